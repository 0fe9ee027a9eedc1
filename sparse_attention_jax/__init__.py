"""sparse_attention_jax: trainable sparse attention (NSA and successors) in JAX.

Public API: the op (:func:`nsa_attention`) and its branches, the config, and (in
:mod:`sparse_attention_jax.nn`) Flax NNX modules and a decoder LM.
"""

from sparse_attention_jax.config import BRANCHES, NSAConfig
from sparse_attention_jax.ops import (
  CompressedAttentionOutput,
  CompressorParams,
  MLPCompressorParams,
  NSAAux,
  block_importance,
  cmp_visibility,
  combine_branches,
  compress,
  compressed_attention,
  cu_seqlens_from_segment_ids,
  dense_causal_attention,
  init_mlp_compressor,
  nsa_attention,
  segment_ids_from_cu_seqlens,
  select_blocks,
  selected_attention,
  sliding_window_attention,
)

__version__ = "0.1.0"

__all__ = [
  "BRANCHES",
  "CompressedAttentionOutput",
  "CompressorParams",
  "MLPCompressorParams",
  "NSAAux",
  "NSAConfig",
  "block_importance",
  "cmp_visibility",
  "cu_seqlens_from_segment_ids",
  "combine_branches",
  "compress",
  "compressed_attention",
  "dense_causal_attention",
  "init_mlp_compressor",
  "nsa_attention",
  "segment_ids_from_cu_seqlens",
  "select_blocks",
  "selected_attention",
  "sliding_window_attention",
]
