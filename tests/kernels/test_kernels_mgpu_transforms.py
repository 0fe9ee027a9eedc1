"""The Mosaic GPU selected-attention op under ``jax.vmap`` and inside ``jax.shard_map``: both
cross-lower for CUDA here (forward and ``jax.grad``); numerics on the GPU are checked by
``test_kernels_mgpu_gpu.py`` through :mod:`selected_checks`, whose plumbing runs here with the
reference in place of the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import selected_checks
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import selected_attention_mgpu as mg

T, H, G, D, N = 200, 2, 16, 128, 4


def _op(q, k, v, bi):
  return mg.selected_attention_mgpu(q, k, v, bi)


def _loss(fn):
  return lambda q, k, v, bi: jnp.sum(fn(q, k, v, bi).astype(jnp.float32))


def _avals(lead, sharding=None):
  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct((*lead, *shape), dt, sharding=sharding)
  return s(T, H * G, D), s(T, H, D), s(T, H, D), s(T, H, N, dt=jnp.int32)


def _lower(fn, avals):
  return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("grad", [False, True])
def test_vmap_over_a_leading_axis_lowers_for_cuda(grad):
  fn = jax.vmap(jax.grad(_loss(_op), argnums=(0, 1, 2)) if grad else _op)
  text = _lower(fn, _avals((3, 1)))
  # The forward kernel (and with grad the dQ and dK/dV kernels) is in the module.
  assert text.count("mosaic_gpu") >= (3 if grad else 1)


@pytest.mark.parametrize("grad", [False, True])
def test_shard_map_over_batch_and_kv_heads_lowers_for_cuda(grad):
  mesh = jax.make_mesh((1, 1), ("data", "kv"))
  spec = P("data", None, "kv", None)
  mapped = jax.shard_map(_op, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
  fn = jax.grad(_loss(mapped), argnums=(0, 1, 2)) if grad else mapped
  text = _lower(fn, _avals((2,), NamedSharding(mesh, spec)))
  assert text.count("mosaic_gpu") >= (3 if grad else 1)


def test_transform_checks_run_on_cpu_with_the_reference():
  """The GPU test's vmap / shard_map plumbing (``selected_checks.transform_errors``) with the
  reference in place of the kernel on the local CPU devices: bf16 inputs vs float32, so the
  errors are small but not zero (proves the plumbing, nothing about the kernel)."""
  rows = selected_checks.transform_errors(selected_checks.reference_op(64), block_size=64, t=150)
  assert [name.split()[0] for name, _ in rows] == ["vmap", "shard_map", "shard_map"]
  for name, errs in rows:
    assert set(errs) == {"o", "dq", "dk", "dv"}, name
    assert all(e < 2e-2 for e in errs.values()) and 0 < errs["dq"] < 2e-2, (name, errs)
