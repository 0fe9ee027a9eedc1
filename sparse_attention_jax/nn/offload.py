"""Offloaded KV block cache of one NOSA layer (NOSI's layout, ALGORITHMS.md §4.3).

The full K/V and eviction scores ``c`` of a batch of sequences live in host memory, one array per
(sequence, KV head, block): ``kv [l', Dk + Dv]`` (cache dtype) and ``c [l']`` (float32), placed
with ``memory_kind="pinned_host"`` (falls back to device memory, with a log line, where the
backend has no pinned host memory). Because every block is its own array, a transfer moves
exactly the blocks it names. The device holds, per (sequence, KV head):

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

The bookkeeping (which block goes to which slot) runs in NumPy on the host, so :meth:`update`
reads ``gamma`` back from the device. Sequences share one length (no ragged batches) and one
document (no segment ids).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.ops.nosa import biased_masked_attention

log = logging.getLogger(__name__)

# Most blocks one slot scatter writes (a larger refill, e.g. the first step after a prefill of a
# big batch, runs in chunks): the scatter compiles once per power of two up to this.
MAX_SCATTER = 1024


def host_memory_kind(device) -> str:
  """``"pinned_host"`` if ``device`` can address pinned host memory, else ``"device"`` (logged)."""
  kinds = [m.kind for m in device.addressable_memories()]
  if "pinned_host" in kinds:
    return "pinned_host"
  log.warning("offload: %s has no pinned_host memory (memories: %s); the host block store "
              "falls back to device memory", device, kinds)
  return "device"


def _fail(name: str, expected: str, got) -> None:
  raise ValueError(f"{name}: expected {expected}, got {got}")


def _scatter(slot_kv, slot_c, b, h, s, blocks):
  """Writes ``blocks`` (N pairs ``(kv [l', Dk+Dv], c [l'])``) into slots ``(b, h, s)`` (``[N]``
  int32 each)."""
  kv = jnp.stack([x[0] for x in blocks])
  c = jnp.stack([x[1] for x in blocks])
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


@functools.partial(jax.jit, static_argnames=("k_dim", "block_size", "scale"))
def _attend(q, slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use, t, *, k_dim: int,
            block_size: int, scale: float):
  """Biased attention of ``q [B, HQ, Dk]`` over the slots and the tail: ``[B, HQ, Dv]``."""
  b, h, ns, bs, _ = slot_kv.shape
  kv = jnp.concatenate([slot_kv.reshape(b, h, ns * bs, -1), tail_kv], axis=2)   # [B,H,S,Dk+Dv]
  c = jnp.concatenate([slot_c.reshape(b, h, ns * bs), tail_c], axis=2)          # [B, H, S]
  offs = jnp.arange(bs, dtype=jnp.int32)
  slot_ok = jnp.repeat(slot_block >= 0, bs, axis=2)                              # [B, H, NS*bs]
  tail_pos = (t // block_size) * block_size + offs                                # [bs]
  tail_ok = tail_use[:, :, None] & (tail_pos <= t)[None, None, :]                 # [B, H, bs]
  mask = jnp.concatenate([slot_ok, tail_ok], axis=2)                              # [B, H, S]
  k = jnp.transpose(kv[..., :k_dim], (0, 2, 1, 3))                                # [B, S, H, Dk]
  v = jnp.transpose(kv[..., k_dim:], (0, 2, 1, 3))
  bias = jnp.transpose(c, (0, 2, 1))
  o = biased_masked_attention(q[:, None], k.astype(q.dtype), v.astype(q.dtype), bias,
                              mask[:, None], scale)
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
  """

  def __init__(self, *, batch: int, num_kv_heads: int, k_dim: int, v_dim: int,
               block_size: int, num_slots: int, max_len: int, dtype=jnp.float32, device=None):
    for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads), ("k_dim", k_dim),
                      ("v_dim", v_dim), ("block_size", block_size), ("num_slots", num_slots),
                      ("max_len", max_len)):
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        _fail(name, "a positive int", repr(val))
    self.batch, self.heads, self.k_dim, self.v_dim = batch, num_kv_heads, k_dim, v_dim
    self.block_size, self.num_slots, self.max_len = block_size, num_slots, max_len
    self.dtype = jnp.dtype(dtype)
    self.device = jax.devices()[0] if device is None else device
    self.host_memory_kind = host_memory_kind(self.device)
    self._host = jax.sharding.SingleDeviceSharding(self.device, memory_kind=self.host_memory_kind)
    self._dev = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
    d = k_dim + v_dim
    zeros = functools.partial(jax.device_put, device=self._dev)
    self.slot_kv = zeros(jnp.zeros((batch, num_kv_heads, num_slots, block_size, d), self.dtype))
    self.slot_c = zeros(jnp.zeros((batch, num_kv_heads, num_slots, block_size), jnp.float32))
    self.slot_block = np.full((batch, num_kv_heads, num_slots), -1, np.int32)
    self.tail_kv = zeros(jnp.zeros((batch, num_kv_heads, block_size, d), self.dtype))
    self.tail_c = zeros(jnp.zeros((batch, num_kv_heads, block_size), jnp.float32))
    self.tail_use = np.zeros((batch, num_kv_heads), bool)
    self._scatter, self._write_token = _updaters(self.device.platform != "cpu")
    self.length = 0
    self.host_blocks: dict[tuple[int, int, int], tuple[jax.Array, jax.Array]] = {}
    self.totals = {"steps": 0, "requested": 0, "hits": 0, "transferred": 0, "bytes": 0}

  # ------------------------------------------------------------------------------ sizes
  @property
  def block_bytes(self) -> int:
    """Bytes of one block of one KV head moved host -> device (K, V and float32 ``c``)."""
    return self.block_size * ((self.k_dim + self.v_dim) * self.dtype.itemsize + 4)

  @property
  def current_block(self) -> int:
    """Block of the newest token (the tail)."""
    return (self.length - 1) // self.block_size

  # ------------------------------------------------------------------------------ writes
  def _to_host(self, items):
    """Host copies of ``{(b, h, j): (kv [l', Dk+Dv], c [l'])}`` device arrays."""
    keys = list(items)
    moved = jax.device_put([items[k] for k in keys], self._host)
    self.host_blocks.update(zip(keys, (tuple(m) for m in moved)))

  def prefill(self, k, v, c) -> None:
    """Stores a prompt: ``k [B, T, H, Dk]`` (RoPE'd), ``v [B, T, H, Dv]``, ``c [B, T, H]``.

    Blocks before the last token's block go to the host; the last token's block is the tail.
    """
    if self.length:
      _fail("prefill", "an empty cache", f"length {self.length}")
    b, h = self.batch, self.heads
    t = k.shape[1] if k.ndim == 4 else -1
    if (k.shape != (b, t, h, self.k_dim) or v.shape != (b, t, h, self.v_dim)
        or c.shape != (b, t, h)):
      _fail("k/v/c", f"shapes [B, T, H, Dk] = {(b, 'T', h, self.k_dim)}, [B, T, H, Dv] and "
            f"[B, T, H]", f"{k.shape}, {v.shape}, {c.shape}")
    if not 1 <= t <= self.max_len:
      _fail("k.shape[1]", f"1 <= T <= max_len={self.max_len}", t)
    bs = self.block_size
    cur = (t - 1) // bs
    pad = (cur + 1) * bs - t
    kv = jnp.concatenate([k.astype(self.dtype), v.astype(self.dtype)], axis=-1)
    kv = jnp.pad(kv, ((0, 0), (0, pad), (0, 0), (0, 0)))
    cc = jnp.pad(c.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    kv = jnp.transpose(kv.reshape(b, cur + 1, bs, h, -1), (0, 3, 1, 2, 4))   # [B, H, NB, l', D]
    cc = jnp.transpose(cc.reshape(b, cur + 1, bs, h), (0, 3, 1, 2))        # [B, H, NB, l']
    self._to_host({(bi, hi, j): (kv[bi, hi, j], cc[bi, hi, j])
                   for bi in range(b) for hi in range(h) for j in range(cur)})
    self.tail_kv = jax.device_put(kv[:, :, cur], self._dev)
    self.tail_c = jax.device_put(cc[:, :, cur], self._dev)
    self.length = t

  def append(self, k_t, v_t, c_t) -> None:
    """Appends one token to every sequence: ``k_t [B, H, Dk]``, ``v_t [B, H, Dv]``, ``c_t [B, H]``.

    When the token starts a new block, the complete tail goes to the host first.
    """
    b, h = self.batch, self.heads
    if (k_t.shape != (b, h, self.k_dim) or v_t.shape != (b, h, self.v_dim)
        or c_t.shape != (b, h)):
      _fail("k_t/v_t/c_t", f"shapes {(b, h, self.k_dim)}, {(b, h, self.v_dim)}, {(b, h)}",
            f"{k_t.shape}, {v_t.shape}, {c_t.shape}")
    if self.length >= self.max_len:
      _fail("append", f"at most max_len={self.max_len} tokens", f"token {self.length + 1}")
    pos, bs = self.length, self.block_size
    if pos and pos % bs == 0:
      done = pos // bs - 1
      self._to_host({(bi, hi, done): (self.tail_kv[bi, hi], self.tail_c[bi, hi])
                     for bi in range(b) for hi in range(h)})
      self.tail_kv = jnp.zeros_like(self.tail_kv)
      self.tail_c = jnp.zeros_like(self.tail_c)
      self.tail_use[:] = False
    kv = jnp.concatenate([k_t.astype(self.dtype), v_t.astype(self.dtype)], axis=-1)
    self.tail_kv, self.tail_c = self._write_token(self.tail_kv, self.tail_c, pos % bs, kv,
                                             c_t.astype(jnp.float32))
    self.length = pos + 1

  # ------------------------------------------------------------------------------ a step
  def update(self, gamma) -> dict:
    """Makes the slots hold ``Gamma(t)`` for the query at ``t = length - 1``.

    Args:
      gamma: ``[B, H, n]`` int block ids (``-1`` padding; duplicates count once), e.g. row ``t``
        of ``nosa_select``. Every id must be ``<= t // l'``.

    Returns:
      ``{"requested": selected blocks other than the current one, "hits": those already
      resident, "transferred": blocks copied host -> device, "hit_rate", "bytes": bytes moved
      host -> device}`` summed over the batch and heads (also accumulated in ``self.totals``).
    """
    if self.length == 0:
      _fail("update", "a cache holding tokens (prefill/append first)", "an empty cache")
    g = np.asarray(gamma)
    if g.ndim != 3 or g.shape[:2] != (self.batch, self.heads):
      _fail("gamma", f"shape [B, H, n] = {(self.batch, self.heads, 'n')}", g.shape)
    cur = self.current_block
    if g.max(initial=-1) > cur:
      _fail("gamma", f"block ids <= the current block {cur} (t = {self.length - 1}, no future "
            f"blocks)", f"max id {int(g.max())}")
    requested = hits = 0
    loads: list[tuple[int, int, int, int]] = []                  # (b, h, slot, block)
    for bi in range(self.batch):
      for hi in range(self.heads):
        want = set(int(j) for j in g[bi, hi] if j >= 0)
        self.tail_use[bi, hi] = cur in want
        want.discard(cur)
        if len(want) > self.num_slots:
          _fail("gamma", f"at most num_slots={self.num_slots} selected blocks besides the "
                f"current block per (sequence, KV head)", f"{len(want)} at (b={bi}, h={hi}); "
                f"build the cache with more slots")
        row = self.slot_block[bi, hi]
        keep = np.isin(row, list(want)) & (row >= 0)
        row[~keep] = -1                                          # evict what left the selection
        resident = set(int(j) for j in row[keep])
        missing = sorted(want - resident)
        free = np.flatnonzero(row < 0)[:len(missing)]
        for s, j in zip(free, missing):
          row[s] = j
          loads.append((bi, hi, int(s), j))
        requested += len(want)
        hits += len(want & resident)
    for at in range(0, len(loads), MAX_SCATTER):     # chunks bound the scatter's arity
      chunk = loads[at:at + MAX_SCATTER]
      blocks = jax.device_put([self.host_blocks[(bi, hi, j)] for bi, hi, _, j in chunk],
                              self._dev)
      # Pad to a power of two with repeats of the first write (same slot, same data, already on
      # the device) so the scatter compiles once per bucket, not once per count.
      pad = (1 << (len(chunk) - 1).bit_length()) - len(chunk)
      blocks = list(blocks) + [blocks[0]] * pad
      rows = chunk + [chunk[0]] * pad
      idx = [jnp.asarray([x[i] for x in rows], jnp.int32) for i in range(3)]
      self.slot_kv, self.slot_c = self._scatter(self.slot_kv, self.slot_c, *idx, blocks)
    stats = {"requested": requested, "hits": hits, "transferred": len(loads),
             "hit_rate": hits / requested if requested else 1.0,
             "bytes": len(loads) * self.block_bytes}
    for key in ("requested", "hits", "transferred", "bytes"):
      self.totals[key] += stats[key]
    self.totals["steps"] += 1
    return stats

  def attend(self, q, *, softmax_scale: float | None = None):
    """Biased attention of the query at ``t = length - 1`` over the resident blocks.

    Args:
      q: ``[B, HQ, Dk]`` (RoPE'd), ``HQ % H == 0``.
      softmax_scale: default ``Dk ** -0.5``.

    Returns:
      ``[B, HQ, Dv]`` in ``q.dtype``: ``sum_j e^{s_j + c_j} v_j / sum_j e^{s_j + c_j}`` over the
      tokens of the slots' blocks and, if selected, the tail's tokens ``<= t``.
    """
    if q.ndim != 3 or q.shape[0] != self.batch or q.shape[2] != self.k_dim or (
        q.shape[1] % self.heads):
      _fail("q", f"shape [B, HQ, Dk] = {(self.batch, 'HQ', self.k_dim)} with H={self.heads} "
            f"dividing HQ", q.shape)
    scale = softmax_scale if softmax_scale is not None else self.k_dim ** -0.5
    return _attend(q, self.slot_kv, self.slot_c, jnp.asarray(self.slot_block), self.tail_kv,
                   self.tail_c, jnp.asarray(self.tail_use), jnp.int32(self.length - 1),
                   k_dim=self.k_dim, block_size=self.block_size, scale=float(scale))


__all__ = ["OffloadedBlockCache", "host_memory_kind"]
