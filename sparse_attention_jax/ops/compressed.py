"""Compressed-token attention (NSA eq. 8): each query attends over the visible compressed tokens."""

from __future__ import annotations

from typing import NamedTuple

import jax

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.compression import cmp_visibility
from sparse_attention_jax.ops.masked_lean import recompute_masked_attention


class CompressedAttentionOutput(NamedTuple):
  """Attributes:
  out: ``[B, T, HQ, Dv]`` branch output (0 for queries that see no compressed token).
  lse: ``[B, T, HQ]`` float32 log-sum-exp of the scaled logits (``-inf`` when nothing is seen;
    no gradient).
  probs: ``[B, T, HQ, NC]`` float32 per-head softmax probabilities (what selection scores are
    built from; no gradient flows through selection).
  """

  out: jax.Array
  lse: jax.Array
  probs: jax.Array


def compressed_attention(
  q, k_cmp, v_cmp, config: NSAConfig, *, segment_ids=None
) -> CompressedAttentionOutput:
  """Attention of ``q [B, T, HQ, Dk]`` over ``k_cmp [B, NC, H, Dk]``, ``v_cmp [B, NC, H, Dv]``.

  Query ``t`` sees compressed token ``i`` iff ``i*d + l - 1 <= t`` (and, with ``segment_ids``
  ``[B, T]``, iff the whole window lies in the query's document).

  The backward pass recomputes the ``[B, T, HQ, NC]`` probabilities instead of keeping them
  (:mod:`sparse_attention_jax.ops.masked_lean`); the forward is
  :func:`~sparse_attention_jax.ops.masked.masked_attention`.
  """
  b, t, nc, _, _, _ = _checks.check_qkv(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
  if nc != config.num_cmp_tokens(t):
    _checks.fail(
      "k_cmp",
      f"{config.num_cmp_tokens(t)} compressed tokens for T={t}, "
      f"l={config.cmp_window}, d={config.cmp_stride}",
      nc,
    )
  _checks.check_segment_ids(segment_ids, b, t)
  mask = cmp_visibility(config, t, segment_ids, b)[:, :, None, :]  # [B|1, T, 1, NC]
  o, lse, probs = recompute_masked_attention(q, k_cmp, v_cmp, mask, config.scale(q.shape[-1]))
  return CompressedAttentionOutput(o, lse, jax.lax.stop_gradient(probs))
