"""Flax NNX modules: attention layers (full, sliding-window, NSA, ASA, SSA, NOSA, pluggable kinds;
one module per kind in :mod:`sparse_attention_jax.nn.attention`) and a decoder LM.

Example::

  from flax import nnx
  from sparse_attention_jax.nn import DecoderLM, load_model_config
  cfg = load_model_config("configs/tiny.yaml")
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  logits = model(tokens)                       # [B, T] int32 -> [B, T, V] float32
"""

from __future__ import annotations

import os

from sparse_attention_jax.nn.attention import (
  ATTENTION_KINDS,
  AttentionKind,
  FullAttention,
  GLAGlobalAttention,
  MLALocalAttention,
  MLPCompressor,
  NOSAAttention,
  NSAAttention,
  SlidingWindowAttention,
  SSAAttention,
  get_attention_kind,
  register_attention_kind,
)
from sparse_attention_jax.nn.attention.ssa import set_inference
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.decode import DecodeState, decode_step, init_decode_state, prefill
from sparse_attention_jax.nn.latent_config import LatentConfig
from sparse_attention_jax.nn.layers import Embed, RMSNorm, SwiGLU
from sparse_attention_jax.nn.model import DecoderBlock, DecoderLM, count_params, param_count
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.nn.ssa_config import SSAConfig


def load_model_config(path: str | os.PathLike) -> ModelConfig:
  """Reads the ``model:`` section of a YAML config file into a :class:`ModelConfig`."""
  import yaml  # PyYAML ships with flax; imported here so the modules need no YAML

  with open(path) as f:
    data = yaml.safe_load(f)
  if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
    raise ValueError(
      f"{path}: expected a YAML mapping with a 'model:' section, got "
      f"{type(data).__name__ if not isinstance(data, dict) else sorted(data)}"
    )
  return ModelConfig.from_dict(data["model"])


__all__ = [
  "ATTENTION_KINDS",
  "AttentionKind",
  "DecodeState",
  "DecoderBlock",
  "DecoderLM",
  "Embed",
  "FullAttention",
  "GLAGlobalAttention",
  "LatentConfig",
  "MLALocalAttention",
  "MLPCompressor",
  "ModelConfig",
  "NOSAAttention",
  "NOSAConfig",
  "NSAAttention",
  "RMSNorm",
  "SSAAttention",
  "SSAConfig",
  "SlidingWindowAttention",
  "SwiGLU",
  "apply_rope",
  "count_params",
  "decode_step",
  "get_attention_kind",
  "init_decode_state",
  "load_model_config",
  "param_count",
  "prefill",
  "register_attention_kind",
  "set_inference",
]
