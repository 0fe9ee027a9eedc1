"""Blocked (flash-style) causal attention in plain JAX: O(T * C) memory, full or sliding window.

Why hand-written: ``jax.nn.dot_product_attention`` has no segment ids (its XLA path and a
``[B, 1, T, T]`` mask both materialize ``T x T`` tensors), and the Pallas kernels of this project
serve only the selected branch. This op is the portable, exact fallback every dense-like path of
the library (full causal attention, the sliding window of NSA/SWA/ASA, SSA's ``o_full``) runs on
when a fused kernel cannot serve the call.

Queries are cut into chunks of ``C`` tokens (the sequence is zero-padded to a multiple of ``C``);
query chunk ``i`` visits key chunks ``lo .. i`` with an online softmax (FlashAttention-2), where
``lo = i - ceil((w - 1) / C)`` for a window of ``w`` keys, or ``0`` for full causal attention,
raised to the chunk of the earliest document start among the chunk's first queries (no chunk
wholly before a document is visited). Only one ``[B, C, H, G, C]`` logits tile lives at a time.
The backward pass (``jax.custom_vjp``) keeps only ``o`` and ``lse`` from the forward pass and
recomputes each tile (FlashAttention-2's ``D = rowsum(dO * O)`` form); ``dK``/``dV`` accumulate
in float32 buffers of the K/V size.

Semantics (equal to :func:`~sparse_attention_jax.ops.masked.masked_attention` with
:func:`~sparse_attention_jax.ops.masked.causal_mask`): key ``s`` visible to query ``t`` iff
``s <= t``, ``t - s < w`` and both lie in the same document (maximal run of equal segment ids);
GQA without repeating K/V (query head ``h*G + g`` reads KV head ``h``); ``Dv`` may differ from
``Dk``; float32 softmax and accumulation (float32 inputs use ``HIGHEST`` matmul precision, bf16 and
f16 inputs feed the matmuls as they are with float32 accumulation); a row that sees nothing outputs
0 with ``lse = -inf`` (cannot happen in self-attention, kept for safety); no NaN in gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.documents import document_ids, document_starts
from sparse_attention_jax.ops.masked import matmul_precision

_NEG = -1e30


def default_chunk(window: int | None) -> int:
  """Query/key chunk ``C``: 512 for full causal attention; for a window ``w`` the power of two
  ``>= w / 2`` clamped to ``[32, 512]`` (so a query chunk visits at most 3 key chunks)."""
  if window is None:
    return 512
  p = 1
  while p < -(-window // 2):
    p *= 2
  return min(512, max(32, p))


class _Geometry:
  """Static chunking of one call: ``c`` tokens per chunk, ``n`` chunks, ``back`` lookback chunks
  (None = full causal)."""

  def __init__(self, t: int, window: int | None, chunk: int):
    self.c = min(chunk, t)
    self.n = -(-t // self.c)
    self.tp = self.n * self.c
    self.window = window
    self.back = None if window is None else -(-(window - 1) // self.c)


def _chunked(x, geo: _Geometry):
  """``[B, T, ...]`` -> ``[N, B, C, ...]`` (zero-padded to ``N * C`` tokens)."""
  pad = geo.tp - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], geo.n, geo.c, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunked(x, t: int):
  """``[N, B, C, ...]`` -> ``[B, T, ...]``."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _key_range(i, first_start, geo: _Geometry):
  """Key chunks ``[lo, i]`` of query chunk ``i`` (``first_start``: ``[N]`` earliest document
  start of each query chunk's queries)."""
  lo = first_start[i] // geo.c
  if geo.back is not None:
    lo = jnp.maximum(lo, i - geo.back)
  return lo, i + 1


def _tile_mask(i, j, doc_c, geo: _Geometry):
  """``[B, C, 1, 1, C]`` bool: key ``s`` (chunk ``j``) visible to query ``t`` (chunk ``i``)."""
  t = i * geo.c + jnp.arange(geo.c)
  s = j * geo.c + jnp.arange(geo.c)
  m = s[None, :] <= t[:, None]
  if geo.window is not None:
    m &= t[:, None] - s[None, :] < geo.window
  m = m[None] & (doc_c[i][:, :, None] == doc_c[j][:, None, :])  # [B, C, C]
  return m[:, :, None, None, :]


def _logits(qi, kj, scale):
  """``qi [B, C, H, G, Dk]``, ``kj [B, C, H, Dk]`` -> float32 ``[B, Cq, H, G, Ck]``."""
  return (
    jnp.einsum(
      "bqhgd,bkhd->bqhgk",
      qi,
      kj,
      precision=matmul_precision(qi.dtype),
      preferred_element_type=jnp.float32,
    )
    * scale
  )


def _prepare(q, k, v, segment_ids, geo: _Geometry):
  """Chunked operands: ``q_c [N, B, C, H, G, Dk]``, ``k_c [N, B, C, H, Dk]``, ``v_c [N, B, C, H,
  Dv]``, ``doc_c [N, B, C]`` int32 (padding tokens form their own document) and ``first_start
  [N]`` int32."""
  b, t, hq, dk = q.shape
  h = k.shape[2]
  q_c = _chunked(q.reshape(b, t, h, hq // h, dk), geo)
  k_c, v_c = _chunked(k, geo), _chunked(v, geo)
  if segment_ids is None:
    doc = jnp.zeros((b, t), jnp.int32)
    starts = jnp.zeros((b, t), jnp.int32)
  else:
    doc = document_ids(segment_ids)
    starts = document_starts(segment_ids, b, t)
  doc = jnp.pad(doc, [(0, 0), (0, geo.tp - t)], constant_values=-1)
  first_start = jnp.min(starts[:, :: geo.c], axis=0)  # [N]
  return q_c, k_c, v_c, _chunked(doc, geo), first_start


def _forward(q, k, v, segment_ids, scale, geo: _Geometry):
  """``(o [B, T, HQ, Dv] in q.dtype, lse [B, T, H, G] float32)``."""
  b, t, hq, _ = q.shape
  h, dv = k.shape[2], v.shape[3]
  g = hq // h
  q_c, k_c, v_c, doc_c, first_start = _prepare(q, k, v, segment_ids, geo)

  def query_chunk(_, i):
    qi = q_c[i]

    def key_chunk(j, carry):
      m, l, acc = carry
      mask = _tile_mask(i, j, doc_c, geo)
      s = jnp.where(mask, _logits(qi, k_c[j], scale), _NEG)  # [B, Cq, H, G, Ck]
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum(
        "bqhgk,bkhv->bqhgv",
        p.astype(v.dtype),
        v_c[j],
        precision=matmul_precision(v.dtype),
        preferred_element_type=jnp.float32,
      )
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    init = (
      jnp.full((b, geo.c, h, g), _NEG, jnp.float32),
      jnp.zeros((b, geo.c, h, g), jnp.float32),
      jnp.zeros((b, geo.c, h, g, dv), jnp.float32),
    )
    lo, hi = _key_range(i, first_start, geo)
    m, l, acc = jax.lax.fori_loop(lo, hi, key_chunk, init)
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return None, (o.astype(q.dtype), lse)

  _, (o_c, lse_c) = jax.lax.scan(query_chunk, None, jnp.arange(geo.n))
  o = _unchunked(o_c, t).reshape(b, t, hq, dv)
  return o, _unchunked(lse_c, t)


def _backward(q, k, v, segment_ids, o, lse, do, scale, geo: _Geometry):
  """FlashAttention-2 backward: ``(dq, dk, dv)`` in the input dtypes."""
  b, t, hq, dk = q.shape
  h, dv = k.shape[2], v.shape[3]
  g = hq // h
  q_c, k_c, v_c, doc_c, first_start = _prepare(q, k, v, segment_ids, geo)
  do_c = _chunked(do.reshape(b, t, h, g, dv), geo)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  delta_c = _chunked(delta.reshape(b, t, h, g), geo)  # [N, B, C, H, G]
  seen_c = _chunked(jnp.isfinite(lse), geo)
  lse_c = jnp.where(seen_c, _chunked(lse, geo), 0.0)
  prec_k, prec_v = matmul_precision(k.dtype), matmul_precision(v.dtype)

  def query_chunk(carry, i):
    dk_acc, dv_acc = carry
    qi, doi = q_c[i], do_c[i]

    def key_chunk(j, inner):
      dq_i, dk_acc, dv_acc = inner
      mask = _tile_mask(i, j, doc_c, geo) & seen_c[i][..., None]
      p = jnp.where(mask, jnp.exp(_logits(qi, k_c[j], scale) - lse_c[i][..., None]), 0.0)
      dp = jnp.einsum(
        "bqhgv,bkhv->bqhgk", doi, v_c[j], precision=prec_v, preferred_element_type=jnp.float32
      )
      ds = p * (dp - delta_c[i][..., None]) * scale  # [B, Cq, H, G, Ck]
      dv_j = jnp.einsum(
        "bqhgk,bqhgv->bkhv",
        p.astype(do.dtype),
        doi,
        precision=prec_v,
        preferred_element_type=jnp.float32,
      )
      dk_j = jnp.einsum(
        "bqhgk,bqhgd->bkhd",
        ds.astype(q.dtype),
        qi,
        precision=prec_k,
        preferred_element_type=jnp.float32,
      )
      dq_i = dq_i + jnp.einsum(
        "bqhgk,bkhd->bqhgd",
        ds.astype(k.dtype),
        k_c[j],
        precision=prec_k,
        preferred_element_type=jnp.float32,
      )
      dk_acc = dk_acc.at[j].add(dk_j)
      dv_acc = dv_acc.at[j].add(dv_j)
      return dq_i, dk_acc, dv_acc

    lo, hi = _key_range(i, first_start, geo)
    dq_i = jnp.zeros((b, geo.c, h, g, dk), jnp.float32)
    dq_i, dk_acc, dv_acc = jax.lax.fori_loop(lo, hi, key_chunk, (dq_i, dk_acc, dv_acc))
    return (dk_acc, dv_acc), dq_i.astype(q.dtype)

  init = (
    jnp.zeros((geo.n, b, geo.c, h, dk), jnp.float32),
    jnp.zeros((geo.n, b, geo.c, h, dv), jnp.float32),
  )
  (dk_c, dv_c), dq_c = jax.lax.scan(query_chunk, init, jnp.arange(geo.n))
  dq = _unchunked(dq_c, t).reshape(b, t, hq, dk)
  return dq, _unchunked(dk_c, t).astype(k.dtype), _unchunked(dv_c, t).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, segment_ids, scale, window, chunk):
  geo = _Geometry(q.shape[1], window, chunk)
  return _forward(q, k, v, segment_ids, scale, geo)


def _attention_fwd(q, k, v, segment_ids, scale, window, chunk):
  o, lse = _attention(q, k, v, segment_ids, scale, window, chunk)
  return (o, lse), (q, k, v, segment_ids, o, lse)


def _attention_bwd(scale, window, chunk, res, cts):
  q, k, v, segment_ids, o, lse = res
  do, _ = cts  # lse is an auxiliary output: its cotangent is not propagated
  geo = _Geometry(q.shape[1], window, chunk)
  dq, dk, dv = _backward(q, k, v, segment_ids, o, lse, do, scale, geo)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(
  q,
  k,
  v,
  *,
  window: int | None = None,
  segment_ids=None,
  softmax_scale: float,
  chunk: int | None = None,
):
  """Causal (``window=None``) or sliding-window attention in ``O(T * C)`` memory.

  Callers validate inputs: this is the ``"blocked"`` implementation of
  :func:`~sparse_attention_jax.ops.causal.causal_attention`.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (one float dtype).
    window: ``w >= 1`` keys per query including itself, or None for full causal attention.
    segment_ids: optional ``[B, T]`` int document ids (documents = maximal runs of equal ids).
    softmax_scale: the logit scale.
    chunk: tokens per query/key chunk ``C`` (default :func:`default_chunk`); clamped to ``T``.

  Returns:
    ``(o, lse)``: ``o [B, T, HQ, Dv]`` in ``q.dtype``; ``lse [B, T, HQ]`` float32 (``-inf`` for a
    row that sees nothing; no gradient flows back through ``lse``).
  """
  chunk = default_chunk(window) if chunk is None else chunk
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids).astype(jnp.int32)
  o, lse = _attention(q, k, v, segment_ids, float(softmax_scale), window, chunk)
  return o, jax.lax.stop_gradient(lse).reshape(q.shape[:3])
