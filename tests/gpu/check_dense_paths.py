"""GPU check of the memory-lean dense paths (full causal / sliding window) of the modules.

Run on the GPU machine from the repository root:
``PYTHONPATH=$PWD python3 tests/gpu/check_dense_paths.py [--quick]`` (``--smoke``: tiny shapes,
for a CPU run of the script itself).

1. Correctness: :func:`sparse_attention_jax.nn.dense_attention.causal_attention` (``auto``: cuDNN,
   for packed rows with a ``[B, 1, T, T]`` same-document mask; and ``blocked``)
   and NSA's window branch (``ops.sliding_window_attention(impl="auto")``, same cuDNN route)
   against the float32 masked reference, forward and gradients, bf16 inputs, fresh random inputs,
   for ``segment_ids`` None / all-equal / packed (4 documents) / padded (3 documents and trailing
   0 ids, the data pipeline's layout), full causal and window 512.
2. Memory and time at T = 8192 (340M head layout: HQ 32, H 2, D 64): compiled temp bytes of a
   jitted value_and_grad and the median time of one call, per path (``--quick``: full causal
   only, B = 1 and 2).

Writes ``$OUT/check_dense_paths.json`` (``$OUT`` default ``.``), prints a table, exits 1 if an
error bound fails.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.nn import dense_attention
from sparse_attention_jax.ops import cudnn, sliding_window_attention
from sparse_attention_jax.ops.masked import causal_mask, masked_attention

HQ, H, D = 32, 2, 64


def inputs(key, b, t, dtype):
  kq, kk, kv, kc = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, HQ, D), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, H, D), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, H, D), jnp.float32).astype(dtype)
  return q, k, v, jax.random.normal(kc, (b, t, HQ, D), jnp.float32)


def segments(kind, b, t):
  if kind == "none":
    return None
  ids = np.ones((b, t), np.int32)
  if kind in ("packed", "padded"):
    for c in (t // 5, t // 2 + 3, t - t // 10):
      ids[:, c:] += 1
  if kind == "padded":  # the data pipeline's layout: documents, then 0 padding
    ids[:, t - t // 16 :] = 0
  return jnp.asarray(ids)


def value_and_grads(fn, q, k, v, ct):
  def loss(q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * ct), o

  return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)


SMOKE = "--smoke" in sys.argv


def correctness(quick):
  rows, ok = [], True
  t = 160 if SMOKE else 1024 if quick else 2048
  for window in (None, 512):
    for seg_kind in ("none", "ones", "packed", "padded"):
      q, k, v, ct = inputs(jax.random.key(len(rows)), 2, t, jnp.bfloat16)
      seg = segments(seg_kind, 2, t)
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]

      def ref(q, k, v, seg=seg, window=window):
        return masked_attention(q, k, v, causal_mask(t, seg, window), D**-0.5)[0]

      g_ref, o_ref = value_and_grads(ref, *f32, ct)
      impls = ("auto", "blocked") + (("nsa_window",) if window else ())
      for impl in impls:
        fn = functools.partial(
          dense_attention.causal_attention, segment_ids=seg, window=window, impl=impl
        )
        if impl == "nsa_window":  # NSA's window branch: the ops-level entry point
          fn = functools.partial(
            sliding_window_attention, segment_ids=seg, window=window, impl="auto"
          )
        try:
          g, o = value_and_grads(fn, q, k, v, ct)
        except Exception as e:  # noqa: BLE001 -- a refused path is a failure: report it
          ok = False
          rows.append(
            {
              "check": "correctness",
              "window": window,
              "segments": seg_kind,
              "impl": impl,
              "error": f"{type(e).__name__}: {str(e)[:300]}",
              "ok": False,
            }
          )
          show(rows[-1])
          continue
        err_o = float(jnp.max(jnp.abs(o.astype(jnp.float32) - o_ref)))
        err_g = max(
          float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(g, g_ref)
        )
        good = err_o < 0.05 and err_g < 0.05 and all(bool(jnp.all(jnp.isfinite(x))) for x in g)
        ok &= good
        rows.append(
          {
            "check": "correctness",
            "window": window,
            "segments": seg_kind,
            "impl": impl,
            "cudnn_usable": cudnn.usable(q, k, v, window, D**-0.5),
            "max_err_o": err_o,
            "max_rel_err_grad": err_g,
            "ok": good,
          }
        )
        show(rows[-1])
  return rows, ok


SHOWN: list[dict] = []


def show(row):
  """Prints a row and rewrites the JSON with every row so far (a run cut short keeps them)."""
  print(
    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
    flush=True,
  )
  SHOWN.append(row)
  out = os.environ.get("OUT", ".")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "check_dense_paths.json"), "w") as f:
    json.dump(SHOWN, f, indent=1)


def timing(quick):
  rows = []
  t, batches = (512, (1,)) if SMOKE else (8192, (1, 2) if quick else (1, 8))
  windows = (None,) if quick else (None, 512)
  for b, window in [(b, w) for b in batches for w in windows]:
    for seg_kind in ("none", "ones", "packed"):
      for impl in ("auto", "blocked"):
        q, k, v, ct = inputs(jax.random.key(0), b, t, jnp.bfloat16)
        seg = segments(seg_kind, b, t)
        fn = functools.partial(dense_attention.causal_attention, window=window, impl=impl)

        # Everything is an argument: a captured array would be an HLO literal (ct at B 2, T 8k:
        # 128 MiB that XLA constant-folds for minutes).
        def loss(q, k, v, ct, seg, fn=fn):
          return jnp.sum(fn(q, k, v, segment_ids=seg).astype(jnp.float32) * ct)

        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
        row = {
          "check": "memory_time",
          "B": b,
          "T": t,
          "window": window,
          "segments": seg_kind,
          "impl": impl,
        }
        args = (q, k, v, ct, seg)
        try:
          compiled = step.lower(*args).compile()
          row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
          jax.block_until_ready(compiled(*args))
          times = []
          for _ in range(3 if quick else 5):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
          row["ms"] = 1e3 * statistics.median(times)
        except Exception as e:  # noqa: BLE001 -- report and go on
          row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        show(row)
  return rows


def main():
  quick = "--quick" in sys.argv
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  ok = correctness(quick)[1]
  timing(quick)  # every row is in the JSON as soon as shown
  print("OK" if ok else "FAILED")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
