"""A tiny NOSA decoder LM shared by the cached-decoding and offloaded-decoding tests."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, ModelConfig
from sparse_attention_jax.nn.nosa_config import NOSAConfig

# k = 5 blocks: 1 init + 1 local (the current block) forced, k_q = 3 query-aware, 2 agnostic.
CFG = NSAConfig.infllm_v2(
  local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=5, num_local_blocks=1
)
KQ = 3


def nosa_model(kinds=("nosa", "full"), seed=3, **kw) -> DecoderLM:
  """A two-layer byte-sized model (NOSA then full by default) with non-zero eviction scales."""
  base = {
    "vocab_size": 64,
    "d_model": 32,
    "num_layers": len(kinds),
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "v_head_dim": 6,
    "mlp_dim": 64,
    "attention": tuple(kinds),
    "nsa": CFG,
    "nosa": NOSAConfig(query_selected=KQ),
  }
  model = DecoderLM(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(seed))
  for i, blk in enumerate(model.layers):  # A = 0 at init would make c = 0: use both signs
    if blk.kind == "nosa":
      blk.attn.a[...] = jnp.array([1.5, -2.0]) * (1 + i)
  return model
