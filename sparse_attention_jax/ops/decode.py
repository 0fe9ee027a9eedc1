"""Single-token (decode) attention over preallocated KV buffers, in plain JAX.

Buffers have a fixed capacity so one compiled step serves every length; each sequence of the batch
has its own length, so the token being decoded sits at its own position ``pos [B]`` (int32: the
number of tokens already cached, one document per sequence starting at position 0).

Buffers are ``[B, S, H, D]`` (token-major: NSA's buffers, read by gathers) or ``[B, H, S, D]``
(head-major, ``axis=2``: dense caches, whose attention reads every slot as a batched matmul with
no transpose of the cache). Two slot layouts (``S`` slots):

* *linear*: slot ``s`` holds position ``s`` (``S`` = the capacity). Full attention, the
  compression source and the selected blocks of NSA read it.
* *ring*: ``S = W`` slots, position ``t`` lives in slot ``t % W``; enough for a sliding window of
  ``W`` keys (SWA, MLA local, NSA's window branch). After writing position ``p`` slot ``s`` holds
  position ``p - ((p - s) mod W)`` (negative = never written).

Every function takes and returns arrays only (jit-able, no Python state); shapes are static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.masked import masked_attention


# ---------------------------------------------------------------------------------- buffers
def write_linear(buf, x, pos, *, axis: int = 1):
  """``buf [B, S, H, D]`` (``axis=1``) or ``[B, H, S, D]`` (``axis=2``) with ``x [B, H, D]``
  written at slot ``pos [B]`` of each row.

  Out-of-range positions are dropped by XLA; callers check capacity (see
  :func:`sparse_attention_jax.nn.decode`)."""
  rows = jnp.arange(buf.shape[0])
  at = buf.at[rows, pos] if axis == 1 else buf.at[rows, :, pos]
  return at.set(x.astype(buf.dtype), mode="drop")


def write_ring(buf, x, pos, *, axis: int = 1):
  """Ring ``buf`` (``W`` slots on ``axis``) with ``x [B, H, D]`` written at slot ``pos % W``."""
  return write_linear(buf, x, pos % buf.shape[axis], axis=axis)


def fill_linear(buf, x, *, axis: int = 1):
  """``buf`` with ``x [B, T, H, D]`` written at slots ``0 .. T-1`` (``T <= S``) of ``axis``."""
  if x.shape[1] > buf.shape[axis]:
    _checks.fail("x", f"at most the buffer's {buf.shape[axis]} slots", x.shape[1])
  if axis == 2:
    x = x.transpose(0, 2, 1, 3)
  return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, axis=axis)


def ring_positions(num_slots: int, pos):
  """``[B, W]`` int32 position held by each ring slot once position ``pos [B]`` is written."""
  s = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
  p = pos.astype(jnp.int32)[:, None]
  return p - jnp.mod(p - s, num_slots)


def fill_ring(buf, x, lengths, *, axis: int = 1):
  """Ring ``buf`` (``W`` slots on ``axis``) holding the last ``W`` of the first ``lengths [B]``
  tokens of ``x [B, T, H, D]`` (slots of positions ``< 0`` get token 0: they are masked)."""
  held = ring_positions(buf.shape[axis], lengths - 1)  # [B, W]
  rows = jnp.take_along_axis(x, jnp.clip(held, 0, x.shape[1] - 1)[:, :, None, None], axis=1)
  return (rows if axis == 1 else rows.transpose(0, 2, 1, 3)).astype(buf.dtype)


def gather_tokens(buf, tok):
  """Per-KV-head gather: ``buf [B, S, H, D]``, ``tok [B, N, H]`` int -> ``[B, N, H, D]``
  (indices clipped into ``[0, S)``; mask the invalid ones separately)."""
  b, s, h, _ = buf.shape
  tok = jnp.clip(tok, 0, s - 1)
  return buf[jnp.arange(b)[:, None, None], tok, jnp.arange(h)[None, None, :]]


# -------------------------------------------------------------------------------- attention
def attend_one(q, k, v, mask, scale: float, *, return_probs: bool = False, axis: int = 1):
  """Attention of one query per sequence over ``S`` keys; GQA without repeating K/V.

  Args:
    q: ``[B, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]`` (``HQ % H == 0``, query head
      ``h*G + g`` reads KV head ``h``); with ``axis=2`` k/v are ``[B, H, S, D]``.
    mask: bool ``[B, S]`` (same keys for every head) or ``[B, S, H]``.
    scale: logit scale.
    return_probs: also return the probabilities ``[B, H, G, S]`` float32.

  Returns:
    ``o [B, HQ, Dv]`` in ``q.dtype`` (0 where no key is visible), and the probabilities if asked:
    :func:`~sparse_attention_jax.ops.masked.masked_attention` of one query (``precision="input"``,
    ``q`` cast to the cache dtype).
  """
  b, hq, _ = q.shape
  s, h = k.shape[axis], k.shape[3 - axis]
  m = mask if mask.ndim == 3 else mask[:, :, None]
  m = jnp.broadcast_to(m, (b, s, h))[:, None]  # [B, 1(T), S, H]
  res = masked_attention(
    q.astype(k.dtype)[:, None],
    k,
    v,
    m.transpose(0, 1, 3, 2),  # [B, 1, H, S]
    scale,
    return_probs=return_probs,
    precision="input",
    kv_axis=axis,
  )
  o = res[0][:, 0].astype(q.dtype)
  return (o, res[2][:, 0].reshape(b, h, hq // h, s)) if return_probs else o


def window_mask(slot_pos, pos, window: int | None):
  """``[B, S]`` bool: slot positions ``slot_pos [B|1, S]`` that query position ``pos [B]``
  sees: written (``>= 0``), causal, and within the last ``window`` positions (None = all)."""
  p = pos[:, None]
  m = (slot_pos >= 0) & (slot_pos <= p)
  if window is not None:
    m &= slot_pos > p - window
  return m


__all__ = [
  "attend_one",
  "fill_linear",
  "fill_ring",
  "gather_tokens",
  "ring_positions",
  "window_mask",
  "write_linear",
  "write_ring",
]
