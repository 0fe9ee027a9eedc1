"""Plain-JAX NSA ops: the reference every kernel is tested against."""

from sparse_attention_jax.ops.compressed import CompressedAttentionOutput, compressed_attention
from sparse_attention_jax.ops.compression import (
  CompressorParams,
  MLPCompressorParams,
  cmp_visibility,
  compress,
  init_mlp_compressor,
)
from sparse_attention_jax.ops.decode import attend_one
from sparse_attention_jax.ops.masked import dense_causal_attention, masked_attention
from sparse_attention_jax.ops.nosa import (
  NOSAAux,
  biased_selected_attention,
  nosa_attention,
  nosa_scores,
)
from sparse_attention_jax.ops.nosa_selection import (
  agnostic_block_scores,
  eviction_bias,
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
from sparse_attention_jax.ops.window import sliding_window_attention

__all__ = [
  "CompressedAttentionOutput",
  "CompressorParams",
  "MLPCompressorParams",
  "NOSAAux",
  "NSAAux",
  "NSACache",
  "agnostic_block_scores",
  "attend_one",
  "biased_selected_attention",
  "block_importance",
  "cmp_visibility",
  "combine_branches",
  "compress",
  "compressed_attention",
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
  "select_blocks",
  "selected_attention",
  "share_selection",
  "sliding_window_attention",
]
