"""Micro-benchmark of one offloaded NOSA layer's decode step (slot plan + block copy +
attention, :func:`sparse_attention_jax.offload.layer_step`), not a test.

Shape of one layer of ``configs/nosa_1b.yaml`` at a 131k context: B sequences (default 128),
H = 2 KV heads, NB = 2048 complete blocks of l' = 64 tokens, Dk = Dv = 64 in bfloat16 (16 KiB of
K/V per block), k = 64 selected blocks (63 slots besides the current block). Selections are
simulated: every (sequence, head) keeps its 63 blocks but swaps ``--churn`` of them for random
others per step (hit rate ~ 1 - churn / 63), and always holds the current block.

Rows (ms per step, mean over ``--steps`` steady-state steps after a full refill, synchronized):

* ``plan``: :func:`sparse_attention_jax.offload.plan_slots` and the read-back of its counts (the
  selections already on the device);
* ``step kernel`` / ``step xla``: the whole jitted layer step with the pinned host store, for
  each of ``--copies`` (the zero-copy Pallas kernel, interpreted on CPU, so off by default
  there; XLA's host gather in chunks of ``--chunk`` blocks).

The host store holds every block (``B * H * (NB + 1)``: 8.6 GB at the defaults), block ``j`` of
every row being one of ``--pool`` distinct random blocks. The step donates the slots (updates
them in place, as the decoder does on a GPU). The numbers of the modes retired from the library
(NumPy and per-block stores, host-side planning, staging buffers) are in
``benchmarks/RESULTS.md``.

Usage: ``python3 benchmarks/offload_update_cpu.py [--batch 128] [--steps 10] [--copies
kernel,xla]``. Runs on a GPU too (the device is ``jax.devices()[0]``). Prints a table and writes
``offload_update_cpu.json`` under ``--out`` (default ``$OUT`` or ``runs/bench``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.offload import COPIES, OffloadedLayer, layer_step, plan_slots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def selections(rng, batch, heads, nb, k, churn, steps):
  """``steps + 1`` selections ``[B, H, k]``: ``k - 1`` blocks of ``[0, nb)`` + the current block
  ``nb``, each step swapping ``churn`` blocks per row for others."""
  rows = np.argsort(rng.random((batch * heads, nb)), axis=1)[:, : k - 1]
  out = []
  for _ in range(steps + 1):
    g = np.concatenate([rows, np.full((batch * heads, 1), nb)], axis=1)
    out.append(g.reshape(batch, heads, k).astype(np.int32))
    rows = rows.copy()
    for r in range(rows.shape[0]):
      have = set(rows[r].tolist())
      pos = rng.choice(k - 1, churn, replace=False)
      new = [j for j in rng.permutation(nb)[: 4 * churn].tolist() if j not in have][:churn]
      rows[r, pos[: len(new)]] = new
  return out


def make_layer(b, h, nb, bs, dk, dtype, pool, rng) -> OffloadedLayer:
  """A layer holding ``nb`` complete blocks and the current block's first token per row."""
  layer = OffloadedLayer(
    batch=b,
    num_kv_heads=h,
    k_dim=dk,
    v_dim=dk,
    block_size=bs,
    num_slots=63,
    max_len=(nb + 1) * bs,
    dtype=dtype,
  )
  store = layer.store
  pool_kv = rng.standard_normal((pool, bs, 2 * dk)).astype(dtype)
  pool_c = rng.standard_normal((pool, bs)).astype(np.float32)
  pick = np.arange(store.shape[2]) % pool
  kv = np.broadcast_to(pool_kv[pick], store.shape)
  c = np.broadcast_to(pool_c[pick], store.shape[:4])
  store.kv, store.c = jax.device_put((kv, c), store.sharding)
  layer.length, layer._stored = nb * bs + 1, nb
  return layer


def time_plan(gammas, b, h, k, nb, pad) -> float:
  """Mean ms of :func:`plan_slots` + the read-back of its counts per step."""
  sel = [jnp.asarray(g) for g in gammas]
  slots = jnp.full((b, h, k - 1), -1, jnp.int32)
  t = []
  for i, g in enumerate(sel):
    t0 = time.perf_counter()
    slots, _, _, info = plan_slots(g, slots, np.int32(nb), pad=pad)
    jax.device_get(info)
    if i:
      t.append(time.perf_counter() - t0)
  return 1e3 * float(np.mean(t))


def time_steps(layer, gammas, copy, chunk, rng) -> tuple[float, float]:
  """Mean ms per synchronized layer step and blocks moved per step (after a full refill)."""
  b, h, dk = layer.batch, layer.heads, layer.k_dim
  step = jax.jit(
    functools.partial(layer_step, chunk=chunk, scale=dk**-0.5, host=layer.store.host, copy=copy),
    donate_argnums=(0,) if jax.devices()[0].platform != "cpu" else (),
  )
  kv_t = jnp.asarray(rng.standard_normal((b, h, 2 * dk)), layer.dtype)
  c_t = jnp.asarray(rng.standard_normal((b, h)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((b, 16 * h, dk)), layer.dtype)
  t = jnp.int32(layer.length)  # the same token every step: only the selection changes
  state, times, moved = layer.state, [], []
  for i, g in enumerate(gammas):
    g = jax.device_put(g)
    t0 = time.perf_counter()
    o, state, info = step(state, layer.store.kv, layer.store.c, kv_t, c_t, g, q, t)
    info = jax.device_get(info)
    jax.block_until_ready(o)
    if i:
      times.append(time.perf_counter() - t0)
      moved.append(int(info[0]))
  return 1e3 * float(np.mean(times)), float(np.mean(moved))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--blocks", type=int, default=2048, help="complete blocks per row (NB)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--churn", type=int, default=6, help="blocks swapped per row per step")
  ap.add_argument("--pool", type=int, default=256, help="distinct random blocks in the store")
  ap.add_argument(
    "--copies",
    default="xla" if jax.default_backend() == "cpu" else "kernel,xla",
    help=f"comma-separated block copies, from {COPIES} (default: xla on CPU, both elsewhere)",
  )
  ap.add_argument("--chunk", type=int, default=1024, help="blocks per XLA copy iteration")
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "bench"))
  args = ap.parse_args(argv)
  copies = [x for x in args.copies.split(",") if x.strip()]
  if not copies or set(copies) - set(COPIES):
    ap.error(f"--copies: expected comma-separated names from {COPIES}, got {args.copies!r}")
  for name in ("batch", "blocks", "steps", "pool", "chunk"):
    if getattr(args, name) < 1:
      ap.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
  b, h, nb, bs, k, dk, dtype = args.batch, 2, args.blocks, 64, 64, 64, jnp.bfloat16
  rng = np.random.default_rng(0)
  gammas = selections(rng, b, h, nb, k, args.churn, args.steps)
  rows = [{"row": "plan", "ms": time_plan(gammas, b, h, k, nb, args.chunk)}]
  for copy in copies:
    layer = make_layer(b, h, nb, bs, dk, dtype, args.pool, rng)
    ms, blocks = time_steps(layer, gammas, copy, args.chunk, rng)
    rows.append({"row": f"step {copy}", "ms": ms, "blocks_per_step": blocks, "copy": copy})
    del layer
  meta = {
    "jax": jax.__version__,
    "device": str(jax.devices()[0]),
    "B": b,
    "H": h,
    "NB": nb,
    "block_size": bs,
    "k": k,
    "D": 2 * dk,
    "dtype": "bfloat16",
    "churn": args.churn,
    "steps": args.steps,
    "chunk": args.chunk,
    "cpus": os.cpu_count(),
  }
  print(
    f"jax {jax.__version__} on {jax.devices()[0]}: B={b} H={h} NB={nb} l'={bs} k={k} "
    f"Dk+Dv={2 * dk} bf16, churn {args.churn}/row/step, {args.steps} steps"
  )
  print(f"{'row':<14} {'ms/step':>9} {'blocks/step':>11}")
  for r in rows:
    print(f"{r['row']:<14} {r['ms']:>9.2f} {r.get('blocks_per_step', float('nan')):>11.1f}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "offload_update_cpu.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
