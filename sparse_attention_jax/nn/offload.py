"""Offloaded KV block cache of one NOSA layer (NOSI's layout, ALGORITHMS.md §4.3).

The full K/V and eviction scores ``c`` of a batch of sequences live in a host block store
(:mod:`sparse_attention_jax.nn.offload_store`): by default ONE contiguous NumPy array per layer,
``kv [B, H, NBmax, l', Dk + Dv]`` (cache dtype) and ``c [B, H, NBmax, l']`` (float32), allocated
once for ``max_len`` tokens (``store="numpy"``); one ``pinned_host`` jax array per block
(``store="pinned_host"``, the earlier layout); or the NumPy store's layout as ONE ``pinned_host``
jax array per layer (``store="pinned_array"``). A transfer moves exactly the blocks it names
(gathered into one buffer, padded by at most 25%). The device holds, per (sequence, KV head):

* ``num_slots`` block slots (``slot_kv [B, H, NS, l', Dk + Dv]``, ``slot_c [B, H, NS, l']``)
  with a block-id map ``slot_block [B, H, NS]`` (``-1`` = empty);
* the tail: the block of the newest token (``tail_kv [B, H, l', Dk + Dv]``), written on the
  device by :meth:`OffloadedBlockCache.append` and copied to the host when it is complete and the
  next token starts a new block. It is never loaded from the host.

A decode step for the query at position ``t = length - 1``::

  cache.append(k_t, v_t, c_t)          # the new token (RoPE'd key), into the tail
  stats = cache.update(gamma)          # Gamma(t) [B, H, n]: keep still-selected blocks, evict
                                       # the rest, load ONLY the missing blocks host -> device
  o = cache.attend(q_t)                # biased attention over the resident slots (+ the tail
                                       # when Gamma(t) holds the current block)

Eviction policy = NOSI's "keep exactly the current selection": after :meth:`update` the slots
hold ``Gamma(t)`` minus the current block, so the hit rate equals the selection locality
``|Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|`` (without the current block). A block that was the tail
and is selected after it completed is loaded from the host once (counted as a transfer).

Loads (``transfer=``): ``"fresh"`` (default) gathers each chunk into a fresh host array and
``device_put`` s it (on GPU PJRT copies pageable memory through its own pinned staging buffer);
``"staged"`` gathers into reused page-aligned host buffers (two per loading thread), registered
for DMA with the client's ``dma_map`` where the backend implements it (GPU: cudaHostRegister), so
the ``device_put`` is one DMA with no staging copy; a buffer is refilled only once its previous
transfer is complete (NumPy store only; ``benchmarks/h2d_transfer.py`` compares the paths).
With ``store="pinned_array"`` (one ``pinned_host`` jax array per layer) there is no host
gather: each chunk is ONE jitted call that gathers its blocks from the host-memory store and
scatters them into the slots (:func:`sparse_attention_jax.nn.offload_store.load_into_slots`),
padded to the same size buckets, so it compiles once per bucket.

The bookkeeping (which block goes to which slot, :func:`assign_slots`) runs vectorized in NumPy
on the host (no Python loop over sequences or heads), so :meth:`update` reads ``gamma`` back
from the device (``plan="host"``, the default). With ``plan="device"`` (``store="pinned_array"``
only) ONE jitted call (:func:`plan_slots_on_device`) computes the same assignment on the device
together with the compacted list of loads; the host reads back only a few int32 counts (the
number of loads among them), and each chunk load slices its rows out of that device list inside
its jitted gather + scatter: no ``gamma`` read-back, no host planning, no host index arrays.
Sequences share one length (no ragged batches) and one document (no segment ids).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import os
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_copy import copy_blocks
from sparse_attention_jax.nn.offload_store import (
  PinnedArrayBlockStore,
  aligned_empty,
  host_memory_kind,
  load_into_slots,
  make_store,
  put_blocks,
  take_kv_c,
  unaliased,
)
from sparse_attention_jax.ops.nosa import biased_masked_attention

# Most blocks one slot scatter writes (a larger refill, e.g. the first step after a prefill of a
# big batch, runs in chunks): the scatter compiles once per size bucket up to this.
MAX_SCATTER = 1024
# Blocks per chunk of a step's load (at most MAX_SCATTER): each chunk is one host gather into a
# fresh buffer, one device_put and one scatter. Small chunks keep those buffers small: on the
# 2-core CPU machine, 1,280 blocks per update (nosa_1b's block size) took 24.5 ms in 1024-block
# chunks on the calling thread and 5.7-6.5 ms in 128- to 512-block chunks
# (``benchmarks/offload_update_cpu.py``), the cost of fresh large allocations.
LOAD_CHUNK = 256
# Per-step counts and host seconds of :meth:`OffloadedBlockCache.update` (summed over steps).
STAT_KEYS = (
  "requested",
  "hits",
  "transferred",
  "bytes",
  "wait_s",
  "plan_s",
  "gather_s",
  "put_s",
  "load_s",
)

# Ways a step's blocks move host -> device (see the module docstring).
TRANSFERS = ("fresh", "staged")
# Where a step's slot assignment is computed: NumPy on the host (reads gamma back), or one jitted
# call on the device (store="pinned_array" only; the host reads back a few counts).
PLANS = ("host", "device")
# Staging buffers per loading thread (transfer="staged"): one is filled while the other's
# transfer is in flight.
STAGING_DEPTH = 2

log = logging.getLogger(__name__)
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_STAGING: dict = {}
_STAGING_LOCK = threading.Lock()
_DMA_MAP_OK: dict[int, bool] = {}


def default_load_workers() -> int:
  """Load workers when not given: a quarter of the CPUs, 1 to 4 (a 16-core host: 4; 2 cores: 1,
  where threads only add contention: ``benchmarks/offload_update_cpu.py``)."""
  return max(1, min(4, (os.cpu_count() or 1) // 4))


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """One shared thread pool per worker count (for every cache and layer)."""
  if workers not in _POOLS:
    _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix="offload-load"
    )
  return _POOLS[workers]


class _Staging:
  """Reused host buffers for one chunk load: ``kv [rows, l', D]``, ``c [rows, l']`` (page
  aligned, DMA-registered when the backend allows: ``pinned``), and ``pending``, the device
  arrays last copied from them."""

  def __init__(self, rows: int, block_size: int, dim: int, dtype, device):
    self.kv = aligned_empty((rows, block_size, dim), dtype)
    self.c = aligned_empty((rows, block_size), np.float32)
    self.kv.fill(0)  # touch every page now, not during a decode step
    self.c.fill(0)
    self.pinned = all(_dma_map(device, x) for x in (self.kv, self.c))
    self.pending = None


def _dma_map(device, buf: np.ndarray) -> bool:
  """Registers ``buf`` for DMA with ``device``'s client (``Client.dma_map``); False (logged once
  per client) where the backend does not implement it (the CPU backend) or the call fails."""
  client = device.client
  if _DMA_MAP_OK.get(id(client)) is False:
    return False
  try:
    client.dma_map(buf.ctypes.data, buf.nbytes)
  except Exception as e:  # noqa: BLE001
    log.info(
      "offload: staging buffers are not DMA-registered on %s (%s): device_put copies "
      "them through PJRT's own staging",
      device.platform,
      str(e).splitlines()[0],
    )
    _DMA_MAP_OK[id(client)] = False
    return False
  _DMA_MAP_OK[id(client)] = True
  return True


def _staging_slot(rows: int, block_size: int, dim: int, dtype, device) -> _Staging:
  """The calling thread's next staging buffers of this shape (a ring of ``STAGING_DEPTH``), once
  the transfer last made from them is complete (a ``device_put`` of a NumPy array may read it
  after returning)."""
  key = (threading.get_ident(), rows, block_size, dim, np.dtype(dtype).str, device)
  with _STAGING_LOCK:
    ring = _STAGING.get(key)
    if ring is None:
      ring = _STAGING[key] = [
        [_Staging(rows, block_size, dim, dtype, device) for _ in range(STAGING_DEPTH)],
        0,
      ]
  bufs, at = ring
  ring[1] = (at + 1) % len(bufs)
  slot = bufs[at]
  if slot.pending is not None:
    jax.block_until_ready(slot.pending)
    slot.pending = None
  return slot


def bucket(n: int) -> int:
  """Padded size of a load of ``n >= 1`` blocks: ``n`` up to 8, else the next ``m * 2^e`` with
  ``m in {4, 5, 6, 7}`` (four sizes per octave: at most 25% padding, ~4 compiled scatters per
  doubling of the largest load)."""
  if n <= 8:
    return 1 << (n - 1).bit_length()
  e = (n - 1).bit_length() - 3  # 2^(e+2) < n <= 2^(e+3)
  return -(-n // (1 << e)) << e


def buckets(most: int) -> list[int]:
  """Every value of :func:`bucket` for loads of ``1 .. most`` blocks, ascending."""
  out, n = [], 1
  while n <= most:
    out.append(bucket(n))
    n = out[-1] + 1
  return out


def _fail(name: str, expected: str, got) -> None:
  raise ValueError(f"{name}: expected {expected}, got {got}")


def assign_slots(gamma: np.ndarray, slot_block: np.ndarray, current: int):
  """Vectorized slot bookkeeping of one step (no Python loop over sequences or heads).

  Args:
    gamma: ``[B, H, n]`` int block ids (``-1`` padding, duplicates count once).
    slot_block: ``[B, H, NS]`` int32 block id per slot (``-1`` = empty); updated in place: the
      slots keep the blocks of ``gamma`` they hold, the others are emptied, and the missing
      blocks go to free slots (per row, the missing ids in ascending order into the free slots in
      ascending order).
    current: the current block (the tail; never put in a slot).

  Returns:
    ``(loads, tail_use, requested, hits)``: ``loads`` = ``(b, h, s, j)`` int arrays ``[N]`` (block
    ``j`` of row ``(b, h)`` goes to slot ``s``), ``tail_use [B, H]`` (``current in gamma``),
    ``requested`` = selected blocks besides the current one, ``hits`` = those already resident.

  Raises:
    ValueError: a row selects more than ``NS`` blocks besides the current one (names the first
      such ``(b, h)``).
  """
  bsz, heads, ns = slot_block.shape
  g = np.asarray(gamma).astype(np.int64)
  if g.shape[-1] == 0:
    g = np.full((bsz, heads, 1), -1, np.int64)
  g = np.sort(g, axis=-1)  # [B, H, n]
  tail_use = np.any(g == current, axis=-1)
  dup = np.zeros_like(g, dtype=bool)
  dup[..., 1:] = g[..., 1:] == g[..., :-1]
  want = (g >= 0) & (g != current) & ~dup  # [B, H, n]
  count = want.sum(-1)
  if count.max(initial=0) > ns:
    bi, hi = (int(x) for x in np.argwhere(count > ns)[0])
    _fail(
      "gamma",
      f"at most num_slots={ns} selected blocks besides the current block per (sequence, KV head)",
      f"{int(count[bi, hi])} at (b={bi}, h={hi}); build the cache with more slots",
    )
  # Row-tagged keys: row r's block j -> r * stride + j. Rows of g are sorted, so the flat keys are
  # sorted and one searchsorted finds every slot's block among its row's selection.
  stride = max(int(g.max(initial=0)), int(slot_block.max(initial=0)), current) + 2
  rows = np.arange(bsz * heads, dtype=np.int64).reshape(bsz, heads, 1) * stride
  want_keys = (np.maximum(g, -1) + rows).reshape(-1)  # sorted
  slot_keys = np.where(slot_block >= 0, slot_block.astype(np.int64) + rows, -2).reshape(-1)
  at = np.minimum(np.searchsorted(want_keys, slot_keys), want_keys.size - 1)
  keep = (want_keys[at] == slot_keys) & want.reshape(-1)[at]  # first of duplicates
  hit = np.zeros(want_keys.size, bool)
  hit[at[keep]] = True
  missing = want & ~hit.reshape(want.shape)  # [B, H, n]
  keep = keep.reshape(slot_block.shape)  # [B, H, NS]
  slot_block[~keep] = -1
  # The r-th missing block of a row (ascending ids) goes to the row's r-th free slot.
  free = ~keep
  free_rank = np.cumsum(free, axis=-1) - 1
  fb, fh, fs = np.nonzero(free)
  slot_of_rank = np.empty((bsz, heads, ns), np.int64)
  slot_of_rank[fb, fh, free_rank[fb, fh, fs]] = fs
  mb, mh, mi = np.nonzero(missing)
  rank = (np.cumsum(missing, axis=-1) - 1)[mb, mh, mi]
  ms = slot_of_rank[mb, mh, rank]
  mj = g[mb, mh, mi]
  slot_block[mb, mh, ms] = mj
  requested = int(count.sum())
  return (mb, mh, ms, mj), tail_use, requested, requested - len(mb)


# Entries of the int32 vector ``info`` returned by :func:`plan_slots_on_device`.
INFO_LOADS, INFO_REQUESTED, INFO_MAX_ID, INFO_OVERFULL_ROW, INFO_OVERFULL_COUNT = range(5)


@functools.partial(jax.jit, static_argnames=("pad",))
def plan_slots_on_device(gamma, slot_block, current, *, pad: int):
  """:func:`assign_slots` computed on the device, plus the compacted list of loads.

  The same slot assignment as :func:`assign_slots` (kept blocks stay in their slots, the other
  slots are emptied, per row the missing ids in ascending order go into the free slots in
  ascending order), the same ``tail_use`` and counts, and the loads in the same order (row-major
  over ``(b, h)``, ascending block id within a row). Compiled once per shape (``current`` is
  traced).

  Args:
    gamma: ``[B, H, n]`` int32 block ids (``-1`` padding, duplicates count once).
    slot_block: ``[B, H, NS]`` int32 block id per slot (``-1`` = empty). Not modified.
    current: int32 scalar, the current block (the tail; never put in a slot).
    pad: rows appended after the ``B * H * NS`` possible loads, so that a chunk of up to ``pad``
      rows sliced at any load index never runs past the end (static).

  Returns:
    ``(slot_block [B, H, NS] int32, tail_use [B, H] bool, loads [B * H * NS + pad, 4] int32,
    info [5] int32)``. ``loads`` holds the rows ``(b, h, block, slot)`` of the missing blocks
    first (``info[INFO_LOADS]`` of them), zero rows after. ``info``: the load count, the blocks
    requested besides the current one (hits = requested - loads), the largest id in ``gamma``
    (``-1`` if none), the first row ``b * H + h`` selecting more than ``NS`` blocks besides the
    current one (``-1`` if none) and that row's count. When a row is over-full the other
    outputs are meaningless (the caller refuses the step).
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


def _scatter(slot_kv, slot_c, b, h, s, kv, c):
  """Writes blocks ``kv [N, l', Dk+Dv]``, ``c [N, l']`` (or lists of N ``[l', Dk+Dv]`` / ``[l']``)
  into slots ``(b, h, s)`` (``[N]`` int32 each)."""
  if isinstance(kv, (list, tuple)):
    kv, c = jnp.stack(kv), jnp.stack(c)
  return slot_kv.at[b, h, s].set(kv), slot_c.at[b, h, s].set(c)


def _write_token(tail_kv, tail_c, offset, kv, c):
  """Token ``kv [B, H, Dk+Dv]``, ``c [B, H]`` into the tail at ``offset``."""
  return tail_kv.at[:, :, offset].set(kv.astype(tail_kv.dtype)), tail_c.at[:, :, offset].set(c)


@functools.cache
def _updaters(donate: bool):
  """Jitted ``(_scatter, _write_token)``, updating the pool in place when ``donate`` (the CPU
  backend cannot donate buffers)."""
  d = (0, 1) if donate else ()
  return jax.jit(_scatter, donate_argnums=d), jax.jit(_write_token, donate_argnums=d)


def _chunk_rows(chunk) -> tuple[np.ndarray, np.ndarray]:
  """``(src, dst)`` ``[size, 3]`` int32 rows ``(b, h, j)`` / ``(b, h, s)`` of a chunk ``(b, h, s,
  j)`` of ``n`` loads, padded to ``size = bucket(n)`` with repeats of the first load."""
  n = len(chunk[0])
  idx = np.empty((bucket(n), 4), np.int32)
  idx[:n] = np.stack(chunk, axis=1)
  idx[n:] = idx[:1]
  return idx[:, [0, 1, 3]], idx[:, :3]


def _put_split(slot_kv, slot_c, kv, c, dst):
  return put_blocks(slot_kv, dst, kv), put_blocks(slot_c, dst, c)


@functools.cache
def _array_loader(donate: bool, host: bool, fused: bool):
  """The jitted chunk load of ``store="pinned_array"``: ``(store_kv, store_c, slot_kv, slot_c,
  src, dst) -> (slot_kv, slot_c)``. ``fused``: one call (gather from the host store and slot
  scatter); else a jitted gather and a jitted scatter (fallback). Slots donated when
  ``donate``."""
  d = (2, 3) if donate else ()
  if fused:
    return jax.jit(functools.partial(load_into_slots, host=host), donate_argnums=d)
  take = jax.jit(functools.partial(take_kv_c, host=host))
  put = jax.jit(_put_split, donate_argnums=(0, 1) if donate else ())

  def split(store_kv, store_c, slot_kv, slot_c, src, dst):
    kv, c = take(store_kv, store_c, src)
    return put(slot_kv, slot_c, kv, c, dst)

  split._cache_size = lambda: take._cache_size() + put._cache_size()
  return split


def _chunk_of_loads(loads, at, valid, *, size: int):
  """Rows ``at .. at + size - 1`` of ``loads [L, 4]`` (``(b, h, block, slot)``, from
  :func:`plan_slots_on_device`), the rows from ``valid`` on replaced by the chunk's first row
  (as :func:`_chunk_rows` pads): ``(src [size, 3] (b, h, block), dst [size, 3] (b, h, slot))``."""
  rows = jax.lax.dynamic_slice_in_dim(loads, at, size, axis=0)  # [size, 4]
  rows = jnp.where((jnp.arange(size) < valid)[:, None], rows, rows[:1])
  return rows[:, :3], jnp.stack([rows[:, 0], rows[:, 1], rows[:, 3]], axis=1)


def _load_planned_chunk(
  store_kv, store_c, slot_kv, slot_c, loads, at, valid, *, size: int, host: bool
):
  src, dst = _chunk_of_loads(loads, at, valid, size=size)
  return load_into_slots(store_kv, store_c, slot_kv, slot_c, src, dst, host=host)


@functools.cache
def _planned_loader(donate: bool, host: bool):
  """The jitted chunk load of ``plan="device"``: ``(store_kv, store_c, slot_kv, slot_c, loads,
  at, valid, *, size) -> (slot_kv, slot_c)``: slices the chunk's rows out of the device-resident
  ``loads`` and gathers + scatters them (:func:`load_into_slots`) in ONE call, compiled once per
  ``size`` (a :func:`bucket`). Slots donated when ``donate``."""
  return jax.jit(
    functools.partial(_load_planned_chunk, host=host),
    static_argnames=("size",),
    donate_argnums=(2, 3) if donate else (),
  )


# Fallback of the planned load: the chunk's rows as device arrays, then the store's jitted load.
_chunk_of_loads_jit = jax.jit(_chunk_of_loads, static_argnames=("size",))


def step_sizes(chunk: int) -> tuple[int, ...]:
  """Gather sizes of :func:`load_planned`: the powers of two and their 1.5 multiples from 8 up to
  ``chunk`` (``chunk`` itself last): at most ~50% padding per iteration, one compiled branch each."""
  out, n = [], 8
  while n < chunk:
    out += [n] + ([n * 3 // 2] if n * 3 // 2 < chunk else [])
    n *= 2
  return tuple(out + [chunk])


def load_planned(store_kv, store_c, slot_kv, slot_c, loads, n, *, chunk: int, host: bool):
  """Loads the ``n`` (traced) blocks listed first in ``loads`` (from :func:`plan_slots_on_device`
  with ``pad >= chunk``) into the slots, inside one traced computation (no host round trip).

  A ``lax.while_loop`` takes up to ``chunk`` rows per iteration; a ``lax.switch`` picks the
  smallest of :func:`step_sizes` holding them, and that branch gathers from the host store and
  scatters into the slots (:func:`load_into_slots`; padding rows repeat the chunk's first row, as
  the host path pads). A step with no missing block runs no iteration. Returns ``(slot_kv,
  slot_c)``."""
  sizes = step_sizes(chunk)

  def branch(size):
    def run(skv, sc, at, valid):
      src, dst = _chunk_of_loads(loads, at, valid, size=size)
      return load_into_slots(store_kv, store_c, skv, sc, src, dst, host=host)

    return run

  def body(carry):
    at, skv, sc = carry
    valid = jnp.minimum(n - at, chunk)
    which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), valid).astype(jnp.int32)
    skv, sc = jax.lax.switch(which, [branch(s) for s in sizes], skv, sc, at, valid)
    return at + valid, skv, sc

  _, slot_kv, slot_c = jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), slot_kv, slot_c))
  return slot_kv, slot_c


class LayerState(NamedTuple):
  """The device state of one offloaded layer, as :func:`layer_step` reads and returns it (the
  arrays of :class:`OffloadedBlockCache` with ``plan="device"``)."""

  slot_kv: jax.Array  # [B, H, NS, l', Dk + Dv]
  slot_c: jax.Array  # [B, H, NS, l'] float32
  slot_block: jax.Array  # [B, H, NS] int32, -1 = empty
  tail_kv: jax.Array  # [B, H, l', Dk + Dv]
  tail_c: jax.Array  # [B, H, l'] float32
  tail_use: jax.Array  # [B, H] bool


# How layer_step moves a step's missing blocks: "kernel" (a Pallas kernel reading the store
# where it is, zero copy; pallas_kernels.block_copy) or "xla" (XLA's gather on the host store,
# run as host compute, in a while loop of chunks).
COPIES = ("kernel", "xla")


def layer_step(
  state: LayerState,
  store_kv,
  store_c,
  kv_t,
  c_t,
  gamma,
  q,
  t,
  *,
  chunk: int,
  k_dim: int,
  scale: float,
  host: bool,
  copy: str = "kernel",
):
  """One decode step of one offloaded layer as ONE traced computation: :meth:`OffloadedBlockCache
  .append` (without the block roll-over, done by the caller between steps), ``update`` with
  ``plan="device"`` and ``attend``, on the same arrays with the same results.

  Args:
    state: the layer's :class:`LayerState`.
    store_kv, store_c: the :class:`~sparse_attention_jax.nn.offload_store.PinnedArrayBlockStore`
      arrays (read only).
    kv_t: ``[B, H, Dk + Dv]`` the new token's RoPE'd key and value; ``c_t [B, H]`` its eviction
      score.
    gamma: ``[B, H, n]`` int32 selection of the query at ``t``.
    q: ``[B, HQ, Dk]``.
    t: int32 scalar, the new token's position (its block is the tail).
    chunk: most blocks one load iteration gathers (static; ``copy="xla"``); ``host``: the store
      is in host memory.
    copy: one of :data:`COPIES`: ``"kernel"`` (:func:`pallas_kernels.block_copy.copy_blocks`,
      one program per possible load, interpreted on CPU) or ``"xla"`` (:func:`load_planned`).

  Returns:
    ``(o [B, HQ, Dv], state, info)``: ``info`` is :func:`plan_slots_on_device`'s int32[5].
  """
  bs = state.tail_kv.shape[2]
  tail_kv = state.tail_kv.at[:, :, t % bs].set(kv_t.astype(state.tail_kv.dtype))
  tail_c = state.tail_c.at[:, :, t % bs].set(c_t.astype(jnp.float32))
  slot_block, tail_use, loads, info = plan_slots_on_device(
    gamma.astype(jnp.int32), state.slot_block, t // bs, pad=chunk
  )
  # A refused selection (a future block, an over-full row; the caller raises from `info`) copies
  # nothing: its rows may name blocks past the store or slot -1.
  refused = (info[INFO_MAX_ID] > t // bs) | (info[INFO_OVERFULL_ROW] >= 0)
  n = jnp.where(refused, 0, info[INFO_LOADS])
  if copy == "kernel":
    most = math.prod(state.slot_block.shape)
    slot_kv, slot_c = copy_blocks(
      store_kv,
      store_c,
      state.slot_kv,
      state.slot_c,
      loads[:most],
      n,
      interpret=jax.default_backend() == "cpu",
    )
  elif copy == "xla":
    slot_kv, slot_c = load_planned(
      store_kv, store_c, state.slot_kv, state.slot_c, loads, n, chunk=chunk, host=host
    )
  else:
    _fail("copy", f"one of {COPIES}", repr(copy))
  o = _attend(
    q,
    slot_kv,
    slot_c,
    slot_block,
    tail_kv,
    tail_c,
    tail_use,
    t,
    k_dim=k_dim,
    block_size=bs,
    scale=scale,
  )
  return o, LayerState(slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use), info


@functools.partial(jax.jit, static_argnames=("k_dim", "block_size", "scale"))
def _attend(
  q,
  slot_kv,
  slot_c,
  slot_block,
  tail_kv,
  tail_c,
  tail_use,
  t,
  *,
  k_dim: int,
  block_size: int,
  scale: float,
):
  """Biased attention of ``q [B, HQ, Dk]`` over the slots and the tail: ``[B, HQ, Dv]``."""
  b, h, ns, bs, _ = slot_kv.shape
  kv = jnp.concatenate([slot_kv.reshape(b, h, ns * bs, -1), tail_kv], axis=2)  # [B,H,S,Dk+Dv]
  c = jnp.concatenate([slot_c.reshape(b, h, ns * bs), tail_c], axis=2)  # [B, H, S]
  offs = jnp.arange(bs, dtype=jnp.int32)
  slot_ok = jnp.repeat(slot_block >= 0, bs, axis=2)  # [B, H, NS*bs]
  tail_pos = (t // block_size) * block_size + offs  # [bs]
  tail_ok = tail_use[:, :, None] & (tail_pos <= t)[None, None, :]  # [B, H, bs]
  mask = jnp.concatenate([slot_ok, tail_ok], axis=2)  # [B, H, S]
  k = jnp.transpose(kv[..., :k_dim], (0, 2, 1, 3))  # [B, S, H, Dk]
  v = jnp.transpose(kv[..., k_dim:], (0, 2, 1, 3))
  bias = jnp.transpose(c, (0, 2, 1))
  o = biased_masked_attention(
    q[:, None], k.astype(q.dtype), v.astype(q.dtype), bias, mask[:, None], scale
  )
  return o[:, 0]


class OffloadedBlockCache:
  """Per-layer NOSA KV cache with host-resident blocks and a device slot pool (see the module
  docstring).

  Args:
    batch: B sequences.
    num_kv_heads: H.
    k_dim, v_dim: Dk, Dv.
    block_size: l'.
    num_slots: NS device slots per (sequence, KV head) for the selected blocks other than the
      current one (``k - 1`` when the forced local blocks include the current block).
    max_len: the most tokens a sequence may hold.
    dtype: cache dtype of K/V (``c`` is kept in float32).
    device: the accelerator (default ``jax.devices()[0]``).
    store: the host block store: ``"numpy"`` (one contiguous NumPy array per layer, allocated
      for ``max_len`` tokens), ``"pinned_host"`` (one jax array per block in pinned host
      memory) or ``"pinned_array"`` (one pinned host jax array per layer, loaded by one jitted
      gather + slot scatter per chunk); :mod:`sparse_attention_jax.nn.offload_store`.
    load_workers: threads that gather and ``device_put`` the chunks of a step's load side by
      side (host copies overlap; the slot scatters stay in order on the calling thread); 1 =
      everything on the calling thread; None = :func:`default_load_workers`. Unused by
      ``store="pinned_array"`` (its loads are jitted calls dispatched by the calling thread).
    transfer: how a chunk moves (one of :data:`TRANSFERS`): ``"fresh"`` (a fresh host array per
      chunk) or ``"staged"`` (reused, DMA-registered staging buffers; ``store="numpy"`` only).
      Both fill the slots with the same bytes.
    plan: where :meth:`update` computes the slot assignment (one of :data:`PLANS`): ``"host"``
      (:func:`assign_slots` in NumPy after reading ``gamma`` back) or ``"device"``
      (:func:`plan_slots_on_device`, one jitted call; ``store="pinned_array"`` only; then
      ``slot_block`` and ``tail_use`` are device arrays). Both give the same slots, counts and
      slot bytes.
  """

  def __init__(
    self,
    *,
    batch: int,
    num_kv_heads: int,
    k_dim: int,
    v_dim: int,
    block_size: int,
    num_slots: int,
    max_len: int,
    dtype=jnp.float32,
    device=None,
    store: str = "numpy",
    load_workers: int | None = None,
    transfer: str = "fresh",
    plan: str = "host",
  ):
    if transfer not in TRANSFERS:
      _fail("transfer", f"one of {TRANSFERS}", repr(transfer))
    if transfer == "staged" and store != "numpy":
      _fail(
        "transfer",
        "'fresh' with a store other than 'numpy' (staging gathers from the NumPy store)",
        f"'staged' with store={store!r}",
      )
    if plan not in PLANS:
      _fail("plan", f"one of {PLANS}", repr(plan))
    if plan == "device" and store != "pinned_array":
      _fail(
        "plan",
        "'host' with a store other than 'pinned_array' (the device plan's loads "
        "gather from the pinned_array store)",
        f"'device' with store={store!r}",
      )
    load_workers = default_load_workers() if load_workers is None else load_workers
    for name, val in (
      ("batch", batch),
      ("num_kv_heads", num_kv_heads),
      ("k_dim", k_dim),
      ("v_dim", v_dim),
      ("block_size", block_size),
      ("num_slots", num_slots),
      ("max_len", max_len),
      ("load_workers", load_workers),
    ):
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        _fail(name, "a positive int", repr(val))
    self.batch, self.heads, self.k_dim, self.v_dim = batch, num_kv_heads, k_dim, v_dim
    self.block_size, self.num_slots, self.max_len = block_size, num_slots, max_len
    self.load_workers, self.transfer, self.plan = load_workers, transfer, plan
    self.dtype = jnp.dtype(dtype)
    self.device = jax.devices()[0] if device is None else device
    d = k_dim + v_dim
    self.store = make_store(
      store,
      batch=batch,
      heads=num_kv_heads,
      num_blocks=-(-max_len // block_size),
      block_size=block_size,
      dim=d,
      dtype=self.dtype,
      device=self.device,
    )
    self._dev = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
    zeros = functools.partial(jax.device_put, device=self._dev)
    self.slot_kv = zeros(jnp.zeros((batch, num_kv_heads, num_slots, block_size, d), self.dtype))
    self.slot_c = zeros(jnp.zeros((batch, num_kv_heads, num_slots, block_size), jnp.float32))
    # plan="host": NumPy arrays updated on the host; plan="device": device arrays (never read
    # back by the cache).
    self.slot_block = np.full((batch, num_kv_heads, num_slots), -1, np.int32)
    self.tail_kv = zeros(jnp.zeros((batch, num_kv_heads, block_size, d), self.dtype))
    self.tail_c = zeros(jnp.zeros((batch, num_kv_heads, block_size), jnp.float32))
    self.tail_use = np.zeros((batch, num_kv_heads), bool)
    if plan == "device":
      self.slot_block, self.tail_use = jax.device_put((self.slot_block, self.tail_use), self._dev)
      self._no_tail = self.tail_use  # all False, reused when a block completes
    self._scatter, self._write_token = _updaters(self.device.platform != "cpu")
    self._array_load = None  # store="pinned_array": the jitted chunk load
    self._array_fused = True
    if isinstance(self.store, PinnedArrayBlockStore):
      self._array_load = _array_loader(self.device.platform != "cpu", self.store.host, True)
    self._planned_load = None  # plan="device": the jitted sliced chunk load
    self._planned_fused = True
    if plan == "device":
      self._planned_load = _planned_loader(self.device.platform != "cpu", self.store.host)
    self.length = 0
    self.totals = {"steps": 0, **{key: 0 for key in STAT_KEYS}}

  # ------------------------------------------------------------------------------ sizes
  @property
  def host_memory_kind(self) -> str:
    """Where the host store's blocks are, from what it holds: ``"numpy"``, ``"pinned_host"`` or
    (pinned store without pinned host memory) ``"device"``."""
    return self.store.memory_kind

  @property
  def host_bytes(self) -> int:
    """Bytes of the host store (the NumPy store: its full ``max_len`` capacity)."""
    return self.store.nbytes

  @property
  def block_bytes(self) -> int:
    """Bytes of one block of one KV head moved host -> device (K, V and float32 ``c``)."""
    return self.block_size * ((self.k_dim + self.v_dim) * self.dtype.itemsize + 4)

  @property
  def current_block(self) -> int:
    """Block of the newest token (the tail)."""
    return (self.length - 1) // self.block_size

  def host_block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Host copy of the stored block ``j`` of sequence ``b``, KV head ``h``: ``(kv [l', Dk+Dv],
    c [l'])``."""
    return self.store.block(b, h, j)

  # ------------------------------------------------------------------------------ writes
  def prefill(self, k, v, c) -> None:
    """Stores a prompt: ``k [B, T, H, Dk]`` (RoPE'd), ``v [B, T, H, Dv]``, ``c [B, T, H]``.

    Blocks before the last token's block go to the host; the last token's block is the tail.
    """
    if self.length:
      _fail("prefill", "an empty cache", f"length {self.length}")
    b, h = self.batch, self.heads
    t = k.shape[1] if k.ndim == 4 else -1
    if k.shape != (b, t, h, self.k_dim) or v.shape != (b, t, h, self.v_dim) or c.shape != (b, t, h):
      _fail(
        "k/v/c",
        f"shapes [B, T, H, Dk] = {(b, 'T', h, self.k_dim)}, [B, T, H, Dv] and [B, T, H]",
        f"{k.shape}, {v.shape}, {c.shape}",
      )
    if not 1 <= t <= self.max_len:
      _fail("k.shape[1]", f"1 <= T <= max_len={self.max_len}", t)
    bs = self.block_size
    cur = (t - 1) // bs
    pad = (cur + 1) * bs - t
    kv = jnp.concatenate([k.astype(self.dtype), v.astype(self.dtype)], axis=-1)
    kv = jnp.pad(kv, ((0, 0), (0, pad), (0, 0), (0, 0)))
    cc = jnp.pad(c.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    kv = jnp.transpose(kv.reshape(b, cur + 1, bs, h, -1), (0, 3, 1, 2, 4))  # [B, H, NB, l', D]
    cc = jnp.transpose(cc.reshape(b, cur + 1, bs, h), (0, 3, 1, 2))  # [B, H, NB, l']
    if cur:
      self.store.write(0, kv[:, :, :cur], cc[:, :, :cur])
    self.tail_kv = jax.device_put(kv[:, :, cur], self._dev)
    self.tail_c = jax.device_put(cc[:, :, cur], self._dev)
    self.length = t

  def append(self, k_t, v_t, c_t) -> None:
    """Appends one token to every sequence: ``k_t [B, H, Dk]``, ``v_t [B, H, Dv]``, ``c_t [B, H]``.

    When the token starts a new block, the complete tail goes to the host first (one copy of
    every sequence's and head's tail).
    """
    b, h = self.batch, self.heads
    if k_t.shape != (b, h, self.k_dim) or v_t.shape != (b, h, self.v_dim) or c_t.shape != (b, h):
      _fail(
        "k_t/v_t/c_t",
        f"shapes {(b, h, self.k_dim)}, {(b, h, self.v_dim)}, {(b, h)}",
        f"{k_t.shape}, {v_t.shape}, {c_t.shape}",
      )
    if self.length >= self.max_len:
      _fail("append", f"at most max_len={self.max_len} tokens", f"token {self.length + 1}")
    pos, bs = self.length, self.block_size
    self.roll_over()
    kv = jnp.concatenate([k_t.astype(self.dtype), v_t.astype(self.dtype)], axis=-1)
    self.tail_kv, self.tail_c = self._write_token(
      self.tail_kv, self.tail_c, pos % bs, kv, c_t.astype(jnp.float32)
    )
    self.length = pos + 1

  def roll_over(self) -> None:
    """When the next token starts a new block (``length`` a positive multiple of ``l'``), copies
    the complete tail of every sequence and head to the host store (one jitted write) and
    empties the tail; otherwise nothing. :meth:`append` calls it; a caller running
    :func:`layer_step` itself calls it before each step."""
    pos, bs = self.length, self.block_size
    if pos and pos % bs == 0:
      self.store.write(pos // bs - 1, self.tail_kv[:, :, None], self.tail_c[:, :, None])
      self.tail_kv = jnp.zeros_like(self.tail_kv)
      self.tail_c = jnp.zeros_like(self.tail_c)
      if self.plan == "device":
        self.tail_use = self._no_tail
      else:
        self.tail_use[:] = False

  # ---------------------------------------------------- a step traced by the caller
  def device_state(self) -> LayerState:
    """The arrays :func:`layer_step` reads (``plan="device"`` only)."""
    if self.plan != "device":
      _fail(
        "plan", "'device' for device_state (the slot map must be a device array)", repr(self.plan)
      )
    return LayerState(
      self.slot_kv, self.slot_c, self.slot_block, self.tail_kv, self.tail_c, self.tail_use
    )

  def commit(self, state: LayerState, info, **seconds) -> dict:
    """Takes the result of a :func:`layer_step` the caller ran for the token at ``t = length``
    (after :meth:`roll_over`): :meth:`adopt` then :meth:`account` (``info`` read back)."""
    return self.account(info, t=self.adopt(state), **seconds)

  def adopt(self, state: LayerState) -> int:
    """The new arrays of a :func:`layer_step` the caller ran for the token at ``t = length``
    (after :meth:`roll_over`), and one more token. Returns ``t``. Nothing waits for the
    device."""
    self.slot_kv, self.slot_c, self.slot_block, self.tail_kv, self.tail_c, self.tail_use = state
    self.length += 1
    return self.length - 1

  def account(self, info, *, t: int, **seconds) -> dict:
    """The stats of the step of token ``t`` from its ``info`` (host int32[5] of
    :func:`layer_step`), also added to ``self.totals``; ``seconds``: the host seconds of
    :data:`STAT_KEYS` (0 if not given). Raises the errors :meth:`update` raises; after such an
    error the cache's slots are meaningless (the step already ran)."""
    self._check_info(info, t)
    n, requested = int(info[INFO_LOADS]), int(info[INFO_REQUESTED])
    return self._record(requested, n, **{key: seconds.get(key, 0.0) for key in STAT_KEYS[4:]})

  def _check_info(self, info, t: int | None = None) -> None:
    """The errors of a device plan's ``info`` (see :func:`plan_slots_on_device`) for the query
    at ``t`` (default ``length - 1``)."""
    t = self.length - 1 if t is None else t
    cur = t // self.block_size
    if info[INFO_MAX_ID] > cur:
      _fail(
        "gamma",
        f"block ids <= the current block {cur} (t = {t}, no future blocks)",
        f"max id {int(info[INFO_MAX_ID])}",
      )
    if info[INFO_OVERFULL_ROW] >= 0:
      bi, hi = divmod(int(info[INFO_OVERFULL_ROW]), self.heads)
      _fail(
        "gamma",
        f"at most num_slots={self.num_slots} selected blocks besides the current "
        f"block per (sequence, KV head)",
        f"{int(info[INFO_OVERFULL_COUNT])} at (b={bi}, h={hi}); build the cache with more slots",
      )

  # ------------------------------------------------------------------------------ a step
  def update(self, gamma) -> dict:
    """Makes the slots hold ``Gamma(t)`` for the query at ``t = length - 1``.

    The bookkeeping is :func:`assign_slots` (vectorized NumPy); the missing blocks are loaded in
    chunks of ``LOAD_CHUNK`` blocks, each ONE gather from the host store and ONE ``device_put``
    (on the load workers' threads, side by side when there are several) and ONE jitted scatter
    into the slots (in order; padded to a :func:`bucket` size with repeats of the chunk's first
    write, so the scatter compiles once per bucket, not once per count).

    Args:
      gamma: ``[B, H, n]`` int block ids (``-1`` padding; duplicates count once), e.g. row ``t``
        of ``nosa_select``. Every id must be ``<= t // l'``.

    Returns:
      ``{"requested": selected blocks other than the current one, "hits": those already
      resident, "transferred": blocks copied host -> device, "hit_rate", "bytes": bytes moved
      host -> device}`` summed over the batch and heads (also accumulated in ``self.totals``),
      and the host seconds of the step's parts: ``wait_s`` (reading ``gamma`` back: waits for
      the device work queued before it), ``plan_s`` (:func:`assign_slots`), ``gather_s`` (host
      store gathers) and ``put_s`` (``device_put`` calls), both summed over the load workers
      (``store="pinned_array"``: building the index arrays, and dispatching the jitted
      gather + scatter calls), and ``load_s`` (wall time of the whole load: gathers, puts and
      slot scatters).
      Padding writes are not counted. With ``plan="device"`` the counts are the same;
      ``plan_s`` is the host time of dispatching :func:`plan_slots_on_device`, ``wait_s`` that
      of reading its counts back (the step's only wait for the device), ``gather_s`` is 0 (no
      host index arrays) and ``put_s`` the dispatch of the jitted sliced chunk loads.
    """
    if self.length == 0:
      _fail("update", "a cache holding tokens (prefill/append first)", "an empty cache")
    if self.plan == "device":
      return self._update_planned_on_device(gamma)
    t0 = time.perf_counter()
    g = np.asarray(gamma)  # waits for the device's selection
    t1 = time.perf_counter()
    if g.ndim != 3 or g.shape[:2] != (self.batch, self.heads):
      _fail("gamma", f"shape [B, H, n] = {(self.batch, self.heads, 'n')}", g.shape)
    cur = self.current_block
    if g.max(initial=-1) > cur:
      _fail(
        "gamma",
        f"block ids <= the current block {cur} (t = {self.length - 1}, no future blocks)",
        f"max id {int(g.max())}",
      )
    slot_block = self.slot_block.copy()  # unchanged if the selection is refused
    loads, tail_use, requested, _ = assign_slots(g, slot_block, cur)
    self.slot_block, self.tail_use = slot_block, tail_use
    n = len(loads[0])
    t2 = time.perf_counter()
    gather_s = put_s = 0.0
    if self._array_load is not None:
      gather_s, put_s = self._load_array(loads, n)
    else:
      for kv, c, b, h, s, dg, dp in self._fetch_all(loads, n):
        self.slot_kv, self.slot_c = self._scatter(self.slot_kv, self.slot_c, b, h, s, kv, c)
        gather_s, put_s = gather_s + dg, put_s + dp
    return self._record(
      requested,
      n,
      wait_s=t1 - t0,
      plan_s=t2 - t1,
      gather_s=gather_s,
      put_s=put_s,
      load_s=time.perf_counter() - t2,
    )

  def _record(self, requested: int, n: int, **seconds) -> dict:
    """The stats of one :meth:`update` (``requested`` blocks, ``n`` of them loaded; the host
    seconds of its parts), also added to ``self.totals``."""
    hits = requested - n
    stats = {
      "requested": requested,
      "hits": hits,
      "transferred": n,
      "hit_rate": hits / requested if requested else 1.0,
      "bytes": n * self.block_bytes,
      **seconds,
    }
    for key in STAT_KEYS:
      self.totals[key] += stats[key]
    self.totals["steps"] += 1
    return stats

  def _update_planned_on_device(self, gamma) -> dict:
    """:meth:`update` with ``plan="device"``: one jitted :func:`plan_slots_on_device` call, ONE
    read-back of its int32 counts, then one jitted sliced gather + scatter per chunk (nothing
    when no block is missing)."""
    shape = np.shape(gamma)
    if len(shape) != 3 or shape[:2] != (self.batch, self.heads):
      _fail("gamma", f"shape [B, H, n] = {(self.batch, self.heads, 'n')}", shape)
    cur = self.current_block
    size = min(MAX_SCATTER, LOAD_CHUNK)
    t0 = time.perf_counter()
    # Committed to the cache's device (a no-op for the selection already there): jit keys its
    # compilations on whether an argument is committed, which the selection's inputs decide.
    gamma = jax.device_put(jnp.asarray(gamma, jnp.int32), self._dev)
    slot_block, tail_use, loads, info = plan_slots_on_device(
      gamma, self.slot_block, np.int32(cur), pad=bucket(size)
    )
    t1 = time.perf_counter()
    info = np.asarray(jax.device_get(info))  # the step's only wait for the device
    t2 = time.perf_counter()
    n, requested = int(info[INFO_LOADS]), int(info[INFO_REQUESTED])
    self._check_info(info)
    self.slot_block, self.tail_use = slot_block, tail_use
    for at in range(0, n, size):
      valid = min(size, n - at)
      self._run_planned_load(loads, at, valid, bucket(valid))
    t3 = time.perf_counter()  # the loads are only dispatched: put = load
    return self._record(
      requested, n, wait_s=t2 - t1, plan_s=t1 - t0, gather_s=0.0, put_s=t3 - t2, load_s=t3 - t2
    )

  def _run_planned_load(self, loads, at: int, valid: int, size: int) -> None:
    """One chunk of a ``plan="device"`` load: rows ``at .. at + valid - 1`` of the device list
    ``loads``, padded to ``size``, in ONE jitted slice + gather + scatter. If XLA cannot compile
    that, logs it once and from then on slices the rows in a jitted call and loads them with the
    store's jitted load (:meth:`_run_array_load`, itself with its own fallback)."""
    at, valid = np.int32(at), np.int32(valid)
    if self._planned_fused:
      try:
        self.slot_kv, self.slot_c = self._planned_load(
          self.store.kv, self.store.c, self.slot_kv, self.slot_c, loads, at, valid, size=size
        )
        return
      except Exception as e:  # noqa: BLE001 (logged)
        log.warning(
          "offload: the fused plan='device' load does not compile on %s (%s); "
          "slicing its rows in a separate call",
          self.device.platform,
          str(e).splitlines()[0],
        )
        self._planned_fused = False
    src, dst = _chunk_of_loads_jit(loads, at, valid, size=size)
    self._run_array_load(src, dst)

  def _load_array(self, loads, n: int) -> tuple[float, float]:
    """``store="pinned_array"``: each chunk (``LOAD_CHUNK`` blocks, padded to a :func:`bucket`
    size with repeats of its first write) is ONE jitted gather from the host store + scatter
    into the slots. Returns the host seconds spent building the index arrays and dispatching
    the calls (the copies themselves run asynchronously)."""
    size = min(MAX_SCATTER, LOAD_CHUNK)
    index_s = call_s = 0.0
    for at in range(0, n, size):
      t0 = time.perf_counter()
      src, dst = _chunk_rows([x[at : at + size] for x in loads])
      t1 = time.perf_counter()
      self._run_array_load(src, dst)
      index_s, call_s = index_s + t1 - t0, call_s + time.perf_counter() - t1
    return index_s, call_s

  def _run_array_load(self, src, dst) -> None:
    """One chunk of :meth:`_load_array`; if XLA cannot compile the fused gather + scatter, logs
    it once and uses a jitted gather then the jitted slot scatter from then on."""
    try:
      self.slot_kv, self.slot_c = self._array_load(
        self.store.kv, self.store.c, self.slot_kv, self.slot_c, src, dst
      )
      return
    except Exception as e:
      if not self._array_fused:
        raise
      log.warning(
        "offload: the fused pinned_array load does not compile on %s (%s); using "
        "a separate gather and scatter",
        self.device.platform,
        str(e).splitlines()[0],
      )
    self._array_fused = False
    self._array_load = _array_loader(self.device.platform != "cpu", self.store.host, False)
    self.slot_kv, self.slot_c = self._array_load(
      self.store.kv, self.store.c, self.slot_kv, self.slot_c, src, dst
    )

  def _fetch_all(self, loads, n: int):
    """Yields :meth:`_fetch` of every chunk (``LOAD_CHUNK`` blocks) of ``loads`` (``(b, h, s,
    j)`` arrays of ``n`` blocks) in order; with ``load_workers > 1`` the chunks are fetched by
    the shared thread pool while the caller scatters the ones already fetched."""
    size = min(MAX_SCATTER, LOAD_CHUNK)
    chunks = [[x[at : at + size] for x in loads] for at in range(0, n, size)]
    if self.load_workers == 1 or len(chunks) < 2:
      yield from map(self._fetch, chunks)
      return
    futures = [_pool(self.load_workers).submit(self._fetch, chunk) for chunk in chunks]
    for future in futures:
      yield future.result()

  def _fetch(self, chunk):
    """Blocks ``j`` of rows ``(b, h)`` for slots ``s`` (``chunk = (b, h, s, j)``), padded to a
    :func:`bucket` size with repeats of the first write, on the device: ``(kv, c, b, h, s)`` and
    the host seconds of the gather and of the ``device_put``."""
    n = len(chunk[0])
    size = bucket(n)
    idx = np.empty((4, size), np.int32)
    idx[:, :n] = chunk
    idx[:, n:] = idx[:, :1]
    t0 = time.perf_counter()
    if self.transfer == "staged":
      slot = _staging_slot(
        bucket(min(MAX_SCATTER, LOAD_CHUNK)),
        self.block_size,
        self.k_dim + self.v_dim,
        self.dtype,
        self.device,
      )
      kv, c = slot.kv[:size], slot.c[:size]
      t0 = time.perf_counter()  # (the wait for the buffer is not a gather)
      self.store.gather_into(idx[0], idx[1], idx[3], kv, c)
      t1 = time.perf_counter()
      out = jax.device_put((kv, c, idx[0], idx[1], idx[2]), self._dev, may_alias=True)
      if self.device.platform == "cpu":  # device memory is host memory: may alias
        out = (unaliased(out[0], slot.kv), unaliased(out[1], slot.c), *out[2:])
      slot.pending = out[:2]
    else:
      kv, c = self.store.gather(idx[0], idx[1], idx[3])
      t1 = time.perf_counter()
      out = jax.device_put((kv, c, idx[0], idx[1], idx[2]), self._dev)
    return (*out, t1 - t0, time.perf_counter() - t1)

  def warm_scatter(self) -> None:
    """Compiles the slot scatter (``store="pinned_array"``: the fused gather + scatter) for
    every :func:`bucket` size up to a full refill (``B * H * num_slots``, at most
    ``MAX_SCATTER``), so no decode step compiles one; writes zero blocks (``pinned_array``: the
    stored block ``(0, 0, 0)``) into the slot ``(0, 0, 0)`` (call it on a cache whose slots are
    still empty)."""
    most = min(self.batch * self.heads * self.num_slots, MAX_SCATTER)
    if self.plan == "device":  # (copies block (0, 0, 0) into the empty slot)
      size = min(MAX_SCATTER, LOAD_CHUNK)
      loads = jax.device_put(
        np.zeros((self.batch * self.heads * self.num_slots + bucket(size), 4), np.int32), self._dev
      )
      for n in buckets(min(most, size)):
        self._run_planned_load(loads, 0, n, n)
      jax.block_until_ready(self.slot_kv)
      return
    for n in buckets(most):
      if self._array_load is not None:  # (copies block (0, 0, 0) into the empty slot)
        self._run_array_load(np.zeros((n, 3), np.int32), np.zeros((n, 3), np.int32))
        continue
      kv, c, idx = jax.device_put((*self.store.zeros(n), np.zeros((n,), np.int32)), self._dev)
      self.slot_kv, self.slot_c = self._scatter(self.slot_kv, self.slot_c, idx, idx, idx, kv, c)
    jax.block_until_ready(self.slot_kv)

  def attend(self, q, *, softmax_scale: float | None = None):
    """Biased attention of the query at ``t = length - 1`` over the resident blocks.

    Args:
      q: ``[B, HQ, Dk]`` (RoPE'd), ``HQ % H == 0``.
      softmax_scale: default ``Dk ** -0.5``.

    Returns:
      ``[B, HQ, Dv]`` in ``q.dtype``: ``sum_j e^{s_j + c_j} v_j / sum_j e^{s_j + c_j}`` over the
      tokens of the slots' blocks and, if selected, the tail's tokens ``<= t``.
    """
    if (
      q.ndim != 3
      or q.shape[0] != self.batch
      or q.shape[2] != self.k_dim
      or (q.shape[1] % self.heads)
    ):
      _fail(
        "q",
        f"shape [B, HQ, Dk] = {(self.batch, 'HQ', self.k_dim)} with H={self.heads} dividing HQ",
        q.shape,
      )
    scale = softmax_scale if softmax_scale is not None else self.k_dim**-0.5
    return _attend(
      q,
      self.slot_kv,
      self.slot_c,
      jnp.asarray(self.slot_block),
      self.tail_kv,
      self.tail_c,
      jnp.asarray(self.tail_use),
      jnp.int32(self.length - 1),
      k_dim=self.k_dim,
      block_size=self.block_size,
      scale=float(scale),
    )


__all__ = [
  "COPIES",
  "MAX_SCATTER",
  "PLANS",
  "STAT_KEYS",
  "TRANSFERS",
  "LayerState",
  "OffloadedBlockCache",
  "assign_slots",
  "bucket",
  "buckets",
  "default_load_workers",
  "host_memory_kind",
  "layer_step",
  "load_planned",
  "plan_slots_on_device",
  "step_sizes",
]
