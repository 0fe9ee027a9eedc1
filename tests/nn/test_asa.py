"""ASA: MLA local / GLA global layers, their two computation forms, the layer pattern,
model-level causality and document isolation, shared selection, KV-cache accounting, parameter
counts of the named configs and a short training run."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_attention_jax.analysis import kv_cache
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import (
  DecoderLM,
  GLAGlobalAttention,
  LatentConfig,
  MLALocalAttention,
  ModelConfig,
  count_params,
  load_model_config,
  param_count,
)
from sparse_attention_jax.nn.attention import latent
from sparse_attention_jax.ops import (
  dense_causal_attention,
  nsa_attention,
  share_selection,
  sliding_window_attention,
)

CONFIG_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
T = 48
LATENT = LatentConfig(kv_rank=16, q_rank=24, rope_dim=4, nope_dim=8, v_dim=6, groups=2)
GLOBAL_NSA = NSAConfig.paper(
  cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, branches=("cmp", "slc")
)
MEAN_NSA = GLOBAL_NSA.replace(compression="mean")


def tiny(attention=("asa_local", "asa_global"), **kw) -> ModelConfig:
  """HQ = 4 query heads, g = 2 GLA latent heads (G = 2), window 12."""
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=tuple(attention),
    window=12,
    nsa=GLOBAL_NSA,
    latent=LATENT,
  )
  return ModelConfig(**{**base, **kw})


def inputs(seed: int = 0, batch: int = 2, seq_len: int = T, d_model: int = 32):
  x = jax.random.normal(jax.random.key(seed), (batch, seq_len, d_model))
  pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  return x, pos


def two_docs(batch: int = 2, split: int = 21):
  seg = jnp.asarray([[0] * split + [1] * (T - split)] * batch, jnp.int32)
  pos = jnp.asarray([list(range(split)) + list(range(T - split))] * batch, jnp.int32)
  return seg, pos


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
  )


# ------------------------------------------------------------------------------------ config
def test_latent_config_validation_and_round_trip():
  with pytest.raises(ValueError, match=r"model\.latent\.groups: expected a divisor of kv_rank"):
    LatentConfig(kv_rank=10, groups=4)
  with pytest.raises(ValueError, match=r"model\.latent\.rope_dim: expected an even"):
    LatentConfig(rope_dim=3)
  with pytest.raises(ValueError, match=r"model\.latent\.q_rank: expected a positive int"):
    LatentConfig(q_rank=0)
  with pytest.raises(ValueError, match=r"model\.latent: unknown keys \['rank'\]"):
    LatentConfig.from_dict({"rank": 3})
  cfg = tiny()
  again = ModelConfig.from_dict(cfg.to_dict())
  assert again == cfg and isinstance(again.latent, LatentConfig)
  assert ModelConfig.from_dict({"attention": ["nsa"]}).latent is None
  with pytest.raises(ValueError, match=r"model\.latent: expected a LatentConfig .*'asa_local'"):
    MLALocalAttention(tiny(latent=None), rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"model\.latent\.groups: expected a divisor of "
    r"num_heads=4",
  ):
    GLAGlobalAttention(tiny(latent=dataclasses.replace(LATENT, groups=8)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.nsa\.branches: expected 'cmp' and/or 'slc'"):
    GLAGlobalAttention(tiny(nsa=GLOBAL_NSA.replace(branches=("win",))), rngs=nnx.Rngs(0))
  for name in ("asa_tiny", "asa_340m", "asa_1p3b"):
    c = load_model_config(os.path.join(CONFIG_DIR, f"{name}.yaml"))
    assert c.layer_kinds()[:2] == ("asa_local", "asa_global") and c.latent is not None


# ---------------------------------------------------------------------------- the two forms
def test_mla_absorbed_equals_training_form():
  layer = MLALocalAttention(tiny(), rngs=nnx.Rngs(0))
  assert layer.groups == 1  # MLA: one latent head
  chex.assert_shape(layer.k_up.kernel[...], (1, 16, 4, 8))  # [g, d_c, HQ, nope_dim]
  x, pos = inputs()
  seg, pos2 = two_docs()

  @jax.jit
  def forms(x, pos, seg):
    return layer(x, pos, seg), layer.absorbed(x, pos, seg), layer.dense(x, pos, seg, window=12)

  for p, s in ((pos, None), (pos2, seg)):
    train, absorbed, dense = forms(x, p, s)
    chex.assert_shape(train, (2, T, 32))
    close(train, absorbed)
    close(train, dense)
  # The padded jax.nn.dot_product_attention path == the library's window op, either dim wider.
  seg_op = jax.jit(functools.partial(latent.window_attention, window=5, softmax_scale=0.3))
  want_op = jax.jit(functools.partial(sliding_window_attention, window=5, softmax_scale=0.3))
  for dk, dv, s in ((12, 6, seg), (6, 12, None)):
    kq, kk, kv = jax.random.split(jax.random.key(dk), 3)
    q = jax.random.normal(kq, (2, T, 4, dk))
    k = jax.random.normal(kk, (2, T, 2, dk))
    v = jax.random.normal(kv, (2, T, 2, dv))
    close(seg_op(q, k, v, segment_ids=s), want_op(q, k, v, segment_ids=s))
  # The absorbed query/key widths: d_c + d_R (MQA over the latent), values d_c.
  q, k, v = layer.absorbed_qkv(layer.project(x, pos))
  chex.assert_shape([q, k, v], [(2, T, 4, 20), (2, T, 1, 20), (2, T, 1, 16)])


@pytest.mark.parametrize("groups", [4, 2])
def test_gla_absorbed_equals_mha_with_same_projections(groups):
  """Dense causal GLA: absorbed (GQA over g latent heads) == expanded (per-head K/V) == an MHA
  built here from the same kernels (g = HQ: one latent head per query head)."""
  cfg = tiny(latent=dataclasses.replace(LATENT, groups=groups))
  layer = GLAGlobalAttention(cfg, rngs=nnx.Rngs(1))
  x, pos = inputs(1)
  seg, pos2 = two_docs()

  @jax.jit
  def forms(x, pos, seg):
    return (layer.dense(x, pos, seg, form="expanded"), layer.dense(x, pos, seg, form="absorbed"))

  for p, s in ((pos, None), (pos2, seg)):
    expanded, absorbed = forms(x, p, s)
    close(expanded, absorbed)
  # MHA by hand: query head h reads latent head h // G through W_uk[h // G, :, h % G].
  lat = layer.project(x, pos)
  w_uk, w_uv = layer.k_up.kernel[...], layer.v_up.kernel[...]  # [g, dl, G, n], [g, dl, G, dv]
  gq = 4 // groups
  ks, vs = [], []
  for h in range(4):
    c = lat.c[:, :, h // gq]  # [B, T, dl]
    ks.append(jnp.concatenate([c @ w_uk[h // gq, :, h % gq], lat.k_rope[:, :, 0]], -1))
    vs.append(c @ w_uv[h // gq, :, h % gq])
  q = jnp.concatenate([lat.q_nope, lat.q_rope], -1)
  o = dense_causal_attention(q, jnp.stack(ks, 2), jnp.stack(vs, 2), softmax_scale=(8 + 4) ** -0.5)
  close(layer.o_proj(o), forms(x, pos, None)[1])


@pytest.mark.parametrize("groups", [2, 4])
def test_global_latent_nsa_equals_op_on_up_projected_keys(groups):
  """Mean pooling commutes with W_uk/W_uv, so NSA in latent space (H = g) == NSA on explicitly
  up-projected per-head keys/values (H = HQ) given the same selection (each latent head's blocks
  repeated for its G query heads); with G = 1 the selection itself agrees too."""
  cfg = tiny(nsa=MEAN_NSA, latent=dataclasses.replace(LATENT, groups=groups))
  layer = GLAGlobalAttention(cfg, rngs=nnx.Rngs(2))
  assert layer.phi_k is None and layer.nsa.branches == ("cmp", "slc")
  x, _ = inputs(2)
  seg, pos = two_docs()
  gq = 4 // groups

  @jax.jit
  def both(x, pos, seg):
    y, aux = layer(x, pos, seg, return_aux=True)
    gates = layer.op_inputs(x, pos)["gates"]
    q, k, v = layer.expanded_qkv(layer.project(x, pos))
    pinned = jnp.repeat(aux.block_indices, gq, axis=2)  # [B, T, HQ, n]
    o, aux_up = nsa_attention(
      q,
      k,
      v,
      gates,
      config=layer.nsa.for_length(T),
      segment_ids=seg,
      block_indices=pinned,
      impl="reference",
      return_aux=True,
    )
    free = None
    if gq == 1:
      free = nsa_attention(
        q,
        k,
        v,
        gates,
        config=layer.nsa.for_length(T),
        segment_ids=seg,
        impl="reference",
        return_aux=True,
      )[1].block_indices
    return y, aux, layer.o_proj(o), aux_up, free

  y, aux, y_up, aux_up, free = both(x, pos, seg)
  close(y, y_up)
  close(aux.cmp_lse, aux_up.cmp_lse, 1e-4)
  if free is not None:
    np.testing.assert_array_equal(free, aux.block_indices)


def test_shared_selection_through_the_layer():
  """r = 1 is per-token selection; r = 4 uses the selection of each aligned run's first token."""
  layer1 = GLAGlobalAttention(tiny(), rngs=nnx.Rngs(3))
  layer4 = GLAGlobalAttention(tiny(nsa=GLOBAL_NSA.replace(selection_share=4)), rngs=nnx.Rngs(3))
  x, pos = inputs(3)

  @jax.jit
  def run(x, pos):
    y1, aux1 = layer1(x, pos, return_aux=True)
    y4, aux4 = layer4(x, pos, return_aux=True)
    a = layer1.op_inputs(x, pos)
    op = functools.partial(
      nsa_attention,
      config=layer1.nsa.for_length(T),
      compress_params=a["compress_params"],
      impl="reference",
    )
    per_token = layer1.o_proj(
      layer1.up_values(op(a["q"], a["k"], a["v"], a["gates"], block_indices=aux1.block_indices))
    )
    shared_idx = share_selection(aux1.block_indices, 4)
    shared = layer1.o_proj(
      layer1.up_values(op(a["q"], a["k"], a["v"], a["gates"], block_indices=shared_idx))
    )
    return y1, y4, per_token, shared, aux1.block_indices, aux4.block_indices, shared_idx

  y1, y4, per_token, shared, idx1, idx4, shared_idx = run(x, pos)
  close(y1, per_token)
  close(y4, shared)
  np.testing.assert_array_equal(idx4, shared_idx)
  assert not np.array_equal(idx1, idx4)  # sharing changed some selections


# --------------------------------------------------------------------------------- the model
def test_layer_pattern_gives_the_intended_kinds():
  cases = {
    ("asa_local", "asa_global"): 4,
    ("asa_local", "asa_local", "asa_global"): 6,
    ("asa_global", "asa_local"): 4,
  }
  for pattern, n in cases.items():
    cfg = tiny(attention=pattern, num_layers=n)
    model = nnx.eval_shape(lambda cfg=cfg: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    want = [pattern[i % len(pattern)] for i in range(n)]
    assert [layer.kind for layer in model.layers] == want
    cls = {"asa_local": MLALocalAttention, "asa_global": GLAGlobalAttention}
    assert all(type(layer.attn) is cls[k] for layer, k in zip(model.layers, want))


@functools.cache
def model_apply():
  model = DecoderLM(tiny(), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

  return model, lambda tokens, positions=None, segment_ids=None: apply(
    state, tokens, positions, segment_ids
  )


def random_tokens(seed: int, batch: int = 2, seq_len: int = T):
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, 64, jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layers_apply_in_dtype(dtype):
  cfg = tiny(dtype=dtype)
  x, pos = inputs(4)
  x = x.astype(dtype)
  for cls in (MLALocalAttention, GLAGlobalAttention):
    layer = cls(cfg, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x, p: m(x, p))(layer, x, pos)
    chex.assert_shape(y, (2, T, 32))
    assert y.dtype == jnp.dtype(dtype)
    chex.assert_tree_all_finite(y)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


def test_model_apply_and_gradients():
  model, apply = model_apply()
  tokens = random_tokens(0)
  logits = apply(tokens)
  chex.assert_shape(logits, (2, T, 64))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)

  def loss_fn(model):
    lg = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(lg, tokens[:, 1:]).mean()

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  flat = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  chex.assert_tree_all_finite([g for _, g in flat])
  zero = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.max(jnp.abs(g))) > 0]
  assert not zero, zero  # every parameter gets a gradient


def test_causality_by_perturbation():
  _, apply = model_apply()
  tokens = random_tokens(1)
  p = 29
  perturbed = tokens.at[:, p].set((tokens[:, p] + 1) % 64)
  a, b = apply(tokens), apply(perturbed)
  np.testing.assert_allclose(a[:, :p], b[:, :p], atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(a[:, p:] - b[:, p:]))) > 1e-4


def test_document_isolation_by_perturbation():
  _, apply = model_apply()
  seg, pos = two_docs()
  tokens = random_tokens(2)
  perturbed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 64)
  a, b = apply(tokens, pos, seg), apply(perturbed, pos, seg)
  np.testing.assert_allclose(a[:, 21:], b[:, 21:], atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(a[:, 5:21] - b[:, 5:21]))) > 1e-4


# ------------------------------------------------------------------------ KV cache, params
def test_kv_cache_formulas_on_a_tiny_config():
  cfg = tiny(attention=("full", "swa", "nsa", "asa_local", "asa_global"), num_layers=5)
  per = kv_cache.kv_cache_bytes_per_token(cfg, dtype_bytes=2)
  h, dk = 2, 8
  want = {
    "full": 2 * h * 2 * dk,
    "swa": 2 * h * 2 * dk,
    "nsa": 2 * (2 * h * 2 * dk + h * 2 * dk / 4),  # cmp+slc pairs + cmp 1/d
    "asa_local": 2 * (16 + 4),  # d_c + d_R
    "asa_global": 2 * (16 + 4 + (2 * (8 + 4) + 16) / 4),
  }  # + compressed latent 1/d
  assert per["by_kind"] == pytest.approx(want)
  assert per["total_bytes_per_token"] == pytest.approx(sum(want.values()))
  assert [r["window"] for r in per["layers"]] == [None, 12, None, 12, None]
  tot = kv_cache.kv_cache_bytes(cfg, 100)
  assert tot["resident"] == pytest.approx(100 * sum(want.values()))
  assert tot["windowed"] == pytest.approx(tot["resident"] - 88 * (want["swa"] + want["asa_local"]))
  with pytest.raises(ValueError, match="kind: expected one of"):
    kv_cache.layer_kv_elements(cfg, "nope")


def test_kv_cache_asa_at_most_half_of_nsa_and_cli(capsys):
  for size in ("340m", "1p3b"):
    paths = [os.path.join(CONFIG_DIR, f"{k}_{size}.yaml") for k in ("asa", "nsa", "full")]
    asa, nsa, full = (
      kv_cache.kv_cache_bytes_per_token(load_model_config(p))["total_bytes_per_token"]
      for p in paths
    )
    print(f"{size}: KV bytes/token asa {asa:,.0f}, nsa {nsa:,.0f}, full {full:,.0f}")
    assert asa <= 0.5 * nsa, (size, asa, nsa)
  assert kv_cache.main([paths[0], paths[1], "--context", "4096"]) == 0
  out = capsys.readouterr().out
  assert "asa_global" in out and "asa_local" in out and "nsa" in out and "at context 4,096" in out


def closed_form_asa_attention_params(c: ModelConfig, kind: str) -> int:
  lat, d, hq = c.latent, c.d_model, c.num_heads
  g = 1 if kind == "asa_local" else lat.groups
  n = d * lat.q_rank + lat.q_rank + lat.q_rank * hq * (lat.nope_dim + lat.rope_dim)  # query
  n += d * lat.kv_rank + lat.kv_rank + d * lat.rope_dim  # latent
  n += lat.kv_rank * (hq // g) * (lat.nope_dim + lat.v_dim) + hq * lat.v_dim * d  # ups, o
  if kind == "asa_global":
    n += d * hq * len(c.nsa.branches) if len(c.nsa.branches) > 1 else 0
    if c.nsa.compression == "mlp":
      f, l = c.nsa_compressor_hidden or c.head_dim, c.nsa.cmp_window
      for dim in (lat.group_rank + lat.rope_dim, lat.group_rank):
        n += g * (l * dim + l * dim * f + f + f * dim + dim)
  return n


def test_param_counts_closed_form_and_matched_to_nsa():
  cfg = tiny()
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  for block in model.layers:
    assert count_params(block.attn) == closed_form_asa_attention_params(cfg, block.kind)
  assert count_params(model) == param_count(cfg)
  for size in ("340m", "1p3b"):
    asa, nsa = (
      param_count(load_model_config(os.path.join(CONFIG_DIR, f"{k}_{size}.yaml")))
      for k in ("asa", "nsa")
    )
    print(f"{size}: asa {asa:,} vs nsa {nsa:,} parameters ({asa / nsa - 1:+.2%})")
    assert abs(asa / nsa - 1) < 0.05, (size, asa, nsa)


# --------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["asa", "nsa", "full"])
def test_short_training_lowers_the_loss(kind):
  """20 AdamW steps on one fixed batch of a repeating sequence: the loss must drop clearly."""
  attention = {"asa": ("asa_local", "asa_global"), "nsa": ("nsa",), "full": ("full",)}[kind]
  nsa = (
    GLOBAL_NSA if kind == "asa" else GLOBAL_NSA.replace(branches=("cmp", "slc", "win"), window=12)
  )
  cfg = tiny(attention=attention, nsa=nsa)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.1), wrt=nnx.Param)
  period = jax.random.randint(jax.random.key(5), (4, 12), 0, 64, jnp.int32)
  tokens = jnp.tile(period, (1, 5))[:, : T + 1]  # [4, T + 1], period 12

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(20)]
  final = float(nnx.jit(loss_fn)(model))
  print(f"{kind}: loss {losses[0]:.3f} -> {final:.3f}")
  assert all(math.isfinite(v) for v in losses)
  assert final < 0.7 * losses[0], (kind, losses[0], final)
