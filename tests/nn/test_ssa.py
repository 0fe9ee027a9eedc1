"""SSA: the alignment terms and their stop-gradients, the full/sparse paths of the layer,
the per-step mode shared by all layers, inference overrides, sparsity metrics, causality, the
config section and a short training run with the CLIs that evaluate it."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention_jax.analysis import sparsity
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, ModelConfig, SSAConfig
from sparse_attention_jax.nn.attention import ssa
from sparse_attention_jax.ops import dense_causal_attention, nsa_attention
from train import loop
from train.__main__ import main as train_main
from train.attention_stats import main as stats_main
from train.config import load_config
from train.ssa_eval import main as eval_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SSA_TINY = os.path.join(ROOT, "configs", "ssa_tiny.yaml")
T = 32
SEL = NSAConfig.paper(
  compression="mean",
  cmp_window=4,
  cmp_stride=4,
  block_size=4,
  num_selected=2,
  num_init_blocks=0,
  num_local_blocks=1,
  window=0,
  branches=("slc",),
)


def tiny(**kw) -> ModelConfig:
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=("ssa",),
    nsa=SEL,
    ssa=SSAConfig(),
  )
  return ModelConfig(**{**base, **kw})


def smooth_l1_np(a, b):
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))


def test_alignment_terms_are_smooth_l1_with_opposite_stop_gradients():
  ka, kb = jax.random.split(jax.random.key(0))
  a = 1.5 * jax.random.normal(ka, (2, 5, 3, 4))  # differences both below and above beta = 1
  b = 1.5 * jax.random.normal(kb, (2, 5, 3, 4))
  t1, t2 = ssa.alignment_loss_terms(a, b)
  want = smooth_l1_np(a, b)
  np.testing.assert_allclose([float(t1), float(t2)], [want, want], rtol=1e-6)
  d = np.abs(np.asarray(a - b))
  assert (d < 1).any() and (d > 1).any()
  g1_full, g1_sparse = jax.grad(lambda x, y: ssa.alignment_loss_terms(x, y)[0], (0, 1))(a, b)
  g2_full, g2_sparse = jax.grad(lambda x, y: ssa.alignment_loss_terms(x, y)[1], (0, 1))(a, b)
  assert not np.any(np.asarray(g1_sparse)) and not np.any(np.asarray(g2_full))
  huber_grad = np.clip(np.asarray(a - b), -1, 1) / a.size
  np.testing.assert_allclose(g1_full, huber_grad, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g2_sparse, -huber_grad, rtol=1e-5, atol=1e-9)


def _layer_and_input(seed=0, **kw):
  cfg = tiny(**kw)
  layer = ssa.SSAAttention(cfg, rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 1), (2, T, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  return cfg, layer, x, pos


def _paths_by_hand(layer, x, pos, op_config):
  q, k, v = layer.qkv(x, pos)
  g = jax.nn.sigmoid(layer.gate_proj(x))[..., 1:2]
  full = g * dense_causal_attention(q, k, v)
  sparse = g * nsa_attention(q, k, v, None, config=op_config, impl="reference")
  return full, sparse


def test_full_and_sparse_modes_follow_the_dense_and_nsa_paths():
  cfg, layer, x, pos = _layer_and_input()
  full, sparse = _paths_by_hand(layer, x, pos, SEL)
  assert float(jnp.max(jnp.abs(full - sparse))) > 1e-3  # n = 2 of 8 blocks: really sparse.
  ssa.set_training(layer, True)
  np.testing.assert_allclose(layer(x, pos), layer.o_proj(full), atol=2e-5)
  np.testing.assert_allclose(layer.align[...], ssa.alignment_loss_terms(full, sparse), rtol=1e-4)
  ssa.set_training(layer, False)  # mode False while training = sparse
  layer.training = True
  np.testing.assert_allclose(layer(x, pos), layer.o_proj(sparse), atol=2e-5)
  ssa.set_training(layer, None)  # inference form: the config's inference_mode (sparse)
  assert not layer.training and layer.inference_mode == "sparse"
  np.testing.assert_allclose(layer(x, pos), layer.o_proj(sparse), atol=2e-5)


def test_gradients_of_each_term_reach_only_their_own_path():
  """d term1 / d params is the gradient through o_full alone (o_sparse a constant target) and
  d term2 / d params the gradient through o_sparse alone: d term1 / d o_sparse = 0 and
  d term2 / d o_full = 0 inside the layer."""
  cfg, layer, x, pos = _layer_and_input()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def outputs(p):
    m = nnx.merge(graphdef, p, rest)
    o = m.outputs(x, pos)
    return o["full"], o["sparse"]

  def term(i, p):
    return ssa.alignment_loss_terms(*outputs(p))[i]

  # d term_i / d params == the gradient through only one output, the other held constant.
  f0, s0 = outputs(params)
  g1 = jax.grad(lambda p: term(0, p))(params)
  g2 = jax.grad(lambda p: term(1, p))(params)
  via_full = jax.grad(lambda p: ssa.smooth_l1(outputs(p)[0], s0))(params)
  via_sparse = jax.grad(lambda p: ssa.smooth_l1(f0, outputs(p)[1]))(params)
  for a, b in ((g1, via_full), (g2, via_sparse)):
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-9)
  assert float(optax_norm(g1)) > 0 and float(optax_norm(g2)) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_inference_override_changes_the_budget_and_full_equals_dense():
  cfg = tiny()
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
  sparse2 = model(tokens)
  ssa.set_inference(model, "full")
  full = model(tokens)
  # Full inference = the training forward in full mode (same dense path through every layer).
  ssa.set_training(model, True)
  np.testing.assert_allclose(model(tokens), full, atol=1e-5)
  ssa.set_training(model, None)
  ssa.set_inference(model, "sparse", num_selected=3)
  assert all(l.sparse_config.num_selected == 3 for l in ssa.ssa_layers(model))
  sparse3 = model(tokens)
  assert float(jnp.max(jnp.abs(sparse3 - sparse2))) > 1e-4
  # Selecting every block is dense attention; a larger block size keeps l = d = l' tied.
  ssa.set_inference(model, num_selected=T // 4)
  np.testing.assert_allclose(model(tokens), full, atol=1e-5)
  ssa.set_inference(model, block_size=8, num_selected=2)
  sc = ssa.ssa_layers(model)[0].sparse_config
  assert (sc.block_size, sc.cmp_window, sc.cmp_stride, sc.num_selected) == (8, 8, 8, 2)
  with pytest.raises(ValueError, match="mode"):
    ssa.set_inference(model, "dense")
  with pytest.raises(ValueError, match="num_selected"):
    ssa.set_inference(model, num_selected=0)


def test_mode_is_drawn_per_step_and_shared_by_all_layers():
  cfg = tiny(num_layers=3, ssa=SSAConfig(full_prob=0.5))
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, loop.make_tx(loop.TrainConfig(steps=10)), wrt=nnx.Param)
  trainer = loop.Trainer(model, opt)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 64, (2, T + 1)).astype(np.int32)
  batch = {
    "tokens": toks[:, :-1],
    "targets": toks[:, 1:],
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy(),
    "segment_ids": np.ones((2, T), np.int32),
    "loss_mask": np.ones((2, T), np.float32),
  }
  seen = []
  for s in range(4):
    m = trainer.step(batch)
    modes = [bool(l.mode[...]) for l in ssa.ssa_layers(trainer.model)]
    assert len(set(modes)) == 1, modes  # one draw for all layers
    assert modes[0] == bool(ssa.draw_mode(s, 0.5)) == bool(m["mode_full"])
    assert float(m["align_full"]) == pytest.approx(float(m["align_sparse"]))
    assert float(m["total_loss"]) == pytest.approx(
      float(m["loss"]) + 10 * 2 * float(m["align_full"]), rel=1e-5
    )
    seen.append(modes[0])
  draws = np.array([bool(ssa.draw_mode(s, 0.3)) for s in range(400)])
  assert 0.22 < draws.mean() < 0.38
  assert not ssa.ssa_layers(trainer.model)[0].training  # the stored graph stays in inference form
  # Gradient accumulation: always-full mode, 2 microbatches == 1 batch.
  cfg1 = tiny(ssa=SSAConfig(full_prob=1.0))
  grads = []
  for accum in (1, 2):
    model = DecoderLM(cfg1, rngs=nnx.Rngs(0))
    ssa.set_training(model, True)
    if accum == 1:
      grads.append(nnx.grad(lambda m: loop.ssa_loss_fn(m, batch, 10.0)[0])(model))
    else:
      _, _, g, (terms, full) = loop._grads_accumulated(model, batch, 2, cfg1.ssa, 0)
      assert float(full) == 1.0
      grads.append(g)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_model_is_causal_in_both_modes():
  cfg = tiny()
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
  cut = 13
  other = tokens.at[0, cut:].set((tokens[0, cut:] + 7) % cfg.vocab_size)
  for mode in (True, False):
    ssa.set_training(model, mode)
    a, b = model(tokens), model(other)
    np.testing.assert_allclose(a[0, :cut], b[0, :cut], atol=1e-5)
    assert float(jnp.max(jnp.abs(a[0, cut:] - b[0, cut:]))) > 1e-3


def test_sparsity_metrics_on_crafted_attention():
  t = 8
  one_hot = jnp.zeros((1, 1, t, t)).at[0, 0, :, 0].set(1.0)  # every query on token 0
  m = sparsity.sparsity_metrics(one_hot, ks=(1, 4), block_size=4, block_ks=(1, 2), sink=2)
  assert m["topk_mass"] == {1: 1.0, 4: 1.0} and m["block_mass"][1] == 1.0
  assert m["entropy"] == pytest.approx(0.0, abs=1e-7) and m["sink_mass"] == pytest.approx(1.0)
  rows = jnp.tril(jnp.ones((t, t)))
  uniform = (rows / rows.sum(-1, keepdims=True))[None, None]  # query i: 1/(i+1) on 0..i
  m = sparsity.sparsity_metrics(uniform, ks=(1, 2, 8), block_size=4, block_ks=(1,), sink=2)
  n = np.arange(1, t + 1)
  assert m["entropy"] == pytest.approx(np.mean(np.log(n)), rel=1e-5)
  assert m["topk_mass"][1] == pytest.approx(np.mean(1 / n), rel=1e-5)
  assert m["topk_mass"][2] == pytest.approx(np.mean(np.minimum(2 / n, 1)), rel=1e-5)
  assert m["topk_mass"][8] == pytest.approx(1.0)
  assert m["block_mass"][1] == pytest.approx(np.mean(np.minimum(4 / n, 1)), rel=1e-5)
  assert m["sink_mass"] == pytest.approx(np.mean(2 / n[2:]), rel=1e-5)  # queries at pos >= 2
  # Probabilities from q/k: causal rows summing to one; documents restart positions and sinks.
  q = jax.random.normal(jax.random.key(0), (1, t, 4, 8))
  k = jax.random.normal(jax.random.key(1), (1, t, 2, 8))
  seg = jnp.array([[1] * 4 + [2] * 4])
  p = sparsity.attention_probs(q, k, segment_ids=seg)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.max(jnp.triu(p[0, 0], 1))) == 0 and float(p[0, 0, 5, 2]) == 0


def test_model_stats_cover_every_layer_kind():
  cfg = tiny(
    attention=("ssa", "full", "nsa"), num_layers=3, nsa=SEL.replace(branches=("cmp", "slc"))
  )
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
  stats = sparsity.model_attention_stats(model, tokens, ks=(1, 4), block_size=4, block_ks=(1,))
  assert [s["kind"] for s in stats["layers"]] == ["ssa", "full", "nsa"]
  for s in stats["layers"]:
    assert 0 < s["topk_mass"][1] <= s["topk_mass"][4] <= 1 and s["entropy"] > 0


def test_config_section_and_overrides():
  cfg = load_config(SSA_TINY, ["model.ssa.full_prob=0.25", "model.ssa.inference_mode=full"])
  assert cfg.model.ssa == SSAConfig(full_prob=0.25, inference_mode="full")
  assert ModelConfig.from_dict(cfg.model.to_dict()) == cfg.model
  for bad, field in (
    ("model.ssa.full_prob=2", "model.ssa.full_prob"),
    ("model.ssa.branches=[slc, foo]", "model.ssa.branches"),
    ("model.ssa.mode=full", "model.ssa.mode"),
  ):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      load_config(SSA_TINY, [bad])
  with pytest.raises(ValueError, match="model.nsa.compression"):
    DecoderLM(tiny(nsa=SEL.replace(compression="mlp")), rngs=nnx.Rngs(0))
  big = load_config(os.path.join(ROOT, "configs", "ssa_340m.yaml")).model
  assert (big.nsa.block_size, big.nsa.num_selected, big.ssa.align_weight) == (16, 16, 10.0)


def test_models_without_ssa_train_as_before():
  cfg = tiny(attention=("full",))
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert loop._ssa_settings(model) is None and ssa.alignment_terms(model) is None
  opt = nnx.Optimizer(model, loop.make_tx(loop.TrainConfig(steps=10)), wrt=nnx.Param)
  toks = np.arange(2 * (T + 1), dtype=np.int32).reshape(2, T + 1) % 64
  batch = {
    "tokens": toks[:, :-1],
    "targets": toks[:, 1:],
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy(),
    "segment_ids": np.ones((2, T), np.int32),
    "loss_mask": np.ones((2, T), np.float32),
  }
  ref = nnx.clone(model)
  ce, _ = loop.loss_fn(ref, batch)
  m = loop.Trainer(model, opt).step(batch)
  assert set(m) == {"loss", "grad_norm", "targets"}
  assert float(m["loss"]) == pytest.approx(float(ce), rel=1e-6)


def test_short_ssa_run_lowers_ce_logs_both_terms_and_evaluates(tmp_path, capsys):
  out = tmp_path / "run"
  small = [
    "train.corpus_max_bytes=300000",
    "train.eval_batches=1",
    "train.batch_size=4",
    "train.seq_len=128",
  ]
  rc = train_main(
    [
      "--config",
      SSA_TINY,
      "--no-progress",
      *small,
      "train.steps=24",
      "train.log_every=8",
      "train.eval_every=0",
      "train.sample_bytes=0",
      f"train.output_dir={out}",
    ]
  )
  assert rc == 0
  text = capsys.readouterr().out
  assert "align full" in text and "sparse" in text
  events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  logs = [e for e in events if "loss" in e]
  assert [e["step"] for e in logs] == [8, 16, 24]
  assert all(np.isfinite(e["align_full"]) and np.isfinite(e["align_sparse"]) for e in logs)
  assert logs[-1]["loss"] < logs[0]["loss"] - 0.5, logs
  assert all(e["total_loss"] >= e["loss"] for e in logs)
  ckpt = str(out / "checkpoints" / "24")
  assert eval_main(["--config", SSA_TINY, "--checkpoint", ckpt, "--budgets", "1,8", *small]) == 0
  text = capsys.readouterr().out
  losses = {
    l.split()[0] + l.split()[1]: float(l.split("eval loss")[1].split()[0])
    for l in text.splitlines()
    if "eval loss" in l and "sparse" in l
  }
  full = float(next(l for l in text.splitlines() if l.startswith("full")).split()[3])
  assert set(losses) == {"sparsen=1", "sparsen=8"} and losses["sparsen=8"] == pytest.approx(
    full, abs=1e-4
  )  # 8 blocks of 16 = every block of a 128-byte row: dense.
  assert (
    stats_main(
      [
        "--config",
        SSA_TINY,
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp_path / "st"),
        "--ks",
        "1,4,16",
        "--block-ks",
        "1,2",
        *small,
        "train.batch_size=2",
      ]
    )
    == 0
  )
  stats = json.loads((tmp_path / "st" / "attention_stats.json").read_text())
  assert len(stats["layers"]) == 2 and (tmp_path / "st" / "attention_stats.png").stat().st_size
