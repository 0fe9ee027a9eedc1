"""Analysis of models built from registered attention kinds: KV-cache bytes, training FLOPs,
attention sparsity and selection locality.

Every tool loops over the layers of a config or model and asks each layer's kind entry in the
registry (:mod:`sparse_attention_jax.nn.attention`) for its numbers, so a newly registered kind
is counted without editing this package; an unknown kind is an error naming it and the
registered kinds.

Modules: :mod:`.kv_cache` (``python -m sparse_attention_jax.analysis.kv_cache CONFIG...``),
:mod:`.flops`, :mod:`.sparsity`, :mod:`.locality`.
"""

from __future__ import annotations

from sparse_attention_jax.analysis.flops import (
  attention_flops_per_token,
  flops_per_token,
  param_split,
)
from sparse_attention_jax.analysis.kv_cache import (
  describe_kv_cache,
  kv_cache_bytes,
  kv_cache_bytes_per_token,
  layer_kv_elements,
)
from sparse_attention_jax.analysis.locality import model_selection_locality
from sparse_attention_jax.analysis.sparsity import model_attention_stats, sparsity_metrics

__all__ = [
  "attention_flops_per_token",
  "describe_kv_cache",
  "flops_per_token",
  "kv_cache_bytes",
  "kv_cache_bytes_per_token",
  "layer_kv_elements",
  "model_attention_stats",
  "model_selection_locality",
  "param_split",
  "sparsity_metrics",
]
