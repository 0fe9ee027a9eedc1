"""NOSA attention (``docs/algorithms.md``): InfLLM-V2 block selection split into a query-aware and a
query-agnostic part, and selected attention with the eviction bias as an additive logit bias.

For query ``t`` with selected token set ``S_t`` (the tokens ``<= t`` of the blocks of
``Gamma(t)``, forced init/local blocks included, inside the query's document; with
``segment_ids`` block ``j`` is document-relative, :mod:`sparse_attention_jax.ops.documents`)::

  o_t = sum_{j in S_t} exp(s_tj + c_j) v_j / sum_{j in S_t} exp(s_tj + c_j)
  s_tj = q_t . k_j * scale

with ``c_j`` the eviction score of key ``j`` for the query's KV head. This is how ``W_delta`` and
``A`` get gradients (the selection itself is not differentiable).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.compression import compress, compressed_attention
from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.nosa.selection import (
  agnostic_block_scores,
  nosa_select,
  pool_agnostic_scores,
  position_visibility,
)
from sparse_attention_jax.ops.selected import selected_attention, selected_mask
from sparse_attention_jax.ops.selection import block_importance


def biased_masked_attention(q, k, v, bias, mask, scale: float):
  """Masked GQA attention with a per-key additive logit bias.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, S, H, Dk]``; v: ``[B, S, H, Dv]``.
    bias: ``[B, S, H]`` added to the scaled logits of key ``s`` for every query of KV head ``h``.
    mask: bool broadcastable to ``[B, T, H, S]``.
    scale: logit scale.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``; float32 softmax; rows that see no key output 0
    (:func:`~sparse_attention_jax.ops.masked.masked_attention` with ``bias``).
  """
  b, s, h = k.shape[0], k.shape[1], k.shape[2]
  if getattr(bias, "shape", None) != (b, s, h):
    _checks.fail("bias", f"shape [B, S, H] = {(b, s, h)}", getattr(bias, "shape", None))
  return masked_attention(q, k, v, mask, scale, bias=bias)[0]


def biased_selected_attention(
  q,
  k,
  v,
  bias,
  block_indices,
  *,
  block_size: int,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
):
  """Selected-block attention (as ``selected_attention``) with the eviction bias on every key.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    bias: ``[B, T, H]`` eviction scores ``c`` of the keys (float).
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` = padding; document-relative with
      ``segment_ids``: block ``j`` of a query whose document starts at ``ds`` holds keys
      ``[ds + j*l', ds + (j+1)*l')``).
    block_size: l'.
    segment_ids: optional ``[B, T]`` document ids.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"reference"``: the dense masked form (``[B, T, HQ, T]`` logits). Anything else:
      ``selected_attention`` (with ``impl``: the Mosaic GPU kernels where they serve) on keys
      and queries with extra head dims that carry the bias: ``q' = [q, 1/scale (, 1/scale)]``,
      ``k' = [k, c]`` so ``scale * q'.k' = scale * q.k + c``, and the kernel's ``dK'`` column is
      ``dc``. For bf16/f16 keys ``c`` is split into ``c_hi + c_lo`` (two columns, both in the key
      dtype), which keeps the bias to ~2^-16 relative instead of bf16's 2^-8.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  b, t, s, _, h, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  _checks.check_block_indices(block_indices, b, t, h)
  _checks.check_segment_ids(segment_ids, b, t)
  _checks.check_rank("bias", bias, 3, "[B, T, H]")
  if bias.shape != (b, t, h):
    _checks.fail("bias", f"shape [B, T, H] = {(b, t, h)}", bias.shape)
  if not isinstance(block_size, int) or block_size < 1:
    _checks.fail("block_size", "a positive int", block_size)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if impl == "reference":
    mask = selected_mask(block_indices, block_size=block_size, seq_len=t, segment_ids=segment_ids)
    return biased_masked_attention(q, k, v, bias, mask, scale)
  c = bias.astype(jnp.float32)[..., None]  # [B, T, H, 1]
  if k.dtype == jnp.float32:
    cols = [c]  # exact
  else:  # c_lo = c - c_hi; its derivative in c is 1 - 1 = 0, so dc is the c_hi column's dK'
    c_hi = c.astype(k.dtype)
    cols = [c_hi, (c - c_hi.astype(jnp.float32)).astype(k.dtype)]
  k_aug = jnp.concatenate([k, *cols], axis=-1)
  q_aug = jnp.concatenate([q, jnp.full(q.shape[:3] + (len(cols),), 1.0 / scale, q.dtype)], axis=-1)
  return selected_attention(
    q_aug,
    k_aug,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=scale,
    impl=impl,
  )


class NOSAAux(NamedTuple):
  """What ``nosa_attention(..., return_aux=True)`` also returns.

  Attributes:
    block_indices: ``[B, T, H, k]`` int32 ``Gamma(t)``.
    query_indices: ``[B, T, H, k_q]`` int32 query-aware part ``Gamma_q(t)`` (None when the
      selection was passed in).
    query_scores: ``[B, T, H, NB]`` ``s^q`` (None when the selection was passed in).
    agnostic_scores: ``[B, T, H, NB]`` ``s^a`` (None when the selection was passed in).
  """

  block_indices: jax.Array
  query_indices: jax.Array | None
  query_scores: jax.Array | None
  agnostic_scores: jax.Array | None


def nosa_scores(q, k, c, config: NSAConfig, *, segment_ids=None):
  """``(s^q, s^a)``, both ``[B, T, H, NB]`` float32: InfLLM-V2's query-aware block scores (mean
  compressed keys, per-head softmax summed over the group, ``config.score_pooling``) and the
  query-agnostic scores from the eviction scores ``c [B, T, H]``.

  With ``segment_ids [B, T]`` both restart at every document: keys and eviction scores are
  compressed per document window (``cmp_layout``) and block ``j`` is document-relative."""
  _checks.check_config(config)
  t, h = q.shape[1], k.shape[2]
  k_cmp = compress(k, config, segment_ids=segment_ids, name="k")
  # Only the probabilities are used; the compressed keys stand in for the unused values.
  probs = compressed_attention(q, k_cmp, k_cmp, config, segment_ids=segment_ids).probs
  s_q = block_importance(probs, config, num_kv_heads=h, seq_len=t, segment_ids=segment_ids)
  s_a = agnostic_block_scores(c, config, segment_ids=segment_ids)
  return s_q, s_a


def decode_selection(
  q, k_cmp, c_cmp, config: NSAConfig, *, seq_len: int, num_query_selected: int, query_positions
):
  """``Gamma(t)`` of queries at given positions from the compressed caches (decoding).

  Reads only what a NOSA decode cache keeps on the device besides the slot pool: the compressed
  keys and the compressed eviction scores of the ``seq_len`` cached tokens. Each sequence is one
  document (no ``segment_ids``): its grids start at position 0, so the block ids are the
  document-relative ids of the packed convention with ``ds = 0``.

  Args:
    q: ``[B, Tq, HQ, Dk]`` new queries (RoPE'd) at ``query_positions``.
    k_cmp: ``[B, NC, H, Dk]`` = ``compress(k, config)`` of the cached RoPE'd keys.
    c_cmp: ``[B, NC, H]`` = ``nosa.selection.compressed_bias(c, config)``.
    config: as in :func:`nosa_attention`, budgets clamped to the blocks of ``seq_len`` (e.g.
      with ``nosa.selection.for_length``).
    seq_len: S, cached tokens (the queries' own tokens included).
    num_query_selected: k_q.
    query_positions: ``[Tq]`` int positions ``< S``.

  Returns:
    ``[B, Tq, H, k]`` int32, equal to the rows ``query_positions`` of the full-sequence selection.
  """
  _checks.check_rank("q", q, 4, "[B, Tq, HQ, Dk]")
  _checks.check_rank("k_cmp", k_cmp, 4, "[B, NC, H, Dk]")
  nc, h = config.num_cmp_tokens(seq_len), k_cmp.shape[2]
  if k_cmp.shape[1] != nc:
    _checks.fail("k_cmp", f"{nc} compressed tokens for seq_len={seq_len}", k_cmp.shape[1])
  vis = position_visibility(config, seq_len, query_positions)  # [1, Tq, NC]
  probs = masked_attention(
    q, k_cmp, k_cmp, vis[:, :, None, :], config.scale(q.shape[-1]), return_probs=True
  )[2]
  s_q = block_importance(probs, config, num_kv_heads=h, seq_len=seq_len)
  s_a = pool_agnostic_scores(c_cmp, vis, config, seq_len=seq_len)
  return nosa_select(
    s_q, s_a, config, num_query_selected=num_query_selected, query_positions=query_positions
  )


def nosa_attention(
  q,
  k,
  v,
  c,
  *,
  config: NSAConfig,
  num_query_selected: int,
  segment_ids=None,
  block_indices=None,
  return_aux: bool = False,
  impl: str = "auto",
):
  """NOSA over ``[B, T, H, D]`` inputs: selection ``Gamma(t)`` + biased selected attention.

  Args:
    q: ``[B, T, HQ, Dk]`` (RoPE applied); k: ``[B, T, H, Dk]`` (RoPE applied); v: ``[B, T, H, Dv]``.
    c: ``[B, T, H]`` eviction scores (:func:`~sparse_attention_jax.ops.nosa.selection.
      eviction_bias`); gradients flow into them through the attention bias only.
    config: an :class:`NSAConfig` with ``compression="mean"`` (e.g. ``NSAConfig.infllm_v2``):
      l, d, l', ``score_pooling``, forced blocks and the total budget ``k = num_selected``. Its
      ``branches``/``window`` are ignored (NOSA has only the selected branch).
    num_query_selected: k_q, the query-aware budget (forced blocks included).
    segment_ids: optional ``[B, T]`` document ids for packed sequences: every block structure
      restarts at each document, so a document's result does not depend on where it sits in the
      row (:mod:`sparse_attention_jax.ops.documents`).
    block_indices: optional precomputed ``[B, T, H, k]`` selection (document-relative with
      ``segment_ids``; skips scoring).
    return_aux: also return :class:`NOSAAux`.
    impl: of the biased selected attention (:func:`biased_selected_attention`): ``"auto"`` (the
      selected-attention kernels where they serve), ``"reference"``, or a backend name.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype`` (and :class:`NOSAAux`).
  """
  _checks.check_config(config)
  if config.compression != "mean":
    _checks.fail(
      "config.compression", "'mean' (NOSA scores blocks with mean-pooled keys)", config.compression
    )
  b, t, s, _, h, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  _checks.check_rank("c", c, 3, "[B, T, H]")
  if c.shape != (b, t, h):
    _checks.fail("c", f"shape [B, T, H] = {(b, t, h)}", c.shape)
  _checks.check_segment_ids(segment_ids, b, t)
  aux = NOSAAux(block_indices, None, None, None)
  if block_indices is None:
    s_q, s_a = nosa_scores(q, k, c, config, segment_ids=segment_ids)
    block_indices, gq = nosa_select(
      s_q,
      s_a,
      config,
      num_query_selected=num_query_selected,
      segment_ids=segment_ids,
      return_query_part=True,
    )
    aux = NOSAAux(block_indices, gq, s_q, s_a)
  o = biased_selected_attention(
    q,
    k,
    v,
    c,
    block_indices,
    block_size=config.block_size,
    segment_ids=segment_ids,
    softmax_scale=config.scale(q.shape[-1]),
    impl=impl,
  )
  return (o, aux) if return_aux else o


__all__ = [
  "NOSAAux",
  "biased_masked_attention",
  "biased_selected_attention",
  "decode_selection",
  "nosa_attention",
  "nosa_scores",
]
