"""Device-side slot planning of one offloaded NOSA layer.

After the selection ``Gamma(t)`` of the query at ``t``, the slots of every (sequence ``b``, KV
head ``h``) must hold exactly ``Gamma(t)`` minus the current block ``t // l'`` (the tail, never in
a slot): NOSI's "keep exactly the current selection" eviction, so the hit rate equals the
selection locality ``|Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|``. :func:`plan_slots` computes, in
one traced computation, which slot keeps which block, where each missing block goes, and the
compacted list of loads; the host reads back only a few int32 counts (:data:`INFO_FIELDS`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Entries of the int32 vector ``info`` returned by :func:`plan_slots`.
INFO_FIELDS = ("loads", "requested", "max_id", "overfull_row", "overfull_count")
INFO_LOADS, INFO_REQUESTED, INFO_MAX_ID, INFO_OVERFULL_ROW, INFO_OVERFULL_COUNT = range(5)


@functools.partial(jax.jit, static_argnames=("pad",))
def plan_slots(gamma, slot_block, current, *, pad: int):
  """The slot assignment of one step and its compacted list of loads.

  Kept blocks stay in their slots, the other slots are emptied, and per row ``(b, h)`` the
  missing ids in ascending order go into the free slots in ascending order. Loads are listed
  row-major over ``(b, h)``, ascending block id within a row. Compiled once per shape
  (``current`` is traced).

  Args:
    gamma: ``[B, H, n]`` int32 block ids (``-1`` padding, duplicates count once).
    slot_block: ``[B, H, NS]`` int32 block id per slot (``-1`` = empty). Not modified.
    current: int32 scalar, the current block (the tail; never put in a slot).
    pad: rows appended after the ``B * H * NS`` possible loads, so that a chunk of up to ``pad``
      rows sliced at any load index never runs past the end (static).

  Returns:
    ``(slot_block [B, H, NS] int32, tail_use [B, H] bool, loads [B * H * NS + pad, 4] int32,
    info [5] int32)``. ``tail_use``: ``current in gamma``. ``loads`` holds the rows ``(b, h,
    block, slot)`` of the missing blocks first (``info[INFO_LOADS]`` of them), zero rows after.
    ``info`` (:data:`INFO_FIELDS`): the load count, the blocks requested besides the current
    one (hits = requested - loads), the largest id in ``gamma`` (``-1`` if none), the first row
    ``b * H + h`` selecting more than ``NS`` blocks besides the current one (``-1`` if none) and
    that row's count. When a row is over-full the other outputs are meaningless (the caller
    refuses the step: :func:`check_info`).
  """
  bsz, heads, num_slots = slot_block.shape
  max_id = jnp.max(gamma, initial=-1).astype(jnp.int32)
  if gamma.shape[-1] == 0:
    gamma = jnp.full((bsz, heads, 1), -1, jnp.int32)
  sel = jnp.sort(gamma.astype(jnp.int32), axis=-1)  # [B, H, n]
  tail_use = jnp.any(sel == current, axis=-1)  # [B, H]
  first = jnp.concatenate(
    [jnp.ones_like(sel[..., :1], bool), sel[..., 1:] != sel[..., :-1]], axis=-1
  )  # first of duplicates
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
  goes = (
    free[..., :, None]
    & missing[..., None, :]
    & (free_rank[..., :, None] == miss_rank[..., None, :])
  )  # [B, H, NS, n]
  new_block = jnp.max(jnp.where(goes, sel[..., None, :], -1), axis=-1)  # [B, H, NS]
  new_slot_block = jnp.where(keep, slot_block, new_block)
  slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
  slot_of = jnp.max(jnp.where(goes, slot_ids[:, None], -1), axis=-2)  # [B, H, n]
  # Compaction: the missing rows, in row-major order, to the front of `loads`.
  seq_ids = jnp.broadcast_to(jnp.arange(bsz, dtype=jnp.int32)[:, None, None], sel.shape)
  head_ids = jnp.broadcast_to(jnp.arange(heads, dtype=jnp.int32)[None, :, None], sel.shape)
  rows = jnp.stack([seq_ids, head_ids, sel, slot_of], axis=-1).reshape(-1, 4)
  is_load = missing.reshape(-1)
  load_index = jnp.cumsum(is_load, dtype=jnp.int32) - 1
  size = bsz * heads * num_slots + pad
  dest = jnp.where(is_load, load_index, size)  # size: dropped
  loads = jnp.zeros((size, 4), jnp.int32).at[dest].set(rows, mode="drop")
  over = (count > num_slots).reshape(-1)
  over_row = jnp.argmax(over).astype(jnp.int32)
  info = jnp.stack(
    [
      jnp.sum(is_load, dtype=jnp.int32),
      jnp.sum(count, dtype=jnp.int32),
      max_id,
      jnp.where(jnp.any(over), over_row, -1),
      count.reshape(-1)[over_row],
    ]
  )
  return new_slot_block, tail_use, loads, info


def refused(info, current):
  """Traced: whether ``info`` (of :func:`plan_slots`) refuses the step (a future block, an
  over-full row); such a step must copy nothing (its rows may name blocks past the store)."""
  return (info[INFO_MAX_ID] > current) | (info[INFO_OVERFULL_ROW] >= 0)


def check_info(info, *, t: int, block_size: int, num_slots: int, heads: int) -> None:
  """Raises the errors of a step's host ``info`` (int32[5] of :func:`plan_slots`) for the query
  at ``t``: a block id after the current block, or a row selecting more than ``num_slots``
  blocks besides the current one (named by ``(b, h)``)."""
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


__all__ = ["INFO_FIELDS", "check_info", "plan_slots", "refused"]
