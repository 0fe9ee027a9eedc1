"""Pieces shared by the attention kinds: input checks, default positions and the q/k/v/o
projections of the GQA head layout.

Head layout: ``HQ = num_heads`` query heads of dim ``Dk = head_dim``; ``H = num_kv_heads`` KV
heads (GQA: query head ``h*G + g`` reads KV head ``h``, ``G = HQ // H``); values have dim
``Dv = config.dv``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.layers import projection
from sparse_attention_jax.nn.rope import apply_rope


def check_inputs(x, positions, segment_ids, d_model: int):
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"x: expected [B, T, d_model={d_model}], got shape {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions: expected shape [B, T] = {x.shape[:2]}, got {positions.shape}")
  if segment_ids is not None and segment_ids.shape != x.shape[:2]:
    raise ValueError(f"segment_ids: expected shape [B, T] = {x.shape[:2]}, got {segment_ids.shape}")


def kv_projection(config: ModelConfig, head_dim: int, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, d_model] -> [B, T, H, head_dim]``."""
  return projection(
    "btd,dhk->bthk",
    (config.d_model, config.num_kv_heads, head_dim),
    in_axes=0,
    out_axes=(1, 2),
    dtype=dtype,
    rngs=rngs,
    names=("embed", "kv_heads", "head_dim"),
  )


def q_projection(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, d_model] -> [B, T, HQ, head_dim]``."""
  c = config
  return projection(
    "btd,dhk->bthk",
    (c.d_model, c.num_heads, c.head_dim),
    in_axes=0,
    out_axes=(1, 2),
    dtype=dtype,
    rngs=rngs,
    names=("embed", "q_heads", "head_dim"),
  )


def o_projection(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, HQ, Dv] -> [B, T, d_model]``."""
  c = config
  return projection(
    "bthv,hvd->btd",
    (c.num_heads, c.dv, c.d_model),
    in_axes=(0, 1),
    out_axes=2,
    dtype=dtype,
    rngs=rngs,
    names=("q_heads", "head_dim", "embed"),
  )


def default_positions(x):
  """``[B, T]`` int32 positions ``0 .. T-1`` of every row (decoding: one document per row)."""
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def rope_qk(layer, x, positions, keys) -> tuple:
  """``(q [B, T, HQ, Dk], k [B, T, H, Dk])``: ``layer.q_proj`` and the projection ``keys`` on
  ``x [B, T, d_model]``, both rotated at ``positions [B, T]``."""
  theta = layer.config.rope_theta
  return apply_rope(layer.q_proj(x), positions, theta), apply_rope(keys(x), positions, theta)


__all__ = [
  "check_inputs",
  "default_positions",
  "kv_projection",
  "o_projection",
  "q_projection",
  "rope_qk",
]
