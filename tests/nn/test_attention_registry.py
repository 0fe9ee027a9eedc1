"""The attention-kind registry: every kind's KV elements and FLOPs per token against hand counts,
unknown kinds, and a kind registered here flowing through the model, decoding and the analysis."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention_jax.analysis import flops, kv_cache, sparsity
from sparse_attention_jax.nn import ATTENTION_KINDS, DecoderLM, ModelConfig, decode
from sparse_attention_jax.nn.attention import (
  AttentionKind,
  DecodeProtocol,
  KVElements,
  get_attention_kind,
  register_attention_kind,
)
from sparse_attention_jax.nn.attention.common import kv_projection, o_projection

BUILT_IN = ("full", "swa", "nsa", "asa_local", "asa_global", "ssa", "nosa")

# HQ = 2 query heads, H = 1 KV head, Dk = Dv = 8, window w = 8; NSA paper preset with l = 8,
# d = 4, l' = 8, n = 3, NSA window 8 (branches cmp, slc, win; independent K/V).
TINY = {
  "vocab_size": 64,
  "d_model": 16,
  "num_layers": 1,
  "num_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 8,
  "mlp_dim": 32,
  "window": 8,
  "nsa": {
    "preset": "paper",
    "cmp_window": 8,
    "cmp_stride": 4,
    "block_size": 8,
    "num_selected": 3,
    "window": 8,
  },
}
LATENT = {"kv_rank": 16, "q_rank": 24, "rope_dim": 4, "nope_dim": 8, "v_dim": 6, "groups": 2}
INFLLM = {
  "preset": "infllm_v2",
  "cmp_window": 8,
  "cmp_stride": 4,
  "block_size": 8,
  "num_selected": 4,
  "num_init_blocks": 1,
  "num_local_blocks": 2,
}
T = 64  # T / 2 = 32 keys for full attention, T / (2 d) = 8 compressed keys

# kind -> (extra config, KV elements per token, window, attention FLOPs per token at T), counted
# by hand: FLOPs = 6 * HQ * sum over branches of keys * (Dk + Dv).
HAND = {
  "full": ({}, 8 + 8, None, 6 * 2 * 32 * 16),
  "swa": ({}, 8 + 8, 8, 6 * 2 * 8 * 16),
  # 3 K/V pairs + compressed K and V / d; cmp 8 keys + slc 24 + win 8.
  "nsa": ({}, 3 * 16 + 16 / 4, None, 6 * 2 * (8 + 24 + 8) * 16),
  # MLA latent d_c + d_R; expanded Dk = 8 + 4, Dv = 6 over min(w, T/2) = 8 keys.
  "asa_local": ({"latent": LATENT}, 16 + 4, 8, 6 * 2 * 8 * (12 + 6)),
  # GLA latent + (g * (dl + d_R) + d_c) / d; absorbed Dk = 8 + 4, Dv = 8; cmp 8 keys + slc 24
  # (the layer drops the window branch).
  "asa_global": (
    {"latent": LATENT},
    16 + 4 + (2 * (8 + 4) + 16) / 4,
    None,
    6 * 2 * (8 + 24) * (12 + 8),
  ),
  # One shared K/V pair + compressed K (no cmp output) / d; full T/2 keys plus scores (q.k only)
  # and the selected blocks.
  "ssa": (
    {"ssa": {"branches": ["slc"]}, "nsa": {**TINY["nsa"], "compression": "mean"}},
    16 + 8 / 4,
    None,
    6 * 2 * (32 * 16 + 8 * 8 + 24 * 16),
  ),
  # K, V, c + compressed K and c / d; scores over 8 compressed keys (q.k only) + k * l' = 32.
  "nosa": (
    {"nsa": INFLLM, "nosa": {"query_selected": 3}},
    (8 + 8 + 1) + (8 + 1) / 4,
    None,
    6 * 2 * (8 * 8 + 32 * 16),
  ),
}


def _config(kind: str, **kw) -> ModelConfig:
  return ModelConfig.from_dict({**TINY, "attention": [kind], **HAND[kind][0], **kw})


def test_every_registered_kind_has_a_hand_count():
  assert set(BUILT_IN) <= set(ATTENTION_KINDS)
  assert set(HAND) == set(BUILT_IN)


@pytest.mark.parametrize("kind", BUILT_IN)
def test_kv_elements_and_flops_match_hand_counts(kind):
  cfg = _config(kind)
  _, elements, window, attn_flops = HAND[kind]
  entry = get_attention_kind(kind)
  assert entry.kv(cfg) == KVElements(pytest.approx(elements), window, entry.kv(cfg).note)
  assert entry.flops(cfg, T) == pytest.approx(attn_flops)
  row = kv_cache.layer_kv_elements(cfg, kind)
  assert (row["elements_per_token"], row["window"]) == (pytest.approx(elements), window)
  per = kv_cache.kv_cache_bytes_per_token(cfg, dtype_bytes=2)
  assert per["by_kind"] == {kind: pytest.approx(2 * elements)}
  assert flops.attention_flops_per_token(cfg, kind, T) == pytest.approx(attn_flops)
  n_matmul, p_phi = flops.param_split(cfg)
  assert flops.flops_per_token(cfg, T) == pytest.approx(
    6 * n_matmul + 6 * p_phi / cfg.nsa.cmp_stride + attn_flops
  )


def test_ssa_kv_cache_is_counted():
  """An ``ssa`` model's KV cache (the sparse path's NSA cache with one shared pair)."""
  cfg = _config("ssa", attention=["ssa", "full"], num_layers=2)
  per = kv_cache.kv_cache_bytes_per_token(cfg, dtype_bytes=2)
  assert per["by_kind"] == {"ssa": pytest.approx(2 * (16 + 2)), "full": pytest.approx(2 * 16)}
  assert kv_cache.kv_cache_bytes(cfg, 10)["resident"] == pytest.approx(10 * 2 * (18 + 16))


def test_unknown_kind_errors_name_it_and_the_registered_kinds():
  with pytest.raises(ValueError, match=r"^model\.attention: .*\['asa_global'.*'swa'\].*'nope'"):
    ModelConfig(attention=("full", "nope"))
  cfg = _config("full")
  for call in (
    lambda: kv_cache.layer_kv_elements(cfg, "nope"),
    lambda: flops.attention_flops_per_token(cfg, "nope", T),
    lambda: get_attention_kind("nope"),
  ):
    with pytest.raises(ValueError, match=r"kind: expected one of .*'full'.*'swa'.*got 'nope'"):
      call()


# ------------------------------------------------------------------------ a kind added in a test
class _SelfAttention(nnx.Module):
  """Toy kind: each query attends only to its own token, ``y = o_proj(v_proj(x))`` with the
  value of KV head ``h`` read by its ``G`` query heads."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.v_proj = kv_projection(config, config.dv, jnp.float32, rngs)
    self.o_proj = o_projection(config, jnp.float32, rngs)

  def __call__(self, x, positions, segment_ids=None):
    v = self.v_proj(x)  # [B, T, H, Dv]
    g = self.config.num_heads // self.config.num_kv_heads
    return self.o_proj(jnp.repeat(v, g, axis=2))


# Decodes through functions of the layer (no methods): the cache is a step counter per row.
_SELF_DECODE = DecodeProtocol(
  init_cache=lambda layer, batch, capacity, dtype=None: jnp.zeros((batch,), jnp.int32),
  prefill=lambda layer, x, lengths, cache: (layer(x, None), lengths),
  step=lambda layer, x, pos, cache: (layer(x, None), cache + 1),
)


def _self_kind(name: str) -> AttentionKind:
  return AttentionKind(
    name=name,
    module=_SelfAttention,
    decode=_SELF_DECODE,
    kv_elements=lambda c: KVElements(0.0, None, "nothing cached"),
    train_flops=lambda c, seq_len: 6.0 * c.num_heads * 1 * c.dv,  # one key, p.v only
  )


def test_a_kind_registered_in_a_test_flows_through_model_decode_and_analysis():
  register_attention_kind(_self_kind("test_self"))
  try:
    cfg = ModelConfig.from_dict({**TINY, "attention": ["test_self", "full"], "num_layers": 2})
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.layers[0].attn, _SelfAttention)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    logits = model(tokens)
    chex.assert_shape(logits, (2, 12, cfg.vocab_size))

    per = kv_cache.kv_cache_bytes_per_token(cfg, dtype_bytes=2)
    assert per["by_kind"] == {"test_self": 0.0, "full": pytest.approx(2 * 16)}
    assert "test_self" in kv_cache.describe_kv_cache(cfg, context=100)
    assert kv_cache.offloaded_kv_bytes(cfg, 100) == {"device": 100 * 2 * 16, "host": 0.0}
    assert flops.attention_flops_per_token(cfg, "test_self", T) == 6 * 2 * 8
    n_matmul, p_phi = flops.param_split(cfg)
    assert p_phi == 0
    assert flops.flops_per_token(cfg, T) == pytest.approx(
      6 * n_matmul + 6 * 2 * 8 + 6 * 2 * 32 * 16
    )

    stats = sparsity.model_attention_stats(model, tokens, ks=(1,), block_ks=(1,), block_size=4)
    assert stats["layers"][0] == {
      "layer": 0,
      "kind": "test_self",
      "skipped": "no plain q/k projections",
    }
    assert "entropy" in stats["layers"][1]

    state = decode.init_decode_state(model, 2, 16)
    lengths = jnp.asarray([12, 7], jnp.int32)
    nxt, state = decode.prefill(model, tokens, lengths, state)
    np.testing.assert_allclose(nxt[1], logits[1, 6], rtol=1e-5, atol=1e-5)
    step, state = decode.decode_step(model, tokens[:, 7], state._replace(lengths=lengths * 0 + 7))
    np.testing.assert_allclose(step, logits[:, 7], rtol=1e-5, atol=1e-5)
    assert state.caches[0].tolist() == [13, 8]  # prefill stored lengths, then one step
  finally:
    ATTENTION_KINDS.pop("test_self", None)


def test_register_forms_and_collisions():
  try:
    entry = register_attention_kind(_self_kind("test_self_b"))
    assert get_attention_kind("test_self_b") is entry
    with pytest.raises(ValueError, match="already registered"):
      register_attention_kind("test_self_b", DecoderLM)

    @register_attention_kind("test_bare")
    class Bare(_SelfAttention):
      pass

    bare = get_attention_kind("test_bare")
    assert bare.module is Bare and bare.decode is None  # no decode methods
    cfg = ModelConfig.from_dict({**TINY, "attention": ["test_bare"]})
    with pytest.raises(ValueError, match="'test_bare' registers no kv_elements"):
      kv_cache.kv_cache_bytes_per_token(cfg)
    with pytest.raises(ValueError, match="'test_bare' registers no train_flops"):
      flops.flops_per_token(cfg, T)
    with pytest.raises(NotImplementedError, match=r"\['test_bare'\]"):
      decode.init_decode_state(DecoderLM(cfg, rngs=nnx.Rngs(0)), 1, 8)
  finally:
    ATTENTION_KINDS.pop("test_self_b", None)
    ATTENTION_KINDS.pop("test_bare", None)
