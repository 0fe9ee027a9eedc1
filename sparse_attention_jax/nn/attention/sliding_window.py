"""Causal sliding-window GQA attention with RoPE (kind ``"swa"``).

Accounting per layer: the cache holds K and V, ``H * (Dk + Dv)`` elements per token, of which
only the last ``w = model.window`` tokens are needed; a query visits ``min(w, T / 2)`` keys on
average (causal, queries spread uniformly over ``0 .. T-1``).
"""

from __future__ import annotations

from flax import nnx

from sparse_attention_jax.nn.attention.full import (
  DenseAttentionBase,
  dense_kv_elements,
  dense_qk,
  dense_train_flops,
)
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  register_attention_kind,
)
from sparse_attention_jax.ops.causal import causal_attention


class SlidingWindowAttention(DenseAttentionBase):
  """Causal sliding-window GQA attention with RoPE (kind ``"swa"``): query ``t`` sees keys
  ``t - window + 1 .. t`` (``config.window`` keys including itself) of its own document, through
  :func:`~sparse_attention_jax.ops.causal.causal_attention` (as ``FullAttention``)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.cache_window = config.window

  def _attend(self, q, k, v, segment_ids):
    return causal_attention(
      q, k, v, segment_ids=segment_ids, window=self.config.window, impl=self.config.attn_impl
    )


SWA = register_attention_kind(
  AttentionKind(
    name="swa",
    module=SlidingWindowAttention,
    decode=LAYER_METHODS,
    kv_elements=lambda config: dense_kv_elements(config, window=config.window),
    train_flops=lambda config, seq_len: dense_train_flops(config, min(config.window, seq_len / 2)),
    qk=dense_qk,
  )
)

__all__ = ["SWA", "SlidingWindowAttention"]
