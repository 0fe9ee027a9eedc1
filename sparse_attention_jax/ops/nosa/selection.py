"""NOSA's selection (``docs/algorithms.md``): eviction head, query-agnostic block scores, and the
union of a query-aware and a query-agnostic top-k.

* Eviction head: ``c[b, j, h] = A_h * softplus((W_delta . concat_heads(v_j))_h)``, one scalar per
  token and KV head, computed from the cached values only.
* Query-agnostic scores ``s^a``: the eviction scores are average-pooled like the compressed keys
  (window ``l``, stride ``d``), then max-pooled onto selection blocks over the same compressed
  tokens as InfLLM-V2's query-aware score (``overlap_table``). Only compressed tokens visible to
  the query (window complete at ``t``) enter, so the selection stays causal; a candidate block
  with no visible compressed token scores ``-inf`` (ranked last, ties to the lower index).
* Selection ``Gamma(t) = Gamma_q(t) ∪ best (k - |Gamma_q(t)|) blocks by s^a``, where
  ``Gamma_q(t) = top_{k_q}(s^q_t)`` with the forced init/local blocks included (they count toward
  ``k_q``). Candidates, forced blocks, tie-breaking and the output layout follow
  :mod:`sparse_attention_jax.ops.selection`: ``[B, T, H, k]`` int32 ascending, ``-1`` padding.

Packed documents (``segment_ids``, :mod:`sparse_attention_jax.ops.documents`): everything restarts
at each document as if it were a sequence of its own. The eviction scores are pooled over each
document's windows into the packed compressed slots (``cmp_layout``, as ``compress`` lays out the
keys), a query sees only its own document's compressed tokens, block indices are
document-relative (block ``j`` covers row positions ``[ds + j*l', ds + (j+1)*l')``, ``ds`` the
document's start) and the forced blocks count from the document's start; ``t`` above reads as
the document position ``u = t - ds``.

Budgets: ``k = config.num_selected`` (total) and ``k_q = num_query_selected`` with
``num_init_blocks + num_local_blocks <= k_q <= k``.

Locality [derived, see ``docs/nosa.md``]: let ``U_t`` be the ``k - k_q`` best non-forced
candidates of query ``t`` by ``s^a``; then ``Gamma(t) ⊇ U_t``. When ``t - 1`` and ``t`` share the
block, the document and the visible compressed tokens, ``U_t = U_{t-1}`` and so
``|Gamma(t) ∩ Gamma(t-1)| >= min(k - k_q, non-forced candidates)``, i.e. ``gamma(t) >= 1 - k_q / k``
once a query has at least ``k`` candidates.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.compression import (
  cmp_visibility,
  window_gather_index,
  window_token_indices,
)
from sparse_attention_jax.ops.documents import cmp_layout, document_positions
from sparse_attention_jax.ops.selection import candidate_and_forced, overlap_table

_HI = jax.lax.Precision.HIGHEST


def eviction_bias(v, w_delta, a):
  """NOSA's eviction head: one additive logit bias per token and KV head.

  Args:
    v: ``[B, T, H, Dv]`` values (all KV heads of a token are concatenated).
    w_delta: ``[H, Dv, H]``, the ``Linear(H * Dv -> H)`` of the paper with its input axis split
      into (KV head, value dim): input feature ``h * Dv + e`` is ``w_delta[h, e]``.
    a: ``[H]`` per-head scale ``A`` (initialized to 0 in the module, so ``c = 0`` at init).

  Returns:
    ``c [B, T, H]`` float32, ``c = A * softplus(concat_heads(v) @ W_delta)``.
  """
  _checks.check_rank("v", v, 4, "[B, T, H, Dv]")
  _, _, h, dv = v.shape
  if getattr(w_delta, "shape", None) != (h, dv, h):
    _checks.fail(
      "w_delta",
      f"shape (H, Dv, H) = {(h, dv, h)} for v of shape {v.shape}",
      getattr(w_delta, "shape", type(w_delta).__name__),
    )
  if getattr(a, "shape", None) != (h,):
    _checks.fail("a", f"shape (H,) = {(h,)}", getattr(a, "shape", type(a).__name__))
  pre = jnp.einsum(
    "bthe,heo->bto", v.astype(jnp.float32), w_delta.astype(jnp.float32), precision=_HI
  )
  return a.astype(jnp.float32) * jax.nn.softplus(pre)


def check_budget(config: NSAConfig, num_query_selected: int) -> None:
  """``num_init_blocks + num_local_blocks <= k_q <= k = config.num_selected``, else ValueError."""
  _checks.check_config(config)
  forced = config.num_init_blocks + config.num_local_blocks
  k = config.num_selected
  if (
    not isinstance(num_query_selected, int)
    or isinstance(num_query_selected, bool)
    or not forced <= num_query_selected <= k
  ):
    _checks.fail(
      "num_query_selected",
      f"an int k_q with num_init_blocks + num_local_blocks = {forced} <= k_q <= num_selected = {k}",
      num_query_selected,
    )


def for_length(config: NSAConfig, num_query_selected: int, seq_len: int) -> tuple[NSAConfig, int]:
  """``(config.for_length(T), min(k_q, clamped k))``: budgets clamped to a length-``T``
  sequence's blocks (the same selection: with ``k >= NB`` every candidate is taken)."""
  check_budget(config, num_query_selected)
  clamped = config.for_length(seq_len)
  return clamped, min(num_query_selected, clamped.num_selected)


def compressed_bias(c, config: NSAConfig, *, segment_ids=None):
  """Average pool of the eviction scores like the compressed keys: ``[B, T, H] -> [B, NC, H]``
  float32 (token ``i`` averages ``c[i*d : i*d + l]``).

  With ``segment_ids [B, T]`` the windows restart at every document and the output holds the
  documents' compressed tokens one after the other in the ``NC`` slots, unused slots 0
  (:func:`~sparse_attention_jax.ops.documents.cmp_layout`, the layout of ``compress``).
  """
  _checks.check_rank("c", c, 3, "[B, T, H]")
  b, t, h = c.shape
  _checks.check_segment_ids(segment_ids, b, t)
  idx = window_token_indices(config, t)  # [NC, l]
  nc = idx.shape[0]
  if nc == 0:
    return jnp.zeros((b, 0, h), jnp.float32)
  c = c.astype(jnp.float32)
  if segment_ids is None:
    return jnp.mean(c[:, window_gather_index(config, t)], axis=2)
  layout = cmp_layout(config, segment_ids, b, t)
  rows = layout.slot_start[:, :, None] + jnp.arange(config.cmp_window, dtype=jnp.int32)
  rows = jnp.minimum(rows, t - 1).reshape(b, nc * config.cmp_window, 1)  # unused: masked below
  win = jnp.take_along_axis(c, rows, axis=1).reshape(b, nc, config.cmp_window, h)
  return jnp.where(layout.slot_doc[:, :, None] >= 0, jnp.mean(win, axis=2), 0.0)


def agnostic_block_scores(c, config: NSAConfig, *, segment_ids=None, query_positions=None):
  """Query-agnostic block scores ``s^a`` of every query.

  Args:
    c: ``[B, S, H]`` eviction scores of the keys (:func:`eviction_bias`).
    config: supplies ``cmp_window`` (l), ``cmp_stride`` (d) and ``block_size`` (l').
    segment_ids: optional ``[B, S]`` document ids (queries are the keys' positions): each query
      pools its own document's compressed tokens onto document-relative blocks.
    query_positions: optional ``[Tq]`` int positions of the queries (decoding: e.g. ``[t]``);
      default ``arange(S)``. Not combinable with ``segment_ids``.

  Returns:
    ``[B, Tq, H, NB]`` float32 (no gradient): the max over the compressed tokens overlapping the
    block that the query sees of the pooled ``c``; ``-inf`` where it sees none.
  """
  _checks.check_config(config)
  _checks.check_rank("c", c, 3, "[B, S, H]")
  _checks.check_batch_len("c", c)
  b, s, _ = c.shape
  _checks.check_segment_ids(segment_ids, b, s)
  if query_positions is not None and segment_ids is not None:
    _checks.fail("segment_ids", "None when query_positions is given", "an array")
  c = jax.lax.stop_gradient(c)
  if segment_ids is not None:
    return document_agnostic_scores(
      compressed_bias(c, config, segment_ids=segment_ids), config, segment_ids=segment_ids
    )
  if query_positions is None:
    vis = cmp_visibility(config, s)  # [1, S, NC]
  else:
    vis = position_visibility(config, s, query_positions)
  return pool_agnostic_scores(compressed_bias(c, config), vis, config, seq_len=s)


def document_agnostic_scores(c_cmp, config: NSAConfig, *, segment_ids):
  """``s^a`` of the queries of packed rows from their packed compressed eviction scores.

  Args:
    c_cmp: ``[B, NC, H]`` = ``compressed_bias(c, config, segment_ids=segment_ids)``.
    config: supplies l, d and l'.
    segment_ids: ``[B, T]`` document ids (``NC = num_cmp_tokens(T)``).

  Returns:
    ``[B, T, H, NB]`` float32: block ``j`` (document-relative) of the query at document position
    ``u`` pools the compressed tokens ``i`` of its document overlapping the block with
    ``i*d + l - 1 <= u``; ``-inf`` where there is none.
  """
  _checks.check_rank("c_cmp", c_cmp, 3, "[B, NC, H]")
  b, nc, h = c_cmp.shape
  t = segment_ids.shape[1]
  _checks.check_segment_ids(segment_ids, b, t)
  if nc != config.num_cmp_tokens(t):
    _checks.fail("c_cmp", f"{config.num_cmp_tokens(t)} compressed tokens for T={t}", nc)
  idx, weight = overlap_table(config, t)  # [NB, K] document-relative compressed tokens
  nb, kk = idx.shape
  if nc == 0:
    return jnp.full((b, t, h, nb), -jnp.inf, jnp.float32)
  last = jnp.asarray(idx * config.cmp_stride + config.cmp_window - 1)  # [NB, K]
  u = document_positions(segment_ids, b, t)[:, :, None, None]  # [B, T, 1, 1]
  valid = jnp.asarray(weight > 0) & (last <= u)  # [B, T, NB, K]: inside the query's document
  slot = cmp_layout(config, segment_ids, b, t).offset[:, :, None, None] + jnp.asarray(idx)
  slot = jnp.where(valid, slot, 0).reshape(b, t * nb * kk, 1)
  c_cmp = jax.lax.stop_gradient(c_cmp).astype(jnp.float32)
  vals = jnp.take_along_axis(c_cmp, slot, axis=1).reshape(b, t, nb, kk, h)
  pooled = jnp.where(valid[..., None], vals, -jnp.inf).max(axis=3)  # [B, T, NB, H]
  out = jnp.moveaxis(pooled, -1, 2)
  chex.assert_shape(out, (b, t, h, nb))
  return out


def pool_agnostic_scores(c_cmp, visible, config: NSAConfig, *, seq_len: int):
  """``s^a`` from the compressed eviction scores (what a decode cache keeps on the device).

  Args:
    c_cmp: ``[B, NC, H]`` (:func:`compressed_bias` of the ``seq_len`` cached tokens).
    visible: bool ``[B|1, Tq, NC]``: compressed token ``i`` visible to each query.
    config: supplies l, d and l'.
    seq_len: S, cached tokens (defines the ``NB`` blocks).

  Returns:
    ``[B, Tq, H, NB]`` float32, ``-inf`` where a query sees no compressed token of the block.
  """
  _checks.check_rank("c_cmp", c_cmp, 3, "[B, NC, H]")
  b, nc, h = c_cmp.shape
  if nc != config.num_cmp_tokens(seq_len):
    _checks.fail("c_cmp", f"{config.num_cmp_tokens(seq_len)} compressed tokens for S={seq_len}", nc)
  idx, weight = overlap_table(config, seq_len)  # [NB, K]
  nb, tq = idx.shape[0], visible.shape[1]
  if nc == 0:
    return jnp.full((b, tq, h, nb), -jnp.inf, jnp.float32)
  c_cmp = jax.lax.stop_gradient(c_cmp).astype(jnp.float32)
  valid = visible[:, :, idx] & jnp.asarray(weight > 0)  # [B|1, Tq, NB, K]
  vals = jnp.moveaxis(c_cmp[:, idx], -1, 1)[:, :, None]  # [B, H, 1, NB, K]
  pooled = jnp.where(valid[:, None], vals, -jnp.inf).max(axis=-1)  # [B, H, Tq, NB]
  out = jnp.moveaxis(pooled, 1, 2)
  chex.assert_shape(out, (b, tq, h, nb))
  return out


def position_visibility(config: NSAConfig, seq_len: int, query_positions):
  """``[1, Tq, NC]`` bool: compressed token ``i`` (of ``seq_len`` tokens) is complete at each
  query position (``i*d + l - 1 <= t``)."""
  last = window_token_indices(config, seq_len)[:, -1]  # [NC]
  return (jnp.asarray(last)[None, :] <= query_positions[:, None])[None]


def _candidates(config: NSAConfig, nb: int, seq_len: int, batch: int, segment_ids, query_positions):
  """``(candidate, forced)`` ``[B|1, Tq, NB]`` bool for queries at their positions."""
  if query_positions is None:
    return candidate_and_forced(config, seq_len, segment_ids, batch)
  bs = config.block_size
  t = query_positions.astype(jnp.int32)[None, :, None]  # [1, Tq, 1]
  j = jnp.arange(nb, dtype=jnp.int32)[None, None, :]
  candidate = j * bs <= t
  init = j < config.num_init_blocks
  local = (j <= t // bs) & (j > t // bs - config.num_local_blocks)
  return candidate, candidate & (init | local)


def top_blocks(score, n: int, candidate, take):
  """Exact top-``n`` blocks: ``take`` blocks first, then by ``score`` (ties to the lower index).

  Args:
    score: ``[B, T, H, NB]`` float scores (non-finite values are clamped to the float32 range).
    n: blocks per row.
    candidate: bool broadcastable to ``score``: blocks that may be chosen.
    take: bool broadcastable to ``score``: blocks that win whatever their score (at most ``n``
      of them per row must be candidates).

  Returns:
    ``[B, T, H, n]`` int32 ascending, ``-1`` padding.
  """
  nb = score.shape[-1]
  fmax = jnp.finfo(jnp.float32).max
  s = jnp.nan_to_num(
    jax.lax.stop_gradient(score).astype(jnp.float32), nan=-fmax, posinf=fmax, neginf=-fmax
  )
  s = jnp.where(take, jnp.inf, s)
  s = jnp.where(candidate, s, -jnp.inf)
  top, idx = jax.lax.top_k(s, n)
  idx = jnp.sort(jnp.where(top == -jnp.inf, nb, idx), axis=-1)
  return jnp.where(idx >= nb, -1, idx).astype(jnp.int32)


def membership(block_indices, num_blocks: int):
  """``[..., n]`` block ids (``-1`` padding) -> ``[..., NB]`` bool membership."""
  return jnp.any(
    block_indices[..., None] == jnp.arange(num_blocks, dtype=block_indices.dtype), axis=-2
  )


def nosa_select(
  query_scores,
  agnostic_scores,
  config: NSAConfig,
  *,
  num_query_selected: int,
  segment_ids=None,
  query_positions=None,
  return_query_part: bool = False,
):
  """NOSA's block selection ``Gamma(t) = top_{k_q}(s^q_t) ∪ best remaining blocks by s^a``.

  Args:
    query_scores: ``[B, T, H, NB]`` query-aware scores ``s^q`` (e.g. ``block_importance`` with
      ``score_pooling="max"``).
    agnostic_scores: ``[B, T, H, NB]`` query-agnostic scores ``s^a``
      (:func:`agnostic_block_scores`).
    config: supplies ``num_selected`` (k), forced-block counts and ``block_size``.
    num_query_selected: k_q, the query-aware budget including the forced blocks.
    segment_ids: optional ``[B, T]`` document ids: candidates and forced blocks count from each
      query's document start and the scores' blocks are document-relative.
    query_positions: optional ``[T]`` positions of the query rows (decoding; default
      ``arange(T)``, and then ``NB`` must be the blocks of ``T`` tokens). Not combinable with
      ``segment_ids``.
    return_query_part: also return ``Gamma_q`` ``[B, T, H, k_q]``.

  Returns:
    ``[B, T, H, k]`` int32 block ids (document-relative with ``segment_ids``), ascending, ``-1``
    padding (and ``Gamma_q``).
  """
  for name, x in (("query_scores", query_scores), ("agnostic_scores", agnostic_scores)):
    _checks.check_rank(name, x, 4, "[B, T, H, NB]")
  if agnostic_scores.shape != query_scores.shape:
    _checks.fail(
      "agnostic_scores", f"the shape of query_scores {query_scores.shape}", agnostic_scores.shape
    )
  check_budget(config, num_query_selected)
  b, t, _, nb = query_scores.shape
  if query_positions is None:
    if nb != config.num_blocks(t):
      _checks.fail(
        "query_scores",
        f"{config.num_blocks(t)} blocks on the last axis for T={t}, block_size={config.block_size}",
        nb,
      )
    _checks.check_segment_ids(segment_ids, b, t)
  else:
    if segment_ids is not None:
      _checks.fail("segment_ids", "None when query_positions is given", "an array")
    if getattr(query_positions, "shape", None) != (t,):
      _checks.fail("query_positions", f"shape ({t},)", getattr(query_positions, "shape", None))
  k = config.num_selected
  if k > nb:
    _checks.fail(
      "config.num_selected",
      f"at most the {nb} blocks (block_size={config.block_size}); use nosa.selection.for_length",
      k,
    )
  candidate, forced = _candidates(config, nb, t, b, segment_ids, query_positions)
  candidate, forced = candidate[:, :, None, :], forced[:, :, None, :]
  gq = top_blocks(query_scores, num_query_selected, candidate, forced)
  out = top_blocks(agnostic_scores, k, candidate, forced | membership(gq, nb))
  chex.assert_shape(out, query_scores.shape[:3] + (k,))
  return (out, gq) if return_query_part else out


__all__ = [
  "agnostic_block_scores",
  "check_budget",
  "compressed_bias",
  "document_agnostic_scores",
  "eviction_bias",
  "for_length",
  "membership",
  "nosa_select",
  "pool_agnostic_scores",
  "position_visibility",
  "top_blocks",
]
