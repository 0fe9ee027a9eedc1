"""Selected-block attention (NSA eq. 12): queries attend over the tokens of their group's blocks.

Implementations (:mod:`sparse_attention_jax.ops.dispatch`, op ``"selected_attention"``):

* ``"pallas_gpu"``: the Mosaic GPU kernels (Hopper), tried first by ``"auto"`` on GPU
  (:func:`pallas_gpu_impl`);
* ``"pallas_tpu"``: the Pallas TPU kernels, tried first by ``"auto"`` on TPU
  (:func:`pallas_tpu_impl`; ``docs/tpu.md``);
* ``"reference"``: :func:`~sparse_attention_jax.ops.masked.masked_attention` over
  :func:`selected_mask` (dense ``[B, T, HQ, T]`` logits). ``"auto"`` takes it while those logits
  stay within :data:`DENSE_MAX_ELEMENTS`;
* ``"gathered"``: :func:`gathered_selected_attention`, the memory-lean plain-JAX form ``"auto"``
  takes above that size. Queries go in chunks of ``C`` tokens through a ``lax.scan`` whose body is
  rematerialized in the backward pass; each chunk gathers the ``n`` selected blocks of every
  (token, KV head) from ``K, V`` laid out as ``[B, H, NB, l', D]``, so the live memory is
  ``O(C * HQ * n * l')`` logits and ``O(C * H * n * l' * D)`` gathered keys and values instead of
  ``O(T^2 * HQ)``; the work is the sparse ``O(T * HQ * n * l' * D)`` plus the gathers (which bound
  its speed: a fallback, not a kernel). Precision: as the blocked op (bf16/f16 operands with
  float32 accumulation, ``HIGHEST`` for float32; float32 softmax); the gathered keys and values
  are float32 copies so that their gradients accumulate over the chunks in float32.

Semantics (every implementation): key ``s`` is visible to query ``t`` through KV head ``h`` iff it
lies in a block of ``h``'s selection (``-1`` and out-of-range entries match nothing, duplicates
count once), ``s <= t`` and both share a document; a query that sees nothing outputs 0. Block
indices are document-relative: with ``segment_ids``, block ``j`` of a query whose document starts
at row position ``ds`` holds keys ``[ds + j*l', ds + (j+1)*l')`` (without them ``ds = 0``;
:mod:`sparse_attention_jax.ops.documents`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops import _checks, dispatch
from sparse_attention_jax.ops.documents import document_starts
from sparse_attention_jax.ops.masked import (
  causal_mask,
  f32_einsum,
  masked_attention,
  masked_softmax,
)

# Logit elements (B * T * HQ * T) above which "auto" without a kernel gathers the selected blocks
# instead of running the dense reference (2^26 float32 logits = 256 MiB per copy).
DENSE_MAX_ELEMENTS = 2**26
# Elements per chunk of the logits plus the gathered keys and values (float32: 32 MiB each).
_CHUNK_ELEMENTS = 2**23


def selected_mask(block_indices, *, block_size: int, seq_len: int, segment_ids=None):
  """``[B, T, H, T]`` bool: key ``s`` visible to query ``t`` through KV head ``h``'s selection.

  ``s`` must lie in a listed block (``-1`` and out-of-range entries match nothing, duplicates count
  once; document-relative with ``segment_ids``), satisfy ``s <= t`` (causal inside the query's own
  block) and share the query's document.
  """
  nb = -(-seq_len // block_size)
  member = jnp.any(
    block_indices[..., None] == jnp.arange(nb, dtype=block_indices.dtype), axis=-2
  )  # [B, T, H, NB]
  key = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids is None:
    return member[..., key // block_size] & causal_mask(seq_len)
  start = document_starts(segment_ids, *segment_ids.shape)  # [B, T]
  rel = jnp.maximum(key[None, None, :] - start[:, :, None], 0) // block_size  # [B, T, S]
  listed = jnp.take_along_axis(member, rel[:, :, None, :], axis=-1)  # [B, T, H, S]
  return listed & causal_mask(seq_len, segment_ids)


def selected_attention(
  q,
  k,
  v,
  block_indices,
  *,
  block_size: int,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
):
  """Attention restricted to selected key blocks.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` = padding), shared by the ``G`` query
      heads of KV head ``h``.
    block_size: l', tokens per block.
    segment_ids: optional ``[B, T]`` document ids.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"auto"``, ``"pallas_gpu"``, ``"pallas_tpu"``, ``"reference"`` or ``"gathered"``
      (module docstring;
      names: :mod:`sparse_attention_jax.ops.dispatch`).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``; a query whose selection holds no visible key gets 0.
  """
  b, t, s, _, h, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  _checks.check_block_indices(block_indices, b, t, h)
  _checks.check_segment_ids(segment_ids, b, t)
  if not isinstance(block_size, int) or block_size < 1:
    _checks.fail("block_size", "a positive int", block_size)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  return dispatch.run(
    "selected_attention",
    impl,
    q,
    k,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=scale,
  )


def reference_impl(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """The ``"reference"`` entry: dense masked attention over :func:`selected_mask`."""
  mask = selected_mask(
    block_indices, block_size=block_size, seq_len=q.shape[1], segment_ids=segment_ids
  )
  return masked_attention(q, k, v, mask, softmax_scale)[0]


def pallas_gpu_impl(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """The ``"pallas_gpu"`` entry: the Mosaic GPU kernels (raise ``NotImplementedError`` for a call
  they cannot serve). With ``segment_ids`` the kernels read K/V in a document-aligned layout of
  a static number of blocks; a row with so many short documents that they do not fit runs the
  whole batch through :func:`gathered_selected_attention` instead (``lax.cond``), so no input is
  ever served wrongly."""
  from pallas_kernels import selected_attention_mgpu as mgpu

  kw = dict(block_size=block_size, softmax_scale=softmax_scale)
  if segment_ids is None or block_size not in mgpu.BLOCK_SIZES:  # the op says why it declines
    return mgpu.selected_attention_op(q, k, v, block_indices, segment_ids=segment_ids, **kw)
  fits = jnp.all(mgpu.documents_fit(segment_ids, mgpu.TuningConfig(block_size=block_size)))
  return jax.lax.cond(
    fits,
    lambda *a: mgpu.selected_attention_op(*a[:4], segment_ids=a[4], **kw),
    lambda *a: gathered_selected_attention(*a[:4], segment_ids=a[4], **kw),
    q,
    k,
    v,
    block_indices,
    segment_ids,
  )


def pallas_tpu_impl(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """The ``"pallas_tpu"`` entry: the Pallas TPU kernels (raise ``NotImplementedError`` for a call
  they cannot serve: no TPU, dtype other than bfloat16/float32, ``G`` above the tile rows, block
  size not a multiple of the dtype's sublane tile). With ``segment_ids`` the kernels read K/V in
  a document-aligned layout of a static number of blocks; a batch with a row whose documents do
  not fit runs through :func:`gathered_selected_attention` instead (``lax.cond``)."""
  from pallas_kernels import selected_attention_tpu as tpu

  kw = dict(block_size=block_size, softmax_scale=softmax_scale)
  reason = tpu.unsupported_reason(q, k, v, block_indices, block_size=block_size)
  if segment_ids is None or reason is not None:  # the op says why it declines
    return tpu.selected_attention_op(q, k, v, block_indices, segment_ids=segment_ids, **kw)
  return jax.lax.cond(
    tpu.documents_fit(segment_ids, block_size),
    lambda *a: tpu.selected_attention_op(*a[:4], segment_ids=a[4], **kw),
    lambda *a: gathered_selected_attention(*a[:4], segment_ids=a[4], **kw),
    q,
    k,
    v,
    block_indices,
    segment_ids,
  )


def dense_too_large(q, k, v, block_indices, **kwargs) -> str | None:
  """``"auto"``'s guard of the reference: a reason while its logits exceed the budget."""
  del k, v, block_indices, kwargs
  b, t, hq, _ = q.shape
  if b * t * hq * t > DENSE_MAX_ELEMENTS:
    return f"dense logits B*T*HQ*T = {b * t * hq * t} > DENSE_MAX_ELEMENTS = {DENSE_MAX_ELEMENTS}"
  return None


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
    segment_ids: optional ``[B, T]`` document ids (maximal runs of equal ids); block indices are
      then document-relative.
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

  packed = segment_ids is not None
  if packed:  # blocks start at document offsets: gather rows of [B, H, T + l', D]
    rows = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, bs), (0, 0), (0, 0))).swapaxes(
      1, 2
    )
    kb, vb = rows(k), rows(v)
    start = document_starts(jnp.asarray(segment_ids), b, t)
  else:
    kb, vb = blocks(k), blocks(v)
    start = jnp.zeros((b, t), jnp.int32)
  pad_t = lambda x, value: jnp.pad(
    x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2), constant_values=value
  )
  # Scanned over chunks: [NT, B, C, ...]
  qs = pad_t(q, 0).reshape(b, nt, c, h, g, dk).swapaxes(0, 1)
  idx = pad_t(jnp.asarray(block_indices, jnp.int32), -1).reshape(b, nt, c, h, n).swapaxes(0, 1)
  start_q = pad_t(start, 0).reshape(b, nt, c).swapaxes(0, 1)
  pos = jnp.arange(tp, dtype=jnp.int32).reshape(nt, c)
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)  # [j, i]: i comes before j
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, None, :, None]

  def chunk_attention(_, xs):
    qc, ic, sc, pc = xs  # [B,C,H,G,Dk], [B,C,H,n], [B,C], [C]
    ok = (ic >= 0) & (ic < nb)
    dup = jnp.any((ic[..., :, None] == ic[..., None, :]) & earlier, axis=-1)
    ok = ok & ~dup  # duplicates count once
    safe = jnp.where(ok, ic, 0)
    # Keys ds + j*l' + c: at or after the document start, so "s <= t" keeps them in the document.
    key_pos = sc[:, :, None, None, None] + safe[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)
    if packed:
      key_row = jnp.minimum(key_pos, t + bs - 1)  # [B, C, H, n, l']
      kg = kb[bi[..., None], hi[..., None], key_row].astype(q.dtype)  # [B, C, H, n, l', Dk]
      vg = vb[bi[..., None], hi[..., None], key_row].astype(v.dtype)
    else:
      kg = kb[bi, hi, safe].astype(q.dtype)  # [B, C, H, n, l', Dk]
      vg = vb[bi, hi, safe].astype(v.dtype)  # [B, C, H, n, l', Dv]
    vis = ok[..., None] & (key_pos <= pc[None, :, None, None, None])
    logits = f32_einsum("bchgd,bchnsd->bchgns", qc, kg) * softmax_scale  # [B,C,H,G,n,l']
    flat = logits.shape[:4] + (n * bs,)  # one softmax over the n*l' gathered keys
    p, _ = masked_softmax(logits.reshape(flat), vis.reshape(b, c, h, 1, n * bs))
    o = f32_einsum("bchgns,bchnsv->bchgv", p.reshape(logits.shape).astype(v.dtype), vg)
    return None, o.astype(q.dtype)

  _, o = jax.lax.scan(jax.checkpoint(chunk_attention), None, (qs, idx, start_q, pos))
  return o.swapaxes(0, 1).reshape(b, tp, hq, dv)[:, :t]


__all__ = [
  "DENSE_MAX_ELEMENTS",
  "default_chunk",
  "dense_too_large",
  "gathered_selected_attention",
  "pallas_gpu_impl",
  "pallas_tpu_impl",
  "reference_impl",
  "selected_attention",
  "selected_mask",
]
