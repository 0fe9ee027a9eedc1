"""Memory-lean plain-JAX selected-block attention: each query gathers its selected blocks.

The fallback of :func:`~sparse_attention_jax.ops.selected.selected_attention` where no kernel
serves the call (CPU, TPU, GPUs without the Mosaic kernels) and the dense reference's
``[B, T, HQ, T]`` logits would be large. Queries go in chunks of ``C`` tokens through a
``lax.scan`` whose body is rematerialized in the backward pass; each chunk gathers the ``n``
selected blocks of every (token, KV head) from ``K, V`` laid out as ``[B, H, NB, l', D]``, so the
live memory is ``O(C * HQ * n * l')`` logits and ``O(C * H * n * l' * D)`` gathered keys and
values instead of ``O(T^2 * HQ)`` (``C`` from :func:`default_chunk`); the work is the sparse
``O(T * HQ * n * l' * D)`` plus the gathers (``n * l' * D`` elements per token and KV head, which
bound its speed: a fallback, not a kernel).

Semantics are those of :func:`~sparse_attention_jax.ops.selected.selected_mask`: ``-1`` and
out-of-range entries match nothing, duplicates count once, keys ``s <= t`` of the query's own
document only, 0 output for a query that sees nothing. Precision: as the blocked op (bf16/f16
operands with float32 accumulation, ``HIGHEST`` for float32; float32 softmax); the gathered keys
and values are float32 copies so that their gradients accumulate over the chunks in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.masked import document_ids
from sparse_attention_jax.ops.masked_lean import _mm

_NEG = -1e30
# Elements per chunk of the logits plus the gathered keys and values (float32: 32 MiB each).
_CHUNK_ELEMENTS = 2**23


def default_chunk(
  seq_len: int,
  num_q_heads: int,
  num_kv_heads: int,
  num_selected: int,
  block_size: int,
  dk: int,
  dv: int,
) -> int:
  """Query tokens per chunk: ~8M elements of logits (``HQ * n * l'`` per token) plus gathered
  keys and values (``H * n * l' * (Dk + Dv)`` per token), between 8 and ``seq_len``."""
  per_token = num_selected * block_size * (num_q_heads + num_kv_heads * (dk + dv))
  return max(1, min(seq_len, max(8, _CHUNK_ELEMENTS // max(1, per_token))))


def gathered_selected_attention(
  q,
  k,
  v,
  block_indices,
  *,
  block_size: int,
  segment_ids=None,
  softmax_scale: float,
  chunk: int | None = None,
):
  """Selected-block attention by gathering the selected blocks per query chunk.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` = padding).
    block_size: l'.
    segment_ids: optional ``[B, T]`` document ids (maximal runs of equal ids).
    softmax_scale: logit scale.
    chunk: query tokens per scan step (default :func:`default_chunk`).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  b, t, hq, dk = q.shape
  h, dv, n = k.shape[2], v.shape[3], block_indices.shape[-1]
  g, bs = hq // h, block_size
  nb = -(-t // bs)
  c = chunk or default_chunk(t, hq, h, n, bs, dk, dv)
  nt = -(-t // c)
  tp = nt * c

  def blocks(x):  # [B, T, H, D] -> [B, H, NB, l', D] float32
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
    return x.reshape(b, nb, bs, h, x.shape[-1]).transpose(0, 3, 1, 2, 4)

  kb, vb = blocks(k), blocks(v)
  doc = (
    jnp.zeros((b, t), jnp.int32) if segment_ids is None else document_ids(jnp.asarray(segment_ids))
  )
  doc_k = jnp.pad(doc, ((0, 0), (0, nb * bs - t)), constant_values=-1).reshape(b, nb, bs)
  pad_t = lambda x, value: jnp.pad(
    x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2), constant_values=value
  )
  # Scanned over chunks: [NT, B, C, ...]
  qs = pad_t(q, 0).reshape(b, nt, c, h, g, dk).swapaxes(0, 1)
  idx = pad_t(jnp.asarray(block_indices, jnp.int32), -1).reshape(b, nt, c, h, n).swapaxes(0, 1)
  doc_q = pad_t(doc, -2).reshape(b, nt, c).swapaxes(0, 1)  # padded queries match no document
  pos = jnp.arange(tp, dtype=jnp.int32).reshape(nt, c)
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)  # [j, i]: i comes before j
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, None, :, None]

  def chunk_attention(_, xs):
    qc, ic, dq, pc = xs  # [B,C,H,G,Dk], [B,C,H,n], [B,C], [C]
    ok = (ic >= 0) & (ic < nb)
    dup = jnp.any((ic[..., :, None] == ic[..., None, :]) & earlier, axis=-1)
    ok = ok & ~dup  # duplicates count once
    safe = jnp.where(ok, ic, 0)
    kg = kb[bi, hi, safe].astype(q.dtype)  # [B, C, H, n, l', Dk]
    vg = vb[bi, hi, safe].astype(v.dtype)  # [B, C, H, n, l', Dv]
    key_pos = safe[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)  # [B, C, H, n, l']
    vis = (
      ok[..., None]
      & (key_pos <= pc[None, :, None, None, None])
      & (doc_k[bi, safe] == dq[:, :, None, None, None])
    )
    logits = _mm("bchgd,bchnsd->bchgns", qc, kg) * softmax_scale  # [B,C,H,G,n,l']
    vis6 = vis[:, :, :, None]
    logits = jnp.where(vis6, logits, _NEG)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=(-2, -1), keepdims=True))
    p = jnp.where(vis6, jnp.exp(logits - m), 0.0)
    den = jnp.sum(p, axis=(-2, -1), keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    o = _mm("bchgns,bchnsv->bchgv", p.astype(v.dtype), vg)
    return None, o.astype(q.dtype)

  _, o = jax.lax.scan(jax.checkpoint(chunk_attention), None, (qs, idx, doc_q, pos))
  return o.swapaxes(0, 1).reshape(b, tp, hq, dv)[:, :t]


__all__ = ["default_chunk", "gathered_selected_attention"]
