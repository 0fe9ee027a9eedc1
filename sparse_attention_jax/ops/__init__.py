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
    "CompressedAttentionOutput", "CompressorParams", "MLPCompressorParams", "NSAAux", "NSACache",
    "attend_one", "block_importance", "cmp_visibility", "combine_branches", "compress",
    "compressed_attention", "dense_causal_attention", "fill_nsa_cache", "init_mlp_compressor",
    "init_nsa_cache", "masked_attention", "nsa_attention", "nsa_decode_step", "overlap_table",
    "select_blocks", "selected_attention", "share_selection", "sliding_window_attention",
]
