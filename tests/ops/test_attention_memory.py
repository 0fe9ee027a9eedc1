"""No ``[T, T]``-sized intermediate on the training path of the attention layers at T = 2048.

The jaxpr of a ``value_and_grad`` of one layer (340M-like head layout: 32 query heads, 2 KV heads,
head dim 64; NSA with the paper preset l=32, d=16, l'=64, n=16, w=512) is scanned for any array
with two axes of length ``>= T``; for NSA the compiled temp memory must also stay below one
float32 ``[B, T, HQ, T]`` array (what a dense window branch needs several times over). The
plain-JAX selected-attention reference, which the GPU kernel replaces, is swapped for a cheap
stand-in of the right shape so that the test is about the other branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparse_attention_jax.nn import ModelConfig, get_attention_kind, load_model_config
from sparse_attention_jax.ops import nsa as nsa_op

T, B = 2048, 1
LAYOUT = {"d_model": 256, "num_heads": 32, "num_kv_heads": 2, "head_dim": 64}


def _selected_stand_in(q, k, v, block_indices, **_):
  """``[B, T, HQ, Dv]`` from ``v`` (differentiable, ``O(T)``), instead of the ``[B, T, H, T]``
  masked reference."""
  g = q.shape[2] // k.shape[2]
  weight = 1.0 + 0.0 * block_indices[..., :1].astype(v.dtype)  # [B, T, H, 1]
  return jnp.repeat(v * weight, g, axis=2).astype(q.dtype)


def _shapes(jaxpr, out):
  """Every intermediate's shape, recursing into sub-jaxprs (scan/while/cond/custom_vjp/pjit)."""
  for eqn in jaxpr.eqns:
    out.extend((eqn.primitive.name, tuple(getattr(v.aval, "shape", ()))) for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
          _shapes(sub.jaxpr, out)
        elif hasattr(sub, "eqns"):
          _shapes(sub, out)
  return out


def _layer_loss(kind: str, config: ModelConfig):
  layer = get_attention_kind(kind)(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x, positions, segment_ids):
    return jnp.sum(nnx.merge(graphdef, state)(x, positions, segment_ids).astype(jnp.float32) ** 2)

  args = (
    state,
    jax.ShapeDtypeStruct((B, T, config.d_model), jnp.float32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
  )
  return jax.value_and_grad(loss), args


def _t_by_t(fn, args):
  shapes = _shapes(jax.make_jaxpr(fn)(*args).jaxpr, [])
  assert len(shapes) > 50  # the scan saw the whole program
  return sorted({s for s in shapes if sum(d >= T for d in s[1]) >= 2})


def _config(kind: str, **kw) -> ModelConfig:
  if kind == "asa_local":
    base = load_model_config("configs/asa_tiny.yaml").to_dict()
    return ModelConfig.from_dict({**base, "attention": ["asa_local"], "window": 512, **kw})
  return ModelConfig(**LAYOUT, attention=(kind,), window=512, **kw)


@pytest.mark.parametrize("kind", ["full", "swa", "asa_local", "nsa"])
def test_layer_training_path_has_no_t_by_t_array(kind, monkeypatch):
  monkeypatch.setattr(nsa_op, "selected_attention", _selected_stand_in)
  fn, args = _layer_loss(kind, _config(kind))
  assert _t_by_t(fn, args) == []
  ref_fn, ref_args = _layer_loss(kind, _config(kind, attn_impl="reference"))
  assert _t_by_t(ref_fn, ref_args), "the dense reference path should show [T, T] arrays"


def test_nsa_layer_compiled_temp_memory_below_one_dense_logits_array(monkeypatch):
  monkeypatch.setattr(nsa_op, "selected_attention", _selected_stand_in)
  config = _config("nsa")
  assert config.nsa.cmp_window == 32 and config.nsa.cmp_stride == 16
  assert config.nsa.block_size == 64 and config.nsa.window == 512
  fn, args = _layer_loss("nsa", config)
  temp = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  dense_logits = B * T * config.num_heads * T * 4
  assert temp < dense_logits, f"{temp / 2**20:.0f} MiB"


def test_nsa_layer_saves_no_compressed_probabilities_for_the_backward_pass(monkeypatch):
  """Residuals kept from forward to backward: no per-head ``[B, T, HQ|H, NC]`` array (the
  compressed branch recomputes its probabilities; only its ``[B, T, 1, NC]`` bool mask is kept)."""
  saved_residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals
  monkeypatch.setattr(nsa_op, "selected_attention", _selected_stand_in)
  config = _config("nsa")
  nc = config.nsa.num_cmp_tokens(T)
  layer = get_attention_kind("nsa")(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x, positions, segment_ids):
    return jnp.sum(nnx.merge(graphdef, state)(x, positions, segment_ids) ** 2)

  pos = jnp.zeros((B, T), jnp.int32)
  res = saved_residuals(loss, state, jnp.ones((B, T, config.d_model)), pos, pos)
  cmp_sized = [(aval, why) for aval, why in res if T in aval.shape and nc in aval.shape]
  assert cmp_sized, "expected the visibility mask among the residuals"
  per_head = [(aval.str_short(), why) for aval, why in cmp_sized if aval.size > B * T * nc]
  assert per_head == []
