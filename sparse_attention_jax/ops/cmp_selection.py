"""Compressed attention fused with block selection (NSA eq. 8-11) without the probabilities.

The selection reads the compressed branch's per-head probabilities ``[B, T, HQ, NC]``; the
composite path (:func:`~sparse_attention_jax.ops.compression.compressed_attention`, then
:func:`~sparse_attention_jax.ops.selection.block_importance` and
:func:`~sparse_attention_jax.ops.selection.select_blocks`) materializes them in float32, 16 GiB
per batch row at ``T = 65536`` with ``HQ = 64`` and ``d = 64`` (64 GiB with ``d = 16``).
:func:`compressed_selection` returns what the rest of the op needs, ``(out, lse, block_indices)``,
and its ``"blocked"`` implementation never holds more than one chunk of query rows:

* query rows are cut into chunks of ``C`` tokens (zero-padded to a multiple of ``C``); per chunk:
  logits over the compressed keys, the masked softmax, the output and log-sum-exp, the
  probabilities summed over each KV group (eq. 10), pooled onto selection blocks (eq. 9 or max)
  and the exact top-``n`` with forced blocks (eq. 11): only ``[C, H, n]`` indices leave the chunk;
* chunks run in ``bands`` of consecutive chunks; a band reads only the compressed tokens its last
  row can see (compressed slot ``k`` covers tokens from ``k*d`` on, packed or not), so the causal
  half of the work is mostly skipped;
* the gradient (a ``jax.custom_vjp``; only ``out`` is differentiable) recomputes each chunk's
  probabilities from the saved log-sum-exp and accumulates ``dk_cmp``/``dv_cmp`` over the chunks
  of a band: ``O(T)`` residuals besides the inputs.

On GPUs, ``"cudnn"`` computes the output as one causal cuDNN call (:func:`cudnn_output`) and
``"pallas_gpu"`` (first in ``auto``'s order) adds the Pallas Triton scores and top-``n`` kernels of
:mod:`pallas_kernels.cmp_scores_triton` for the log-sum-exp and the indices.

Packed documents (``segment_ids``) follow :mod:`sparse_attention_jax.ops.documents`: the inputs
are ``compress(..., segment_ids=...)`` outputs and block indices are document-relative.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks, cudnn, dispatch
from sparse_attention_jax.ops.compression import compressed_attention
from sparse_attention_jax.ops.documents import cmp_layout, document_positions, document_starts
from sparse_attention_jax.ops.masked import f32_einsum, masked_softmax
from sparse_attention_jax.ops.selection import (
  block_importance,
  candidate_and_forced_at,
  pool_blocks,
  select_blocks,
  top_n_blocks,
)

PROBS_MAX_ELEMENTS = 2**26
"""``"auto"`` runs the composite ``"reference"`` path only while ``B*T*HQ*NC`` stays below this
(256 MiB of float32 probabilities); above it, the chunked ``"blocked"`` path."""

CHUNK_ELEMENTS = 2**25
"""Target ``B*C*HQ*S`` float32 logits per chunk of the ``"blocked"`` path (128 MiB)."""


class CompressedSelection(NamedTuple):
  """Attributes:
  out: ``[B, T, HQ, Dv]`` compressed-branch output (0 for queries that see no compressed token).
  lse: ``[B, T, HQ]`` float32 log-sum-exp of its scaled logits (``-inf`` where nothing is seen;
    no gradient).
  block_indices: ``[B, T, H, n]`` int32 selected blocks, ascending, ``-1`` padding
    (document-relative with ``segment_ids``), or None when called with ``select=False``.
  """

  out: jax.Array
  lse: jax.Array
  block_indices: jax.Array | None


def compressed_selection(
  q,
  k_cmp,
  v_cmp,
  config: NSAConfig,
  *,
  segment_ids=None,
  select: bool = True,
  chunk: int | None = None,
  impl: str = "auto",
) -> CompressedSelection:
  """Compressed attention and the top-``n`` blocks its probabilities select.

  Args:
    q: ``[B, T, HQ, Dk]`` queries.
    k_cmp: ``[B, NC, H, Dk]`` compressed keys (``compress(k, ...)``), ``HQ % H == 0``.
    v_cmp: ``[B, NC, H, Dv]`` compressed values.
    config: the :class:`NSAConfig` (l, d, l', n, forced blocks, ``score_pooling``).
    segment_ids: optional ``[B, T]`` document ids (the packed layout of
      :mod:`sparse_attention_jax.ops.documents`).
    select: also compute the block indices (False: ``out`` and ``lse`` only).
    chunk: query rows per chunk of the ``"blocked"`` implementation (default: about
      :data:`CHUNK_ELEMENTS` logits per chunk).
    impl: ``"auto"``, ``"reference"`` (compressed attention with the full probabilities, then
      block importance and top-n) or ``"blocked"`` (query chunks, see the module docstring).

  Returns:
    :class:`CompressedSelection`; only ``out`` is differentiable (w.r.t. ``q``, ``k_cmp`` and
    ``v_cmp``).
  """
  _checks.check_config(config)
  b, t, nc, *_ = _checks.check_qkv(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
  if nc != config.num_cmp_tokens(t):
    _checks.fail(
      "k_cmp",
      f"{config.num_cmp_tokens(t)} compressed tokens for T={t}, "
      f"l={config.cmp_window}, d={config.cmp_stride}",
      nc,
    )
  _checks.check_segment_ids(segment_ids, b, t)
  if select and config.num_selected > config.num_blocks(t):
    _checks.fail(
      "config.num_selected",
      f"at most the {config.num_blocks(t)} blocks of a T={t} sequence "
      f"(block_size={config.block_size}); use config.for_length(T)",
      config.num_selected,
    )
  if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
    _checks.fail("chunk", "a positive int or None", chunk)
  return dispatch.run(
    "compressed_selection",
    impl,
    q,
    k_cmp,
    v_cmp,
    config,
    segment_ids=segment_ids,
    select=select,
    chunk=chunk,
  )


# ------------------------------------------------------------------------------- reference
def reference_impl(q, k_cmp, v_cmp, config, *, segment_ids, select, chunk):
  """The composite path: full ``[B, T, HQ, NC]`` probabilities, then importance and top-n."""
  del chunk
  b, t = q.shape[:2]
  cmp = compressed_attention(q, k_cmp, v_cmp, config, segment_ids=segment_ids)
  idx = None
  if select:
    imp = block_importance(
      cmp.probs, config, num_kv_heads=k_cmp.shape[2], seq_len=t, segment_ids=segment_ids
    )
    idx = select_blocks(imp, config, segment_ids=segment_ids)
    chex.assert_shape(idx, (b, t, k_cmp.shape[2], config.num_selected))
  return CompressedSelection(cmp.out, cmp.lse, idx)


def probs_too_large(q, k_cmp, v_cmp, config, **kwargs) -> str | None:
  """``"auto"``'s guard of the reference: a reason while its probabilities exceed the budget."""
  del v_cmp, config, kwargs
  size = q.shape[0] * q.shape[1] * q.shape[2] * k_cmp.shape[1]
  if size > PROBS_MAX_ELEMENTS:
    return f"probabilities B*T*HQ*NC = {size} > PROBS_MAX_ELEMENTS = {PROBS_MAX_ELEMENTS}"
  return None


# --------------------------------------------------------------------------------- blocked
@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static chunking of one call.

  Attributes:
    chunk: query rows per chunk (``C``); ``num_chunks * chunk >= T``.
    bands: ``(first_chunk, num_chunks, num_slots)`` per band: the band's chunks read compressed
      slots ``[0, num_slots)``.
  """

  chunk: int
  num_chunks: int
  bands: tuple[tuple[int, int, int], ...]
  config: NSAConfig
  seq_len: int
  scale: float
  select: bool
  out: bool = True


def default_chunk(batch: int, seq_len: int, num_q_heads: int, num_cmp: int) -> int:
  """Query rows per chunk: a power of two with about :data:`CHUNK_ELEMENTS` logits, in
  ``[16, 4096]`` and at most ``T`` rounded up to a power of two."""
  per_row = max(1, batch * num_q_heads * num_cmp)
  c = max(16, min(4096, CHUNK_ELEMENTS // per_row))
  c = 1 << (c.bit_length() - 1)
  return max(1, min(c, 1 << max(0, (seq_len - 1).bit_length())))


def _plan(
  config: NSAConfig, t: int, nc: int, chunk: int, scale: float, select: bool, out: bool = True
) -> _Plan:
  n = -(-t // chunk)
  num_bands = min(4, n)
  per = -(-n // num_bands)
  bands = []
  l, d = config.cmp_window, config.cmp_stride
  for first in range(0, n, per):
    count = min(per, n - first)
    last_row = min(t, (first + count) * chunk) - 1
    slots = (last_row - l + 1) // d + 1 if last_row >= l - 1 else 0
    bands.append((first, count, max(1, min(nc, slots))))
  return _Plan(chunk, n, tuple(bands), config, t, scale, select, out)


class _Rows(NamedTuple):
  """Per query row (``[B, Tp]``, padded rows at position -1) and per slot (``[B, NC]``)."""

  u: jax.Array  # document position
  start: jax.Array  # row position of the document's first token
  offset: jax.Array  # slot of the document's compressed token 0
  count: jax.Array  # compressed tokens of the document
  slot_doc: jax.Array  # row position of slot k's document start (-1: unused)
  slot_last: jax.Array  # document position of the last token of slot k's window


def _rows(config: NSAConfig, segment_ids, b: int, t: int, tp: int) -> _Rows:
  layout = cmp_layout(config, segment_ids, b, t)
  pad = ((0, 0), (0, tp - t))
  u = jnp.pad(document_positions(segment_ids, b, t), pad, constant_values=-1)
  start = jnp.pad(document_starts(segment_ids, b, t), pad)
  return _Rows(
    u=u,
    start=start,
    offset=jnp.pad(layout.offset, pad),
    count=jnp.pad(layout.count, pad),
    slot_doc=layout.slot_doc,
    slot_last=layout.slot_index * config.cmp_stride + config.cmp_window - 1,
  )


def _chunk_rows(rows: _Rows, i, c: int):
  """The ``[B, C]`` per-row arrays of chunk ``i``."""
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
  return take(rows.u), take(rows.start), take(rows.offset), take(rows.count)


def _visible(rows: _Rows, u, start, s: int):
  """``[B, C, 1, 1, S]`` bool: slot ``k < S`` visible to each row of a chunk."""
  same = rows.slot_doc[:, None, :s] == start[:, :, None]
  seen = rows.slot_last[:, None, :s] <= u[:, :, None]
  return (same & seen)[:, :, None, None, :]


def _band_forward(plan: _Plan, band, qg, k, v, rows: _Rows):
  """Forward of one band: ``(o [N, B, C, H, G, Dv] or None, lse [N, B, C, H, G],
  idx [N, B, C, H, n] or None)``."""
  first, count, s = band
  c, cfg = plan.chunk, plan.config
  ks, vs = k[:, :s], v[:, :s]
  nb = cfg.num_blocks(plan.seq_len)
  nc = k.shape[1]

  def body(i):
    u, start, offset, cnt = _chunk_rows(rows, i, c)
    qc = jax.lax.dynamic_slice_in_dim(qg, i * c, c, axis=1)  # [B, C, H, G, Dk]
    logits = f32_einsum("bchgd,bshd->bchgs", qc, ks.astype(qc.dtype)) * plan.scale
    p, lse = masked_softmax(logits, _visible(rows, u, start, s))
    o = idx = None
    if plan.out:
      o = f32_einsum("bchgs,bshv->bchgv", p.astype(vs.dtype), vs).astype(qg.dtype)
    if plan.select:
      ph = jnp.pad(p.sum(axis=3), ((0, 0), (0, 0), (0, 0), (0, nc - s)))  # [B, C, H, NC] eq. 10
      imp = pool_blocks(ph, cfg, plan.seq_len, offset=offset, count=cnt)
      cand, forced = candidate_and_forced_at(cfg, nb, u)
      idx = top_n_blocks(imp, cand[:, :, None], forced[:, :, None], cfg.num_selected)
    return o, lse, idx

  return jax.lax.map(body, jnp.arange(first, first + count))


def _unchunk(x, t: int):
  """``[N, B, C, ...]`` -> ``[B, T, ...]`` (drops the padded rows)."""
  n, b, c = x.shape[:3]
  x = jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])
  return x[:, :t]


def _forward(plan: _Plan, q, k, v, rows: _Rows):
  b, t, hq, dk = q.shape
  h = k.shape[2]
  tp = plan.num_chunks * plan.chunk
  qg = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, h, hq // h, dk)
  parts = [_band_forward(plan, band, qg, k, v, rows) for band in plan.bands]

  def joined(j):
    xs = [part[j] for part in parts]
    if xs[0] is None:
      return None
    return _unchunk(jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0], t)

  o, lse, idx = joined(0), joined(1).reshape(b, t, hq), joined(2)
  o = None if o is None else o.reshape(b, t, hq, v.shape[3])
  return o, lse, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q, k, v, rows: _Rows):
  return _forward(plan, q, k, v, rows)


def _attend_fwd(plan: _Plan, q, k, v, rows: _Rows):
  o, lse, idx = _forward(plan, q, k, v, rows)
  return (o, lse, idx), (q, k, v, rows, o, lse)


def _attend_bwd(plan: _Plan, res, cts):
  q, k, v, rows, o, lse = res
  do = cts[0]  # lse and the indices carry no gradient
  b, t, hq, dk = q.shape
  h, dv = k.shape[2], v.shape[3]
  g = hq // h
  c, tp = plan.chunk, plan.num_chunks * plan.chunk
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  qg = pad(q).reshape(b, tp, h, g, dk)
  dog = pad(do.astype(v.dtype)).reshape(b, tp, h, g, dv)
  og = pad(o).reshape(b, tp, h, g, dv)
  lse5 = pad(lse).reshape(b, tp, h, g)
  dq_parts, dk_acc, dv_acc = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for first, count, s in plan.bands:
    ks, vs = k[:, :s], v[:, :s]

    def body(carry, i, ks=ks, vs=vs, s=s):
      dks, dvs = carry
      u, start, _, _ = _chunk_rows(rows, i, c)
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
      qc, doc, oc, lc = sl(qg), sl(dog), sl(og), sl(lse5)
      seen = jnp.isfinite(lc)
      mask = _visible(rows, u, start, s) & seen[..., None]
      logits = f32_einsum("bchgd,bshd->bchgs", qc, ks.astype(qc.dtype)) * plan.scale
      p = jnp.where(mask, jnp.exp(logits - jnp.where(seen, lc, 0.0)[..., None]), 0.0)
      delta = jnp.sum(doc.astype(jnp.float32) * oc.astype(jnp.float32), axis=-1)
      dp = f32_einsum("bchgv,bshv->bchgs", doc, vs)
      ds = p * (dp - delta[..., None]) * plan.scale
      dqc = f32_einsum("bchgs,bshd->bchgd", ds.astype(ks.dtype), ks).astype(q.dtype)
      dks = dks + f32_einsum("bchgs,bchgd->bshd", ds.astype(qc.dtype), qc)
      dvs = dvs + f32_einsum("bchgs,bchgv->bshv", p.astype(vs.dtype), doc)
      return (dks, dvs), dqc

    init = (jnp.zeros((b, s, h, dk), jnp.float32), jnp.zeros((b, s, h, dv), jnp.float32))
    (dks, dvs), dqc = jax.lax.scan(body, init, jnp.arange(first, first + count))
    dq_parts.append(dqc)
    dk_acc = dk_acc.at[:, :s].add(dks)
    dv_acc = dv_acc.at[:, :s].add(dvs)
  dq = _unchunk(jnp.concatenate(dq_parts, axis=0), t).reshape(b, t, hq, dk)
  return dq, dk_acc.astype(k.dtype), dv_acc.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blocked_impl(q, k_cmp, v_cmp, config, *, segment_ids, select, chunk):
  """Query chunks in bands (see the module docstring); ``O(C * NC)`` memory per chunk."""
  b, t, hq, dk = q.shape
  nc = k_cmp.shape[1]
  if nc == 0:  # T < l: no compressed token, nothing to chunk
    return reference_impl(
      q, k_cmp, v_cmp, config, segment_ids=segment_ids, select=select, chunk=chunk
    )
  c = default_chunk(b, t, hq, nc) if chunk is None else min(chunk, t)
  plan = _plan(config, t, nc, c, float(config.scale(dk)), select)
  rows = _rows(config, segment_ids, b, t, plan.num_chunks * c)
  o, lse, idx = _attend(plan, q, k_cmp, v_cmp, rows)
  return CompressedSelection(o, jax.lax.stop_gradient(lse), idx)


def _no_grad_stats(q, k_cmp, v_cmp, config, segment_ids, select, chunk):
  """``(lse, block_indices)`` of the blocked path without its output (no gradient)."""
  b, t, hq, dk = q.shape
  nc = k_cmp.shape[1]
  c = default_chunk(b, t, hq, nc) if chunk is None else min(chunk, t)
  plan = _plan(config, t, nc, c, float(config.scale(dk)), select, out=False)
  rows = _rows(config, segment_ids, b, t, plan.num_chunks * c)
  sg = jax.lax.stop_gradient
  _, lse, idx = _forward(plan, sg(q), sg(k_cmp), sg(v_cmp), rows)
  return lse, idx


CUDNN_SEQ_MULTIPLE = 64
"""The compressed positions are zero-padded to this multiple for cuDNN: with jax 0.11.2 on an H100
its fused attention refused the lengths ``NC`` = 87, 511 and 4095 (served 174 and 1024)."""


def _cudnn_positions(nc: int) -> int:
  return -(-nc // CUDNN_SEQ_MULTIPLE) * CUDNN_SEQ_MULTIPLE


def cudnn_output(q, k_cmp, v_cmp, config: NSAConfig):
  """The compressed branch's output as one causal cuDNN call (rows without documents).

  Query ``t >= l - 1`` sees compressed tokens ``0 .. m`` with ``m = (t - l + 1) // d``: the ``d``
  queries sharing an ``m`` become ``d`` extra query heads of one position, so the branch is causal
  attention between ``NC`` positions with ``HQ * d`` query heads over ``H`` KV heads (query head
  ``(h*G + g)*d + r`` reads KV head ``h``). Queries ``t < l - 1`` see nothing and output 0.

  Args:
    q: ``[B, T, HQ, Dk]`` (bf16/f16); k_cmp: ``[B, NC, H, Dk]``; v_cmp: ``[B, NC, H, Dv]``,
      ``NC >= 1``.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  b, t, hq, dk = q.shape
  nc, dv = k_cmp.shape[1], v_cmp.shape[3]
  l, d = config.cmp_window, config.cmp_stride
  ncp = _cudnn_positions(nc)
  m = ncp * d  # >= T - l + 1 query rows from row l - 1 on
  qs = jnp.pad(q[:, l - 1 :], ((0, 0), (0, m - (t - l + 1)), (0, 0), (0, 0)))
  qs = qs.reshape(b, ncp, d, hq, dk).transpose(0, 1, 3, 2, 4).reshape(b, ncp, hq * d, dk)
  # Zero keys past NC are seen only by the padded positions past NC (causal), whose rows are
  # dropped below.
  kv_pad = ((0, 0), (0, ncp - nc), (0, 0), (0, 0))
  kp, vp = jnp.pad(k_cmp, kv_pad), jnp.pad(v_cmp, kv_pad)
  o = cudnn.attention(qs, kp, vp, window=None, softmax_scale=config.scale(dk))
  o = o.reshape(b, ncp, hq, d, dv).transpose(0, 1, 3, 2, 4).reshape(b, m, hq, dv)
  return jnp.pad(o[:, : t - l + 1], ((0, 0), (l - 1, 0), (0, 0), (0, 0))).astype(q.dtype)


def _cudnn_serves(q, k_cmp, v_cmp, config: NSAConfig) -> bool:
  """Whether cuDNN accepts the head-folded call of :func:`cudnn_output` (shapes only)."""
  b, _, hq, dk = q.shape
  ncp, h = _cudnn_positions(k_cmp.shape[1]), k_cmp.shape[2]
  like = lambda x, *shape: jax.ShapeDtypeStruct(shape, x.dtype)
  return cudnn.usable(
    like(q, b, ncp, hq * config.cmp_stride, dk),
    like(k_cmp, b, ncp, h, dk),
    like(v_cmp, b, ncp, h, v_cmp.shape[3]),
    None,
    config.scale(dk),
  )


def _require_cudnn(impl: str, q, k_cmp, v_cmp, config: NSAConfig) -> None:
  """``NotImplementedError`` naming ``impl`` unless cuDNN serves :func:`cudnn_output`'s call."""
  if k_cmp.shape[1] == 0 or not _cudnn_serves(q, k_cmp, v_cmp, config):
    raise NotImplementedError(
      f"impl={impl!r} (compressed_selection): the output's cuDNN call needs a GPU, bf16/f16 "
      f"inputs it accepts and NC >= 1; got {q.dtype} q {q.shape}, k_cmp {k_cmp.shape}, "
      f"v_cmp {v_cmp.shape} on {jax.default_backend()!r}"
    )


def _rows_without_documents(stats, q, k_cmp, v_cmp, config, segment_ids, select, chunk):
  """:func:`cudnn_output` with ``stats(q, k_cmp) -> (lse, block_indices)`` on rows without
  documents; packed rows take the blocked path at run time unless every row is one document."""

  def plain(q, k_cmp, v_cmp, segment_ids):
    del segment_ids
    return (cudnn_output(q, k_cmp, v_cmp, config), *stats(q, k_cmp, v_cmp))

  if segment_ids is None:
    return CompressedSelection(*plain(q, k_cmp, v_cmp, None))

  def blocked(q, k_cmp, v_cmp, segment_ids):
    return tuple(
      blocked_impl(q, k_cmp, v_cmp, config, segment_ids=segment_ids, select=select, chunk=chunk)
    )

  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return CompressedSelection(
    *jax.lax.cond(one_document, plain, blocked, q, k_cmp, v_cmp, segment_ids)
  )


def cudnn_impl(q, k_cmp, v_cmp, config, *, segment_ids, select, chunk):
  """Output from :func:`cudnn_output` (fwd and bwd in cuDNN); log-sum-exp and block indices from
  the blocked path without its output (the log-sum-exp is dropped by XLA when unused). Packed
  rows take the blocked path at run time unless every row is one document."""
  _require_cudnn("cudnn", q, k_cmp, v_cmp, config)
  return _rows_without_documents(
    lambda q, k, v: _no_grad_stats(q, k, v, config, None, select, chunk),
    q,
    k_cmp,
    v_cmp,
    config,
    segment_ids,
    select,
    chunk,
  )


def _scores_config(q, k_cmp, config: NSAConfig):
  """The kernels' module and :class:`pallas_kernels.cmp_scores_triton.ScoresConfig` (imported on
  first use), or ``NotImplementedError`` naming why they cannot serve the call."""
  from pallas_kernels import cmp_scores_triton as kern

  cfg = kern.ScoresConfig(
    cmp_window=config.cmp_window,
    cmp_stride=config.cmp_stride,
    block_size=config.block_size,
    pooling=config.score_pooling,
    softmax_scale=float(config.scale(q.shape[-1])),
    num_selected=config.num_selected,
    num_init_blocks=config.num_init_blocks,
    num_local_blocks=config.num_local_blocks,
    # H100, T = 65536: 16 blocks per tile took 16.4 ms with l'/d = 1 and 32 blocks 10.4 ms;
    # with l'/d = 4, 16 blocks 36 ms and 32 blocks 67 ms.
    tb=32 if config.block_size == config.cmp_stride else 16,
  )
  reason = kern.unsupported_reason(cfg, group=q.shape[2] // k_cmp.shape[2], dk=q.shape[-1])
  if reason:
    raise NotImplementedError(
      f"impl='pallas_gpu' (compressed_selection): the scores kernels cannot serve this call: "
      f"{reason}"
    )
  return kern, cfg


def _kernel_select(q, k_cmp, config: NSAConfig, select: bool):
  """``(lse [B, T, HQ], block_indices [B, T, H, n] or None)`` from the Pallas Triton kernels:
  the top-``n`` inside the kernel when ``n`` is a power of two, else pooled importance and the
  top-``n`` in XLA."""
  kern, cfg = _scores_config(q, k_cmp, config)
  n = config.num_selected
  if not select:
    return kern.compressed_lse(q, k_cmp, cfg), None
  if n & (n - 1) == 0:
    return kern.compressed_select(q, k_cmp, cfg)
  lse, imp = kern.compressed_scores(q, k_cmp, cfg)  # imp [B, H, T, NB]
  u = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
  cand, forced = candidate_and_forced_at(config, imp.shape[-1], u)  # [1, T, NB]
  idx = top_n_blocks(imp, cand[:, None], forced[:, None], n)
  return lse, jnp.transpose(idx, (0, 2, 1, 3))  # [B, T, H, n]


def _grid_blocks(config: NSAConfig, t: int) -> int:
  """Blocks of the block-aligned grid for packed rows: ``2 NB`` (as the selected kernels)."""
  return 2 * config.num_blocks(t)


def _packed_kernel_select(q, k_cmp, config: NSAConfig, segment_ids):
  """``(lse, block_indices)`` of packed rows from the in-kernel top-``n``: queries and compressed
  tokens are placed on the block-aligned grid of :mod:`pallas_kernels.packed_layout` (every
  document starts on a block boundary), where NSA's per-document structure is translation
  invariant. Rows whose documents do not fit the grid's :func:`_grid_blocks` get wrong indices
  (the caller checks ``packed_blocks_needed``)."""
  from pallas_kernels import packed_layout

  kern, cfg = _scores_config(q, k_cmp, config)
  b, t = q.shape[:2]
  d, bs = config.cmp_stride, config.block_size
  nbp = _grid_blocks(config, t)
  layout = packed_layout.packed_layout(segment_ids, block_size=bs, num_blocks=nbp)
  # Grid slot s starts at grid position s*d; it is compressed token i = s - P*(l'/d) of the
  # document whose grid blocks start at P, stored in packed slot offset + i when i < count.
  grid = jnp.arange(config.num_cmp_tokens(nbp * bs), dtype=jnp.int32)
  row = layout.source[:, grid * d]  # [B, NCg] row position, T for grid padding
  has_row = row < t
  row = jnp.minimum(row, t - 1)
  take = lambda x: jnp.take_along_axis(x, row, axis=1)
  cmp = cmp_layout(config, segment_ids, b, t)
  i = grid[None, :] - take(layout.block_start) * (bs // d)
  valid = has_row & (i >= 0) & (i < take(cmp.count))
  slot = jnp.where(valid, take(cmp.offset) + i, 0)
  kg = jnp.take_along_axis(k_cmp, slot[:, :, None, None], axis=1)
  kg = jnp.where(valid[:, :, None, None], kg, 0).astype(k_cmp.dtype)
  rows = (packed_layout.padded_positions(layout), layout.block_start * bs)
  lse, ids = kern.compressed_select(q, kg, cfg, rows=rows, num_blocks=nbp)
  return lse, jnp.where(ids >= 0, ids - layout.block_start[:, :, None, None], -1)


def pallas_gpu_impl(q, k_cmp, v_cmp, config, *, segment_ids, select, chunk):
  """Output from :func:`cudnn_output`; log-sum-exp and block indices from the Pallas Triton
  kernels of :mod:`pallas_kernels.cmp_scores_triton` (no ``[B, T, HQ, NC]`` array; the exact
  top-``n`` inside the kernel for power-of-two ``n``, else in XLA from the pooled importance).

  Packed rows (decided at run time): one document per row as above; else, with a power-of-two
  ``n``, the output from the blocked path and the indices from the kernel on the block-aligned
  grid of :mod:`pallas_kernels.packed_layout` while the documents fit it; else the blocked path.
  """
  _require_cudnn("pallas_gpu", q, k_cmp, v_cmp, config)
  _scores_config(q, k_cmp, config)  # declines early
  n = config.num_selected

  def plain(q, k_cmp, v_cmp, segment_ids):
    del segment_ids
    return (cudnn_output(q, k_cmp, v_cmp, config), *_kernel_select(q, k_cmp, config, select))

  if segment_ids is None:
    return CompressedSelection(*plain(q, k_cmp, v_cmp, None))

  def blocked(q, k_cmp, v_cmp, segment_ids, select=select):
    return tuple(
      blocked_impl(q, k_cmp, v_cmp, config, segment_ids=segment_ids, select=select, chunk=chunk)
    )

  def packed(q, k_cmp, v_cmp, segment_ids):
    out = blocked(q, k_cmp, v_cmp, segment_ids, select=False)[0]
    return (out, *_packed_kernel_select(q, k_cmp, config, segment_ids))

  many = blocked
  if select and n & (n - 1) == 0:
    from pallas_kernels import packed_layout

    need = packed_layout.packed_blocks_needed(segment_ids, config.block_size)
    fits = jnp.all(need <= _grid_blocks(config, q.shape[1]))

    def many(q, k_cmp, v_cmp, segment_ids):
      return jax.lax.cond(fits, packed, blocked, q, k_cmp, v_cmp, segment_ids)

  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return CompressedSelection(*jax.lax.cond(one_document, plain, many, q, k_cmp, v_cmp, segment_ids))


__all__ = [
  "CHUNK_ELEMENTS",
  "CUDNN_SEQ_MULTIPLE",
  "PROBS_MAX_ELEMENTS",
  "CompressedSelection",
  "blocked_impl",
  "cudnn_impl",
  "cudnn_output",
  "pallas_gpu_impl",
  "compressed_selection",
  "default_chunk",
  "probs_too_large",
  "reference_impl",
]
