"""Masked multi-head attention in plain JAX: the numerical core of every reference branch.

Softmax and accumulation run in float32 (``HIGHEST`` matmul precision, so the f32 reference stays
exact on GPUs/TPUs that would otherwise use reduced-precision passes). Rows that see no key get a
zero output and ``lse = -inf``, without NaNs in the forward or the gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

_NEG = -1e30
_HI = jax.lax.Precision.HIGHEST


def masked_softmax(logits, mask):
  """Softmax over the last axis of float32 ``logits`` where ``mask`` (broadcastable) holds.

  Returns:
    ``(p, lse)``: probabilities (0 where masked; all 0 on a row that sees nothing) and the
    log-sum-exp with the last axis dropped (``-inf`` on such a row).
  """
  logits = jnp.where(mask, logits, _NEG)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  seen = denom > 0
  p = p / jnp.where(seen, denom, 1.0)
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)[..., 0]
  return p, lse


def masked_attention(q, k, v, mask, scale: float, *, return_probs: bool = False):
  """Attention of every query over the keys its mask allows; GQA without repeating K/V.

  Args:
    q: ``[B, T, HQ, Dk]`` queries.
    k: ``[B, S, H, Dk]`` keys, ``HQ % H == 0``; query head ``h*G + g`` reads KV head ``h``.
    v: ``[B, S, H, Dv]`` values.
    mask: bool, broadcastable to ``[B, T, H, S]`` (one mask per KV group).
    scale: logit scale.
    return_probs: also return the normalized probabilities ``[B, T, HQ, S]`` (float32).

  Returns:
    ``(o, lse)`` or ``(o, lse, probs)``: ``o [B, T, HQ, Dv]`` in ``q.dtype``; ``lse [B, T, HQ]``
    float32 natural-log log-sum-exp of the scaled logits (``-inf`` where nothing is visible).
  """
  b, t, hq, dk = q.shape
  h = k.shape[2]
  g = hq // h
  if k.shape[1] == 0:  # no keys at all (e.g. T < l for the compressed branch)
    o = jnp.zeros((b, t, hq, v.shape[3]), q.dtype)
    lse = jnp.full((b, t, hq), -jnp.inf, jnp.float32)
    return (o, lse, jnp.zeros((b, t, hq, 0), jnp.float32)) if return_probs else (o, lse)
  qg = q.reshape(b, t, h, g, dk).astype(jnp.float32)
  logits = jnp.einsum("bthgd,bshd->bthgs", qg, k.astype(jnp.float32), precision=_HI) * scale
  m5 = jnp.broadcast_to(mask, (b, t, h, k.shape[1]))[:, :, :, None, :]  # [B,T,H,1,S]
  p, lse = masked_softmax(logits, m5)  # [B,T,H,G,S]
  o = jnp.einsum("bthgs,bshv->bthgv", p, v.astype(jnp.float32), precision=_HI)
  o = o.reshape(b, t, hq, v.shape[3]).astype(q.dtype)
  lse = lse.reshape(b, t, hq)
  chex.assert_shape(o, (b, t, hq, v.shape[3]))
  chex.assert_type([o, lse], [q.dtype, jnp.float32])
  if return_probs:
    return o, lse, p.reshape(b, t, hq, k.shape[1])
  return o, lse


def document_ids(segment_ids):
  """``[B, T]`` int32 run index: documents are maximal runs of equal segment ids, so an id that
  comes back later (``0 0 1 1 0 0``) starts a new document."""
  is_start = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return jnp.cumsum(is_start, axis=1, dtype=jnp.int32)


def same_document(segment_ids):
  """``[B, T, T]`` bool: tokens ``t`` and ``s`` belong to the same document."""
  doc = document_ids(segment_ids)
  return doc[:, :, None] == doc[:, None, :]


def document_starts(segment_ids, batch: int, seq_len: int):
  """``[B, T]`` int32: position of the first token of each token's document (0 without ids).

  Documents are maximal runs of equal segment ids.
  """
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids is None:
    return jnp.zeros((batch, seq_len), jnp.int32)
  is_start = jnp.concatenate(
    [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return jax.lax.cummax(jnp.where(is_start, pos[None, :], 0), axis=1)


def causal_mask(seq_len: int, segment_ids=None, window: int | None = None):
  """``[B|1, T, 1, T]`` bool: key ``s`` visible to query ``t`` iff ``s <= t`` (and
  ``t - s < window``, and same document)."""
  t = jnp.arange(seq_len)
  m = t[None, :] <= t[:, None]
  if window is not None:
    m &= t[:, None] - t[None, :] < window
  m = m[None]
  if segment_ids is not None:
    m = m & same_document(segment_ids)
  return m[:, :, None, :]


def dense_causal_attention(
  q,
  k,
  v,
  *,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
  chunk: int | None = None,
):
  """Dense causal (GQA) attention, the baseline every sparse branch reduces to.

  By default it runs the blocked op of :mod:`sparse_attention_jax.ops.blocked` (``O(T * C)``
  memory, online softmax); ``impl="reference"`` runs the masked reference with ``[B, T, HQ, T]``
  logits that it is tested against.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    segment_ids: optional ``[B, T]`` int document ids (no attention across documents).
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"reference"`` (dense masked) or anything else (``"auto"``: the blocked op).
    chunk: tokens per chunk of the blocked op (default 512, clamped to ``T``).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  from sparse_attention_jax.ops import _checks
  from sparse_attention_jax.ops.blocked import blocked_attention

  b, t, s, _, _, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  _checks.check_segment_ids(segment_ids, b, t)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if impl == "reference":
    return masked_attention(q, k, v, causal_mask(t, segment_ids), scale)[0]
  return blocked_attention(q, k, v, segment_ids=segment_ids, softmax_scale=scale, chunk=chunk)[0]
