"""Shared base of the semantic tests (``test_semantics_*.py``): every implementation of an op in
the dispatch table, and each dtype, against the float32 reference on fresh random inputs, forward
and gradients.

An implementation made only for GPUs becomes a ``gpu``-marked case (skipped without a Hopper GPU).
A dtype an implementation does not serve (e.g. float32 on the cuDNN or Mosaic GPU paths) must be
declined with ``NotImplementedError`` when the implementation is named.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention_jax.ops import dispatch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Per dtype: bound on |o - o_ref| (absolute and relative, as assert_allclose) and on
# max|g - g_ref| / max(1, max|g_ref|) of each gradient.
TOLERANCE = {
  "float32": {"out": 2e-5, "grad": 2e-5},
  "bfloat16": {"out": 3e-2, "grad": 3e-2},
}

# (implementation, dtype) pairs an implementation declines when named.
DECLINED = {("cudnn", "float32"), ("pallas_gpu", "float32")}


def impl_params(op: str):
  """``pytest.param`` per implementation of ``op`` (table order) and ``"auto"``; those made only
  for GPUs carry the ``gpu`` mark; those made only for TPUs are skipped elsewhere (their CPU
  tests run the kernels in the TPU interpreter, ``tests/kernels/test_kernels_tpu.py``)."""
  params = [pytest.param("auto", id="auto")]
  for entry in dispatch.implementations(op):
    plats = entry.platforms
    if plats is not None and set(plats) == {"tpu"}:
      on_tpu = jax.default_backend() == "tpu"
      marks = () if on_tpu else (pytest.mark.skip(reason="needs a TPU"),)
      params.append(pytest.param(entry.name, marks=marks, id=entry.name))
      continue
    gpu_only = plats is not None and "cpu" not in plats
    marks = (pytest.mark.gpu,) if gpu_only else ()
    params.append(pytest.param(entry.name, marks=marks, id=entry.name))
  return params


def dtype_params():
  return [pytest.param(name, id=name) for name in DTYPES]


def fresh_key(request) -> jax.Array:
  """A key of its own for each test case (derived from the case's id)."""
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def declined(impl: str, dtype: str) -> bool:
  return (impl, dtype) in DECLINED


def check_against_reference(fn, ref_fn, args, dtype: str, *, ct_key, num_diff: int = 3):
  """``fn`` on ``args`` cast to ``dtype`` against ``ref_fn`` on the same values in float32.

  Args:
    fn, ref_fn: ``f(*args) -> o``; the first ``num_diff`` args are differentiated.
    args: float32 arrays (floating args are cast to ``dtype`` for ``fn``; integer ones pass).
    dtype: a key of :data:`DTYPES`.
    ct_key: key of the random cotangent of ``o``.
  """
  dt = DTYPES[dtype]

  def cast(x, to):
    return x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x

  low = [cast(x, dt) for x in args]
  f32 = [cast(x, jnp.float32) for x in low]  # the same values, in float32
  diff = tuple(range(num_diff))

  def grads(f, xs):
    o = f(*xs)
    ct = jax.random.normal(ct_key, o.shape, jnp.float32)

    def loss(*d):
      return jnp.sum(f(*d, *xs[num_diff:]).astype(jnp.float32) * ct)

    return o, jax.grad(loss, diff)(*xs[:num_diff])

  o, g = grads(fn, low)
  o_ref, g_ref = grads(ref_fn, f32)
  assert o.dtype == dt, (o.dtype, dt)
  tol = TOLERANCE[dtype]
  np.testing.assert_allclose(
    np.asarray(o.astype(jnp.float32)), np.asarray(o_ref), atol=tol["out"], rtol=tol["out"]
  )
  assert float(jnp.max(jnp.abs(o_ref))) > 0.1  # not a trivially zero output
  for i, (a, b) in enumerate(zip(g, g_ref)):
    assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), f"grad {i} not finite"
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    assert err <= tol["grad"] * scale, f"grad {i}: max error {err} > {tol['grad']} * {scale}"
