"""NOSA layer kind: wiring vs the op, causality and documents through the model,
gradients of the eviction head, config section, KV-cache accounting and a short training run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention_jax.analysis import kv_cache
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import (
  DecoderLM,
  ModelConfig,
  NOSAAttention,
  NOSAConfig,
  load_model_config,
  param_count,
)
from sparse_attention_jax.ops.nosa import nosa_attention
from train.__main__ import main as train_main
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOSA_TINY = os.path.join(ROOT, "configs", "nosa_tiny.yaml")
T = 48
SEL = NSAConfig.infllm_v2(
  cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, num_init_blocks=1, num_local_blocks=1
)


fwd = nnx.jit(lambda m, *a: m(*a))  # eager dispatch of the reference is slow on CPU


def tiny(**kw) -> ModelConfig:
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=("nosa",),
    nsa=SEL,
    nosa=NOSAConfig(query_selected=3),
  )
  return ModelConfig(**{**base, **kw})


def _layer(seed=0, a=None):
  cfg = tiny()
  layer = NOSAAttention(cfg, rngs=nnx.Rngs(seed))
  if a is not None:
    layer.a[...] = a
  x = jax.random.normal(jax.random.key(seed + 1), (2, T, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  return cfg, layer, x, pos


def test_layer_is_projections_around_the_op():
  cfg, layer, x, pos = _layer(a=jnp.array([1.0, -0.7]))
  q, k, v, c = layer.qkvc(x, pos)
  assert c.shape == (2, T, 2) and float(jnp.std(c)) > 0.1
  op = jax.jit(lambda *a: nosa_attention(*a, config=SEL, num_query_selected=3))
  want = layer.o_proj(op(q, k, v, c))
  np.testing.assert_allclose(fwd(layer, x, pos), want, atol=1e-6)
  # The eviction bias changes the output (A = 0 would give c = 0).
  layer.a[...] = jnp.zeros(2)
  assert float(jnp.max(jnp.abs(fwd(layer, x, pos) - want))) > 1e-3


def test_model_is_causal_and_isolates_documents():
  model = DecoderLM(tiny(), rngs=nnx.Rngs(0))
  for blk in model.layers:
    blk.attn.a[...] = jnp.array([0.8, -1.2])
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, 64)
  cut = 29
  other = tokens.at[0, cut:].set((tokens[0, cut:] + 5) % 64)
  a, b = fwd(model, tokens), fwd(model, other)
  np.testing.assert_allclose(a[0, :cut], b[0, :cut], atol=1e-5)
  assert float(jnp.max(jnp.abs(a[0, cut:] - b[0, cut:]))) > 1e-3
  seg = jnp.array([[1] * 20 + [2] * (T - 20)])
  pos = jnp.concatenate([jnp.arange(20), jnp.arange(T - 20)])[None].astype(jnp.int32)
  first = tokens.at[0, :20].set((tokens[0, :20] + 3) % 64)
  np.testing.assert_allclose(
    fwd(model, tokens, pos, seg)[0, 20:], fwd(model, first, pos, seg)[0, 20:], atol=1e-5
  )


def test_eviction_head_receives_gradients():
  model = DecoderLM(tiny(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, T + 1), 0, 64)

  def loss(m):
    logits = m(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  def head_grads(m):
    g = nnx.jit(nnx.grad(loss))(m)
    return [
      (jnp.asarray(g.layers[i].attn.a[...]), jnp.asarray(g.layers[i].attn.w_delta[...]))
      for i in range(len(m.layers))
    ]

  for ga, gw in head_grads(model):  # at init A = 0: A gets a gradient, W_delta not yet
    assert float(jnp.max(jnp.abs(ga))) > 1e-6
    assert float(jnp.max(jnp.abs(gw))) == 0.0
  for blk in model.layers:
    blk.attn.a[...] = jnp.array([0.5, -0.5])
  for ga, gw in head_grads(model):
    assert float(jnp.max(jnp.abs(ga))) > 1e-6
    assert float(jnp.max(jnp.abs(gw))) > 1e-6


def test_config_section_and_errors():
  cfg = load_config(NOSA_TINY, ["model.nosa.query_selected=4"])
  assert cfg.model.nosa == NOSAConfig(query_selected=4)
  assert ModelConfig.from_dict(cfg.model.to_dict()) == cfg.model
  with pytest.raises(ValueError, match=r"model\.nosa\.foo"):
    load_config(NOSA_TINY, ["model.nosa.foo=1"])
  with pytest.raises(
    ValueError,
    match=r"model\.nosa\.query_selected: expected k_q with "
    r"num_init_blocks \+ num_local_blocks = 2 <= k_q <= "
    r"model\.nsa\.num_selected = 4, got 5",
  ):
    DecoderLM(tiny(nosa=NOSAConfig(query_selected=5)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.nsa\.compression: expected 'mean'"):
    DecoderLM(tiny(nsa=SEL.replace(compression="mlp")), rngs=nnx.Rngs(0))
  big = load_model_config(os.path.join(ROOT, "configs", "nosa_340m.yaml"))
  assert (
    big.nsa.num_selected,
    big.nsa.num_init_blocks,
    big.nsa.num_local_blocks,
    big.nsa.block_size,
    big.nosa.query_selected,
  ) == (64, 1, 17, 64, 33)


def test_kv_cache_accounting():
  cfg = tiny(attention=("nosa", "full"))
  h, dk, dv, d = 2, 8, 8, 4
  per = kv_cache.kv_cache_bytes_per_token(cfg, dtype_bytes=2)
  assert per["by_kind"]["nosa"] == pytest.approx(2 * (h * (dk + dv + 1) + h * (dk + 1) / d))
  e = kv_cache.nosa_offload_elements(cfg)
  assert e["slots"] == 4  # k, the current block included
  assert e["device_fixed"] == 4 * 8 * h * (dk + dv + 1)
  off = kv_cache.offloaded_kv_bytes(cfg, 1000, dtype_bytes=2)
  full = 1000 * 2 * h * (dk + dv)
  assert off["host"] == pytest.approx(1000 * 2 * h * (dk + dv + 1))
  assert off["device"] == pytest.approx(full + 2 * (1000 * h * (dk + 1) / d + e["device_fixed"]))
  short = kv_cache.offloaded_kv_bytes(cfg, 16, dtype_bytes=2)  # the pool never exceeds T
  assert short["device"] == pytest.approx(
    16 * 2 * h * (dk + dv) + 2 * (16 * h * (dk + 1) / d + 16 * h * (dk + dv + 1))
  )
  assert kv_cache.nosa_slots(tiny(nsa=SEL.replace(num_local_blocks=0))) == 5


def test_short_nosa_run_lowers_the_loss(tmp_path, capsys):
  out = tmp_path / "run"
  rc = train_main(
    [
      "--config",
      NOSA_TINY,
      "--no-progress",
      "train.corpus_max_bytes=300000",
      "train.eval_batches=1",
      "train.batch_size=4",
      "train.seq_len=128",
      "train.steps=24",
      "train.log_every=8",
      "train.eval_every=0",
      "train.sample_bytes=0",
      f"train.output_dir={out}",
    ]
  )
  assert rc == 0
  capsys.readouterr()
  logs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  logs = [e for e in logs if "loss" in e]
  assert [e["step"] for e in logs] == [8, 16, 24]
  assert logs[-1]["loss"] < logs[0]["loss"] - 0.5, logs


@pytest.mark.parametrize(
  "name,lo,hi",
  [("nosa_340m", 300e6, 420e6), ("nosa_1b", 1.1e9, 1.3e9), ("nosa_1p3b", 1.1e9, 1.3e9)],
)
def test_named_config_param_counts(name, lo, hi):
  cfg = load_model_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
  n = param_count(cfg)
  full = param_count(ModelConfig.from_dict({**cfg.to_dict(), "attention": ["full"]}))
  h, dv = cfg.num_kv_heads, cfg.dv
  assert n == full + cfg.num_layers * (h * dv * h + h)  # + W_delta and A per layer
  assert lo <= n <= hi, (name, n)
