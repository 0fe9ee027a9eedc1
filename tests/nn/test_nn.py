"""Flax NNX modules and the decoder LM: shapes, dtypes, causality, document isolation, parameter
counts of the named configs, one optimizer step, and the attention-kind registry."""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx

import sparse_attention_jax as sa
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import (
  ATTENTION_KINDS,
  DecoderLM,
  FullAttention,
  ModelConfig,
  NSAAttention,
  RMSNorm,
  SlidingWindowAttention,
  SwiGLU,
  apply_rope,
  count_params,
  load_model_config,
  param_count,
  register_attention_kind,
)
from sparse_attention_jax.ops import dense_causal_attention, sliding_window_attention

CONFIG_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
T = 48
TINY_NSA = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, window=12)


def tiny(kind: str = "nsa", **kw) -> ModelConfig:
  """A 2-layer model with GQA (HQ=4, H=2) small enough for CPU tests."""
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=(kind,),
    window=12,
    nsa=TINY_NSA,
  )
  return ModelConfig(**{**base, **kw})


# name -> config: every registered kind plus the NSA/value-dim variants worth covering.
VARIANTS = {
  "full": tiny("full"),
  "swa": tiny("swa"),
  "nsa": tiny("nsa"),
  "nsa_shared_kv_mean": tiny(
    "nsa",
    nsa_independent_kv=False,
    nsa=NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=12),
  ),
  "nsa_dv": tiny("nsa", v_head_dim=12, nsa_compressor_hidden=16),
  "full_dv": tiny("full", v_head_dim=12),
  "mixed": tiny("swa", attention=("swa", "nsa", "full"), num_layers=3),
}


def jit_apply(model: nnx.Module):
  """``(tokens, positions, segment_ids) -> logits``, jitted through the split/merge pattern."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

  return lambda tokens, positions=None, segment_ids=None: apply(
    state, tokens, positions, segment_ids
  )


@functools.cache
def variant_apply(name: str):
  """The jitted apply of ``DecoderLM(VARIANTS[name])``, shared by the tests (saves compiles)."""
  return jit_apply(DecoderLM(VARIANTS[name], rngs=nnx.Rngs(0)))


def jit_layer(layer: nnx.Module):
  """``(x, positions, segment_ids) -> y`` for an attention layer, jitted via split/merge."""
  graphdef, state = nnx.split(layer)

  @jax.jit
  def apply(state, x, positions, segment_ids):
    return nnx.merge(graphdef, state)(x, positions, segment_ids)

  return lambda x, positions, segment_ids=None: apply(state, x, positions, segment_ids)


def random_tokens(seed: int, cfg: ModelConfig, batch: int = 2, seq_len: int = T):
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)


# ------------------------------------------------------------------------------------------ RoPE
def test_rope_is_a_relative_rotation():
  rope = jax.jit(apply_rope, static_argnums=2)
  d = 16
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, d))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, d))

  def dot(pq, pk):
    rq = rope(q, jnp.full((1, 1), pq, jnp.int32), 10000.0)
    rk = rope(k, jnp.full((1, 1), pk, jnp.int32), 10000.0)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  np.testing.assert_allclose(dot(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  x = jax.random.normal(jax.random.key(2), (2, 5, 3, d)).astype(jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  y = rope(x, pos, 500.0)
  assert y.dtype == jnp.bfloat16
  chex.assert_shape(y, x.shape)
  np.testing.assert_allclose(
    jnp.linalg.norm(y.astype(jnp.float32), axis=-1),
    jnp.linalg.norm(x.astype(jnp.float32), axis=-1),
    rtol=2e-2,
  )
  # Half-split convention: dim i pairs with dim i + D/2.
  e0 = jnp.zeros((1, 1, 1, d)).at[..., 0].set(1.0)
  r = rope(e0, jnp.ones((1, 1), jnp.int32), 10000.0)
  np.testing.assert_allclose(r[0, 0, 0, [0, d // 2]], [np.cos(1.0), np.sin(1.0)], atol=1e-6)
  with pytest.raises(ValueError, match="positions"):
    apply_rope(x, pos[:, :4], 10000.0)


# ------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_and_mlp(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  norm = RMSNorm(32, dtype=dtype)
  y = norm(x)
  assert y.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(jnp.mean(jnp.square(y.astype(jnp.float32)), -1), 1.0, rtol=2e-2)
  mlp = SwiGLU(32, 48, dtype=dtype, rngs=nnx.Rngs(0))
  z = mlp(y)
  chex.assert_shape(z, (2, 7, 32))
  assert z.dtype == jnp.dtype(dtype)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(mlp, nnx.Param)))


# --------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["full", "swa", "nsa", "nsa_shared_kv_mean", "nsa_dv", "full_dv"])
def test_attention_layer_apply(name, dtype):
  cfg = dataclasses.replace(VARIANTS[name], dtype=dtype)
  layer = ATTENTION_KINDS[cfg.attention[0]](cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, cfg.d_model)).astype(dtype)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  y = jit_layer(layer)(x, pos, None)
  chex.assert_shape(y, (2, T, cfg.d_model))
  assert y.dtype == jnp.dtype(dtype)
  chex.assert_tree_all_finite(y)
  params = jax.tree.leaves(nnx.state(layer, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)


def test_nsa_layer_structure():
  layer = NSAAttention(VARIANTS["nsa"], rngs=nnx.Rngs(0))
  for name in ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gate_proj", "phi_k", "phi_v"):
    assert getattr(layer, name) is not None, name
  chex.assert_shape(layer.phi_k.w1[...], (2, 8, 8, 8))  # [H, l, D, F]
  chex.assert_shape(layer.gate_proj.kernel[...], (32, 4, 3))  # [d_model, HQ, 3]
  shared = NSAAttention(VARIANTS["nsa_shared_kv_mean"], rngs=nnx.Rngs(0))
  assert shared.k_slc is None and shared.k_win is None and shared.phi_k is None
  # Only the enabled branches get K/V; a single branch runs ungated.
  slc_only = NSAAttention(
    tiny(
      "nsa",
      nsa=NSAConfig.infllm_v2(
        cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, num_local_blocks=2
      ),
    ),
    rngs=nnx.Rngs(0),
  )
  assert slc_only.k_slc is not None and slc_only.k_win is None and slc_only.gate_proj is None
  x = jnp.ones((1, T, 32))
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  chex.assert_shape(jit_layer(slc_only)(x, pos, None), (1, T, 32))


def test_nsa_config_for_short_sequences():
  cfg = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=4)
  assert cfg.for_length(64) == cfg
  short = cfg.for_length(16)  # 2 blocks < 1 + 2 forced
  assert short.num_selected == 2
  assert short.num_init_blocks + short.num_local_blocks <= 2
  # n = NB selects every causally valid block, as any n >= NB would.
  q = jax.random.normal(jax.random.key(1), (1, 16, 2, 8))
  kv = jax.random.normal(jax.random.key(2), (1, 16, 1, 8))
  _, aux = sa.nsa_attention(
    q, kv, kv, None, config=short.replace(compression="mean"), return_aux=True
  )
  t = np.arange(16)
  want = np.stack([t // 8 >= 0, t // 8 >= 1], -1)  # block j valid iff 8j <= t
  got = np.stack([(np.asarray(aux.block_indices[0, :, 0]) == j).any(-1) for j in (0, 1)], -1)
  np.testing.assert_array_equal(got, want)
  layer = NSAAttention(tiny("nsa", nsa=cfg), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 16, 32))
  y = jit_layer(layer)(x, jnp.arange(16, dtype=jnp.int32)[None], None)
  chex.assert_shape(y, (1, 16, 32))


@pytest.mark.parametrize("kind", ["full", "swa"])
def test_dense_kinds_match_library_ops(kind):
  """jax.nn.dot_product_attention path (mask/window conventions) == the library's masked ops."""
  cfg = VARIANTS[kind]
  layer = ATTENTION_KINDS[kind](cfg, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (2, T, 4, 8))
  k = jax.random.normal(keys[1], (2, T, 2, 8))
  v = jax.random.normal(keys[2], (2, T, 2, 8))
  seg = jnp.asarray([[0] * 20 + [1] * 28, [3] * 48], jnp.int32)

  @jax.jit
  def both(q, k, v, s):
    if kind == "full":
      want = dense_causal_attention(q, k, v, segment_ids=s)
    else:
      want = sliding_window_attention(q, k, v, window=cfg.window, segment_ids=s)
    return layer._attend(q, k, v, s), want

  for s in (None, seg):
    got, want = both(q, k, v, s)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------ model
class ModelApplyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("nsa_f32", "nsa", "float32"), ("mixed_bf16", "mixed", "bfloat16")
  )
  def test_apply(self, name, dtype):
    cfg = dataclasses.replace(VARIANTS[name], dtype=dtype)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def apply(state, tokens):
      return nnx.merge(graphdef, state)(tokens)

    logits = self.variant(apply)(state, random_tokens(0, cfg))
    chex.assert_shape(logits, (2, T, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_tied_embeddings():
  cfg = tiny("full", tie_embeddings=True)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert model.lm_head is None
  assert count_params(model) == closed_form_params(cfg)
  chex.assert_shape(jit_apply(model)(random_tokens(0, cfg)), (2, T, cfg.vocab_size))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causality_by_perturbation(name):
  cfg, apply = VARIANTS[name], variant_apply(name)
  tokens = random_tokens(1, cfg)
  p = 29
  perturbed = tokens.at[:, p].set((tokens[:, p] + 1) % cfg.vocab_size)
  a, b = apply(tokens), apply(perturbed)
  np.testing.assert_allclose(a[:, :p], b[:, :p], atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(a[:, p:] - b[:, p:]))) > 1e-4


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_document_isolation_by_perturbation(name):
  cfg, apply = VARIANTS[name], variant_apply(name)
  split = 21  # doc A = [0, 21), doc B = [21, 48): unaligned
  seg = jnp.asarray([[0] * split + [1] * (T - split)] * 2, jnp.int32)
  pos = jnp.asarray([list(range(split)) + list(range(T - split))] * 2, jnp.int32)
  tokens = random_tokens(2, cfg)
  perturbed = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab_size)
  a, b = apply(tokens, pos, seg), apply(perturbed, pos, seg)
  np.testing.assert_allclose(a[:, split:], b[:, split:], atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(a[:, 5:split] - b[:, 5:split]))) > 1e-4
  if name in ("full", "swa", "full_dv"):
    # Position-restarting RoPE + segment masks: doc B packed == doc B alone.
    alone = apply(tokens[:, split:])
    np.testing.assert_allclose(a[:, split:], alone, atol=2e-5, rtol=2e-5)


# -------------------------------------------------------------------------------- parameters
def closed_form_params(c: ModelConfig) -> int:
  """Parameter count from the config fields alone."""
  d, hq, h, dk, dv = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.dv
  total = c.vocab_size * d + d  # embedding + final norm
  if not c.tie_embeddings:
    total += d * c.vocab_size
  for kind in c.layer_kinds():
    total += 2 * d + 3 * d * c.mlp_dim  # two norms + SwiGLU
    total += d * hq * dk + hq * dv * d  # q and o projections
    if kind in ("full", "swa"):
      total += d * h * (dk + dv)
      continue
    assert kind == "nsa", kind
    nsa = c.nsa
    pairs = 1 + (sum(b in nsa.branches for b in ("slc", "win")) if c.nsa_independent_kv else 0)
    total += pairs * d * h * (dk + dv)
    if len(nsa.branches) > 1:
      total += d * hq * 3  # gates
    if nsa.compression == "mlp":
      f, l = c.nsa_compressor_hidden or dk, nsa.cmp_window
      for dim in (dk, dv):  # phi_k, phi_v
        total += h * (l * dim + l * dim * f + f + f * dim + dim)
  return total


NAMED = {
  "tiny": None,
  "full_340m": (300e6, 420e6),
  "nsa_340m": (300e6, 420e6),
  "full_1p3b": (1.1e9, 1.5e9),
  "nsa_1p3b": (1.1e9, 1.5e9),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_config_param_counts(name):
  cfg = load_model_config(os.path.join(CONFIG_DIR, f"{name}.yaml"))
  n = param_count(cfg)
  print(f"{name}: {n:,} parameters")
  assert n == closed_form_params(cfg)
  if NAMED[name] is not None:
    lo, hi = NAMED[name]
    assert lo <= n <= hi, (name, n)


def test_all_config_files_load():
  paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
  assert {os.path.basename(p)[:-5] for p in paths} >= set(NAMED)
  for p in paths:
    assert isinstance(load_model_config(p), ModelConfig)


def test_count_params_matches_closed_form_on_materialized_models():
  for name in ("nsa", "nsa_shared_kv_mean", "nsa_dv", "mixed"):
    cfg = VARIANTS[name]
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert count_params(model) == param_count(cfg) == closed_form_params(cfg), name


# --------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["nsa", "full"])
def test_adamw_step_lowers_loss(name):
  cfg = VARIANTS[name]
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)
  tokens = random_tokens(4, cfg, batch=4, seq_len=T + 1)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(model):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  loss0 = float(train_step(model, optimizer))
  loss1 = float(nnx.jit(loss_fn)(model))
  assert math.isfinite(loss0) and loss1 < loss0, (loss0, loss1)
  assert loss0 < math.log(cfg.vocab_size) + 1.0, loss0  # near-uniform init


# --------------------------------------------------------------------------------- registry
def test_unknown_attention_kind_lists_registered_kinds():
  with pytest.raises(ValueError, match=r"\[.*'full'.*'nsa'.*'swa'.*'nope'"):
    DecoderLM(tiny("nope"), rngs=nnx.Rngs(0))


def test_register_new_attention_kind():

  class DoubledFull(FullAttention):
    def __call__(self, x, positions, segment_ids=None):
      return 2 * super().__call__(x, positions, segment_ids)

  register_attention_kind("test_doubled_full", DoubledFull)
  try:
    register_attention_kind("test_doubled_full", DoubledFull)  # idempotent
    with pytest.raises(ValueError, match="already registered"):
      register_attention_kind("test_doubled_full", SlidingWindowAttention)
    cfg = tiny("full", attention=("test_doubled_full", "nsa"))
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.layers[0].attn, DoubledFull)
    assert isinstance(model.layers[1].attn, NSAAttention)
    chex.assert_shape(jit_apply(model)(random_tokens(0, cfg)), (2, T, cfg.vocab_size))
  finally:
    ATTENTION_KINDS.pop("test_doubled_full", None)


# ------------------------------------------------------------------------------- scan_layers
@pytest.mark.parametrize(
  "name,remat,unroll",
  [
    ("nsa", "none", 1),
    ("nsa_dv", "full", 1),
    ("full", "dots", 1),
    ("mixed_runs", "none", 1),
    ("full", "none", 2),
  ],
)
def test_scan_layers_equals_unrolled_forward_and_gradients(name, remat, unroll):
  """``model.scan_layers``: the same logits and parameter gradients (float32, packed documents)
  as the layer-by-layer model with the same weights; runs of one kind are scanned, the rest is
  called one by one. ``scan_unroll=2`` over 3 layers: one unrolled pair plus a remainder."""
  from sparse_attention_jax.nn.model import _scan_runs

  base = (
    tiny("full", attention=("full", "full", "nsa", "nsa", "nsa", "swa"), num_layers=6)
    if name == "mixed_runs"
    else dataclasses.replace(VARIANTS[name], num_layers=3)
  )
  cfg = dataclasses.replace(base, remat=remat)
  plain = DecoderLM(cfg, rngs=nnx.Rngs(3))
  scanned = DecoderLM(
    dataclasses.replace(cfg, scan_layers=True, scan_unroll=unroll), rngs=nnx.Rngs(3)
  )
  runs = [(a, b) for a, b, _ in _scan_runs(list(scanned.layers))]
  assert runs == ([(0, 2), (2, 5)] if name == "mixed_runs" else [(0, 3)])
  tokens = random_tokens(4, cfg)
  seg = jnp.asarray([[0] * 20 + [1] * (T - 20)] * 2, jnp.int32)
  pos = jnp.asarray([list(range(20)) + list(range(T - 20))] * 2, jnp.int32)
  ct = jax.random.normal(jax.random.key(5), (2, T, cfg.vocab_size))

  def loss_and_grads(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
      return jax.value_and_grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens, pos, seg) * ct))(
        state
      )

    return f(state)

  (la, ga), (lb, gb) = loss_and_grads(plain), loss_and_grads(scanned)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ga))
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(y, x, atol=1e-5 * scale, rtol=1e-4)
  # The scan really runs: one while loop per run in the lowered program, and the layers' own
  # parameters (not copies) receive the gradients (checked above leaf by leaf).
  hlo = (
    jax.jit(lambda s: nnx.merge(*nnx.split(scanned)[:1], s)(tokens, pos, seg))
    .lower(nnx.state(scanned))
    .as_text()
  )
  assert hlo.count("stablehlo.while") >= len(runs)


def test_scan_layers_traces_one_block_per_run():
  """Eight scanned NSA layers lower to a program a fraction of the unrolled one's size (the
  point of the option: compile time grows with the traced program, not with the depth)."""
  cfg = dataclasses.replace(VARIANTS["nsa"], num_layers=8)
  tokens = random_tokens(0, cfg)

  def text(c):
    graphdef, state = nnx.split(DecoderLM(c, rngs=nnx.Rngs(0)))
    return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens)).lower(state).as_text()

  unrolled, scanned = text(cfg), text(dataclasses.replace(cfg, scan_layers=True))
  assert len(scanned) < 0.3 * len(unrolled), (len(scanned), len(unrolled))


def test_scan_layers_skips_layers_with_non_parameter_state():
  """SSA layers hold mode/alignment variables besides parameters: never scanned."""
  from sparse_attention_jax.nn.model import _scan_runs

  cfg = load_model_config(os.path.join(CONFIG_DIR, "ssa_tiny.yaml"))
  model = DecoderLM(dataclasses.replace(cfg, scan_layers=True, num_layers=3), rngs=nnx.Rngs(0))
  assert _scan_runs(list(model.layers)) == []
  with pytest.raises(ValueError, match="model.scan_layers: expected a bool"):
    dataclasses.replace(cfg, scan_layers="yes")
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="model.scan_unroll: expected a positive int"):
      dataclasses.replace(cfg, scan_unroll=bad)


# ------------------------------------------------------------------------------ token checks
def test_model_token_errors_name_the_argument():
  """Empty batches or sequences, non-integer or non-rank-2 tokens, and (concrete) ids outside
  ``[0, vocab)`` are rejected with one message naming ``tokens``; traced ids are not read."""
  model = DecoderLM(tiny("full"), rngs=nnx.Rngs(0))
  v = model.config.vocab_size
  ok = jnp.ones((2, 8), jnp.int32)
  cases = [
    (jnp.ones((0, 8), jnp.int32), r"^tokens\.shape\[0\]: expected a batch size B >= 1, got 0$"),
    (jnp.ones((2, 0), jnp.int32), r"^tokens\.shape\[1\]: expected a length T >= 1, got 0$"),
    (ok[0], r"^tokens: expected a rank-2 \[B, T\] array of token ids, got shape \(8,\)$"),
    (ok.astype(jnp.float32), r"^tokens: expected an integer dtype \(token ids\), got float32$"),
    (
      ok.at[0, 3].set(v),
      rf"^tokens: expected token ids in \[0, vocab_size={v}\), got ids in \[1, {v}\]$",
    ),
    (
      ok.at[1, 0].set(-1),
      rf"^tokens: expected token ids in \[0, vocab_size={v}\), got ids in \[-1, 1\]$",
    ),
    (np.full((1, 4), v, np.int32), r"^tokens: expected token ids in"),
  ]
  for tokens, msg in cases:
    with pytest.raises(ValueError, match=msg):
      model(tokens)
  assert model(ok).shape == (2, 8, v)
  # Under jit the values are unknown: only shapes and dtypes are checked at trace time.
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  assert fwd(state, ok.at[0, 3].set(v)).shape == (2, 8, v)
  with pytest.raises(ValueError, match=r"^tokens\.shape\[0\]: expected a batch size"):
    fwd(state, jnp.ones((0, 8), jnp.int32))


def test_check_token_ids_under_checkify():
  """``check_token_ids`` reports out-of-range ids of jitted code through checkify and is a no-op
  without it."""
  from jax.experimental import checkify

  from sparse_attention_jax.nn.inputs import check_token_ids

  model = DecoderLM(tiny("full"), rngs=nnx.Rngs(0))
  v = model.config.vocab_size
  graphdef, state = nnx.split(model)

  def logits(s, tokens):
    check_token_ids(tokens, v)
    return nnx.merge(graphdef, s)(tokens)

  checked = jax.jit(checkify.checkify(logits))
  ok = jnp.ones((2, 8), jnp.int32)
  err, out = checked(state, ok)
  err.throw()
  assert out.shape == (2, 8, v)
  for bad, lo, hi in ((ok.at[1, 2].set(v + 5), 1, v + 5), (ok.at[0, 0].set(-3), -3, 1)):
    err, _ = checked(state, bad)
    with pytest.raises(
      checkify.JaxRuntimeError,
      match=rf"tokens: expected token ids in \[0, vocab_size={v}\), got ids in \[{lo}, {hi}\]",
    ):
      err.throw()
  assert jax.jit(logits)(state, ok.at[1, 2].set(v + 5)).shape == (2, 8, v)  # removed unchecked
  with pytest.raises(ValueError, match="^tokens: expected an integer dtype"):
    check_token_ids(ok.astype(jnp.float32), v)
