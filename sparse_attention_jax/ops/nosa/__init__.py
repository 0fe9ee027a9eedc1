"""NOSA (trainable sparse attention with a query-agnostic, offload-friendly selection).

* :mod:`~sparse_attention_jax.ops.nosa.selection`: eviction head, query-agnostic block scores,
  the union of a query-aware and a query-agnostic top-k;
* :mod:`~sparse_attention_jax.ops.nosa.attention`: biased selected attention and the whole op;
* :mod:`~sparse_attention_jax.ops.nosa.decode`: device-resident decoding state and step.
"""

from sparse_attention_jax.ops.nosa.attention import (
  NOSAAux,
  biased_masked_attention,
  biased_selected_attention,
  decode_selection,
  nosa_attention,
  nosa_scores,
)
from sparse_attention_jax.ops.nosa.decode import (
  NOSACache,
  NOSASelectState,
  fill_nosa_cache,
  init_nosa_cache,
  nosa_decode_step,
)
from sparse_attention_jax.ops.nosa.selection import (
  agnostic_block_scores,
  eviction_bias,
  nosa_select,
)

__all__ = [
  "NOSAAux",
  "NOSACache",
  "NOSASelectState",
  "agnostic_block_scores",
  "biased_masked_attention",
  "biased_selected_attention",
  "decode_selection",
  "eviction_bias",
  "fill_nosa_cache",
  "init_nosa_cache",
  "nosa_attention",
  "nosa_decode_step",
  "nosa_scores",
  "nosa_select",
]
