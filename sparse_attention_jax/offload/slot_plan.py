"""Device-side slot planning of one offloaded NOSA layer.

After the selection ``Gamma(t)`` of the query at ``t``, the slots of every (sequence ``b``, KV
head ``h``) must hold exactly ``Gamma(t)`` minus the current block ``t // l'`` (the tail, never in
a slot): NOSI's "keep exactly the current selection" eviction, so the hit rate equals the
selection locality ``|Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|``. :func:`plan_slots` computes it in
one traced computation; the host reads back only a few int32 counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Entries of the int32[5] ``info`` of :func:`plan_slots`.
INFO_LOADS, INFO_REQUESTED, INFO_MAX_ID, INFO_OVERFULL_ROW, INFO_OVERFULL_COUNT = range(5)


@functools.partial(jax.jit, static_argnames=("pad",))
def plan_slots(gamma, slot_block, current, *, pad: int):
  """The slot assignment of one step and its compacted list of loads: kept blocks stay in their
  slots, the others are emptied, and per row ``(b, h)`` the missing ids in ascending order go to
  the free slots in ascending order.

  Args: ``gamma [B, H, n]`` block ids (``-1`` padding, duplicates count once); ``slot_block [B,
  H, NS]`` (``-1`` = empty); ``current`` (traced), the tail's block, never put in a slot; ``pad``
  (static) zero rows appended to ``loads`` so that a chunk of up to ``pad`` rows sliced at any
  load index stays inside.

  Returns: int32 ``(slot_block [B, H, NS], tail_use [B, H] (current in gamma), loads [B * H * NS
  + pad, 4], info [5])``. ``loads``: the rows ``(b, h, block, slot)`` of the missing blocks
  first, row-major over ``(b, h)``, ascending ids in a row. ``info``: the load count, the blocks
  requested besides the current one (hits = requested - loads), the largest id (``-1`` if none),
  the first row ``b * H + h`` selecting more than ``NS`` blocks besides the current one (``-1``
  if none; then the other outputs are meaningless, :func:`load_count`) and its count.
  """
  bsz, heads, num_slots = slot_block.shape
  max_id = jnp.max(gamma, initial=-1).astype(jnp.int32)
  sel = jnp.sort(gamma.astype(jnp.int32), axis=-1)  # [B, H, n]
  tail_use = jnp.any(sel == current, axis=-1)  # [B, H]
  first = jnp.diff(sel, axis=-1, prepend=-2) != 0  # first of duplicates (ids >= -1)
  want = (sel >= 0) & (sel != current) & first  # [B, H, n]
  count = jnp.sum(want, axis=-1, dtype=jnp.int32)  # [B, H]
  # slot_holds[b, h, s, i]: slot s already holds the wanted block sel[b, h, i].
  slot_holds = (slot_block[..., :, None] == sel[..., None, :]) & want[..., None, :]
  keep = jnp.any(slot_holds, axis=-1)  # [B, H, NS]
  missing = want & ~jnp.any(slot_holds, axis=-2)  # [B, H, n]
  free = ~keep
  free_rank = jnp.cumsum(free, axis=-1, dtype=jnp.int32) - 1  # [B, H, NS]
  miss_rank = jnp.cumsum(missing, axis=-1, dtype=jnp.int32) - 1  # [B, H, n]
  # goes[b, h, s, i]: the r-th missing block of the row goes to its r-th free slot.
  same_rank = free_rank[..., :, None] == miss_rank[..., None, :]
  goes = free[..., :, None] & missing[..., None, :] & same_rank  # [B, H, NS, n]
  new_block = jnp.max(jnp.where(goes, sel[..., None, :], -1), axis=-1, initial=-1)  # [B, H, NS]
  new_slot_block = jnp.where(keep, slot_block, new_block)
  slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
  slot_of = jnp.max(jnp.where(goes, slot_ids[:, None], -1), axis=-2)  # [B, H, n]
  # Compaction: the missing rows, in row-major order, to the front of `loads`.
  idx = jnp.indices(sel.shape, jnp.int32)  # [3, B, H, n]
  rows = jnp.stack([idx[0], idx[1], sel, slot_of], axis=-1).reshape(-1, 4)
  is_load = missing.reshape(-1)
  size = bsz * heads * num_slots + pad
  dest = jnp.where(is_load, jnp.cumsum(is_load, dtype=jnp.int32) - 1, size)  # size: dropped
  loads = jnp.zeros((size, 4), jnp.int32).at[dest].set(rows, mode="drop")
  over = (count > num_slots).reshape(-1)
  at = jnp.argmax(over)
  info = (jnp.sum(is_load), jnp.sum(count), max_id, jnp.where(over[at], at, -1), count.ravel()[at])
  return new_slot_block, tail_use, loads, jnp.stack(info).astype(jnp.int32)


def load_count(info, current):
  """Traced: the step's loads, 0 if ``info`` refuses it (a future block, an over-full row: its
  rows may name blocks past the store)."""
  bad = (info[INFO_MAX_ID] > current) | (info[INFO_OVERFULL_ROW] >= 0)
  return jnp.where(bad, 0, info[INFO_LOADS])


def check_info(info, t: int, block_size: int, num_slots: int, heads: int) -> tuple[int, int]:
  """Raises the errors of the host ``info`` of the step at ``t`` (a block after the current one,
  a row ``(b, h)`` selecting more than ``num_slots`` blocks besides the current one); returns
  ``(loads, requested)``."""
  cur = t // block_size
  if info[INFO_MAX_ID] > cur:
    raise ValueError(
      f"gamma: expected block ids <= the current block {cur} (t = {t}, no future blocks), "
      f"got max id {int(info[INFO_MAX_ID])}"
    )
  if info[INFO_OVERFULL_ROW] >= 0:
    bi, hi = divmod(int(info[INFO_OVERFULL_ROW]), heads)
    raise ValueError(
      f"gamma: expected at most num_slots={num_slots} selected blocks besides the current "
      f"block per (sequence, KV head), got {int(info[INFO_OVERFULL_COUNT])} at (b={bi}, "
      f"h={hi}); build the cache with more slots"
    )
  return int(info[INFO_LOADS]), int(info[INFO_REQUESTED])
