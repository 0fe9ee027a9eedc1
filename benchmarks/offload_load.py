"""Benchmark: host -> device block loads of the offloaded NOSA cache vs the number of load workers.

One :class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache` (one layer) with random blocks
in its NumPy host store; every step asks for a fresh random selection of ``--slots`` blocks per
(sequence, KV head), so nearly every block misses and is loaded (the worst case of the decode
step's load phase, without the model). Per worker count the table shows the wall time of the load
(``update`` with its slot assignment, then synchronized on the slots: the copies and scatters
have finished), the host time of the load phase alone, the host seconds of gathers and puts
summed over the workers, and the throughput in GB/s (bytes moved / synchronized wall time; on the
CPU backend the scatters themselves are slow, on a GPU they are not).

  python3 benchmarks/offload_load.py --batch 128 --context 32768 --workers 1,2,4,8

Writes ``<out>/offload_load.json``. CPU smoke: ``--batch 2 --context 2048 --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_attention_jax.nn.offload import OffloadedBlockCache  # noqa: E402


def run(workers: int, args) -> dict:
  """Median per-step load figures of one cache with ``workers`` load workers."""
  nb = args.context // args.block_size
  cache = OffloadedBlockCache(batch=args.batch, num_kv_heads=args.heads, k_dim=args.dk,
                              v_dim=args.dv, block_size=args.block_size, num_slots=args.slots,
                              max_len=args.context, dtype=jnp.bfloat16, load_workers=workers)
  rng = np.random.default_rng(args.seed)
  shape = (args.batch, args.heads, nb, args.block_size)
  # Random bits reinterpreted as bf16 are fine for copies (no arithmetic on them).
  cache.store.kv = rng.integers(0, 2**15, (*shape, args.dk + args.dv), np.uint16).view(
      cache.store.dtype)
  cache.store.c = rng.standard_normal(shape, np.float32)
  cache.length = args.context - 1               # the current block is the last one
  cache.warm_scatter()
  rows = []
  for _ in range(args.warmup + args.steps):
    gamma = np.stack([np.stack([rng.choice(nb - 1, args.slots, replace=False)
                                for _ in range(args.heads)]) for _ in range(args.batch)])
    t0 = time.perf_counter()
    stats = cache.update(gamma.astype(np.int32))
    jax.block_until_ready(cache.slot_kv)
    rows.append({"wall_s": time.perf_counter() - t0, **stats})
  rows = rows[args.warmup:]
  med = {key: statistics.median(r[key] for r in rows)
         for key in ("wall_s", "gather_s", "put_s", "load_s", "transferred", "bytes")}
  return {"workers": workers, "ms_per_load": med["wall_s"] * 1e3,
          "load_ms": med["load_s"] * 1e3,
          "gather_ms": med["gather_s"] * 1e3, "put_ms": med["put_s"] * 1e3,
          "blocks": med["transferred"], "bytes": med["bytes"],
          "gb_per_s": med["bytes"] / med["wall_s"] / 1e9}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--heads", type=int, default=2)
  ap.add_argument("--context", type=int, default=32768)
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--dk", type=int, default=64)
  ap.add_argument("--dv", type=int, default=64)
  ap.add_argument("--slots", type=int, default=63, help="blocks per (sequence, KV head)")
  ap.add_argument("--workers", default="1,2,4,8", help="comma-separated load worker counts")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args(argv)
  try:
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
  except ValueError:
    workers = []
  if not workers or min(workers) < 1:
    ap.error(f"--workers: expected comma-separated positive ints, got {args.workers!r}")
  for name in ("batch", "heads", "context", "block_size", "dk", "dv", "slots", "steps"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
  if args.context % args.block_size or args.context // args.block_size <= args.slots:
    ap.error(f"--context: expected a multiple of --block-size {args.block_size} with more than "
             f"--slots {args.slots} + 1 blocks, got {args.context}")
  dev = jax.devices()[0]
  meta = {"device": f"{dev.platform} ({dev.device_kind})", "jax": jax.__version__,
          "cpus": os.cpu_count(), **{k: v for k, v in vars(args).items() if k != "out"}}
  print(f"{meta['device']}, jax {jax.__version__}, {os.cpu_count()} CPUs: B {args.batch} H "
        f"{args.heads} context {args.context} l' {args.block_size} Dk+Dv {args.dk + args.dv} "
        f"bf16, {args.slots} fresh blocks per (sequence, head) per load", flush=True)
  print(f"{'workers':>7} {'ms/load':>9} {'load ms':>9} {'gather ms':>10} {'put ms':>8} "
        f"{'blocks':>8} {'MiB':>8} {'GB/s':>7}", flush=True)
  rows = []
  for w in workers:
    r = run(w, args)
    rows.append(r)
    print(f"{w:>7} {r['ms_per_load']:>9.2f} {r['load_ms']:>9.2f} {r['gather_ms']:>10.2f} "
          f"{r['put_ms']:>8.2f} "
          f"{r['blocks']:>8.0f} {r['bytes'] / 2**20:>8.1f} {r['gb_per_s']:>7.2f}", flush=True)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "offload_load.json")
  with open(path, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
