"""CPU micro-benchmark of ``OffloadedBlockCache.update`` (the per-step host bookkeeping and block
loads of offloaded NOSA decoding), not a test.

Shape of one layer of ``configs/nosa_1b.yaml`` at a 131k context: B sequences (default 128),
H = 2 KV heads, NB = 2048 complete blocks of l' = 64 tokens, Dk = Dv = 64 in bfloat16 (16 KiB of
K/V per block), k = 64 selected blocks (63 slots besides the current block). Selections are
simulated: every (sequence, head) keeps its 63 blocks but swaps ``--churn`` of them for random
others per step (hit rate ~ 1 - churn / 63), and always holds the current block.

Rows (ms per ``update()``, mean over ``--steps`` steady-state steps after a full refill):

* ``bookkeeping loop``: the earlier per-(b, h) Python set arithmetic alone (no copies);
* ``bookkeeping vectorized``: :func:`sparse_attention_jax.nn.offload.assign_slots` alone;
* ``bookkeeping device``: with ``--plans ...,device``, the jitted
  :func:`sparse_attention_jax.nn.offload.plan_slots_on_device` and the read-back of its counts
  (the selections already on the device);
* ``update numpy, W workers``: the whole step with the NumPy store (gathers, ``device_put`` s,
  scatters), for each count of ``--load-workers`` (threads fetching the chunks of a load side by
  side), with the host milliseconds of the load phase and of the gathers and puts (summed over
  the workers);
* ``update numpy staged, W workers``: with ``--transfers fresh,staged``, the same through
  reused DMA-registered staging buffers (``OffloadedBlockCache(transfer="staged")``);
* ``update pinned_host``: the whole step with the per-block ``pinned_host`` store (same
  vectorized bookkeeping, one host array per block);
* ``update pinned_array``: the whole step with ONE ``pinned_host`` jax array per layer
  (``--stores numpy,pinned_array``): each chunk is one jitted gather from host memory + slot
  scatter (``load ms`` = host time of the whole load, ``gather ms`` = building the index arrays,
  ``put ms`` = dispatching the jitted calls; the copies finish inside the timed step);
* ``update pinned_array plan device``: with ``--plans host,device``, the same store with the
  slot assignment planned on the device (``OffloadedBlockCache(plan="device")``; the selections
  are moved to the device before the timed step; ``gather ms`` = 0, ``put ms`` = dispatching the
  sliced chunk loads);
* ``update baseline``: with ``--baseline PATH`` (e.g. the earlier module from ``git show
  b0c8696:sparse_attention_jax/nn/offload.py > /tmp/old_offload.py``), that module's update.

The slot scatter donates the pool (updates it in place, as on a GPU) unless ``--no-donate``:
the library does not donate on the CPU backend, where a non-donated scatter copies the whole
slot pool (B * H * 63 blocks, 264 MB at B=128) per call, which would swamp what is measured here.

Host RAM: the NumPy store is a strided view sharing one row's blocks between the rows (as in
``benchmarks/decode.py``); the per-block stores share a pool of blocks. Copies move real bytes.
The ``pinned_array`` store cannot share rows: it holds all ``B * H * (NB + 1)`` blocks (8.6 GB
at the defaults, built from the pool through one host copy).

Usage: ``python3 benchmarks/offload_update_cpu.py [--batch 128] [--steps 10] [--baseline PATH]
[--load-workers 1,2,4] [--transfers fresh,staged] [--stores numpy,pinned_array] [--plans
host,device]``. Runs on a GPU too (the device is ``jax.devices()[0]``).
Prints a table and writes ``offload_update_cpu.json`` under ``--out`` (default ``$OUT`` or
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.nn import offload
from sparse_attention_jax.nn.offload import OffloadedBlockCache, assign_slots
from sparse_attention_jax.nn.offload_store import STORES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_bookkeeping(gamma, slot_block, cur):
  """The earlier per-(b, h) set-based bookkeeping (slot map updated in place; the loads)."""
  loads = []
  for bi in range(slot_block.shape[0]):
    for hi in range(slot_block.shape[1]):
      want = {int(j) for j in gamma[bi, hi] if j >= 0}
      want.discard(cur)
      row = slot_block[bi, hi]
      keep = np.isin(row, list(want)) & (row >= 0)
      row[~keep] = -1
      resident = {int(j) for j in row[keep]}
      missing = sorted(want - resident)
      for s, j in zip(np.flatnonzero(row < 0)[: len(missing)], missing):
        row[s] = j
        loads.append((bi, hi, int(s), j))
  return loads


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


def make_cache(
  cls,
  store,
  batch,
  heads,
  nb,
  bs,
  d,
  dtype,
  pool,
  rng,
  load_workers=None,
  transfer="fresh",
  plan="host",
):
  kw = {} if store is None else {"store": store, "load_workers": load_workers}
  if transfer != "fresh":
    kw["transfer"] = transfer
  if plan != "host":
    kw["plan"] = plan
  cache = cls(
    batch=batch,
    num_kv_heads=heads,
    k_dim=d // 2,
    v_dim=d // 2,
    block_size=bs,
    num_slots=63,
    max_len=(nb + 1) * bs,
    dtype=dtype,
    **kw,
  )
  kv = rng.standard_normal((pool, bs, d), np.float32).astype(np.dtype(dtype))
  cc = rng.standard_normal((pool, bs), np.float32)
  if store == "pinned_array":  # all B * H * (NB + 1) blocks, from the pool
    kv = np.tile(kv, (-(-(nb + 1) // pool), 1, 1))[: nb + 1]
    cc = np.tile(cc, (-(-(nb + 1) // pool), 1))[: nb + 1]
    cache.store.kv = jax.device_put(
      np.broadcast_to(kv, (batch, heads, *kv.shape)), cache.store.sharding
    )
    cache.store.c = jax.device_put(
      np.broadcast_to(cc, (batch, heads, *cc.shape)), cache.store.sharding
    )
  elif store == "numpy":
    kv = np.tile(kv, (-(-(nb + 1) // pool), 1, 1))[: nb + 1]
    cc = np.tile(cc, (-(-(nb + 1) // pool), 1))[: nb + 1]
    cache.store.kv = np.lib.stride_tricks.as_strided(
      kv, (batch, heads, *kv.shape), (0, 0, *kv.strides)
    )
    cache.store.c = np.lib.stride_tricks.as_strided(
      cc, (batch, heads, *cc.shape), (0, 0, *cc.strides)
    )
  else:
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    blocks = [tuple(b) for b in jax.device_put([(kv[i], cc[i]) for i in range(pool)], host)]
    table = {
      (b, h, j): blocks[(b * heads * nb + h * nb + j) % pool]
      for b in range(batch)
      for h in range(heads)
      for j in range(nb)
    }
    if store is None:
      cache.host_blocks = table
    else:
      cache.store.blocks = table
  cache.length = nb * bs + 1  # the current block nb holds one token
  return cache


def warm_baseline(cache, most) -> None:
  """Compiles the earlier module's scatter for every power-of-two count (as its decoder did)."""
  kv, cc = jax.device_put(
    (jnp.zeros(cache.slot_kv.shape[3:], cache.dtype), jnp.zeros(cache.slot_c.shape[3:])), cache._dev
  )
  n = 1
  while n <= min(cache.batch * cache.heads * cache.num_slots, most):
    idx = [jnp.zeros((n,), jnp.int32)] * 3
    cache.slot_kv, cache.slot_c = cache._scatter(cache.slot_kv, cache.slot_c, *idx, [(kv, cc)] * n)
    n *= 2
  jax.block_until_ready(cache.slot_kv)


def device_bookkeeping(gammas, batch, heads, k, nb) -> float:
  """Mean ms of :func:`offload.plan_slots_on_device` + the read-back of its counts per step
  (selections already on the device; the first call, a full refill, compiles)."""
  pad = offload.bucket(min(offload.MAX_SCATTER, offload.LOAD_CHUNK))
  sel = [jnp.asarray(g) for g in gammas]
  slots = jnp.full((batch, heads, k - 1), -1, jnp.int32)
  t = []
  for i, g in enumerate(sel):
    t0 = time.perf_counter()
    slots, _, _, info = offload.plan_slots_on_device(g, slots, np.int32(nb), pad=pad)
    jax.device_get(info)
    if i:
      t.append(time.perf_counter() - t0)
  return 1e3 * float(np.mean(t))


def time_update(cache, gammas):
  """Mean ms per synchronized ``update``, blocks moved per step, and the mean host ms of the
  load phase, gathers and puts (those stats, when the module reports them)."""
  cache.update(gammas[0])  # full refill (compiles buckets)
  jax.block_until_ready(cache.slot_kv)
  times, stats = [], []
  for g in gammas[1:]:
    t0 = time.perf_counter()
    stats.append(cache.update(g))
    jax.block_until_ready(cache.slot_kv)
    times.append(time.perf_counter() - t0)
  host = {
    f"{key[:-2]}_ms": 1e3 * float(np.mean([st[key] for st in stats]))
    for key in ("load_s", "gather_s", "put_s")
    if key in stats[0]
  }
  return 1e3 * float(np.mean(times)), float(np.mean([st["transferred"] for st in stats])), host


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--blocks", type=int, default=2048, help="complete blocks per row (NB)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--churn", type=int, default=6, help="blocks swapped per row per step")
  ap.add_argument("--pool", type=int, default=256, help="distinct random blocks in the store")
  ap.add_argument(
    "--stores",
    default="numpy,pinned_host",
    help="comma-separated host stores: numpy, pinned_host, pinned_array",
  )
  ap.add_argument(
    "--load-workers",
    default="1",
    help="comma-separated load worker counts (a numpy-store row per count)",
  )
  ap.add_argument(
    "--transfers",
    default="fresh",
    help="comma-separated load transfers of the numpy store: fresh, staged",
  )
  ap.add_argument(
    "--plans",
    default="host",
    help="comma-separated slot plans of the pinned_array store: host, device",
  )
  ap.add_argument("--baseline", default=None, help="path of an earlier offload.py to time too")
  ap.add_argument(
    "--no-donate",
    action="store_true",
    help="keep the library's CPU behaviour (no donation: every scatter copies)",
  )
  ap.add_argument(
    "--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
  )
  args = ap.parse_args(argv)
  try:
    workers = [int(w) for w in args.load_workers.split(",") if w.strip()]
  except ValueError:
    workers = []
  if not workers or min(workers) < 1:
    ap.error(f"--load-workers: expected comma-separated positive ints, got {args.load_workers!r}")
  transfers = [t for t in args.transfers.split(",") if t.strip()]
  if not transfers or set(transfers) - set(offload.TRANSFERS):
    ap.error(
      f"--transfers: expected comma-separated names from {offload.TRANSFERS}, got "
      f"{args.transfers!r}"
    )
  stores = [x for x in args.stores.split(",") if x.strip()]
  if not stores or set(stores) - set(STORES):
    ap.error(f"--stores: expected comma-separated names from {STORES}, got {args.stores!r}")
  plans = [x for x in args.plans.split(",") if x.strip()]
  if not plans or set(plans) - set(offload.PLANS):
    ap.error(f"--plans: expected comma-separated names from {offload.PLANS}, got {args.plans!r}")
  if "device" in plans and "pinned_array" not in stores:
    ap.error(
      f"--plans: expected 'host' only without pinned_array in --stores (the device plan "
      f"loads from the pinned_array store), got {args.plans!r} with --stores "
      f"{args.stores!r}"
    )
  b, h, nb, bs, k, d, dtype = args.batch, 2, args.blocks, 64, 64, 128, jnp.bfloat16
  rng = np.random.default_rng(0)
  gammas = selections(rng, b, h, nb, k, args.churn, args.steps)
  rows = []

  def bookkeeping(fn):
    slots = np.full((b, h, k - 1), -1, np.int32)
    fn(gammas[0], slots, nb)
    t = []
    for g in gammas[1:]:
      t0 = time.perf_counter()
      fn(g, slots, nb)
      t.append(time.perf_counter() - t0)
    return 1e3 * float(np.mean(t))

  rows.append({"row": "bookkeeping loop", "ms": bookkeeping(loop_bookkeeping)})
  rows.append({"row": "bookkeeping vectorized", "ms": bookkeeping(assign_slots)})
  if "device" in plans:
    rows.append({"row": "bookkeeping device", "ms": device_bookkeeping(gammas, b, h, k, nb)})
  for store, tr, w, plan in [
    (s, t, w, p)
    for s in stores
    for t in (transfers if s == "numpy" else ["fresh"])
    for w in (workers if s == "numpy" else workers[:1])
    for p in (plans if s == "pinned_array" else ["host"])
  ]:
    cache = make_cache(
      OffloadedBlockCache, store, b, h, nb, bs, d, dtype, args.pool, rng, w, tr, plan
    )
    if not args.no_donate:
      cache._scatter, cache._write_token = offload._updaters(True)
      if cache._array_load is not None:
        cache._array_load = offload._array_loader(True, cache.store.host, True)
      if cache._planned_load is not None:
        cache._planned_load = offload._planned_loader(True, cache.store.host)
    cache.warm_scatter()
    ms, blocks, host = time_update(
      cache, [jnp.asarray(g) for g in gammas] if plan == "device" else gammas
    )
    name = store if tr == "fresh" else f"{store} {tr}"
    name += " plan device" if plan == "device" else ""
    rows.append(
      {
        "row": f"update {name}, {w} worker{'s' * (w > 1)}",
        "ms": ms,
        "blocks_per_step": blocks,
        "load_workers": w,
        "transfer": tr,
        "plan": plan,
        **host,
      }
    )
    del cache
  if args.baseline:
    spec = importlib.util.spec_from_file_location("baseline_offload", args.baseline)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache = make_cache(mod.OffloadedBlockCache, None, b, h, nb, bs, d, dtype, args.pool, rng)
    if not args.no_donate:
      cache._scatter, cache._write_token = mod._updaters(True)
    warm_baseline(cache, mod.MAX_SCATTER)
    ms, blocks, host = time_update(cache, gammas)
    rows.append({"row": "update baseline", "ms": ms, "blocks_per_step": blocks, **host})
  meta = {
    "jax": jax.__version__,
    "device": str(jax.devices()[0]),
    "B": b,
    "H": h,
    "NB": nb,
    "block_size": bs,
    "k": k,
    "D": d,
    "dtype": "bfloat16",
    "churn": args.churn,
    "steps": args.steps,
    "donate": not args.no_donate,
    "cpus": os.cpu_count(),
  }
  print(
    f"jax {jax.__version__} on {jax.devices()[0]}: B={b} H={h} NB={nb} l'={bs} k={k} "
    f"Dk+Dv={d} bf16, churn {args.churn}/row/step, {args.steps} steps"
  )
  print(
    f"{'row':<42} {'ms/update':>10} {'blocks/step':>11} {'load ms':>8} {'gather ms':>9} "
    f"{'put ms':>7}"
  )
  nan = float("nan")
  for r in rows:
    print(
      f"{r['row']:<42} {r['ms']:>10.2f} {r.get('blocks_per_step', nan):>11.1f} "
      f"{r.get('load_ms', nan):>8.2f} {r.get('gather_ms', nan):>9.2f} {r.get('put_ms', nan):>7.2f}"
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "offload_update_cpu.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
