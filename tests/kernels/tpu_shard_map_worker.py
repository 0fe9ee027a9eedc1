"""Subprocess of ``test_kernels_tpu.py``: the TPU kernels (interpreted) inside ``jax.shard_map``
over batch and KV heads on 4 simulated CPU devices, forward and gradients against the reference.
``jax_num_cpu_devices`` must be set before JAX starts, hence a process of its own. Prints ``OK``.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np
import selected_checks as sc
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import selected_attention_tpu as st


def main():
  b, t, hq, h, d, n, bs = 2, 48, 8, 2, 16, 2, 16
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(keys[0], (b, t, hq, d))
  k = jax.random.normal(keys[1], (b, t, h, d))
  v = jax.random.normal(keys[2], (b, t, h, d))
  bi = sc.random_selection(keys[3], b, t, h, n, block_size=bs)
  do = jax.random.normal(keys[4], (b, t, hq, d))
  mesh = jax.make_mesh((2, 2), ("b", "h"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  spec = P("b", None, "h", None)
  cfg = st.TpuConfig(interpret=True)
  attend = jax.shard_map(
    lambda q, k, v, bi: st.selected_attention_tpu(q, k, v, bi, block_size=bs, config=cfg),
    mesh=mesh,
    in_specs=(spec,) * 4,
    out_specs=spec,
    check_vma=False,
  )

  def run(q, k, v, bi, do):
    o, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, bi), q, k, v)
    return o, vjp(do)

  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  o, grads = jax.jit(run)(*map(put, (q, k, v, bi, do)))
  assert o.sharding.spec == spec, o.sharding
  ref = lambda q, k, v: sc.reference(q, k, v, bi, block_size=bs, scale=d**-0.5)[0]
  ro, vjp = jax.vjp(ref, q, k, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=2e-5, rtol=2e-5)
  for got, want in zip(grads, vjp(do)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  print("OK")


if __name__ == "__main__":
  main()
