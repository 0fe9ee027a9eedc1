"""One offloaded NOSA layer: its options, host block store, device slots and traced decode step.

K/V and eviction scores ``c`` live in the host :class:`BlockStore`. The device holds, per
(sequence, KV head), ``num_slots`` block slots and the tail (the newest token's block, copied to
the store when the next token starts a block; loaded back once if selected later). Sequences
share one length and one document.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.offload.block_copy import copy_into_slots
from sparse_attention_jax.offload.slot_plan import check_info, load_count, plan_slots
from sparse_attention_jax.ops.nosa import biased_masked_attention

log = logging.getLogger("sparse_attention_jax.offload")

# How missing blocks move host -> device slots (:mod:`~.block_copy`): a Pallas kernel reading the
# pinned store in place, or XLA's gather on the host store in a while loop of chunks.
COPIES = ("kernel", "xla")
# A step's counts and host seconds (reading its counts back, dispatching it).
STAT_KEYS = ("requested", "hits", "transferred", "bytes", "wait_s", "dispatch_s")


def check_positive(**values) -> None:
  """Raises ``ValueError`` naming the first of ``values`` that is not a positive int."""
  for name, val in values.items():
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{name}: expected a positive int, got {val!r}")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """Options of offloaded decoding: ``copy``, one of :data:`COPIES` (``"kernel"`` falls back to
  ``"xla"`` where the kernel cannot serve); ``chunk``, most blocks per XLA load iteration."""

  copy: str = "kernel"
  chunk: int = 1024

  def __post_init__(self):
    if self.copy not in COPIES:
      raise ValueError(f"copy: expected one of {COPIES}, got {self.copy!r}")
    check_positive(chunk=self.chunk)


def host_memory_kind(device) -> str:
  """``"pinned_host"`` if ``device`` can address pinned host memory, else ``"device"`` (logged)."""
  kinds = [m.kind for m in device.addressable_memories()]
  if "pinned_host" in kinds:
    return "pinned_host"
  log.warning(
    f"offload: {device} has no pinned_host memory ({kinds}); the store uses device memory"
  )
  return "device"


@functools.cache
def _store_write(sharding: jax.sharding.Sharding):
  """The jitted in-place write (store donated) of a store with ``sharding``."""

  def write(kv_store, c_store, kv, c, start):
    if sharding.memory_kind != "device":
      kv, c = jax.device_put((kv, c), jax.memory.Space.Host)
    at = (0, 0, start, 0, 0)
    return (
      jax.lax.dynamic_update_slice(kv_store, kv.astype(kv_store.dtype), at),
      jax.lax.dynamic_update_slice(c_store, c, at[:4]),
    )

  return jax.jit(write, donate_argnums=(0, 1), out_shardings=(sharding,) * 2)


class BlockStore:
  """One layer's blocks, ``kv [B, H, NB, l', D]`` (``shape``, ``dtype``) and float32 ``c [B, H,
  NB, l']``: ONE jax array each in ``device``'s ``pinned_host`` memory (mapped into the GPU's
  address space: the block copy reads it in place), else in device memory (``kind``, ``host``).
  Zero-filled at first use (a benchmark may assign its own arrays with :attr:`sharding`)."""

  def __init__(self, shape, dtype, device):
    self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)
    self.kind = host_memory_kind(device)
    self.host = self.kind != "device"
    self.sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=self.kind)

  @functools.cached_property
  def kv(self) -> jax.Array:
    return jax.device_put(np.zeros(self.shape, self.dtype), self.sharding)

  @functools.cached_property
  def c(self) -> jax.Array:
    return jax.device_put(np.zeros(self.shape[:4], np.float32), self.sharding)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape) * self.dtype.itemsize + np.prod(self.shape[:4]) * 4)

  def write(self, start: int, kv, c) -> None:
    """Writes ``kv [B, H, n, l', D]``, ``c [B, H, n, l']`` at blocks ``start ..`` in place."""
    write = _store_write(self.sharding)
    self.kv, self.c = write(self.kv, self.c, kv, jnp.asarray(c, jnp.float32), jnp.int32(start))


class LayerState(NamedTuple):
  """The device state of one offloaded layer, as :func:`layer_step` reads and returns it."""

  slot_kv: jax.Array  # [B, H, NS, l', Dk + Dv]
  slot_c: jax.Array  # [B, H, NS, l'] float32
  slot_block: jax.Array  # [B, H, NS] int32, -1 = empty
  tail_kv: jax.Array  # [B, H, l', Dk + Dv]
  tail_c: jax.Array  # [B, H, l'] float32
  tail_use: jax.Array  # [B, H] bool


def attend(q, st: LayerState, t, *, scale: float):
  """Biased attention (``softmax(s + c)``) of ``q [B, HQ, Dk]`` at position ``t`` over the
  occupied slots and, if ``tail_use``, the tail's tokens ``<= t``: ``[B, HQ, Dv]``."""
  b, h, ns, bs, _ = st.slot_kv.shape
  kv = jnp.concatenate([st.slot_kv.reshape(b, h, ns * bs, -1), st.tail_kv], axis=2)  # [B,H,S,D]
  c = jnp.concatenate([st.slot_c.reshape(b, h, ns * bs), st.tail_c], axis=2)  # [B, H, S]
  tail_pos = (t // bs) * bs + jnp.arange(bs, dtype=jnp.int32)  # [bs]
  tail_ok = st.tail_use[:, :, None] & (tail_pos <= t)[None, None, :]  # [B, H, bs]
  mask = jnp.concatenate([jnp.repeat(st.slot_block >= 0, bs, axis=2), tail_ok], axis=2)
  k, v = jnp.split(jnp.transpose(kv, (0, 2, 1, 3)).astype(q.dtype), [q.shape[-1]], axis=-1)
  bias = jnp.transpose(c, (0, 2, 1))  # [B, S, H]
  return biased_masked_attention(q[:, None], k, v, bias, mask[:, None], scale)[:, 0]


def layer_step(
  state: LayerState, store_kv, store_c, kv_t, c_t, gamma, q, t, *, chunk: int, scale: float,
  host: bool, copy: str = "kernel",
):  # fmt: skip
  """One decode step of one layer as ONE traced computation: the new token (``kv_t [B, H, Dk +
  Dv]`` RoPE'd, ``c_t [B, H]``) at position ``t`` into the tail, the slots made to hold ``gamma
  [B, H, n]`` (``-1`` padding) from the store (``host``: in host memory; ``copy``, ``chunk``:
  :func:`~.block_copy.copy_into_slots`), attention of ``q [B, HQ, Dk]``. The tail roll-over is
  the caller's (:meth:`OffloadedLayer.roll_over`). Returns ``(o [B, HQ, Dv], state, info)``,
  ``info`` the int32[5] of :func:`~.slot_plan.plan_slots`; a refused selection copies nothing
  (the caller raises from ``info``)."""
  bs = state.tail_kv.shape[2]
  tail_kv = state.tail_kv.at[:, :, t % bs].set(kv_t.astype(state.tail_kv.dtype))
  tail_c = state.tail_c.at[:, :, t % bs].set(c_t.astype(jnp.float32))
  slot_block, tail_use, loads, info = plan_slots(
    gamma.astype(jnp.int32), state.slot_block, t // bs, pad=chunk
  )
  n = load_count(info, t // bs)
  slot_kv, slot_c = copy_into_slots(
    store_kv, store_c, state.slot_kv, state.slot_c, loads, n, copy=copy, chunk=chunk, host=host
  )
  state = LayerState(slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use)
  return attend(q, state, t, scale=scale), state, info


_jitted_step = jax.jit(layer_step, static_argnames=("chunk", "scale", "host", "copy"))


class OffloadedLayer:
  """The offloaded KV cache of one NOSA layer: ``batch`` B, ``num_kv_heads`` H, ``k_dim`` Dk,
  ``v_dim`` Dv, ``block_size`` l', ``num_slots`` NS (slots per (sequence, KV head) besides the
  current block), ``max_len`` tokens per sequence, K/V ``dtype``; ``config`` for :meth:`step`.
  Attributes: ``store`` (:class:`BlockStore`), ``state`` (:class:`LayerState`), ``length``
  (tokens per sequence), ``totals`` (:data:`STAT_KEYS` summed over steps, and ``"steps"``)."""

  def __init__(
    self, *, batch, num_kv_heads, k_dim, v_dim, block_size, num_slots, max_len,
    dtype=jnp.float32, device=None, config: OffloadConfig | None = None,
  ):  # fmt: skip
    check_positive(
      batch=batch, num_kv_heads=num_kv_heads, k_dim=k_dim, v_dim=v_dim, block_size=block_size,
      num_slots=num_slots, max_len=max_len,
    )  # fmt: skip
    self.batch, self.heads, self.k_dim, self.v_dim = batch, num_kv_heads, k_dim, v_dim
    self.block_size, self.num_slots, self.max_len = block_size, num_slots, max_len
    self.dtype = jnp.dtype(dtype)
    self.config = OffloadConfig() if config is None else config
    device = jax.devices()[0] if device is None else device
    rows, d = (batch, num_kv_heads), k_dim + v_dim
    self.store = BlockStore((*rows, -(-max_len // block_size), block_size, d), self.dtype, device)
    self._dev = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    zeros = (
      np.zeros((*rows, num_slots, block_size, d), self.dtype),
      np.zeros((*rows, num_slots, block_size), np.float32),
      np.full((*rows, num_slots), -1, np.int32),
      np.zeros((*rows, block_size, d), self.dtype),
      np.zeros((*rows, block_size), np.float32),
      np.zeros(rows, bool),
    )
    self.state = LayerState(*jax.device_put(zeros, self._dev))
    self.length = self._stored = 0  # tokens; complete blocks written to the store
    self.totals = {"steps": 0, **dict.fromkeys(STAT_KEYS, 0)}

  def prefill(self, k, v, c) -> None:
    """Stores a prompt ``k [B, T, H, Dk]`` (RoPE'd), ``v [B, T, H, Dv]``, ``c [B, T, H]``; the
    last token's block is the tail."""
    if self.length:
      raise ValueError(f"prefill: expected an empty cache, got length {self.length}")
    (b, t, h, _), bs = k.shape, self.block_size
    if (
      (b, h) != (self.batch, self.heads) or not 1 <= t <= self.max_len
      or k.shape[3] != self.k_dim or v.shape != (b, t, h, self.v_dim) or c.shape != (b, t, h)
    ):  # fmt: skip
      raise ValueError(
        f"k.shape: expected [{self.batch}, T, {self.heads}, Dk], 1 <= T <= max_len="
        f"{self.max_len} (v [B, T, H, Dv], c [B, T, H]), got {(k.shape, v.shape, c.shape)}"
      )
    cur = (t - 1) // bs
    pad = ((0, 0), (0, (cur + 1) * bs - t), (0, 0))
    kv = jnp.pad(jnp.concatenate([k, v], axis=-1).astype(self.dtype), (*pad, (0, 0)))
    kv = jnp.transpose(kv.reshape(b, cur + 1, bs, h, -1), (0, 3, 1, 2, 4))  # [B, H, NB, l', D]
    cc = jnp.transpose(jnp.pad(c.astype(jnp.float32), pad).reshape(b, cur + 1, bs, h), (0, 3, 1, 2))
    if cur:
      self.store.write(0, kv[:, :, :cur], cc[:, :, :cur])
    tail = jax.device_put((kv[:, :, cur], cc[:, :, cur]), self._dev)
    self.state = self.state._replace(tail_kv=tail[0], tail_c=tail[1])
    self.length, self._stored = t, cur

  def roll_over(self) -> None:
    """Before the step at ``t = length``: if it starts a block, moves the full tail to the store."""
    if self.length >= self.max_len:
      raise ValueError(
        f"step: expected at most max_len={self.max_len} tokens, got token {self.length + 1}"
      )
    pos, bs, st = self.length, self.block_size, self.state
    if pos and pos % bs == 0 and self._stored < pos // bs:
      self.store.write(pos // bs - 1, st.tail_kv[:, :, None], st.tail_c[:, :, None])
      self.state = LayerState(*st[:3], *map(jnp.zeros_like, st[3:]))  # an empty tail
      self._stored = pos // bs

  def adopt(self, state: LayerState) -> int:
    """Takes the new state of the step at ``t = length`` (no wait); returns ``t``."""
    self.state, self.length = state, self.length + 1
    return self.length - 1

  def account(self, info, *, t: int, **seconds) -> dict:
    """The stats of the step at ``t`` from its host ``info``, added to :attr:`totals`:
    ``requested`` (selected blocks besides the current one), ``hits``, ``transferred``,
    ``hit_rate``, ``bytes``, and host ``seconds``. Raises the selection's errors."""
    n, requested = check_info(info, t, self.block_size, self.num_slots, self.heads)
    block_bytes = self.block_size * ((self.k_dim + self.v_dim) * self.dtype.itemsize + 4)
    stats = {"requested": requested, "hits": requested - n, "transferred": n}
    stats.update(bytes=n * block_bytes, hit_rate=(requested - n) / requested if requested else 1.0)
    stats.update({key: seconds.get(key, 0.0) for key in STAT_KEYS[4:]})
    for key in STAT_KEYS:
      self.totals[key] += stats[key]
    self.totals["steps"] += 1
    return stats

  def step(self, k_t, v_t, c_t, gamma, q, *, softmax_scale: float | None = None):
    """:func:`layer_step` of this layer alone, synchronous, with ``k_t [B, H, Dk]`` and ``v_t
    [B, H, Dv]``: ``(o, stats)`` (:meth:`account`); a refused selection raises, slots kept."""
    if np.ndim(gamma) != 3 or np.shape(gamma)[:2] != (self.batch, self.heads):
      want = (self.batch, self.heads, "n")
      raise ValueError(f"gamma: expected shape [B, H, n] = {want}, got {np.shape(gamma)}")
    self.roll_over()
    scale = self.k_dim**-0.5 if softmax_scale is None else softmax_scale
    kv_t = jnp.concatenate([k_t, v_t], axis=-1).astype(self.dtype)
    gamma = jax.device_put(jnp.asarray(gamma, jnp.int32), self._dev)
    o, state, info = _jitted_step(
      self.state, self.store.kv, self.store.c, kv_t, c_t, gamma, q, self.length,
      chunk=self.config.chunk, scale=float(scale), host=self.store.host, copy=self.config.copy,
    )  # fmt: skip
    check_info(info := np.asarray(info), self.length, self.block_size, self.num_slots, self.heads)
    return o, self.account(info, t=self.adopt(state))
