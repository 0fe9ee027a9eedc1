"""GPU check: the selected-attention kernel under ``jax.vmap`` and inside ``jax.shard_map``.

Run on the GPU machine from the repository root:
``PYTHONPATH=$PWD python3 tests/gpu/check_selected_transforms.py`` (every local GPU is used for
the shard_map meshes: ``data=N`` over the batch and, when ``N`` divides the KV heads,
``kv=N`` over the KV heads). Writes ``$OUT/selected_transforms.json`` (default ``.``).

Each case draws fresh random bf16 inputs and a random cotangent, runs the kernel op
(``selected_attention(impl="pallas_gpu")``) inside the transform, forward and ``jax.grad``, and
compares with the plain-JAX reference on float32 copies without the transform (relative L2
error of O and of dQ/dK/dV). Exits 1 on any failure. ``--cpu-smoke``: the script's plumbing on
2 simulated CPU devices with the reference in place of the kernel (proves nothing about it).
"""

from __future__ import annotations

import json
import os
import sys

import jax

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
  jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, "tests/gpu")
from check_selected_mgpu import BS, random_selection

from sparse_attention_jax.ops.selected import selected_attention

TOL = 2e-2


def op(impl):
  impl = "reference" if SMOKE else impl
  return lambda q, k, v, bi: selected_attention(q, k, v, bi, block_size=BS, impl=impl)


def fwd_and_grads(fn, q, k, v, bi, w):
  def loss(q, k, v):
    o = fn(q, k, v, bi)
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, g


def inputs(seed, lead, t, hq, h, d, n):
  ks = jax.random.split(jax.random.key(seed), 5)
  rnd = lambda key, shape: jax.random.normal(key, (*lead, *shape), jnp.float32)
  q = rnd(ks[0], (t, hq, d)).astype(jnp.bfloat16)
  k = rnd(ks[1], (t, h, d)).astype(jnp.bfloat16)
  v = rnd(ks[2], (t, h, d)).astype(jnp.bfloat16)
  flat = int(np.prod(lead))
  bi = random_selection(ks[3], flat, t, h, n).reshape(*lead, t, h, n)
  w = rnd(ks[4], (t, hq, d))
  return q, k, v, bi, w


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(name, got, want):
  (o, g), (o_r, g_r) = got, want
  errs = {"o": rel(o, o_r), **{nm: rel(a, b) for nm, a, b in zip(("dq", "dk", "dv"), g, g_r)}}
  ok = all(e < TOL for e in errs.values()) and all(bool(jnp.all(jnp.isfinite(x))) for x in (o, *g))
  print(
    f"{'OK  ' if ok else 'FAIL'} {name:44s} " + "  ".join(f"{k}={e:.1e}" for k, e in errs.items()),
    flush=True,
  )
  return {"case": name, "ok": ok, **errs}


def main():
  devs = jax.devices()
  print("devices:", len(devs), devs[0].device_kind, "jax", jax.__version__, flush=True)
  f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
  rows = []
  t, hq, h, d, n = 333, 32, 2, 128, 6

  # vmap over a leading axis of 3 independent problems (batch 1 each).
  q, k, v, bi, w = inputs(1, (3, 1), t, hq, h, d, n)
  got = jax.jit(jax.vmap(lambda q, k, v, bi, w: fwd_and_grads(op("pallas_gpu"), q, k, v, bi, w)))(
    q, k, v, bi, w
  )
  want = jax.jit(
    jax.vmap(lambda q, k, v, bi, w: fwd_and_grads(op("reference"), *f32((q, k, v)), bi, w))
  )(q, k, v, bi, w)
  rows.append(compare("vmap x3 (G16 D128 T=333)", got, want))

  # shard_map over the batch (data=N) and over the KV heads (kv=N when N divides H).
  nd = len(devs)
  meshes = [((nd, 1), "data")] + ([((1, nd), "kv")] if h % nd == 0 else [])
  for shape, label in meshes:
    mesh = jax.make_mesh(shape, ("data", "kv"))
    spec = P("data", None, "kv", None)
    shard = NamedSharding(mesh, spec)
    q, k, v, bi, w = inputs(2 + shape[0], (2 * shape[0],), t, hq, h, d, n)
    mapped = jax.shard_map(
      op("pallas_gpu"), mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False
    )
    args = [jax.device_put(x, shard) for x in (q, k, v, bi, w)]
    got = jax.jit(lambda q, k, v, bi, w, f=mapped: fwd_and_grads(f, q, k, v, bi, w))(*args)
    want = jax.jit(lambda q, k, v, bi, w: fwd_and_grads(op("reference"), *f32((q, k, v)), bi, w))(
      q, k, v, bi, w
    )
    rows.append(compare(f"shard_map {label}={max(shape)} B={q.shape[0]}", got, want))

  out = os.environ.get("OUT", ".")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "selected_transforms.json"), "w") as f:
    json.dump(
      {"jax": jax.__version__, "device": devs[0].device_kind, "devices": nd, "rows": rows},
      f,
      indent=1,
    )
  ok = all(r["ok"] for r in rows)
  print("OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
