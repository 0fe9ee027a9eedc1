"""The blocked (flash-style) causal / sliding-window op against the dense masked reference.

float32, fresh random inputs, forward and ``jax.grad`` (random cotangent); chunk geometries with
``T`` not a multiple of ``C``, ``w > T``, ``w = 1``, documents crossing chunk boundaries, GQA and
``Dk != Dv``; causality and document isolation by perturbation; compiled temp memory at T = 4096.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv

from sparse_attention_jax.ops import causal as dense_attention
from sparse_attention_jax.ops import (
  cudnn,
  dense_causal_attention,
  dispatch,
  sliding_window_attention,
)
from sparse_attention_jax.ops.blocked import blocked_attention, default_chunk
from sparse_attention_jax.ops.masked import causal_mask, masked_attention

TOL = {"atol": 2e-5, "rtol": 2e-5}


def _segments(b, t, cuts_per_row):
  """``[B, T]`` ids; row ``r`` starts new documents at ``cuts_per_row[r]``; an id that comes back
  later (row 1: ``0 .. 1 .. 0``) starts a new document too."""
  ids = np.zeros((b, t), np.int32)
  for r, cuts in enumerate(cuts_per_row):
    for n, c in enumerate(cuts):
      ids[r, c:] = (n + 1) % 2 if r == 1 else n + 1
  return jnp.asarray(ids)


def _reference(q, k, v, window, segment_ids, scale):
  return masked_attention(q, k, v, causal_mask(q.shape[1], segment_ids, window), scale)


CASES = [  # (T, window, chunk, HQ, H, Dk, Dv, cuts of row 0, cuts of row 1)
  (37, 5, 8, 4, 2, 8, 4, [3, 17], [9, 30]),  # T % C != 0, docs cross chunks
  (64, None, 16, 4, 1, 8, 8, [20, 40], [16]),  # full causal, MQA, cut on a boundary
  (20, 100, 8, 2, 2, 4, 6, [], [5]),  # w > T
  (33, 1, 4, 4, 2, 8, 8, [7], []),  # w = 1: only the query itself
  (40, None, 64, 2, 1, 4, 4, [], []),  # C > T: one chunk
  (50, 12, 4, 6, 2, 8, 8, [11, 12, 13, 40], [25]),  # window spans 3 chunks, 1-token docs
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-w{c[1]}-C{c[2]}")
def test_blocked_equals_reference_fwd_and_grad(case):
  t, w, c, hq, h, dk, dv, cuts0, cuts1 = case
  q, k, v = rand_qkv(jax.random.key(t + (w or 0)), 2, t, hq, h, dk, dv)
  seg = _segments(2, t, [cuts0, cuts1])
  scale = 0.4
  ct = jax.random.normal(jax.random.key(99), (2, t, hq, dv))
  blocked = functools.partial(
    blocked_attention, window=w, segment_ids=seg, softmax_scale=scale, chunk=c
  )
  ref = functools.partial(_reference, window=w, segment_ids=seg, scale=scale)

  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, q, k, v):
    def loss(q, k, v):
      o, lse = fn(q, k, v)
      return jnp.sum(o * ct), (o, lse)

    return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

  grads, (o, lse) = run(blocked, q, k, v)
  want, (o_ref, lse_ref) = run(ref, q, k, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), **TOL)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), **TOL)
  for name, g, gw in zip("qkv", grads, want):
    assert np.all(np.isfinite(np.asarray(g))), name
    np.testing.assert_allclose(np.asarray(g), np.asarray(gw), err_msg=name, **TOL)


def test_public_ops_route_to_blocked_and_match_reference():
  q, k, v = rand_qkv(jax.random.key(3), 1, 70, 4, 2, 8, 6)
  seg = _segments(1, 70, [[33]])
  for fn in (functools.partial(sliding_window_attention, window=9), dense_causal_attention):
    for s in (None, seg):
      got = jax.jit(lambda q, k, v, s=s, fn=fn: fn(q, k, v, segment_ids=s, chunk=16))(q, k, v)
      want = fn(q, k, v, segment_ids=s, impl="reference")
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize("window", [None, 6])
def test_causality_and_document_isolation_by_perturbation(window):
  t, cut = 40, 19
  q, k, v = rand_qkv(jax.random.key(5), 1, t, 4, 2, 8, 8)
  seg = _segments(1, t, [[cut]])
  fn = jax.jit(
    functools.partial(
      blocked_attention, window=window, segment_ids=seg, softmax_scale=0.35, chunk=8
    )
  )
  o = fn(q, k, v)[0]
  noise = jax.random.normal(jax.random.key(6), k.shape)
  # Changing keys/values at positions >= 25 changes nothing before 25 (causality).
  future = jnp.arange(t)[None, :, None, None] >= 25
  o2 = fn(q, jnp.where(future, noise, k), jnp.where(future, noise, v))[0]
  np.testing.assert_array_equal(np.asarray(o2[:, :25]), np.asarray(o[:, :25]))
  assert float(jnp.max(jnp.abs(o2[:, 25:] - o[:, 25:]))) > 1e-3
  # Changing the first document changes nothing in the second (isolation).
  first = jnp.arange(t)[None, :, None, None] < cut
  o3 = fn(q, jnp.where(first, noise, k), jnp.where(first, noise, v))[0]
  np.testing.assert_array_equal(np.asarray(o3[:, cut:]), np.asarray(o[:, cut:]))


def test_bfloat16_inputs_are_finite_and_close():
  q, k, v = rand_qkv(jax.random.key(7), 1, 48, 4, 2, 16, 16, jnp.bfloat16)
  seg = _segments(1, 48, [[20]])

  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, q, k, v):
    def loss(q, k, v):
      o = fn(q, k, v)
      return jnp.sum(o.astype(jnp.float32) ** 2), o

    return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

  got = functools.partial(sliding_window_attention, window=10, segment_ids=seg, chunk=8)
  want = functools.partial(sliding_window_attention, window=10, segment_ids=seg, impl="reference")
  grads, o = run(got, q, k, v)
  grads_ref, o_ref = run(want, q, k, v)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=5e-2, rtol=5e-2
  )
  for g, gw in zip(grads, grads_ref):
    g, gw = np.asarray(g, np.float32), np.asarray(gw, np.float32)
    assert np.all(np.isfinite(g))
    assert np.abs(g - gw).max() <= 0.05 * np.abs(gw).max()


@pytest.mark.parametrize("window", [None, 512])
def test_no_t_by_t_intermediate_at_t4096(window):
  """Compiled temp memory of a jitted value_and_grad stays below one float32 ``[T, T]`` array,
  which the dense reference needs many times over."""
  t = 4096
  q = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def temp_bytes(impl):
    def loss(q, k, v, s):
      if window is None:
        o = dense_causal_attention(q, k, v, segment_ids=s, impl=impl)
      else:
        o = sliding_window_attention(q, k, v, window=window, segment_ids=s, impl=impl)
      return jnp.sum(o**2)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    return fn.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

  t_by_t = t * t * 4
  assert temp_bytes("auto") < t_by_t / 2
  assert temp_bytes("reference") > t_by_t  # the bound can fail


def test_default_chunk():
  assert default_chunk(None) == 512
  assert default_chunk(512) == 256 and default_chunk(1) == 32 and default_chunk(4096) == 512
  with pytest.raises(ValueError, match="chunk"):
    blocked_attention(*rand_qkv(jax.random.key(0), 1, 8, 2, 1, 4), softmax_scale=1.0, chunk=0)


# ----------------------------------------------------------- module path (cuDNN / blocked / cond)
@pytest.mark.parametrize("mask_max", [cudnn.MASK_MAX_ELEMENTS, 0])
def test_causal_attention_cudnn_routes_equal_reference(monkeypatch, mask_max):
  """With XLA standing in for cuDNN's fused attention (same call, ``implementation="xla"``), the
  module path equals the reference, forward and gradients, for every route: no segment ids (no
  mask), packed rows under the size limit (same-document mask), and over it (``mask_max=0``:
  one-document rows without a mask through the runtime cond, packed rows the blocked op)."""
  calls = []

  def stand_in(q, k, v, mask, *, scale, local_window_size):
    calls.append(mask is not None)
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      scale=scale,
      is_causal=True,
      local_window_size=local_window_size,
      implementation="xla",
    )

  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")  # "auto" tries the cuDNN entry
  monkeypatch.setattr(cudnn, "usable", lambda *a: True)
  monkeypatch.setattr(cudnn, "_sdpa", stand_in)
  monkeypatch.setattr(cudnn, "MASK_MAX_ELEMENTS", mask_max)
  q, k, v = rand_qkv(jax.random.key(11), 2, 36, 4, 2, 8, 8)
  ct = jax.random.normal(jax.random.key(12), q.shape[:3] + (8,))
  padded = np.array(_segments(2, 36, [[10, 30], [5, 20]]))
  padded[0, 30:] = 0  # the data pipeline's trailing 0 padding
  for window in (None, 7):
    for seg in (
      None,
      jnp.full((2, 36), 3, jnp.int32),
      _segments(2, 36, [[10], []]),
      jnp.asarray(padded),
    ):

      def loss(q, k, v, impl, seg=seg, window=window):
        o = dense_attention.causal_attention(q, k, v, segment_ids=seg, window=window, impl=impl)
        return jnp.sum(o * ct), o

      calls.clear()
      (_, got), g_got = jax.jit(
        jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3
      )(q, k, v, "auto")
      (_, want), g_want = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "reference")
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
      for x, y in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
      masked_route = seg is not None and mask_max > 0
      assert calls and all(c == masked_route for c in calls), (window, seg, calls)


def test_nsa_window_branch_takes_the_cudnn_route(monkeypatch):
  """NSA's window branch goes through the shared cuDNN route (XLA standing in for cuDNN): the
  whole op, forward and gradients, equals the reference on packed rows, and the stand-in was
  called with the branch's window and a document mask."""
  from sparse_attention_jax.config import NSAConfig
  from sparse_attention_jax.ops import nsa_attention

  calls = []

  def stand_in(q, k, v, mask, *, scale, local_window_size):
    calls.append((local_window_size, mask is not None))
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      scale=scale,
      is_causal=True,
      local_window_size=local_window_size,
      implementation="xla",
    )

  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")  # "auto" tries the cuDNN entry
  monkeypatch.setattr(cudnn, "usable", lambda *a: True)
  monkeypatch.setattr(cudnn, "_sdpa", stand_in)
  cfg = NSAConfig(
    cmp_window=16,
    cmp_stride=8,
    block_size=8,
    num_selected=3,
    num_init_blocks=1,
    num_local_blocks=1,
    compression="mean",
    window=12,
  )
  q, k, v = rand_qkv(jax.random.key(21), 2, 48, 4, 2, 8)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(22), (2, 48, 4, 3)))
  ct = jax.random.normal(jax.random.key(23), q.shape)
  seg = _segments(2, 48, [[17, 30], [9]])

  def loss(q, k, v, impl):
    o = nsa_attention(q, k, v, gates, config=cfg, segment_ids=seg, impl=impl)
    return jnp.sum(o * ct), o

  (_, got), g_got = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "auto")
  (_, want), g_want = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "reference")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  for x, y in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  assert ((11, 0), True) in calls


# ------------------------------------------------------- masked attention with a recomputing VJP
def test_recompute_masked_attention_equals_autodiff_reference():
  """Same forward as ``masked_attention`` and the same gradient as its autodiff, incl. rows that
  see nothing (0 output, no NaN) and GQA with ``Dk != Dv``."""
  from sparse_attention_jax.ops.masked import recompute_masked_attention

  q, k, v = rand_qkv(jax.random.key(21), 2, 24, 4, 2, 8, 6)
  k, v = k[:, :9], v[:, :9]  # S = 9 keys
  mask = jax.random.bernoulli(jax.random.key(22), 0.5, (2, 24, 2, 9)).at[:, :3].set(False)
  ct = jax.random.normal(jax.random.key(23), (2, 24, 4, 6))

  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, q, k, v):
    def loss(q, k, v):
      out = fn(q, k, v, mask, 0.45)
      return jnp.sum(out[0] * ct), out

    return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

  grads, (o, lse, probs) = run(recompute_masked_attention, q, k, v)
  want, (o_ref, lse_ref, probs_ref) = run(
    functools.partial(masked_attention, return_probs=True), q, k, v
  )
  for got, ref in ((o, o_ref), (lse, lse_ref), (probs, probs_ref), *zip(grads, want)):
    assert not np.any(np.isnan(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), **TOL)
  assert float(jnp.max(jnp.abs(o[:, :3]))) == 0.0


def test_recompute_masked_attention_bf16_uses_bf16_matmuls_and_stays_close():
  """bf16 inputs: every matmul takes bf16 operands with float32 accumulation (upcast float32
  operands would run without tensor cores on GPUs), and the outputs, probabilities and
  gradients stay within bf16 rounding of the float32 computation on the same (rounded) inputs."""
  from sparse_attention_jax.ops.masked import recompute_masked_attention

  q, k, v = rand_qkv(jax.random.key(31), 2, 40, 4, 2, 16, 8, dtype=jnp.bfloat16)
  k, v = k[:, :12], v[:, :12]
  mask = jax.random.bernoulli(jax.random.key(32), 0.6, (2, 40, 2, 12)).at[:, :2].set(False)
  ct = jax.random.normal(jax.random.key(33), (2, 40, 4, 8))

  def run(q, k, v):
    def loss(q, k, v):
      out = recompute_masked_attention(q, k, v, mask, 0.3)
      return jnp.sum(out[0].astype(jnp.float32) * ct), out

    return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

  text = jax.jit(run).trace(q, k, v).lower().as_text()
  dots = [line.split(":")[-1] for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 7, dots  # fwd: QK, PV; bwd: QK again, dP, dQ, dK, dV
  assert all(line.split("->")[0].count("xbf16>") == 2 for line in dots), dots
  grads, (o, lse, probs) = jax.jit(run)(q, k, v)
  want, (o_ref, lse_ref, probs_ref) = jax.jit(run)(*(x.astype(jnp.float32) for x in (q, k, v)))
  rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
  assert rel(o, o_ref) < 2e-2 and rel(probs, probs_ref) < 1e-2
  np.testing.assert_allclose(np.asarray(lse[:, 2:]), np.asarray(lse_ref[:, 2:]), atol=2e-2)
  assert bool(jnp.all(jnp.isneginf(lse[:, :2])))  # rows that see nothing
  for g, g_ref in zip(grads, want):
    assert rel(g, g_ref) < 3e-2
