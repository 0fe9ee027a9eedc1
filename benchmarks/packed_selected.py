"""Benchmark: the Mosaic GPU selected-attention kernels on packed rows vs unpacked rows.

Standard NSA shape (B = 1, T = 8192, HQ = 64, H = 4, D = 128, bf16, block 64, n = 16), one run:

* ``unpacked``: no ``segment_ids`` (the kernels' plain path);
* ``docs=4`` / ``docs=16``: rows of 4 / 16 documents of random lengths, DOCUMENT-RELATIVE block
  ids; the kernels read K/V in the document-aligned padded layout of
  :mod:`pallas_kernels.packed_layout`, of ``NB + doc_blocks`` blocks (``--doc-blocks``:
  ``default`` = ``NB`` extra blocks, or a number, e.g. 16, to measure what the extra capacity
  costs);
* ``cudnn``: dense causal attention of the same q/k/v (``jax.nn.dot_product_attention(...,
  implementation="cudnn")``), for scale.

Selections (per token, relative to its document, like NSA's): block 0 of the document and the
query's own and previous block forced, the others random earlier blocks of the document;
``--kinds random`` draws them independently per token (a tile's union is the largest),
``corr`` shares the random picks between the tokens of each 64-token row block (a proxy for the
correlation of real selections between neighbours).

Per row: ``fwd_ms`` and ``fb_ms`` (``jax.grad`` of ``sum(o * w)`` w.r.t. q, k, v), the median of
``--reps`` synchronised calls after warm-up, every array an argument of the jitted function;
``prep_ms``: the XLA side of packed documents alone (padded layout, K/V gathers, padded ids);
``vs_unpacked``: the ratio to the unpacked row of the same selection kind (target <= 1.10).
Prints a table and writes JSON with ``--out``.

On a machine without a Hopper GPU only the XLA-side preparation is timed (the kernels need
sm90), which is what the CPU smoke test runs (``--tiny``).

Usage: ``PYTHONPATH=$PWD python3 benchmarks/packed_selected.py --out packed.json
[--docs 0,4,16] [--kinds random,corr] [--doc-blocks default,16] [--reps 20]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import packed_layout as packed
from pallas_kernels import selected_attention_mgpu as mg
from pallas_kernels.selected_attention_common import document_starts

KINDS = ("random", "corr")


def bench(fn, args, reps: int, warmup: int = 2) -> float:
  """Median ms of ``reps`` synchronised calls of ``fn(*args)`` after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def segments(rng, b: int, t: int, num_docs: int):
  """``[B, T]`` int32 ids of ``num_docs`` random-length documents per row (``0``: one)."""
  rows = []
  for _ in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=max(num_docs - 1, 0), replace=False))
    ids = np.zeros(t, np.int32)
    for c in cuts:
      ids[c:] += 1
    rows.append(ids)
  return jnp.asarray(np.stack(rows))


def selection(key, seg, h: int, n: int, bs: int, kind: str):
  """``[B, T, H, n]`` int32 document-relative ids: slot 0 block 0 of the document, slot 1 the
  query's own block, slot 2 the previous one (clipped at 0, a duplicate then), the rest random
  blocks in ``[0, own]`` (``kind="corr"``: the same draws for the tokens of a row block)."""
  b, t = seg.shape
  cur = (jnp.arange(t, dtype=jnp.int32)[None] - document_starts(seg, b, t)) // bs  # [B, T]
  cur = cur[..., None, None]
  if kind == "corr":
    u = jax.random.uniform(key, (b, t // bs + 1, h, n))[:, jnp.arange(t) // bs]
  else:
    u = jax.random.uniform(key, (b, t, h, n))
  ids = jnp.minimum(jnp.floor(u * (cur + 1)), cur).astype(jnp.int32)
  ids = ids.at[..., 0].set(0)
  ids = ids.at[..., 1].set(cur[..., 0])
  return ids.at[..., 2].set(jnp.maximum(cur[..., 0] - 1, 0))


def _grad(attn):
  def loss(q, k, v, w, *extra):
    return jnp.sum(attn(q, k, v, *extra).astype(jnp.float32) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def hopper() -> bool:
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return cc is not None and str(cc).startswith("9")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--hq", type=int, default=64)
  ap.add_argument("--h", type=int, default=4)
  ap.add_argument("--d", type=int, default=128)
  ap.add_argument("--block", type=int, default=64, help="KV block size (32, 64 or 128)")
  ap.add_argument("--n", type=int, default=16, help="selected blocks per token")
  ap.add_argument("--docs", default="0,4,16", help="documents per row (0: unpacked)")
  ap.add_argument("--kinds", default="random,corr", help=f"selection kinds, of {KINDS}")
  ap.add_argument(
    "--doc-blocks", default="default,16", help="padded-layout capacities: 'default' or ints"
  )
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--no-bwd", action="store_true", help="forward only")
  ap.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN dense rows")
  ap.add_argument("--tiny", action="store_true", help="CPU smoke shapes (T 512, HQ 8, H 2, D 64)")
  ap.add_argument("--out", default=None, help="JSON output path")
  args = ap.parse_args(argv)
  if args.tiny:
    args.seq_len, args.hq, args.h, args.d, args.n, args.reps = 512, 8, 2, 64, 4, 2
  try:
    args.docs = [int(x) for x in args.docs.split(",")]
    args.kinds = args.kinds.split(",")
    args.doc_blocks = [None if x == "default" else int(x) for x in args.doc_blocks.split(",")]
  except ValueError as e:
    ap.error(f"--docs / --doc-blocks: expected comma-separated ints ('default' allowed): {e}")
  if any(d < 0 or d > args.seq_len for d in args.docs):
    ap.error(f"--docs: expected counts in [0, {args.seq_len}], got {args.docs}")
  if any(k not in KINDS for k in args.kinds):
    ap.error(f"--kinds: expected a list of {KINDS}, got {args.kinds}")
  if any(c is not None and c < 0 for c in args.doc_blocks):
    ap.error(f"--doc-blocks: expected 'default' or ints >= 0, got {args.doc_blocks}")
  if args.hq % args.h:
    ap.error(f"--hq: expected a multiple of --h {args.h}, got {args.hq}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  b, t, hq, h, d, bs, n = args.batch, args.seq_len, args.hq, args.h, args.d, args.block, args.n
  gpu = hopper()
  dev = jax.devices()[0]
  meta = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "B": b,
    "T": t,
    "HQ": hq,
    "H": h,
    "D": d,
    "block": bs,
    "n": n,
    "dtype": "bfloat16",
    "kernels": gpu,
    "NB": -(-t // bs),
  }
  print(meta, flush=True)
  keys = iter(jax.random.split(jax.random.key(0), 8))
  rnd = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32).astype(jnp.bfloat16)
  q, k, v = rnd(b, t, hq, d), rnd(b, t, h, d), rnd(b, t, h, d)
  w = jax.random.normal(next(keys), (b, t, hq, d), jnp.float32)
  rng = np.random.default_rng(0)
  sel_key = next(keys)
  scale = d**-0.5
  rows = []
  base = {}
  for kind in args.kinds:
    for num_docs in args.docs:
      seg = segments(rng, b, t, max(num_docs, 1))
      bi = selection(sel_key, seg, h, n, bs, kind)
      caps = [None] if num_docs == 0 else args.doc_blocks
      for cap in caps:
        tuning = mg.TuningConfig(block_size=bs, doc_blocks=cap)
        row = {"kind": kind, "docs": num_docs, "impl": "mgpu"}
        if num_docs:
          nbp = mg.packed_num_blocks(t, tuning)
          need = int(jnp.max(packed.packed_blocks_needed(seg, bs)))
          row.update(doc_blocks=nbp - meta["NB"], nb_pad=nbp, needed_blocks=need)
          if need > nbp:
            row["error"] = f"documents need {need} blocks > capacity {nbp}"
            rows.append(row)
            print(row, flush=True)
            continue
          cfg = mg.kernel_config(tuning, softmax_scale=scale, group_size=hq // h, has_docs=True)
          prep = jax.jit(
            lambda k, v, bi, seg, cfg=cfg, tuning=tuning: mg.packed_operands(
              k, v, bi, seg, cfg, tuning
            )[:4]
          )
          row["prep_ms"] = bench(prep, (k, v, bi, seg), args.reps)
        if gpu:
          if num_docs:
            attn = lambda q, k, v, bi, seg, tuning=tuning: mg.selected_attention_mgpu(
              q, k, v, bi, segment_ids=seg, softmax_scale=scale, tuning=tuning
            )
            extra = (bi, seg)
          else:
            attn = lambda q, k, v, bi, tuning=tuning: mg.selected_attention_mgpu(
              q, k, v, bi, softmax_scale=scale, tuning=tuning
            )
            extra = (bi,)
          try:
            row["fwd_ms"] = bench(jax.jit(attn), (q, k, v, *extra), args.reps)
            if not args.no_bwd:
              row["fb_ms"] = bench(_grad(attn), (q, k, v, w, *extra), args.reps)
          except Exception as e:  # noqa: BLE001  (report it, time the other rows)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
          if num_docs == 0:
            base[kind] = row
          elif kind in base and "error" not in row:
            for m in ("fwd_ms", "fb_ms"):
              if m in row and m in base[kind]:
                row[f"{m[:-3]}_vs_unpacked"] = row[m] / base[kind][m]
        rows.append(row)
        print(row, flush=True)
  if gpu and not args.no_cudnn:

    def dense(q, k, v):
      return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn", scale=scale
      )

    row = {"kind": "-", "docs": 0, "impl": "cudnn-dense-causal"}
    try:
      row["fwd_ms"] = bench(jax.jit(dense), (q, k, v), args.reps)
      if not args.no_bwd:
        row["fb_ms"] = bench(_grad(dense), (q, k, v, w), args.reps)
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    print(row, flush=True)
  print()
  print(f"T={t} B={b} HQ={hq} H={h} D={d} block={bs} n={n}; ms = median of synchronised calls")
  hdr = f"{'kind':7} {'docs':>4} {'impl':20} {'NBp':>5} {'need':>5} {'prep ms':>8} "
  print(hdr + f"{'fwd ms':>8} {'x unp':>6} {'f+b ms':>8} {'x unp':>6}")
  nan = float("nan")
  for r in rows:
    if "error" in r:
      print(f"{r['kind']:7} {r['docs']:>4} {r['impl']:20} ERROR {r['error'][:80]}")
      continue
    print(
      f"{r['kind']:7} {r['docs']:>4} {r['impl']:20} {r.get('nb_pad', meta['NB']):>5} "
      f"{r.get('needed_blocks', ''):>5} {r.get('prep_ms', nan):8.3f} {r.get('fwd_ms', nan):8.3f} "
      f"{r.get('fwd_vs_unpacked', nan):6.3f} {r.get('fb_ms', nan):8.3f} "
      f"{r.get('fb_vs_unpacked', nan):6.3f}"
    )
  if not gpu:
    print("(no Hopper GPU: only the XLA-side preparation was timed)")
  result = {"meta": meta, "rows": rows}
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=1)
  return result


if __name__ == "__main__":
  main()
