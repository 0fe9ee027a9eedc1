"""GPU check of the NOSA offloaded block cache (``sparse_attention_jax.nn.offload``).

Run from the repository root on a CUDA machine (jax >= 0.11.2, no grain needed):
``PYTHONPATH=$PWD python3 tests/gpu/check_nosa_offload.py [--quick] [--stores numpy,pinned_host]``
(``--tiny`` runs a CPU-sized case); results go to ``$OUT/nosa_offload.json`` (default
``./nosa_offload_out``). Every case runs once per host store (``numpy``: one contiguous NumPy
array per layer, the default store; ``pinned_host``: one pinned host jax array per block).

What it checks, on fresh random inputs (never zeros):

1. the host block store really is where it says: ``numpy`` = NumPy arrays (``kv [B, H, NBmax,
   l', D]``), ``pinned_host`` = every stored block a jax array in ``pinned_host`` memory; the
   slot pool is in ``device`` memory;
2. a decode simulation (prefill, then one token per step with the NOSA selection of that step)
   attends over the slot pool exactly like the float32 full-cache reference
   (``biased_selected_attention``) and moves exactly the blocks that were not resident;
3. timing: per-step wall time of ``update`` (host -> device copies of the missing blocks) and
   ``attend``, the hit rate and bytes moved, vs a device_put of the whole K/V/c of the context.

Exits 1 on any failure. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn.offload import OffloadedBlockCache
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention


def _host_kind(cache) -> str:
  """Where the host store's blocks are, read from the arrays themselves."""
  st = cache.store
  if hasattr(st, "blocks"):
    kinds = {x.sharding.memory_kind for blk in st.blocks.values() for x in blk}
    return kinds.pop() if len(kinds) == 1 else f"mixed {sorted(kinds)}"
  return "numpy" if type(st.kv) is np.ndarray and type(st.c) is np.ndarray else type(st.kv).__name__


def run(b, t, hq, h, d, steps, k_total, kq, seed, store):
  cfg = NSAConfig.infllm_v2(local_window=256, num_selected=k_total)  # l'=64, 1 init + 5 local
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, h, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, h, d), jnp.float32)
  c = 1.5 * jax.random.normal(keys[3], (b, t, h), jnp.float32)
  # Selections of every query from the full-sequence op (the reference pipeline).
  _, aux = jax.jit(
    lambda *a: nosa_attention(*a, config=cfg, num_query_selected=kq, return_aux=True)
  )(q, k, v, c)
  idx = aux.block_indices
  ref = jax.jit(lambda *a: biased_selected_attention(*a, block_size=cfg.block_size))(
    q, k, v, c, idx
  )
  gam = np.asarray(idx)
  cache = OffloadedBlockCache(
    batch=b,
    num_kv_heads=h,
    k_dim=d,
    v_dim=d,
    block_size=cfg.block_size,
    num_slots=k_total - 1,
    max_len=t,
    store=store,
  )
  prompt = t - steps
  cache.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  kinds = {
    "host": _host_kind(cache),
    "reported": cache.host_memory_kind,
    "slots": cache.slot_kv.sharding.memory_kind,
  }
  ok = kinds == {"host": store, "reported": store, "slots": "device"}
  rows, prev = [], None
  max_err = 0.0
  for step_t in range(prompt - 1, t):
    if step_t >= prompt:
      cache.append(k[:, step_t], v[:, step_t], c[:, step_t])
    cur = step_t // cfg.block_size
    want = {
      (bi, hi): {int(j) for j in gam[bi, step_t, hi] if j >= 0} - {cur}
      for bi in range(b)
      for hi in range(h)
    }
    t0 = time.perf_counter()
    stats = cache.update(gam[:, step_t])
    jax.block_until_ready(cache.slot_kv)
    t1 = time.perf_counter()
    o = jax.block_until_ready(cache.attend(q[:, step_t]))
    t2 = time.perf_counter()
    exp = sum(len(w - (prev or {}).get(key, set())) for key, w in want.items())
    prev = want
    err = float(jnp.max(jnp.abs(o - ref[:, step_t])))
    max_err = max(max_err, err)
    ok &= stats["transferred"] == exp and err < 1e-4
    rows.append(
      {
        "t": step_t,
        **stats,
        "update_ms": 1e3 * (t1 - t0),
        "attend_ms": 1e3 * (t2 - t1),
        "max_abs_err": err,
      }
    )
  full = jnp.concatenate([k, v, c[..., None]], axis=-1)
  host = jax.device_put(
    full, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  )
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
  jax.block_until_ready(jax.device_put(host, dev))
  t0 = time.perf_counter()
  jax.block_until_ready(jax.device_put(host, dev))
  full_ms = 1e3 * (time.perf_counter() - t0)
  warm = rows[2:] or rows
  return ok, {
    "store": store,
    "B": b,
    "T": t,
    "HQ": hq,
    "H": h,
    "D": d,
    "k": k_total,
    "k_q": kq,
    "memory_kinds": kinds,
    "max_abs_err": max_err,
    "steps": rows,
    "mean_hit_rate": float(np.mean([r["hit_rate"] for r in rows])),
    "mean_blocks_per_step": float(np.mean([r["transferred"] for r in rows])),
    "mean_update_ms": float(np.mean([r["update_ms"] for r in warm])),
    "mean_attend_ms": float(np.mean([r["attend_ms"] for r in warm])),
    "full_context_h2d_ms": full_ms,
    "full_context_bytes": int(full.size * 4),
  }


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="one small case")
  p.add_argument("--tiny", action="store_true", help="a CPU-sized smoke case")
  p.add_argument(
    "--stores",
    default="numpy,pinned_host",
    help="comma-separated host stores to run every case with",
  )
  args = p.parse_args()
  out_dir = os.environ.get("OUT", "nosa_offload_out")
  os.makedirs(out_dir, exist_ok=True)
  print(
    f"jax {jax.__version__} on {jax.devices()[0]} "
    f"(memories {[m.kind for m in jax.devices()[0].addressable_memories()]})"
  )
  cases = [(2, 2048, 8, 2, 64, 24, 16, 9), (2, 4096, 16, 2, 128, 32, 32, 17)]
  if args.quick:
    cases = cases[:1]
  if args.tiny:
    cases = [(1, 640, 4, 2, 32, 12, 8, 7)]
  results, all_ok = [], True
  stores = [x for x in args.stores.split(",") if x]
  head = (
    f"{'store':<11} {'B':>2} {'T':>6} {'H':>2} {'D':>4} {'k':>3} {'k_q':>4} {'ok':>3} "
    f"{'err':>8} "
    f"{'hit':>5} {'blk/step':>8} {'upd ms':>7} {'att ms':>7} {'full h2d ms':>11}"
  )
  print(head)
  runs = [(i, case, store) for i, case in enumerate(cases) for store in stores]
  for i, (b, t, hq, h, d, steps, kt, kq), store in runs:
    ok, r = run(b, t, hq, h, d, steps, kt, kq, seed=i, store=store)
    all_ok &= ok
    results.append({"ok": bool(ok), **r})
    print(
      f"{store:<11} {b:>2} {t:>6} {h:>2} {d:>4} {kt:>3} {kq:>4} {'yes' if ok else 'NO':>3} "
      f"{r['max_abs_err']:8.1e} {r['mean_hit_rate']:5.2f} {r['mean_blocks_per_step']:8.1f} "
      f"{r['mean_update_ms']:7.2f} {r['mean_attend_ms']:7.2f} {r['full_context_h2d_ms']:11.2f}"
    )
  path = os.path.join(out_dir, "nosa_offload.json")
  with open(path, "w") as f:
    json.dump(
      {
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "ok": bool(all_ok),
        "cases": results,
      },
      f,
      indent=1,
    )
  print(f"wrote {path}; {'all checks passed' if all_ok else 'FAILURES'}")
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main())
