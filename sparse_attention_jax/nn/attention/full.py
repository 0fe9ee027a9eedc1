"""Dense causal GQA attention with RoPE (kind ``"full"``) and the dense base class it shares
with the sliding-window kind.

Accounting per layer (``H`` KV heads, ``HQ`` query heads, ``Dk``/``Dv`` head dims, length ``T``):
the cache holds K and V, ``H * (Dk + Dv)`` elements per token; a query visits ``T / 2`` keys on
average, ``6 * HQ * T / 2 * (Dk + Dv)`` training FLOPs per token (``2 Dk`` for q.k, ``2 Dv`` for
p.v, x 3 for forward + backward).
"""

from __future__ import annotations

from flax import nnx

from sparse_attention_jax.nn.attention.common import (
  check_inputs,
  default_positions,
  kv_projection,
  o_projection,
  q_projection,
  rope_qk,
)
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.decode import dense_decode, fill_dense_cache, init_dense_cache
from sparse_attention_jax.nn.layers import as_dtype
from sparse_attention_jax.nn.parallel import sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  LayerQK,
  register_attention_kind,
)
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.ops.causal import causal_attention


class DenseAttentionBase(nnx.Module):
  """q/k/v/o projections + RoPE shared by the dense kinds; subclasses pick the mask."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = as_dtype(config.dtype)
    c, dt = config, self.dtype
    self.q_proj = q_projection(c, dt, rngs)
    self.k_proj = kv_projection(c, c.head_dim, dt, rngs)
    self.v_proj = kv_projection(c, c.dv, dt, rngs)
    self.o_proj = o_projection(c, dt, rngs)

  # Keys a query sees (None = all earlier ones); set by the sliding-window kind.
  cache_window: int | None = None

  def _attend(self, q, k, v, segment_ids):
    raise NotImplementedError

  def qkv(self, x, positions):
    """Rotated ``q [B, T, HQ, Dk]``, ``k [B, T, H, Dk]`` and ``v [B, T, H, Dv]``."""
    c = self.config
    q = apply_rope(self.q_proj(x), positions, c.rope_theta)
    k = apply_rope(self.k_proj(x), positions, c.rope_theta)
    return q, k, self.v_proj(x)

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.nn.decode.DenseCache`: linear (full) or a ring of the
    window (swa)."""
    c = self.config
    return init_dense_cache(
      batch,
      capacity,
      num_kv_heads=c.num_kv_heads,
      dk=c.head_dim,
      dv=c.dv,
      dtype=dtype or self.dtype,
      window=self.cache_window,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    check_inputs(x, default_positions(x), None, self.config.d_model)
    q, k, v = self.qkv(x, default_positions(x))
    y = self.o_proj(self._attend(q, k, v, None))
    return y, fill_dense_cache(cache, k, v, lengths, ring=self.cache_window is not None)

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at positions ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    q, k, v = self.qkv(x, pos[:, None])
    o, cache = dense_decode(
      cache,
      q[:, 0],
      k[:, 0],
      v[:, 0],
      pos,
      scale=q.shape[-1] ** -0.5,
      ring=self.cache_window is not None,
      window=self.cache_window,
    )
    return self.o_proj(o[:, None]), cache

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    c = self.config
    check_inputs(x, positions, segment_ids, c.d_model)
    q, k, v = self.qkv(x, positions)  # [B, T, HQ, Dk], [B, T, H, Dk], [B, T, H, Dv]
    o = sharded_call(
      self._attend,
      {"q": q, "k": k, "v": v, "segment_ids": segment_ids},
      {"q": "bthd", "k": "bthd", "v": "bthd", "segment_ids": "bt"},
      num_kv_heads=c.num_kv_heads,
    )
    return self.o_proj(o)


class FullAttention(DenseAttentionBase):
  """Dense causal GQA attention with RoPE (kind ``"full"``).

  Runs :func:`~sparse_attention_jax.ops.causal.causal_attention` with
  ``impl=config.attn_impl``: cuDNN flash attention on GPU (packed rows: with a ``[B, 1, T, T]``
  document mask while ``B * T * T <= 2**28``, one per step), else the blocked plain-JAX op
  (``O(T * C)`` memory); no ``[B, HQ, T, T]`` logits either way.
  """

  def _attend(self, q, k, v, segment_ids):
    return causal_attention(q, k, v, segment_ids=segment_ids, impl=self.config.attn_impl)


def dense_kv_elements(config: ModelConfig, window: int | None = None) -> KVElements:
  """K and V of every token, ``H * (Dk + Dv)``; only the last ``window`` tokens when set."""
  c = config
  note = "K+V" + (f"; only the last w={window} tokens needed" if window is not None else "")
  return KVElements(float(c.num_kv_heads * (c.head_dim + c.dv)), window, note)


def dense_train_flops(config: ModelConfig, keys: float) -> float:
  """``6 * HQ * keys * (Dk + Dv)``: training FLOPs per token of ``keys`` visited keys."""
  return 6.0 * config.num_heads * keys * (config.head_dim + config.dv)


def dense_qk(layer, x, positions) -> LayerQK:
  """The layer's rotated q/k (``q_proj``, ``k_proj``)."""
  return LayerQK(*rope_qk(layer, x, positions, layer.k_proj))


FULL = register_attention_kind(
  AttentionKind(
    name="full",
    module=FullAttention,
    decode=LAYER_METHODS,
    kv_elements=dense_kv_elements,
    train_flops=lambda config, seq_len: dense_train_flops(config, seq_len / 2),
    qk=dense_qk,
  )
)

__all__ = [
  "FULL",
  "DenseAttentionBase",
  "FullAttention",
  "dense_kv_elements",
  "dense_qk",
  "dense_train_flops",
]
