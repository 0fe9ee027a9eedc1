"""GPU check of NOSA's training path: biased selected attention on the selected-attention kernels.

Run from the repository root on an H100/H200: ``PYTHONPATH=$PWD python3
tests/gpu/check_nosa_train.py`` (``--smoke``: tiny shapes, for a CPU run of the script itself).
Writes ``$OUT/nosa_train.json`` (``$OUT`` default ``.``), prints a table, exits 1 on a failure.

1. Correctness (bf16, B = 1, T = 2048, HQ = 32, H = 2, D = 64: the nosa_1b head layout; the
   selection of ``nosa_attention`` on the same inputs, 24 of 32 blocks with k_q = 20, packed into
   2 documents): the output and
   the gradients w.r.t. q, k, v and the eviction scores c of
   ``biased_selected_attention(impl="auto")`` (the Mosaic GPU kernels on keys with bias columns)
   against ``impl="reference"`` (dense masked form) on float32 copies of the same inputs;
   relative L2 error <= 2e-2 each, finite, computed twice (equal: no race).
2. Time and XLA temp memory of one fwd+bwd at T = 8192 for ``auto`` and the whole
   ``nosa_attention`` op (selection included), and ``reference`` where it fits (nosa_1b's budgets
   k = 64, k_q = 33).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention
from sparse_attention_jax.ops.nosa.selection import for_length

SMOKE = "--smoke" in sys.argv
HQ, H, D = (4, 2, 16) if SMOKE else (32, 2, 64)
# (config, k_q): correctness selects 24 of the 32 blocks of T = 2048 (nosa_1b's k = 64 would take
# them all); timing at T = 8192 uses nosa_1b's budgets (k = 64, k_q = 33).
SMOKE_CFG = NSAConfig.infllm_v2(
  cmp_window=16, cmp_stride=8, block_size=16, num_selected=6, local_window=32
)
CHECK = (SMOKE_CFG, 4) if SMOKE else (NSAConfig.infllm_v2(num_selected=24), 20)
TIMING = (SMOKE_CFG, 4) if SMOKE else (NSAConfig.infllm_v2(num_selected=64), 33)


def inputs(key, t, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (1, t, HQ, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (1, t, H, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (1, t, H, D), jnp.float32).astype(dtype)
  c = 2.0 * jax.random.normal(ks[3], (1, t, H), jnp.float32)
  ct = jax.random.normal(ks[4], (1, t, HQ, D), jnp.float32)
  seg = jnp.asarray(np.repeat(np.arange(2, dtype=np.int32), t // 2)[None])
  return q, k, v, c, ct, seg


def grads(impl, bs):
  """``(q, k, v, c, idx, seg, ct) -> ((dq, dk, dv, dc), o)``, jitted; every array is an argument
  (a captured one would be an HLO constant that XLA may fold)."""

  def loss(q, k, v, c, idx, seg, ct):
    o = biased_selected_attention(q, k, v, c, idx, block_size=bs, segment_ids=seg, impl=impl)
    return jnp.sum(o.astype(jnp.float32) * ct), o

  return jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))


def rel(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def correctness():
  t = 256 if SMOKE else 2048
  cfg, kq = for_length(*CHECK, t)
  q, k, v, c, ct, seg = inputs(jax.random.key(0), t)
  _, aux = jax.jit(
    lambda q, k, v, c, seg: nosa_attention(
      q, k, v, c, config=cfg, num_query_selected=kq, segment_ids=seg, return_aux=True
    )
  )(q, k, v, c, seg)
  idx = aux.block_indices
  g1, o1 = grads("auto", cfg.block_size)(q, k, v, c, idx, seg, ct)
  g2, o2 = grads("auto", cfg.block_size)(q, k, v, c, idx, seg, ct)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  gr, orf = grads("reference", cfg.block_size)(*f32, c, idx, seg, ct)
  row = {
    "check": "correctness",
    "T": t,
    "o_rel": rel(o1, orf),
    **{f"d{n}_rel": rel(a, b) for n, a, b in zip("qkvc", g1, gr)},
    "repeat_equal": all(bool(jnp.array_equal(a, b)) for a, b in zip((o1, *g1), (o2, *g2))),
    "finite": all(bool(jnp.all(jnp.isfinite(x))) for x in (o1, *g1)),
  }
  row["ok"] = (
    row["finite"]
    and row["repeat_equal"]
    and all(row[key] <= 2e-2 for key in row if key.endswith("_rel"))
  )
  return row


def timing():
  rows = []
  t = 512 if SMOKE else 8192
  cfg, kq = for_length(*TIMING, t)
  q, k, v, c, ct, seg = inputs(jax.random.key(1), t)
  idx = jax.jit(
    lambda q, k, v, c, seg: (
      nosa_attention(
        q, k, v, c, config=cfg, num_query_selected=kq, segment_ids=seg, return_aux=True
      )[1].block_indices
    )
  )(q, k, v, c, seg)

  def whole(q, k, v, c, idx, seg, ct):
    del idx  # nosa_attention selects by itself
    o = nosa_attention(q, k, v, c, config=cfg, num_query_selected=kq, segment_ids=seg)
    return jnp.sum(o.astype(jnp.float32) * ct)

  cases = {
    "biased auto": grads("auto", cfg.block_size),
    "biased reference": grads("reference", cfg.block_size),
    "nosa_attention auto": jax.jit(jax.grad(whole, (0, 1, 2, 3))),
  }
  args = (q, k, v, c, idx, seg, ct)
  for name, fn in cases.items():
    row = {"check": "time", "T": t, "case": name}
    try:
      compiled = fn.lower(*args).compile()
      row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
      jax.block_until_ready(compiled(*args))
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
      row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
    except Exception as e:  # noqa: BLE001 -- e.g. the reference out of memory: record it
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
  return rows


def main():
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  rows = [correctness()]
  print(rows[0], flush=True)
  for row in timing():
    rows.append(row)
    print(row, flush=True)
  out = os.environ.get("OUT", ".")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "nosa_train.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("OK" if rows[0]["ok"] else "FAILED", flush=True)
  sys.exit(0 if rows[0]["ok"] else 1)


if __name__ == "__main__":
  main()
