"""Selected-block attention (op ``"selected_attention"``), NOSA's biased form over it, and the
whole NSA op: every implementation and dtype against the float32 reference, forward and gradients
(shared base: ``semantics_base``).

Shapes the Mosaic GPU kernels serve (block size 32, head dim 64, G = 2), so that the
``pallas_gpu`` cases run as they are on a Hopper GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from semantics_base import (
  check_against_reference,
  declined,
  dtype_params,
  fresh_key,
  impl_params,
)

from sparse_attention_jax import NSAConfig, nsa_attention, selected_attention
from sparse_attention_jax.ops.nosa import biased_selected_attention

B, T, HQ, H, D, BS, N = 1, 192, 4, 2, 64, 32, 3


def _selection(key, b, t, h, n, bs):
  """``[B, T, H, n]`` int32: ``n`` distinct blocks ``<= t // bs`` per query and KV head, the
  query's own block included, ``-1`` padding where fewer exist."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  out = np.full((b, t, h, n), -1, np.int32)
  for bi in range(b):
    for ti in range(t):
      own = ti // bs
      for hi in range(h):
        rest = rng.permutation(own)[: n - 1]
        out[bi, ti, hi, : len(rest) + 1] = np.sort(np.append(rest, own))
  return jnp.asarray(out)


def _inputs(key):
  kq, kk, kv, ki, kc = jax.random.split(key, 5)
  q = jax.random.normal(kq, (B, T, HQ, D))
  k = jax.random.normal(kk, (B, T, H, D))
  v = jax.random.normal(kv, (B, T, H, D))
  seg = jnp.asarray(np.repeat(np.array([0, 1, 2], np.int32), [50, 80, 62])[None])
  return q, k, v, _selection(ki, B, T, H, N, BS), seg, kc


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("impl", impl_params("selected_attention"))
@pytest.mark.parametrize("use_seg", [False, True])
def test_selected_attention_matches_the_reference(request, impl, dtype, use_seg):
  q, k, v, idx, seg, kc = _inputs(fresh_key(request))
  seg = seg if use_seg else None

  def run(impl, q, k, v):
    return selected_attention(q, k, v, idx, block_size=BS, segment_ids=seg, impl=impl)

  if declined(impl, dtype):
    with pytest.raises(NotImplementedError):
      run(impl, q, k, v)
    return
  check_against_reference(
    functools.partial(run, impl), functools.partial(run, "reference"), (q, k, v), dtype, ct_key=kc
  )


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("impl", impl_params("selected_attention"))
def test_biased_selected_attention_matches_the_reference(request, impl, dtype):
  """NOSA's biased attention: ``"reference"`` is the dense biased form; any other name runs
  ``selected_attention`` with that name on keys carrying the bias. Gradients reach the bias."""
  q, k, v, idx, seg, kc = _inputs(fresh_key(request))
  c = jax.nn.softplus(jax.random.normal(jax.random.fold_in(kc, 1), (B, T, H)))

  def run(impl, q, k, v, c):
    return biased_selected_attention(q, k, v, c, idx, block_size=BS, segment_ids=seg, impl=impl)

  if declined(impl, dtype):
    with pytest.raises(NotImplementedError):
      run(impl, q, k, v, c)
    return
  check_against_reference(
    functools.partial(run, impl),
    functools.partial(run, "reference"),
    (q, k, v, c),
    dtype,
    ct_key=kc,
    num_diff=4,
  )


NSA_CFG = NSAConfig(
  cmp_window=32,
  cmp_stride=16,
  block_size=BS,
  num_selected=N,
  num_init_blocks=1,
  num_local_blocks=1,
  compression="mean",
  window=40,
)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize(
  "impl", ["auto", "reference", pytest.param("pallas_gpu", marks=pytest.mark.gpu)]
)
def test_nsa_attention_matches_the_reference(request, impl, dtype):
  """The whole op (composite: ``impl`` goes on to the branch ops), gated, packed rows; the
  selection is fixed (the float32 reference's) so that bf16 rounding cannot pick other blocks."""
  q, k, v, _, seg, kc = _inputs(fresh_key(request))
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(kc, 2), (B, T, HQ, 3)))
  _, aux = nsa_attention(
    q, k, v, gates, config=NSA_CFG, segment_ids=seg, impl="reference", return_aux=True
  )

  def run(impl, q, k, v):
    return nsa_attention(
      q,
      k,
      v,
      gates.astype(q.dtype),
      config=NSA_CFG,
      segment_ids=seg,
      block_indices=aux.block_indices,
      impl=impl,
    )

  if declined(impl, dtype):
    with pytest.raises(NotImplementedError):
      run(impl, q, k, v)
    return
  check_against_reference(
    functools.partial(run, impl), functools.partial(run, "reference"), (q, k, v), dtype, ct_key=kc
  )
