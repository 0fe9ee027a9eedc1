"""Causal and sliding-window attention (op ``"causal_attention"``): every implementation and dtype
against the float32 reference, forward and gradients (shared base: ``semantics_base``).

Also the module path (``ops.causal.causal_attention``) and the public ops route through the
same table, and, on a Hopper GPU, the bf16 checks at the 340M head layout and the compiled memory
at 8k.
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

from sparse_attention_jax.ops import causal as dense_attention
from sparse_attention_jax.ops import (
  causal_attention,
  dense_causal_attention,
  dispatch,
  sliding_window_attention,
)
from sparse_attention_jax.ops.masked import causal_mask, masked_attention

B, T, HQ, H, D = 2, 128, 4, 2, 32


def _segments(kind: str, b: int, t: int):
  """None, one document, or packed rows (3 cuts; ``padded``: trailing 0 ids, the data pipeline's
  layout)."""
  if kind == "none":
    return None
  ids = np.ones((b, t), np.int32)
  if kind in ("packed", "padded"):
    for c in (t // 5, t // 2 + 3, t - t // 10):
      ids[:, c:] += 1
  if kind == "padded":
    ids[:, t - t // 16 :] = 0
  return jnp.asarray(ids)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("impl", impl_params("causal_attention"))
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("seg_kind", ["none", "packed"])
def test_causal_attention_matches_the_reference(request, impl, dtype, window, seg_kind):
  key = fresh_key(request)
  kq, kk, kv, kc = jax.random.split(key, 4)
  q = jax.random.normal(kq, (B, T, HQ, D))
  k = jax.random.normal(kk, (B, T, H, D))
  v = jax.random.normal(kv, (B, T, H, D))
  seg = _segments(seg_kind, B, T)
  run = functools.partial(causal_attention, window=window, segment_ids=seg, chunk=32)
  fn = functools.partial(run, impl=impl)
  if declined(impl, dtype):
    with pytest.raises(NotImplementedError):
      fn(q, k, v)
    return
  check_against_reference(fn, functools.partial(run, impl="reference"), (q, k, v), dtype, ct_key=kc)


def test_public_ops_and_module_path_share_the_routing(monkeypatch):
  """``dense_causal_attention``, ``sliding_window_attention`` and the modules' path all reach the
  ``causal_attention`` table: under ``"auto"`` on a GPU they try cuDNN first (here a marker)."""
  calls = []

  def marker(q, k, v, *, window, segment_ids, softmax_scale, chunk):
    calls.append(window)
    return jnp.zeros(q.shape[:3] + (v.shape[3],), q.dtype)

  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setitem(
    dispatch._TABLE["causal_attention"],
    "cudnn",
    dispatch.Implementation("cudnn", marker, platforms=("gpu",)),
  )
  q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
  dense_causal_attention(q, q, q)
  sliding_window_attention(q, q, q, window=3)
  dense_attention.causal_attention(q, q, q)
  dense_attention.causal_attention(q, q, q, window=5)
  assert calls == [None, 3, None, 5]
  monkeypatch.setattr(dispatch, "platform", lambda: "cpu")  # not made for this platform
  dense_causal_attention(q, q, q)
  assert calls == [None, 3, None, 5]


def test_named_implementation_fails_loudly():
  q = jnp.ones((1, 8, 2, 4), jnp.float32)
  with pytest.raises(NotImplementedError, match="does not implement causal_attention"):
    dense_causal_attention(q, q, q, impl="gathered")
  with pytest.raises(ValueError, match="impl"):
    sliding_window_attention(q, q, q, window=2, impl="no_such_impl")
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="cuDNN"):
      qb = q.astype(jnp.bfloat16)
      dense_causal_attention(qb, qb, qb, impl="cudnn")


# ------------------------------------------------------------------- Hopper GPU: 340M head layout
GPU_HQ, GPU_H, GPU_D = 32, 2, 64


def _gpu_inputs(key, b, t):
  kq, kk, kv, kc = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, GPU_HQ, GPU_D)).astype(jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, GPU_H, GPU_D)).astype(jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, GPU_H, GPU_D)).astype(jnp.bfloat16)
  return q, k, v, jax.random.normal(kc, (b, t, GPU_HQ, GPU_D))


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["auto", "blocked", "nsa_window"])
@pytest.mark.parametrize("window", [None, 512])
@pytest.mark.parametrize("seg_kind", ["none", "ones", "packed", "padded"])
def test_gpu_bf16_paths_match_the_float32_reference(request, entry, window, seg_kind):
  """bf16, B 2, T 1024: the module path (``auto``: cuDNN with a document mask for packed rows;
  ``blocked``) and NSA's window branch (``ops.sliding_window_attention``) against the float32
  masked reference: max |dO| < 0.05 and gradient error < 0.05 of the largest gradient."""
  if entry == "nsa_window" and window is None:
    pytest.skip("NSA's window branch always has a window")
  t = 1024
  q, k, v, ct = _gpu_inputs(fresh_key(request), 2, t)
  seg = _segments(seg_kind, 2, t)
  if entry == "nsa_window":
    fn = functools.partial(sliding_window_attention, segment_ids=seg, window=window, impl="auto")
  else:
    fn = functools.partial(
      dense_attention.causal_attention, segment_ids=seg, window=window, impl=entry
    )

  def ref(q, k, v):
    return masked_attention(q, k, v, causal_mask(t, seg, window), GPU_D**-0.5)[0]

  def value_and_grads(f, q, k, v):
    def loss(q, k, v):
      o = f(q, k, v)
      return jnp.sum(o.astype(jnp.float32) * ct), o

    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

  g, o = value_and_grads(fn, q, k, v)
  g_ref, o_ref = value_and_grads(ref, *(x.astype(jnp.float32) for x in (q, k, v)))
  assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - o_ref))) < 0.05
  for a, b in zip(g, g_ref):
    assert bool(jnp.all(jnp.isfinite(a)))
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b))) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "blocked"])
@pytest.mark.parametrize("seg_kind", ["none", "packed"])
def test_gpu_memory_at_8k_stays_lean(impl, seg_kind):
  """One jitted fwd+bwd at T = 8192, B = 1, bf16: XLA temporaries stay under 1 GiB (float32
  ``[B, HQ, T, T]`` logits alone would be 8 GiB; cuDNN's document-mask bias is 0.125 GiB)."""
  t = 8192
  q, k, v, ct = _gpu_inputs(jax.random.key(0), 1, t)
  seg = _segments(seg_kind, 1, t)

  def loss(q, k, v, ct, seg):  # everything an argument: no captured constants
    o = dense_attention.causal_attention(q, k, v, segment_ids=seg, impl=impl)
    return jnp.sum(o.astype(jnp.float32) * ct)

  compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, k, v, ct, seg).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30
