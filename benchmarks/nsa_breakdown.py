"""Where the time of one NSA layer goes: each stage of ``nsa_attention`` timed on its own.

One layer of ``configs/nsa_340m.yaml`` by default (B = 1, T = 8192, HQ = 32, H = 2, D = 64,
bf16, paper preset: phi-MLP l = 32, d = 16, l' = 64, n = 16 incl. 1 + 2 forced, w = 512), fresh
random inputs (never zeros), optionally packed into documents (``--docs N``: N equal documents,
the training data's layout). Stages, each a jitted function of its inputs:

* ``compress``: phi-MLP compression of K and V (``ops.compress``), fwd and fwd+bwd;
* ``compressed``: compressed attention with the probabilities the selection reads
  (``ops.compressed_attention``), fwd and fwd+bwd;
* ``select``: block importance (eq. 9-10 pooling) + top-n (``ops.block_importance``,
  ``ops.select_blocks``), fwd only (no gradient flows through the selection);
* ``selected``: selected-block attention (``impl="auto"``: the Mosaic GPU kernels on an H100/H200),
  on the selection of ``select``;
* ``window``: the window branch (``ops.sliding_window_attention``): ``auto`` (cuDNN on GPU) and
  ``blocked`` (the plain-JAX op);
* ``nsa``: the whole op (``ops.nsa_attention``, gated, ``impl="auto"``);
* ``dense``: full causal attention of the same q/k/v through the modules' dense path (cuDNN on
  GPU) for scale.

fwd+bwd times ``jax.grad`` of ``sum(out * w)`` (random ``w``) w.r.t. every float input. Each row
reports the median ms of ``--reps`` timed calls after a warm-up call, and the XLA temporary
memory of the compiled call. Prints a table; writes ``nsa_breakdown.json`` under ``--out``
(default ``$OUT`` or ``.``).

Usage (GPU): ``PYTHONPATH=$PWD python3 benchmarks/nsa_breakdown.py [--seq-len 8192] [--docs 4]``;
``--tiny`` for a CPU smoke run (T = 256, small heads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import (
  CompressorParams,
  block_importance,
  compress,
  compressed_attention,
  init_mlp_compressor,
  nsa_attention,
  select_blocks,
  selected_attention,
  sliding_window_attention,
)
from sparse_attention_jax.ops.causal import causal_attention


def _bench(fn, args, reps: int) -> tuple[float, float]:
  """(median ms over ``reps`` calls after a warm-up, XLA temp MiB) of ``jax.jit(fn)(*args)``."""
  compiled = jax.jit(fn).lower(*args).compile()
  temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan")) / 2**20
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), temp


def _grad_of(fn, argnums):
  """``grad`` of ``sum(fn(*args) * w)`` (``w`` the last argument) w.r.t. ``argnums``."""

  def loss(*args):
    *xs, w = args
    return jnp.sum(fn(*xs).astype(jnp.float32) * w)

  return jax.grad(loss, argnums)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--hq", type=int, default=32)
  ap.add_argument("--h", type=int, default=2)
  ap.add_argument("--d", type=int, default=64)
  ap.add_argument("--docs", type=int, default=1, help="equal documents per row (1 = none)")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke shapes")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args(argv)
  if args.tiny:
    args.seq_len, args.hq, args.h, args.d, args.reps = 256, 4, 2, 16, 2
    cfg = NSAConfig.paper(cmp_window=16, cmp_stride=8, block_size=16, num_selected=4, window=32)
  else:
    cfg = NSAConfig.paper()
  b, t, hq, h, d = args.batch, args.seq_len, args.hq, args.h, args.d
  if args.docs < 1 or t % args.docs:
    ap.error(f"--docs: expected a divisor of --seq-len {t}, got {args.docs}")
  cfg = cfg.for_length(t)
  dtype = jnp.bfloat16
  keys = iter(jax.random.split(jax.random.key(0), 16))

  def rnd(*shape, dt=dtype):
    return jax.random.normal(next(keys), shape, jnp.float32).astype(dt)

  q, k, v = rnd(b, t, hq, d), rnd(b, t, h, d), rnd(b, t, h, d)
  k2, v2 = rnd(b, t, h, d), rnd(b, t, h, d)  # the independent selected / window K/V
  gates = jax.nn.sigmoid(rnd(b, t, hq, 3, dt=jnp.float32))
  w_out = rnd(b, t, hq, d, dt=jnp.float32)
  seg = None
  if args.docs > 1:
    seg = jnp.asarray(
      np.repeat(np.arange(args.docs, dtype=np.int32), t // args.docs)[None].repeat(b, 0)
    )
  params = CompressorParams(
    *(
      init_mlp_compressor(next(keys), num_kv_heads=h, window=cfg.cmp_window, in_dim=d)
      for _ in range(2)
    )
  )
  scale = cfg.scale(d)
  k_cmp = compress(k, cfg, params.k, segment_ids=seg, name="k")
  v_cmp = compress(v, cfg, params.v, segment_ids=seg, name="v")
  cmp = jax.jit(lambda q, kc, vc, sg: compressed_attention(q, kc, vc, cfg, segment_ids=sg))(
    q, k_cmp, v_cmp, seg
  )
  select = lambda probs, sg: select_blocks(
    block_importance(probs, cfg, num_kv_heads=h, seq_len=t, segment_ids=sg), cfg, segment_ids=sg
  )
  blocks = jax.jit(select)(cmp.probs, seg)

  # Every array is an argument of the timed function, the segment ids (last) and the selected
  # blocks included: a captured array would be an HLO constant, and XLA could fold the masks and
  # the kernels' index preparation that depend only on it into the executable.
  stages = {
    "compress": (
      lambda k, v, p, sg: jnp.concatenate(
        [
          compress(k, cfg, p.k, segment_ids=sg, name="k"),
          compress(v, cfg, p.v, segment_ids=sg, name="v"),
        ],
        axis=-1,
      ),
      (k, v, params, seg),
      (0, 1, 2),
      jnp.concatenate([k_cmp, v_cmp], -1),
    ),
    "compressed": (
      lambda q, kc, vc, sg: compressed_attention(q, kc, vc, cfg, segment_ids=sg).out,
      (q, k_cmp, v_cmp, seg),
      (0, 1, 2),
      None,
    ),
    "select": (select, (cmp.probs, seg), None, None),
    "selected": (
      lambda q, k, v, bl, sg: selected_attention(
        q, k, v, bl, block_size=cfg.block_size, segment_ids=sg, softmax_scale=scale
      ),
      (q, k, v, blocks, seg),
      (0, 1, 2),
      None,
    ),
    "window auto": (
      lambda q, k, v, sg: sliding_window_attention(
        q, k, v, window=cfg.window, segment_ids=sg, softmax_scale=scale
      ),
      (q, k2, v2, seg),
      (0, 1, 2),
      None,
    ),
    "window blocked": (
      lambda q, k, v, sg: sliding_window_attention(
        q, k, v, window=cfg.window, segment_ids=sg, softmax_scale=scale, impl="blocked"
      ),
      (q, k2, v2, seg),
      (0, 1, 2),
      None,
    ),
    "nsa": (
      lambda q, k, v, g, p, k2, v2, sg: nsa_attention(
        q,
        k,
        v,
        g,
        config=cfg,
        segment_ids=sg,
        compress_params=p,
        k_slc=k2,
        v_slc=v2,
        k_win=k2,
        v_win=v2,
      ),
      (q, k, v, gates, params, k2, v2, seg),
      (0, 1, 2, 3, 4, 5, 6),
      None,
    ),
    "dense (cuDNN on GPU)": (
      lambda q, k, v, sg: causal_attention(q, k, v, segment_ids=sg),
      (q, k, v, seg),
      (0, 1, 2),
      None,
    ),
  }
  dev = jax.devices()[0]
  meta = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "B": b,
    "T": t,
    "HQ": hq,
    "H": h,
    "D": d,
    "docs": args.docs,
    "dtype": "bfloat16",
    "config": {
      "cmp_window": cfg.cmp_window,
      "cmp_stride": cfg.cmp_stride,
      "block_size": cfg.block_size,
      "num_selected": cfg.num_selected,
      "window": cfg.window,
      "compression": cfg.compression,
    },
  }
  print(
    f"device {meta['device']}, jax {jax.__version__}, B {b} T {t} HQ {hq} H {h} D {d}, "
    f"{args.docs} document(s) per row",
    flush=True,
  )
  print(f"{'stage':<22} {'fwd ms':>9} {'fwd MiB':>9} {'f+b ms':>9} {'f+b MiB':>9}", flush=True)
  rows = []
  os.makedirs(args.out, exist_ok=True)
  for name, (fn, xs, argnums, like) in stages.items():
    row = {"stage": name}
    try:
      row["fwd_ms"], row["fwd_temp_mib"] = _bench(fn, xs, args.reps)
      if argnums is not None:
        w = w_out if like is None else rnd(*like.shape, dt=jnp.float32)
        row["fb_ms"], row["fb_temp_mib"] = _bench(_grad_of(fn, argnums), (*xs, w), args.reps)
    except Exception as e:  # noqa: BLE001 -- record the failure and time the other stages
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    with open(os.path.join(args.out, "nsa_breakdown.json"), "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fmt = lambda key, spec, row=row: format(row[key], spec) if key in row else f"{'-':>9}"
    print(
      f"{name:<22} {fmt('fwd_ms', '9.3f')} {fmt('fwd_temp_mib', '9.0f')} "
      f"{fmt('fb_ms', '9.3f')} {fmt('fb_temp_mib', '9.0f')}"
      + (f"  {row['error']}" if "error" in row else ""),
      flush=True,
    )
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  raise SystemExit(main())
