"""Block selection (NSA eq. 9-11): importance of selection blocks, forced blocks, exact top-n.

Importance of block ``j`` (tokens ``[j*l', (j+1)*l')``) pools the compressed-attention
probabilities of every compressed token whose window overlaps the block:

* ``"sum"``: overlap-weighted sum, weight = shared stride-``d`` chunks. This is NSA eq. 9 in its
  0-based form: with ``l'/d = 4``, ``l/d = 2`` block ``j`` gets compressed tokens ``4j-1 .. 4j+3``
  with weights ``(1, 2, 2, 2, 1)``; with ``l = d = l'`` it is ``p_slc = p_cmp``.
* ``"max"``: maximum over the same tokens (InfLLM-V2).

Probabilities are first summed over the ``G`` query heads of each KV group (eq. 10; summing and
pooling commute for ``"sum"``, and InfLLM-V2 sums before max-pooling).

Packed documents (``segment_ids``): blocks, compressed tokens and forced blocks restart at every
document and **block indices are document-relative**: block ``j`` of a query whose document starts
at row position ``ds`` covers row positions ``[ds + j*l', ds + (j+1)*l')``
(:mod:`sparse_attention_jax.ops.documents`). Below, ``u`` is the query's document position
(``u = t`` without ``segment_ids``).

A block is a *candidate* for query ``t`` iff it starts at or before ``u``. Forced blocks
(``num_init_blocks`` from the document's first block, ``num_local_blocks`` ending at the query's
block) are selected whenever they are candidates and count toward ``n``. The rest are the top-scoring candidates; ties go to the lower block index
(non-finite importances are clamped to the finite float32 range, so forced blocks always win).
Output indices are sorted ascending, then ``-1`` padding.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.documents import cmp_layout, document_positions


def overlap_table(config: NSAConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Compressed tokens overlapping each selection block and their eq. 9 weights (static).

  Returns:
    ``(idx, weight)``, both ``[NB, K]`` with ``K = l'/d + l/d - 1``: ``idx`` are compressed-token
    indices (clipped into range) and ``weight`` the number of shared stride-``d`` chunks (0 for
    entries that fall outside ``[0, NC)``).
  """
  i, weight = _overlap(config, seq_len)
  nc = config.num_cmp_tokens(seq_len)
  return np.clip(i, 0, max(nc - 1, 0)).astype(np.int32), weight


def _overlap(config: NSAConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """:func:`overlap_table` before clipping: ``i`` may fall outside ``[0, NC)`` (weight 0)."""
  l, d, bs = config.cmp_window, config.cmp_stride, config.block_size
  nb, nc = config.num_blocks(seq_len), config.num_cmp_tokens(seq_len)
  kk = bs // d + l // d - 1
  lo = np.arange(nb)[:, None] * (bs // d) - l // d + 1
  i = lo + np.arange(kk)[None, :]  # [NB, K]
  j = np.arange(nb)[:, None]
  overlap = np.minimum(i * d + l, (j + 1) * bs) - np.maximum(i * d, j * bs)
  weight = np.where((i >= 0) & (i < nc), overlap // d, 0)
  return i.astype(np.int32), weight.astype(np.float32)


def block_importance(
  probs, config: NSAConfig, *, num_kv_heads: int, seq_len: int | None = None, segment_ids=None
):
  """Scores of selection blocks from compressed probabilities.

  Args:
    probs: ``[B, T, HQ, NC]`` per-head compressed-attention probabilities.
    config: supplies l, d, l' and ``score_pooling``.
    num_kv_heads: ``H``; heads ``h*G .. h*G + G - 1`` form group ``h``.
    seq_len: ``T`` of the keys (defaults to ``probs.shape[1]``).
    segment_ids: optional ``[B, T]`` document ids (self-attention only): ``probs`` are over the
      packed compressed slots of :func:`~sparse_attention_jax.ops.documents.cmp_layout` and
      block ``j`` is document-relative.

  Returns:
    ``[B, T, H, NB]`` float32 importance (no gradient).
  """
  _checks.check_config(config)
  _checks.check_rank("probs", probs, 4, "[B, T, HQ, NC]")
  _checks.check_batch_len("probs", probs)
  b, t, hq, nc = probs.shape
  seq_len = t if seq_len is None else seq_len
  if hq % num_kv_heads:
    _checks.fail("num_kv_heads", f"a divisor of HQ={hq}", num_kv_heads)
  if nc != config.num_cmp_tokens(seq_len):
    _checks.fail(
      "probs", f"{config.num_cmp_tokens(seq_len)} compressed tokens on the last axis", nc
    )
  p = jax.lax.stop_gradient(probs).astype(jnp.float32)
  p = p.reshape(b, t, num_kv_heads, hq // num_kv_heads, nc).sum(axis=3)  # [B,T,H,NC] eq. 10
  nb = config.num_blocks(seq_len)
  if nc == 0:
    return jnp.zeros((b, t, num_kv_heads, nb), jnp.float32)
  if segment_ids is None:
    out = pool_blocks(p, config, seq_len)
  else:
    if seq_len != t:
      _checks.fail("seq_len", f"the query length T={t} with segment_ids", seq_len)
    _checks.check_segment_ids(segment_ids, b, t)
    layout = cmp_layout(config, segment_ids, b, t)
    out = pool_blocks(p, config, seq_len, offset=layout.offset, count=layout.count)
  chex.assert_shape(out, (b, t, num_kv_heads, nb))
  return out


def pool_blocks(p, config: NSAConfig, seq_len: int, *, offset=None, count=None):
  """Pools group-summed compressed probabilities onto selection blocks (eq. 9, or max).

  Args:
    p: ``[B, C, H, NC]`` float32 probabilities already summed over each KV group's query heads,
      for ``C`` query rows (all ``T`` of them, or a chunk).
    config: supplies l, d, l' and ``score_pooling``.
    seq_len: ``T`` of the keys (sets ``NC`` and ``NB``).
    offset, count: ``[B, C]`` int32 slot of compressed token 0 of each row's document and the
      number of compressed tokens of that document (packed rows,
      :func:`~sparse_attention_jax.ops.documents.cmp_layout`); None: one document from row 0.

  Returns:
    ``[B, C, H, NB]`` float32 importance; block ``j`` is document-relative with ``offset``.
  """
  b, c, h, _ = p.shape
  nb = config.num_blocks(seq_len)
  if offset is None:
    idx, weight = overlap_table(config, seq_len)
    pk = p[..., idx]  # [B, C, H, NB, K]
  else:
    i, weight = _overlap(config, seq_len)  # [NB, K] document-relative compressed tokens
    slot = offset[:, :, None, None] + i  # [B, C, NB, K]
    own = (i >= 0) & (i < count[:, :, None, None])  # the query's document's tokens
    slot = jnp.where(own, slot, 0).reshape(b, c, 1, nb * i.shape[1])
    pk = jnp.take_along_axis(p, slot, axis=-1).reshape(b, c, h, nb, i.shape[1])
    weight = jnp.where(own[:, :, None], weight, 0.0)
  if config.score_pooling == "sum":
    out = jnp.sum(pk * weight, axis=-1)
  else:
    out = jnp.max(jnp.where(weight > 0, pk, 0.0), axis=-1)
  chex.assert_shape(out, (b, c, h, nb))
  return out


def candidate_and_forced(config: NSAConfig, seq_len: int, segment_ids=None, batch: int = 1):
  """``(candidate, forced)``, both ``[B|1, T, NB]`` bool (see the module docstring)."""
  if segment_ids is None:
    u = jnp.arange(seq_len, dtype=jnp.int32)[None, :]  # [1, T]
  else:
    u = document_positions(segment_ids, batch, seq_len)  # [B, T]
  return candidate_and_forced_at(config, config.num_blocks(seq_len), u)


def candidate_and_forced_at(config: NSAConfig, num_blocks: int, u):
  """``(candidate, forced)``, both ``[B|1, C, NB]`` bool, for rows at document positions
  ``u [B|1, C]`` (int32; a negative position has no candidate)."""
  bs = config.block_size
  j = jnp.arange(num_blocks, dtype=jnp.int32)[None, None, :]  # [1, 1, NB]
  u = u[:, :, None]
  candidate = j * bs <= u
  init = j < config.num_init_blocks
  local = (j <= u // bs) & (j > u // bs - config.num_local_blocks)
  return candidate, candidate & (init | local)


def select_blocks(importance, config: NSAConfig, *, segment_ids=None):
  """Top-n selection blocks per query and KV head.

  Args:
    importance: ``[B, T, H, NB]`` block scores (e.g. from :func:`block_importance`).
    config: supplies ``num_selected`` (n), forced-block counts and ``block_size``.
    segment_ids: optional ``[B, T]`` document ids.

  Returns:
    ``[B, T, H, n]`` int32 block indices, document-relative with ``segment_ids``, ascending,
    padded with ``-1`` when fewer than ``n`` blocks are candidates.
  """
  _checks.check_config(config)
  _checks.check_rank("importance", importance, 4, "[B, T, H, NB]")
  _checks.check_batch_len("importance", importance)
  b, t, _, nb = importance.shape
  if nb != config.num_blocks(t):
    _checks.fail(
      "importance",
      f"{config.num_blocks(t)} blocks on the last axis for T={t}, block_size={config.block_size}",
      nb,
    )
  n = config.num_selected
  if n > nb:
    _checks.fail(
      "config.num_selected",
      f"at most the {nb} blocks of a T={t} sequence "
      f"(block_size={config.block_size}); use config.for_length(T)",
      n,
    )
  _checks.check_segment_ids(segment_ids, b, t)
  candidate, forced = candidate_and_forced(config, t, segment_ids, b)
  out = top_n_blocks(importance, candidate[:, :, None, :], forced[:, :, None, :], n)
  chex.assert_shape(out, importance.shape[:3] + (n,))
  return out


def top_n_blocks(importance, candidate, forced, n: int):
  """Exact top-``n`` of the last axis with forced blocks first and ties to the lower index.

  Args:
    importance: ``[..., NB]`` block scores (no gradient flows back).
    candidate, forced: bool, broadcastable to ``importance``.
    n: blocks to keep (``<= NB``).

  Returns:
    ``[..., n]`` int32 block ids, ascending, ``-1`` padding where fewer blocks are candidates.
  """
  nb = importance.shape[-1]
  score = jax.lax.stop_gradient(importance).astype(jnp.float32)
  fmax = jnp.finfo(jnp.float32).max  # keep +inf for forced blocks and -inf for non-candidates
  score = jnp.nan_to_num(score, nan=-fmax, posinf=fmax, neginf=-fmax)
  score = jnp.where(forced, jnp.inf, score)
  score = jnp.where(candidate, score, -jnp.inf)
  if n <= ITERATIVE_TOP_N:
    idx = _iterative_top_n(score, n)
  else:
    top, idx = jax.lax.top_k(score, n)  # ties: lower index first (stable)
    idx = jnp.where(top == -jnp.inf, nb, idx)
  idx = jnp.sort(idx, axis=-1)
  return jnp.where(idx >= nb, -1, idx).astype(jnp.int32)


ITERATIVE_TOP_N = 32
"""``top_n_blocks`` takes ``n`` rounds of argmax up to this ``n`` and ``lax.top_k`` above it. On
an H100 (jax 0.11.2) the exact top-16 of ``[1, 4, 65536, 1024]`` float32 scores took 7.2 ms by
16 argmax rounds and 25.0 ms by ``lax.top_k`` (``approx_max_k`` also 25.0 ms)."""


def _iterative_top_n(score, n: int):
  """``[..., n]`` int32 column ids of the ``n`` largest ``score`` entries (``NB`` where a round
  finds only ``-inf``): per round the first maximal column (ties to the lower index), then that
  column is set to ``-inf``."""
  nb = score.shape[-1]
  col = jnp.arange(nb, dtype=jnp.int32)
  ids = []
  for _ in range(n):
    j = jnp.argmax(score, axis=-1).astype(jnp.int32)
    best = jnp.max(score, axis=-1)
    ids.append(jnp.where(best == -jnp.inf, nb, j))
    score = jnp.where(col == j[..., None], -jnp.inf, score)
  return jnp.stack(ids, axis=-1)


def share_selection(block_indices, r: int, *, segment_ids=None):
  """ASA's shared selection: token ``t`` uses the block list of token ``t - t % r``.

  Aligned runs of ``r`` consecutive tokens (per batch row and KV head) share the list of their
  first token, so a kernel tile of ``r`` tokens iterates over one list with no per-row mask. With
  ``segment_ids`` the runs are aligned to each document's start: a token at document position
  ``u`` uses the list of the document's token ``u - u % r``.

  Args:
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` = padding).
    r: tokens per shared run, a positive int.
    segment_ids: optional ``[B, T]`` document ids.

  Returns:
    ``[B, T, H, n]``, same dtype: row ``t`` holds ``block_indices[:, t - t % r]`` (``t - u % r``
    with ``segment_ids``).
  """
  _checks.check_rank("block_indices", block_indices, 4, "[B, T, H, n]")
  if not isinstance(r, int) or r < 1:
    _checks.fail("r", "a positive int", r)
  b, t = block_indices.shape[:2]
  pos = jnp.arange(t, dtype=jnp.int32)
  if segment_ids is None:
    return jnp.take(block_indices, (pos // r) * r, axis=1)
  _checks.check_segment_ids(segment_ids, b, t)
  leader = pos[None, :] - document_positions(segment_ids, b, t) % r  # [B, T]
  return jnp.take_along_axis(block_indices, leader[:, :, None, None], axis=1)
