"""Packed documents at the model level: every attention kind's decoder LM gives each document of a
packed row (positions restarting at 0, ``segment_ids``) the logits of the document run alone, and
cached decoding of a document alone reproduces its packed training-time logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nosa_models import nosa_model

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, LatentConfig, ModelConfig, SSAConfig
from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.ops.documents import document_positions

NSA = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=10)
LATENT = LatentConfig(kv_rank=16, q_rank=24, rope_dim=4, nope_dim=8, v_dim=6, groups=2)
SSA_NSA = NSA.replace(
  compression="mean",
  cmp_window=8,
  cmp_stride=8,
  branches=("slc",),
  num_init_blocks=0,
  num_local_blocks=1,
)
# Documents of 13, 1, 21 and 5 tokens: off every grid (l=8, d=4, l'=8), one of length 1.
LENGTHS = (13, 1, 21, 5)
T = sum(LENGTHS)


def _model(kinds, **kw) -> DecoderLM:
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=len(kinds),
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=tuple(kinds),
    window=12,
    nsa=NSA,
    latent=LATENT,
  )
  return DecoderLM(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(3))


MODELS = {
  "full_swa_nsa": lambda: _model(["full", "swa", "nsa"]),
  "asa": lambda: _model(["asa_local", "asa_global"]),
  "ssa_sparse": lambda: _model(["ssa"], nsa=SSA_NSA, ssa=SSAConfig(inference_mode="sparse")),
  "nosa": lambda: nosa_model(),
}


def packed_row():
  seg = jnp.asarray(np.repeat(np.arange(1, len(LENGTHS) + 1), LENGTHS)[None], jnp.int32)
  return seg, document_positions(seg, 1, T)


def bounds():
  ends = np.cumsum(LENGTHS)
  return list(zip(ends - np.asarray(LENGTHS), ends, strict=True))


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
  )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_logits_equal_each_document_alone(name):
  model = MODELS[name]()
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x, pos, seg: nnx.merge(graphdef, p)(x, pos, seg))
  tokens = jax.random.randint(jax.random.key(5), (1, T), 0, 64)
  seg, pos = packed_row()
  packed = forward(params, tokens, pos, seg)
  for a, b in bounds():
    close(packed[:, a:b], forward(params, tokens[:, a:b], None, None))


@pytest.mark.parametrize("name", ["full_swa_nsa", "nosa"])
def test_cached_decoding_of_a_document_matches_its_packed_logits(name):
  """Each document alone: a one-token prefill, then cached steps; every step's logits equal the
  packed row's logits at that document's positions."""
  model = MODELS[name]()
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(9), (1, T), 0, 64)
  seg, pos = packed_row()
  packed = jax.jit(lambda p, x, ps, s: nnx.merge(graphdef, p)(x, ps, s))(params, tokens, pos, seg)
  pre = jax.jit(
    lambda p, x: dec.prefill(
      nnx.merge(graphdef, p),
      x,
      jnp.ones((1,), jnp.int32),
      dec.init_decode_state(nnx.merge(graphdef, p), 1, max(LENGTHS)),
    )
  )
  step = jax.jit(lambda p, x, st: dec.decode_step(nnx.merge(graphdef, p), x, st))
  for a, b in bounds():
    logits, state = pre(params, tokens[:, a : a + 1])
    close(logits[0], packed[0, a])
    for t in range(a + 1, b):
      logits, state = step(params, tokens[:, t], state)
      close(logits[0], packed[0, t])
