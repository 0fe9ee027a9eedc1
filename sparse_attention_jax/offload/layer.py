"""One offloaded NOSA layer: its host block store, device slots and the traced decode step.

The full K/V and eviction scores ``c`` of every sequence live in the host
:class:`~sparse_attention_jax.offload.store.BlockStore`. The device holds, per (sequence, KV
head), ``num_slots`` block slots with a block-id map (``-1`` = empty) and the tail, the block of
the newest token, written on the device and copied to the store when the next token starts a new
block (:meth:`OffloadedLayer.roll_over`); a completed tail selected later is loaded from the host
once. Sequences share one length (no ragged batches) and one document (no segment ids).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.offload.block_copy import copy_into_slots
from sparse_attention_jax.offload.config import OffloadConfig, check_positive
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


def attend(q, slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use, t, *, scale: float):
  """Biased attention of ``q [B, HQ, Dk]`` (``HQ % H == 0``) at position ``t`` over the occupied
  slots and, if ``tail_use``, the tail's tokens ``<= t``: ``[B, HQ, Dv]`` in ``q.dtype``,
  ``sum_j e^{s_j + c_j} v_j / sum_j e^{s_j + c_j}``."""
  b, h, ns, bs, _ = slot_kv.shape
  k_dim = q.shape[-1]
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
  state: LayerState, store_kv, store_c, kv_t, c_t, gamma, q, t, *, chunk: int, scale: float,
  host: bool, copy: str = "kernel",
):  # fmt: skip
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
  o = attend(q, slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use, t, scale=scale)
  return o, LayerState(slot_kv, slot_c, slot_block, tail_kv, tail_c, tail_use), info


@functools.cache
def _jitted_step(chunk: int, scale: float, host: bool, copy: str):
  return jax.jit(functools.partial(layer_step, chunk=chunk, scale=scale, host=host, copy=copy))


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
    config: the copy options of :meth:`step` (default ``OffloadConfig()``).

  Attributes:
    store: the host :class:`~sparse_attention_jax.offload.store.BlockStore`.
    state: the device arrays (:class:`LayerState`).
    length: tokens held per sequence. totals: :data:`STAT_KEYS` summed over steps, and
      ``"steps"``.
  """

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

  @property
  def block_bytes(self) -> int:
    """Bytes of one block of one KV head moved host -> device (K, V and float32 ``c``)."""
    return self.block_size * ((self.k_dim + self.v_dim) * self.dtype.itemsize + 4)

  def prefill(self, k, v, c) -> None:
    """Stores a prompt: ``k [B, T, H, Dk]`` (RoPE'd), ``v [B, T, H, Dv]``, ``c [B, T, H]``.
    Blocks before the last token's block go to the host store; the last token's block is the
    tail."""
    if self.length:
      _fail("prefill", "an empty cache", f"length {self.length}")
    (b, t, h, _), bs = k.shape, self.block_size
    if k.shape != (b, t, h, self.k_dim) or v.shape != (b, t, h, self.v_dim) or c.shape != (b, t, h):
      _fail(
        "k/v/c", "shapes [B, T, H, Dk], [B, T, H, Dv] and [B, T, H]", (k.shape, v.shape, c.shape)
      )
    if (b, h) != (self.batch, self.heads) or not 1 <= t <= self.max_len:
      _fail(
        "k.shape", f"[{self.batch}, T, {self.heads}, Dk], 1 <= T <= max_len={self.max_len}", k.shape
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
    """Before the step of the token at ``t = length``: when that token starts a new block, copies
    the complete tail of every sequence and head to the host store (one jitted write) and empties
    the tail; otherwise (or when already done) nothing."""
    if self.length >= self.max_len:
      _fail("step", f"at most max_len={self.max_len} tokens", f"token {self.length + 1}")
    pos, bs, st = self.length, self.block_size, self.state
    if pos and pos % bs == 0 and self._stored < pos // bs:
      self.store.write(pos // bs - 1, st.tail_kv[:, :, None], st.tail_c[:, :, None])
      self.state = st._replace(
        tail_kv=jnp.zeros_like(st.tail_kv),
        tail_c=jnp.zeros_like(st.tail_c),
        tail_use=jnp.zeros_like(st.tail_use),
      )
      self._stored = pos // bs

  def adopt(self, state: LayerState) -> int:
    """The new arrays of a :func:`layer_step` run for the token at ``t = length`` (after
    :meth:`roll_over`), and one more token. Returns ``t``. Nothing waits for the device."""
    self.state, self.length = state, self.length + 1
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
    stats = {"requested": requested, "hits": requested - n, "transferred": n}
    stats.update(
      bytes=n * self.block_bytes, hit_rate=(requested - n) / requested if requested else 1.0
    )
    stats.update({key: seconds.get(key, 0.0) for key in STAT_KEYS[4:]})
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
      slots as they were.
    """
    if np.ndim(gamma) != 3 or np.shape(gamma)[:2] != (self.batch, self.heads):
      _fail("gamma", f"shape [B, H, n] = {(self.batch, self.heads, 'n')}", np.shape(gamma))
    self.roll_over()
    scale = self.k_dim**-0.5 if softmax_scale is None else softmax_scale
    fn = _jitted_step(self.config.chunk, float(scale), self.store.host, self.config.copy)
    kv_t = jnp.concatenate([k_t, v_t], axis=-1).astype(self.dtype)
    gamma = jax.device_put(jnp.asarray(gamma, jnp.int32), self._dev)
    o, state, info = fn(self.state, self.store.kv, self.store.c, kv_t, c_t, gamma, q, self.length)
    check_info(
      info := np.asarray(info), t=self.length, block_size=self.block_size,
      num_slots=self.num_slots, heads=self.heads,
    )  # fmt: skip
    return o, self.account(info, t=self.adopt(state))


__all__ = ["STAT_KEYS", "LayerState", "OffloadedLayer", "attend", "layer_step"]
