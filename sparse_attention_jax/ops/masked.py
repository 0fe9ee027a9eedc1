"""The attention core in plain JAX: masks and masked (optionally biased) softmax attention.

Every reference path of the library (dense causal and windowed attention, the compressed and
selected branches, NOSA's biased attention, single-token decoding) is :func:`masked_attention`
over a boolean mask built here or next to its op. Conventions, shared by every backend:

* GQA without repeating K/V: query head ``h*G + g`` reads KV head ``h`` (einsum letters
  ``b`` batch, ``t`` query, ``s`` key, ``h`` KV head, ``g`` query head of the group, ``d``/``v``
  key/value feature);
* logits, softmax and accumulation in float32; ``precision="float32"`` upcasts the operands and
  uses ``HIGHEST`` matmul precision (the exact reference), ``precision="input"`` feeds bf16/f16
  operands to the matmuls as they are with float32 accumulation (FlashAttention's policy; float32
  operands still use ``HIGHEST``);
* a row that sees no key outputs 0 with ``lse = -inf``, without NaNs in the forward or the
  gradient.

:func:`recompute_masked_attention` is the same forward with a backward pass that recomputes the
probabilities instead of keeping them (``O(T)`` residuals besides the inputs).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.documents import same_document

_NEG = -1e30
_HI = jax.lax.Precision.HIGHEST
PRECISIONS = ("float32", "input")


# ------------------------------------------------------------------------------------- masks
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


# ------------------------------------------------------------------------------------ softmax
def matmul_precision(dtype):
  """``HIGHEST`` for float32 operands; the default (tensor cores as they are) otherwise."""
  return _HI if dtype == jnp.float32 else None


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


def _operands(precision: str, *xs):
  if precision not in PRECISIONS:
    raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
  if precision == "float32":
    return tuple(x.astype(jnp.float32) for x in xs)
  return xs


def f32_einsum(spec, a, b):
  """einsum with float32 accumulation; ``HIGHEST`` for float32 operands."""
  return jnp.einsum(
    spec, a, b, precision=matmul_precision(a.dtype), preferred_element_type=jnp.float32
  )


def masked_attention(
  q,
  k,
  v,
  mask,
  scale: float,
  *,
  bias=None,
  return_probs: bool = False,
  precision: str = "float32",
  kv_axis: int = 1,
):
  """Attention of every query over the keys its mask allows; GQA without repeating K/V.

  Args:
    q: ``[B, T, HQ, Dk]`` queries.
    k: ``[B, S, H, Dk]`` keys (``kv_axis=2``: ``[B, H, S, Dk]``), ``HQ % H == 0``.
    v: ``[B, S, H, Dv]`` values (``kv_axis=2``: ``[B, H, S, Dv]``).
    mask: bool, broadcastable to ``[B, T, H, S]`` (one mask per KV group).
    scale: logit scale.
    bias: optional ``[B, S, H]`` float added to the scaled logits of key ``s`` for every query
      of KV head ``h`` (NOSA's eviction bias).
    return_probs: also return the normalized probabilities ``[B, T, HQ, S]`` (float32).
    precision: ``"float32"`` (exact reference) or ``"input"`` (see the module docstring).
    kv_axis: the key axis of ``k``/``v``: 1 (token-major) or 2 (head-major caches).

  Returns:
    ``(o, lse)`` or ``(o, lse, probs)``: ``o [B, T, HQ, Dv]`` in ``q.dtype``; ``lse [B, T, HQ]``
    float32 natural-log log-sum-exp of the (biased) scaled logits (``-inf`` where nothing is
    visible).
  """
  if kv_axis not in (1, 2):
    raise ValueError(f"kv_axis: expected 1 or 2, got {kv_axis!r}")
  b, t, hq, dk = q.shape
  s, h, dv = k.shape[kv_axis], k.shape[3 - kv_axis], v.shape[3]
  g = hq // h
  if s == 0:  # no keys at all (e.g. T < l for the compressed branch)
    o = jnp.zeros((b, t, hq, dv), q.dtype)
    lse = jnp.full((b, t, hq), -jnp.inf, jnp.float32)
    return (o, lse, jnp.zeros((b, t, hq, 0), jnp.float32)) if return_probs else (o, lse)
  kv = "bshd" if kv_axis == 1 else "bhsd"
  qg, kx, vx = _operands(precision, q.reshape(b, t, h, g, dk), k, v)
  logits = f32_einsum(f"bthgd,{kv}->bthgs", qg, kx.astype(qg.dtype)) * scale
  if bias is not None:
    if getattr(bias, "shape", None) != (b, s, h):
      raise ValueError(
        f"bias: expected shape [B, S, H] = {(b, s, h)}, got {getattr(bias, 'shape', None)}"
      )
    logits = logits + jnp.transpose(bias.astype(jnp.float32), (0, 2, 1))[:, None, :, None, :]
  m5 = jnp.broadcast_to(mask, (b, t, h, s))[:, :, :, None, :]  # [B, T, H, 1, S]
  p, lse = masked_softmax(logits, m5)  # [B, T, H, G, S]
  o = f32_einsum(f"bthgs,{kv.replace('d', 'v')}->bthgv", p.astype(vx.dtype), vx)
  o = o.reshape(b, t, hq, dv).astype(q.dtype)
  lse = lse.reshape(b, t, hq)
  chex.assert_shape(o, (b, t, hq, dv))
  chex.assert_type([o, lse], [q.dtype, jnp.float32])
  if return_probs:
    return o, lse, p.reshape(b, t, hq, s)
  return o, lse


# ------------------------------------------------------------- recomputing backward (O(T) saved)
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lean(q, k, v, mask, scale):
  return masked_attention(q, k, v, mask, scale, return_probs=True, precision="input")


def _lean_fwd(q, k, v, mask, scale):
  o, lse, probs = _lean(q, k, v, mask, scale)
  return (o, lse, probs), (q, k, v, mask, o, lse)


def _lean_bwd(scale, res, cts):
  q, k, v, mask, o, lse = res
  do = cts[0]  # lse and probs are auxiliary outputs without gradient
  b, t, hq, dk = q.shape
  s, h, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // h
  qg = q.reshape(b, t, h, g, dk)
  dog = do.reshape(b, t, h, g, dv).astype(v.dtype)
  lse5 = lse.reshape(b, t, h, g)
  seen = jnp.isfinite(lse5)
  m5 = jnp.broadcast_to(mask, (b, t, h, s))[:, :, :, None, :] & seen[..., None]
  logits = f32_einsum("bthgd,bshd->bthgs", qg, k.astype(q.dtype)) * scale
  p = jnp.where(m5, jnp.exp(logits - jnp.where(seen, lse5, 0.0)[..., None]), 0.0)
  delta = jnp.sum(dog.astype(jnp.float32) * o.reshape(b, t, h, g, dv).astype(jnp.float32), axis=-1)
  dp = f32_einsum("bthgv,bshv->bthgs", dog, v)
  ds = p * (dp - delta[..., None]) * scale
  dq = f32_einsum("bthgs,bshd->bthgd", ds.astype(k.dtype), k)
  dk_ = f32_einsum("bthgs,bthgd->bshd", ds.astype(q.dtype), qg)
  dv_ = f32_einsum("bthgs,bthgv->bshv", p.astype(v.dtype), dog)
  return (dq.reshape(b, t, hq, dk).astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), None)


_lean.defvjp(_lean_fwd, _lean_bwd)


def recompute_masked_attention(q, k, v, mask, scale: float):
  """:func:`masked_attention` with ``return_probs=True`` and ``precision="input"`` whose
  gradient recomputes the probabilities instead of saving them.

  Autodiff of :func:`masked_attention` keeps about six ``[B, T, HQ, S]`` arrays alive from the
  forward to the backward pass; this ``jax.custom_vjp`` keeps ``q, k, v``, the boolean mask,
  ``o`` and ``lse`` and recomputes ``p = exp(logits - lse)`` (FlashAttention's
  ``D = rowsum(dO * O)`` form; the ``[.., S]``-sized operands of the backward matmuls are cast to
  the input dtype).

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]``.
    mask: bool, broadcastable to ``[B, T, H, S]``.
    scale: logit scale (a Python float).

  Returns:
    ``(o [B, T, HQ, Dv], lse [B, T, HQ], probs [B, T, HQ, S])``; only ``o`` is differentiable.
  """
  if k.shape[1] == 0:
    return masked_attention(q, k, v, mask, scale, return_probs=True)
  mask = jnp.asarray(mask, bool)
  o, lse, probs = _lean(q, k, v, mask, float(scale))
  return o, jax.lax.stop_gradient(lse), jax.lax.stop_gradient(probs)


__all__ = [
  "PRECISIONS",
  "causal_mask",
  "f32_einsum",
  "masked_attention",
  "masked_softmax",
  "matmul_precision",
  "recompute_masked_attention",
]
