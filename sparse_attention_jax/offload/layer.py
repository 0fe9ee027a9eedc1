"""One offloaded NOSA layer: its host block store, device slots and the traced decode step.

The full K/V and eviction scores ``c`` of every sequence live in the host block store
(:class:`~sparse_attention_jax.offload.store.BlockStore`). The device holds, per (sequence, KV
head):

* ``num_slots`` block slots (``slot_kv [B, H, NS, l', Dk + Dv]``, ``slot_c [B, H, NS, l']``)
  with a block-id map ``slot_block [B, H, NS]`` (``-1`` = empty);
* the tail: the block of the newest token (``tail_kv [B, H, l', Dk + Dv]``, ``tail_c``), written
  on the device and copied to the host store when it is complete and the next token starts a new
  block (:meth:`OffloadedLayer.roll_over`). It is never loaded from the host.

:func:`layer_step` is one decode step as ONE traced computation: the new token into the tail,
the slot plan (:func:`~sparse_attention_jax.offload.slot_plan.plan_slots`), the copy of ONLY the
missing blocks host -> slots (:mod:`~sparse_attention_jax.offload.block_copy`) and the biased
attention over the slots (+ the tail when ``Gamma(t)`` holds the current block). A block that was
the tail and is selected after it completed is loaded from the host once (counted as a
transfer). Sequences share one length (no ragged batches) and one document (no segment ids).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.offload.block_copy import copy_into_slots
from sparse_attention_jax.offload.config import OffloadConfig
from sparse_attention_jax.offload.slot_plan import (
  INFO_LOADS,
  INFO_REQUESTED,
  check_info,
  plan_slots,
  refused,
)
from sparse_attention_jax.offload.store import BlockStore
from sparse_attention_jax.ops.nosa import biased_masked_attention

# Per-step counts and host seconds of a layer's step (summed over steps in ``totals``):
# ``wait_s`` reading the step's counts back, ``dispatch_s`` dispatching the step.
STAT_KEYS = ("requested", "hits", "transferred", "bytes", "wait_s", "dispatch_s")


class LayerState(NamedTuple):
  """The device state of one offloaded layer, as :func:`layer_step` reads and returns it."""

  slot_kv: jax.Array  # [B, H, NS, l', Dk + Dv]
  slot_c: jax.Array  # [B, H, NS, l'] float32
  slot_block: jax.Array  # [B, H, NS] int32, -1 = empty
  tail_kv: jax.Array  # [B, H, l', Dk + Dv]
  tail_c: jax.Array  # [B, H, l'] float32
  tail_use: jax.Array  # [B, H] bool


def attend(
  q, slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use, t, *, k_dim: int, scale: float
):
  """Biased attention of ``q [B, HQ, Dk]`` (``HQ % H == 0``) at position ``t`` over the occupied
  slots and, if ``tail_use``, the tail's tokens ``<= t``: ``[B, HQ, Dv]`` in ``q.dtype``,
  ``sum_j e^{s_j + c_j} v_j / sum_j e^{s_j + c_j}``."""
  b, h, ns, bs, _ = slot_kv.shape
  kv = jnp.concatenate([slot_kv.reshape(b, h, ns * bs, -1), tail_kv], axis=2)  # [B,H,S,Dk+Dv]
  c = jnp.concatenate([slot_c.reshape(b, h, ns * bs), tail_c], axis=2)  # [B, H, S]
  slot_ok = jnp.repeat(slot_block >= 0, bs, axis=2)  # [B, H, NS*bs]
  tail_pos = (t // bs) * bs + jnp.arange(bs, dtype=jnp.int32)  # [bs]
  tail_ok = tail_use[:, :, None] & (tail_pos <= t)[None, None, :]  # [B, H, bs]
  mask = jnp.concatenate([slot_ok, tail_ok], axis=2)  # [B, H, S]
  k = jnp.transpose(kv[..., :k_dim], (0, 2, 1, 3))  # [B, S, H, Dk]
  v = jnp.transpose(kv[..., k_dim:], (0, 2, 1, 3))
  bias = jnp.transpose(c, (0, 2, 1))  # [B, S, H]
  o = biased_masked_attention(
    q[:, None], k.astype(q.dtype), v.astype(q.dtype), bias, mask[:, None], scale
  )
  return o[:, 0]


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
  """One decode step of one offloaded layer as ONE traced computation (the tail roll-over, every
  ``l'`` tokens, is done by the caller between steps: :meth:`OffloadedLayer.roll_over`).

  Args:
    state: the layer's :class:`LayerState`.
    store_kv, store_c: the :class:`~sparse_attention_jax.offload.store.BlockStore` arrays (read
      only); ``host``: they are in host memory.
    kv_t: ``[B, H, Dk + Dv]`` the new token's RoPE'd key and value; ``c_t [B, H]`` its eviction
      score.
    gamma: ``[B, H, n]`` int selection of the query at ``t`` (``-1`` padding).
    q: ``[B, HQ, Dk]``.
    t: int32 scalar, the new token's position (its block is the tail).
    chunk: most blocks one XLA load iteration gathers (static; also the plan's padding).
    copy: ``"kernel"`` or ``"xla"`` (:func:`~sparse_attention_jax.offload.block_copy
      .copy_into_slots`).

  Returns:
    ``(o [B, HQ, Dv], state, info)``: ``info`` is :func:`~sparse_attention_jax.offload.slot_plan
    .plan_slots`'s int32[5]. A refused selection (a future block, an over-full row) copies
    nothing; the caller raises from ``info``.
  """
  bs = state.tail_kv.shape[2]
  tail_kv = state.tail_kv.at[:, :, t % bs].set(kv_t.astype(state.tail_kv.dtype))
  tail_c = state.tail_c.at[:, :, t % bs].set(c_t.astype(jnp.float32))
  slot_block, tail_use, loads, info = plan_slots(
    gamma.astype(jnp.int32), state.slot_block, t // bs, pad=chunk
  )
  n = jnp.where(refused(info, t // bs), 0, info[INFO_LOADS])
  slot_kv, slot_c = copy_into_slots(
    store_kv, store_c, state.slot_kv, state.slot_c, loads, n, copy=copy, chunk=chunk, host=host
  )
  o = attend(q, slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use, t, k_dim=k_dim, scale=scale)
  return o, LayerState(slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use), info


@functools.cache
def _jitted_step(chunk: int, k_dim: int, scale: float, host: bool, copy: str):
  return jax.jit(
    functools.partial(layer_step, chunk=chunk, k_dim=k_dim, scale=scale, host=host, copy=copy)
  )


def _fail(name: str, expected: str, got) -> None:
  raise ValueError(f"{name}: expected {expected}, got {got}")


class OffloadedLayer:
  """The offloaded KV cache of one NOSA layer (see the module docstring).

  Args:
    batch: B sequences. num_kv_heads: H. k_dim, v_dim: Dk, Dv. block_size: l'.
    num_slots: NS device slots per (sequence, KV head) for the selected blocks other than the
      current one.
    max_len: the most tokens a sequence may hold.
    dtype: cache dtype of K/V (``c`` is kept in float32).
    device: the accelerator (default ``jax.devices()[0]``).
    config: the copy options (:class:`~sparse_attention_jax.offload.config.OffloadConfig`) of
      :meth:`step` (default ``OffloadConfig()``).

  Attributes:
    store: the host :class:`~sparse_attention_jax.offload.store.BlockStore`.
    slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use: the device arrays of
      :class:`LayerState`.
    length: tokens held per sequence. totals: :data:`STAT_KEYS` summed over steps, and
      ``"steps"``.
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
    config: OffloadConfig | None = None,
  ):
    for name, val in (
      ("batch", batch),
      ("num_kv_heads", num_kv_heads),
      ("k_dim", k_dim),
      ("v_dim", v_dim),
      ("block_size", block_size),
      ("num_slots", num_slots),
      ("max_len", max_len),
    ):
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        _fail(name, "a positive int", repr(val))
    self.batch, self.heads, self.k_dim, self.v_dim = batch, num_kv_heads, k_dim, v_dim
    self.block_size, self.num_slots, self.max_len = block_size, num_slots, max_len
    self.dtype = jnp.dtype(dtype)
    self.config = OffloadConfig() if config is None else config
    self.device = jax.devices()[0] if device is None else device
    d = k_dim + v_dim
    self.store = BlockStore(
      batch=batch,
      heads=num_kv_heads,
      num_blocks=-(-max_len // block_size),
      block_size=block_size,
      dim=d,
      dtype=self.dtype,
      device=self.device,
    )
    self._dev = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
    self.slot_kv, self.slot_c, self.slot_block, self.tail_kv, self.tail_c, self.tail_use = (
      jax.device_put(
        (
          np.zeros((batch, num_kv_heads, num_slots, block_size, d), self.dtype),
          np.zeros((batch, num_kv_heads, num_slots, block_size), np.float32),
          np.full((batch, num_kv_heads, num_slots), -1, np.int32),
          np.zeros((batch, num_kv_heads, block_size, d), self.dtype),
          np.zeros((batch, num_kv_heads, block_size), np.float32),
          np.zeros((batch, num_kv_heads), bool),
        ),
        self._dev,
      )
    )
    self._no_tail = self.tail_use  # all False, reused when a block completes
    self.length = 0
    self._stored = 0  # complete blocks written to the store
    self.totals = {"steps": 0, **{key: 0 for key in STAT_KEYS}}

  # ------------------------------------------------------------------------------ sizes
  @property
  def host_memory_kind(self) -> str:
    """Where the store's arrays are: ``"pinned_host"``, or ``"device"`` (no pinned host memory)."""
    return self.store.memory_kind

  @property
  def host_bytes(self) -> int:
    """Bytes of the host store (its full ``max_len`` capacity)."""
    return self.store.nbytes

  @property
  def block_bytes(self) -> int:
    """Bytes of one block of one KV head moved host -> device (K, V and float32 ``c``)."""
    return self.block_size * ((self.k_dim + self.v_dim) * self.dtype.itemsize + 4)

  def host_block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Host copy of the stored block ``j`` of sequence ``b``, KV head ``h``: ``(kv [l', Dk+Dv],
    c [l'])``."""
    return self.store.block(b, h, j)

  def state(self) -> LayerState:
    """The arrays :func:`layer_step` reads."""
    return LayerState(
      self.slot_kv, self.slot_c, self.slot_block, self.tail_kv, self.tail_c, self.tail_use
    )

  # ------------------------------------------------------------------------------ writes
  def prefill(self, k, v, c) -> None:
    """Stores a prompt: ``k [B, T, H, Dk]`` (RoPE'd), ``v [B, T, H, Dv]``, ``c [B, T, H]``.
    Blocks before the last token's block go to the host store; the last token's block is the
    tail."""
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
    self.length, self._stored = t, cur

  def roll_over(self) -> None:
    """Before the step of the token at ``t = length``: when that token starts a new block, copies
    the complete tail of every sequence and head to the host store (one jitted write) and empties
    the tail; otherwise (or when already done) nothing."""
    if self.length >= self.max_len:
      _fail("step", f"at most max_len={self.max_len} tokens", f"token {self.length + 1}")
    pos, bs = self.length, self.block_size
    if pos and pos % bs == 0 and self._stored < pos // bs:
      self.store.write(pos // bs - 1, self.tail_kv[:, :, None], self.tail_c[:, :, None])
      self.tail_kv = jnp.zeros_like(self.tail_kv)
      self.tail_c = jnp.zeros_like(self.tail_c)
      self.tail_use = self._no_tail
      self._stored = pos // bs

  # ------------------------------------------------------------------------------ a step
  def adopt(self, state: LayerState) -> int:
    """The new arrays of a :func:`layer_step` run for the token at ``t = length`` (after
    :meth:`roll_over`), and one more token. Returns ``t``. Nothing waits for the device."""
    self.slot_kv, self.slot_c, self.slot_block, self.tail_kv, self.tail_c, self.tail_use = state
    self.length += 1
    return self.length - 1

  def account(self, info, *, t: int, **seconds) -> dict:
    """The stats of the step of token ``t`` from its host ``info`` (int32[5] of
    :func:`layer_step`), also added to :attr:`totals`; ``seconds``: host seconds of
    :data:`STAT_KEYS` (0 if not given). Raises the selection's errors
    (:func:`~sparse_attention_jax.offload.slot_plan.check_info`).

    Returns:
      ``{"requested": selected blocks other than the current one, "hits": those already
      resident, "transferred": blocks copied host -> device, "hit_rate", "bytes": bytes moved,
      "wait_s", "dispatch_s"}`` summed over the batch and heads.
    """
    check_info(info, t=t, block_size=self.block_size, num_slots=self.num_slots, heads=self.heads)
    n, requested = int(info[INFO_LOADS]), int(info[INFO_REQUESTED])
    stats = {
      "requested": requested,
      "hits": requested - n,
      "transferred": n,
      "hit_rate": (requested - n) / requested if requested else 1.0,
      "bytes": n * self.block_bytes,
      **{key: seconds.get(key, 0.0) for key in STAT_KEYS[4:]},
    }
    for key in STAT_KEYS:
      self.totals[key] += stats[key]
    self.totals["steps"] += 1
    return stats

  def step(self, k_t, v_t, c_t, gamma, q, *, softmax_scale: float | None = None):
    """One synchronous decode step of this layer alone (the decoder fuses every layer's step
    into one call instead): appends the token ``k_t [B, H, Dk]`` (RoPE'd), ``v_t [B, H, Dv]``,
    ``c_t [B, H]`` at ``t = length``, makes the slots hold ``gamma [B, H, n]`` (block ids
    ``<= t // l'``, ``-1`` padding) besides the current block, and attends ``q [B, HQ, Dk]``
    (``softmax_scale`` default ``Dk ** -0.5``).

    Returns:
      ``(o [B, HQ, Dv], stats)`` (:meth:`account`). A refused selection raises and leaves the
      layer as it was.
    """
    b, h = self.batch, self.heads
    if k_t.shape != (b, h, self.k_dim) or v_t.shape != (b, h, self.v_dim) or c_t.shape != (b, h):
      _fail(
        "k_t/v_t/c_t",
        f"shapes {(b, h, self.k_dim)}, {(b, h, self.v_dim)}, {(b, h)}",
        f"{k_t.shape}, {v_t.shape}, {c_t.shape}",
      )
    if np.ndim(gamma) != 3 or np.shape(gamma)[:2] != (b, h):
      _fail("gamma", f"shape [B, H, n] = {(b, h, 'n')}", np.shape(gamma))
    if q.ndim != 3 or q.shape[0] != b or q.shape[2] != self.k_dim or q.shape[1] % h:
      _fail("q", f"shape [B, HQ, Dk] = {(b, 'HQ', self.k_dim)} with H={h} dividing HQ", q.shape)
    self.roll_over()
    scale = self.k_dim**-0.5 if softmax_scale is None else softmax_scale
    fn = _jitted_step(
      self.config.chunk, self.k_dim, float(scale), self.store.host, self.config.copy
    )
    kv_t = jnp.concatenate([k_t.astype(self.dtype), v_t.astype(self.dtype)], axis=-1)
    gamma = jax.device_put(jnp.asarray(gamma, jnp.int32), self._dev)
    o, state, info = fn(
      self.state(), self.store.kv, self.store.c, kv_t, c_t, gamma, q, jnp.int32(self.length)
    )
    info = np.asarray(info)
    check_info(info, t=self.length, block_size=self.block_size, num_slots=self.num_slots, heads=h)
    return o, self.account(info, t=self.adopt(state))


__all__ = ["STAT_KEYS", "LayerState", "OffloadedLayer", "attend", "layer_step"]
