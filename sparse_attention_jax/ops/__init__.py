"""Plain-JAX sparse attention ops (NSA, NOSA) and the ``impl=`` dispatch to kernels.

Every op taking ``impl=`` dispatches through one table (:mod:`sparse_attention_jax.ops.dispatch`;
:func:`valid_impls` lists the names); ``impl="reference"`` is the plain-JAX masked reference
(:mod:`sparse_attention_jax.ops.masked`) every other implementation is tested against.
"""

from sparse_attention_jax.ops.causal import (
  causal_attention,
  dense_causal_attention,
  sliding_window_attention,
)
from sparse_attention_jax.ops.cmp_selection import CompressedSelection, compressed_selection
from sparse_attention_jax.ops.compression import (
  CompressedAttentionOutput,
  CompressorParams,
  MLPCompressorParams,
  cmp_visibility,
  compress,
  compressed_attention,
  init_mlp_compressor,
)
from sparse_attention_jax.ops.decode import attend_one
from sparse_attention_jax.ops.dispatch import valid_impls
from sparse_attention_jax.ops.documents import (
  cu_seqlens_from_segment_ids,
  segment_ids_from_cu_seqlens,
)
from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.nosa import (
  NOSAAux,
  agnostic_block_scores,
  biased_selected_attention,
  eviction_bias,
  nosa_attention,
  nosa_scores,
  nosa_select,
)
from sparse_attention_jax.ops.nsa import NSAAux, combine_branches, nsa_attention
from sparse_attention_jax.ops.nsa_decode import (
  NSACache,
  fill_nsa_cache,
  init_nsa_cache,
  nsa_decode_step,
)
from sparse_attention_jax.ops.selected import selected_attention
from sparse_attention_jax.ops.selection import (
  block_importance,
  overlap_table,
  select_blocks,
  share_selection,
)

__all__ = [
  "CompressedAttentionOutput",
  "CompressedSelection",
  "CompressorParams",
  "MLPCompressorParams",
  "NOSAAux",
  "NSAAux",
  "NSACache",
  "agnostic_block_scores",
  "attend_one",
  "biased_selected_attention",
  "block_importance",
  "causal_attention",
  "cmp_visibility",
  "combine_branches",
  "compress",
  "compressed_attention",
  "compressed_selection",
  "cu_seqlens_from_segment_ids",
  "dense_causal_attention",
  "eviction_bias",
  "fill_nsa_cache",
  "init_mlp_compressor",
  "init_nsa_cache",
  "masked_attention",
  "nosa_attention",
  "nosa_scores",
  "nsa_decode_step",
  "nosa_select",
  "nsa_attention",
  "overlap_table",
  "segment_ids_from_cu_seqlens",
  "select_blocks",
  "selected_attention",
  "share_selection",
  "sliding_window_attention",
  "valid_impls",
]
