"""Reverse-mode gradients against finite differences (``jax.test_util.check_grads``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import rand_qkv, segments
from jax.test_util import check_grads

from sparse_attention_jax import (
  CompressorParams,
  NSAConfig,
  compress,
  compressed_attention,
  dense_causal_attention,
  init_mlp_compressor,
  nsa_attention,
  selected_attention,
  sliding_window_attention,
)

B, T, HQ, H, DK, DV = 1, 32, 4, 2, 8, 4
GRAD = dict(order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)

PAPER = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=8)
FLA = NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8)


def qkv(seed, dtype=jnp.float32):
  return rand_qkv(jax.random.key(seed), B, T, HQ, H, DK, DV, dtype)


def mlp_params(seed, dtype=jnp.float32):
  kk, kv = jax.random.split(jax.random.key(seed))
  p = CompressorParams(
    k=init_mlp_compressor(kk, num_kv_heads=H, window=8, in_dim=DK, hidden=8, dtype=dtype),
    v=init_mlp_compressor(kv, num_kv_heads=H, window=8, in_dim=DV, hidden=8, dtype=dtype),
  )
  # non-zero biases so their gradient is exercised away from 0
  return jax.tree.map(
    lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape, x.dtype), p
  )


def fixed_indices(seed):
  return jax.random.randint(jax.random.key(seed), (B, T, H, 3), -1, T // 8, jnp.int32)


def test_grad_dense():
  check_grads(jax.jit(dense_causal_attention), qkv(1), **GRAD)


def test_grad_dense_with_segments():
  seg = segments(B, T, [11])
  check_grads(jax.jit(functools.partial(dense_causal_attention, segment_ids=seg)), qkv(2), **GRAD)


def test_grad_window():
  check_grads(jax.jit(functools.partial(sliding_window_attention, window=5)), qkv(3), **GRAD)


def test_grad_selected_fixed_indices():
  bi = fixed_indices(4)
  check_grads(lambda q, k, v: selected_attention(q, k, v, bi, block_size=8), qkv(5), **GRAD)


def test_grad_compressed_mean():
  cfg = PAPER.replace(compression="mean")

  def f(q, k, v):
    return compressed_attention(q, compress(k, cfg), compress(v, cfg), cfg).out

  check_grads(f, qkv(6), **GRAD)


def test_grad_compressed_mlp_inputs_and_params():
  params = mlp_params(7)

  def f(q, k, v, params):
    return compressed_attention(
      q, compress(k, PAPER, params.k), compress(v, PAPER, params.v), PAPER
    ).out

  check_grads(f, (*qkv(8), params), **GRAD)


def test_grad_nsa_paper_fixed_selection():
  q, k, v = qkv(9)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(10), (B, T, HQ, 3)))
  params = mlp_params(11)
  seg = segments(B, T, [13])
  bi = nsa_attention(
    q, k, v, gates, config=PAPER, compress_params=params, segment_ids=seg, return_aux=True
  )[1].block_indices

  def f(q, k, v, gates, params):
    return nsa_attention(
      q, k, v, gates, config=PAPER, compress_params=params, segment_ids=seg, block_indices=bi
    )

  check_grads(f, (q, k, v, gates, params), **GRAD)


def test_grad_nsa_internal_selection():
  """Top-n is piecewise constant (no gradient through it): finite differences agree away from
  ties, which random inputs avoid at this eps."""
  q, k, v = qkv(12)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(13), (B, T, HQ, 3)))
  f = functools.partial(nsa_attention, config=FLA)
  check_grads(f, (q, k, v, gates), **GRAD)


def test_grad_nsa_per_branch_kv():
  q, k, v = qkv(14)
  _, k2, v2 = qkv(15)
  _, k3, v3 = qkv(16)
  bi = fixed_indices(17)

  def f(q, k, v, k2, v2, k3, v3):
    return nsa_attention(
      q, k, v, config=FLA, k_slc=k2, v_slc=v2, k_win=k3, v_win=v3, block_indices=bi
    )

  check_grads(f, (q, k, v, k2, v2, k3, v3), **GRAD)


@pytest.mark.parametrize("cfg", [PAPER, FLA], ids=["paper", "fla"])
def test_grads_finite_with_bf16_inputs(cfg):
  q, k, v = qkv(18, jnp.bfloat16)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(19), (B, T, HQ, 3))).astype(jnp.bfloat16)
  params = mlp_params(20, jnp.bfloat16) if cfg.compression == "mlp" else None

  def loss(q, k, v, gates, params):
    o = nsa_attention(q, k, v, gates, config=cfg, compress_params=params)
    return jnp.sum(o.astype(jnp.float32) ** 2)

  primals = (q, k, v, gates, params)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*primals)
  for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(primals)):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
  assert float(jnp.abs(grads[0].astype(jnp.float32)).sum()) > 0
