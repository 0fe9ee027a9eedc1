"""Masked attention whose backward pass recomputes the probabilities (saves only O(T) residuals).

:func:`~sparse_attention_jax.ops.masked.masked_attention` differentiated by autodiff keeps about
six ``[B, T, HQ, S]`` arrays (logits, masks, exponentials, probabilities) alive from the forward to
the backward pass. For the compressed branch (``S = T / d``: 4.3 GB each at B=8, T=8192, HQ=32,
d=16) that is what limits a model without rematerialization. This variant has the same forward
(:func:`masked_attention` itself) and a ``jax.custom_vjp`` that keeps ``q, k, v``, the boolean mask
(``[B|1, T, H|1, S]``), ``o`` and ``lse`` and recomputes ``p = exp(logits - lse)`` in the backward
pass (FlashAttention's ``D = rowsum(dO * O)`` form). The probabilities it returns carry no
gradient (selection uses them under ``stop_gradient``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.masked import masked_attention

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
  return masked_attention(q, k, v, mask, scale, return_probs=True)


def _attention_fwd(q, k, v, mask, scale):
  o, lse, probs = masked_attention(q, k, v, mask, scale, return_probs=True)
  return (o, lse, probs), (q, k, v, mask, o, lse)


def _attention_bwd(scale, res, cts):
  q, k, v, mask, o, lse = res
  do = cts[0]                       # lse and probs are auxiliary outputs without gradient
  b, t, hq, dk = q.shape
  s, h, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // h
  qg = q.reshape(b, t, h, g, dk).astype(jnp.float32)
  dog = do.reshape(b, t, h, g, dv).astype(jnp.float32)
  lse5 = lse.reshape(b, t, h, g)
  seen = jnp.isfinite(lse5)
  m5 = jnp.broadcast_to(mask, (b, t, h, s))[:, :, :, None, :] & seen[..., None]
  logits = jnp.einsum("bthgd,bshd->bthgs", qg, k.astype(jnp.float32), precision=_HI) * scale
  p = jnp.where(m5, jnp.exp(logits - jnp.where(seen, lse5, 0.0)[..., None]), 0.0)
  delta = jnp.sum(dog * o.reshape(b, t, h, g, dv).astype(jnp.float32), axis=-1)
  dp = jnp.einsum("bthgv,bshv->bthgs", dog, v.astype(jnp.float32), precision=_HI)
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bthgs,bshd->bthgd", ds, k.astype(jnp.float32), precision=_HI)
  dk_ = jnp.einsum("bthgs,bthgd->bshd", ds, qg, precision=_HI)
  dv_ = jnp.einsum("bthgs,bthgv->bshv", p, dog, precision=_HI)
  return (dq.reshape(b, t, hq, dk).astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype),
          None)


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
