"""Masked attention whose backward pass recomputes the probabilities (saves only O(T) residuals).

:func:`~sparse_attention_jax.ops.masked.masked_attention` differentiated by autodiff keeps about
six ``[B, T, HQ, S]`` arrays (logits, masks, exponentials, probabilities) alive from the forward to
the backward pass. For the compressed branch (``S = T / d``: 4.3 GB each at B=8, T=8192, HQ=32,
d=16) that is what limits a model without rematerialization. This variant has the same forward
(:func:`masked_attention` itself) and a ``jax.custom_vjp`` that keeps ``q, k, v``, the boolean mask
(``[B|1, T, H|1, S]``), ``o`` and ``lse`` and recomputes ``p = exp(logits - lse)`` in the backward
pass (FlashAttention's ``D = rowsum(dO * O)`` form). The probabilities it returns carry no
gradient (selection uses them under ``stop_gradient``).

Matmul precision follows the blocked op (:mod:`sparse_attention_jax.ops.blocked`): float32
inputs use ``HIGHEST`` (then the forward is exactly :func:`masked_attention`'s computation);
bf16/f16 inputs feed the tensor cores as they are with float32 accumulation, and the
``[.., S]``-sized operands of the other matmuls (probabilities, ``dS``) are cast to the input
dtype as FlashAttention does. (Upcasting bf16 inputs to float32 with ``HIGHEST`` made these
GPU matmuls run without tensor cores; a bf16 x bf16 product is exact in float32, so the logits
only change by summation order.) Softmax, ``lse`` and the returned probabilities stay float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.blocked import matmul_precision
from sparse_attention_jax.ops.masked import masked_attention, masked_softmax


def _mm(spec, a, b):
  """einsum with float32 accumulation; ``HIGHEST`` for float32 operands."""
  return jnp.einsum(
    spec, a, b, precision=matmul_precision(a.dtype), preferred_element_type=jnp.float32
  )


def _forward(q, k, v, mask, scale):
  """As :func:`masked_attention` with ``return_probs=True`` (the precision policy above)."""
  b, t, hq, dk = q.shape
  h, s = k.shape[2], k.shape[1]
  g = hq // h
  qg = q.reshape(b, t, h, g, dk)
  logits = _mm("bthgd,bshd->bthgs", qg, k.astype(q.dtype)) * scale
  m5 = jnp.broadcast_to(mask, (b, t, h, s))[:, :, :, None, :]  # [B,T,H,1,S]
  p, lse = masked_softmax(logits, m5)  # [B,T,H,G,S]
  o = _mm("bthgs,bshv->bthgv", p.astype(v.dtype), v)
  return (
    o.reshape(b, t, hq, v.shape[3]).astype(q.dtype),
    lse.reshape(b, t, hq),
    p.reshape(b, t, hq, s),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  return _forward(q, k, v, mask, scale)


def _attention_fwd(q, k, v, mask, scale):
  o, lse, probs = _forward(q, k, v, mask, scale)
  return (o, lse, probs), (q, k, v, mask, o, lse)


def _attention_bwd(scale, res, cts):
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
  logits = _mm("bthgd,bshd->bthgs", qg, k.astype(q.dtype)) * scale
  p = jnp.where(m5, jnp.exp(logits - jnp.where(seen, lse5, 0.0)[..., None]), 0.0)
  delta = jnp.sum(dog.astype(jnp.float32) * o.reshape(b, t, h, g, dv).astype(jnp.float32), axis=-1)
  dp = _mm("bthgv,bshv->bthgs", dog, v)
  ds = p * (dp - delta[..., None]) * scale
  dq = _mm("bthgs,bshd->bthgd", ds.astype(k.dtype), k)
  dk_ = _mm("bthgs,bthgd->bshd", ds.astype(q.dtype), qg)
  dv_ = _mm("bthgs,bthgv->bshv", p.astype(v.dtype), dog)
  return (dq.reshape(b, t, hq, dk).astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def recompute_masked_attention(q, k, v, mask, scale: float):
  """:func:`~sparse_attention_jax.ops.masked.masked_attention` with ``return_probs=True`` whose
  gradient recomputes the probabilities instead of saving them.

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
  o, lse, probs = _attention(q, k, v, mask, float(scale))
  return o, jax.lax.stop_gradient(lse), jax.lax.stop_gradient(probs)
