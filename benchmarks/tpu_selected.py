"""Benchmark: Pallas TPU selected-block attention vs splash attention (dense causal) on a TPU.

NOT YET RUN ON A TPU: written and smoke-tested on CPU (``--interpret``: the TPU interpreter, tiny
shapes, timings meaningless). The first run on a TPU is also the kernels' first compilation by
libtpu (``docs/tpu.md``, "To verify and tune on hardware"): run ``--check`` first.

Standard NSA shape (B=1, HQ=64, H=4, D=128, bf16, block 64, n=16, current block forced) over
``--seqs``. Per T and per kernel variant (``--tile-rows`` x ``--slots``) it prints, side by side
with splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``, MQA kernel per KV
head under ``jax.vmap``, causal mask, ``--splash-block`` blocks), the median ms of synchronised
calls of the forward and (``--bwd``) of forward+backward (``jax.grad`` of ``sum(o * w)``), and
effective TFLOP/s with ``2*B*HQ*T*(n*l')*(Dk+Dv)`` FLOPs for the sparse forward and
``B*HQ*T^2*(Dk+Dv)`` for dense causal (x3.5 for forward+backward). The sparse kernels also report
the mean union size per tile over ``n`` (their masked work).

Selections (``--kinds``): ``exact-random`` (independent picks per token: the worst union) and
``exact-corr`` (tokens of each 64-token block share their random picks besides the forced
current block: a proxy for real, strongly correlated selections).

``--check``: O and dQ/dK/dV of the kernels against the plain-JAX gathered op in float32 at
``--check-seq`` tokens (relative L2 errors, bf16 bounds 1e-2 / 2e-2); exits 1 on a failure.

Usage: ``PYTHONPATH=$PWD python3 benchmarks/tpu_selected.py --check --bwd --seqs 8192,32768,65536
[--tile-rows 128,256] [--slots 2,4,8] [--out $OUT/tpu_selected.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import selected_attention_tpu as st
from pallas_kernels import selected_attention_tpu_prep as prep
from sparse_attention_jax.ops.selected import gathered_selected_attention

KINDS = ("exact-corr", "exact-random")


def _ints(text: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(",") if x]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
  if not vals or min(vals) < 1:
    raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
  return vals


def _kinds(text: str) -> list[str]:
  vals = [x for x in text.split(",") if x]
  bad = [x for x in vals if x not in KINDS]
  if not vals or bad:
    raise argparse.ArgumentTypeError(f"expected kinds from {KINDS}, got {text!r}")
  return vals


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seqs", type=_ints, default=[8192, 32768, 65536])
  p.add_argument("--hq", type=int, default=64)
  p.add_argument("--h", type=int, default=4)
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--block", type=int, default=64)
  p.add_argument("--n", type=int, default=16)
  p.add_argument("--kinds", type=_kinds, default=list(KINDS))
  p.add_argument("--tile-rows", type=_ints, default=[128, 256])
  p.add_argument("--slots", type=_ints, default=[4])
  p.add_argument("--splash-block", type=int, default=512)
  p.add_argument("--bwd", action="store_true", help="also time forward+backward")
  p.add_argument("--check", action="store_true", help="numerics vs the gathered op first")
  p.add_argument("--check-seq", type=int, default=2048)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--interpret", action="store_true", help="CPU smoke run in the TPU interpreter")
  p.add_argument("--out", default=None, help="JSON file for the rows")
  args = p.parse_args(argv)
  if args.h < 1 or args.hq % args.h:
    p.error(f"--hq: expected a multiple of --h={args.h}, got {args.hq}")
  if any(tr % 128 for tr in args.tile_rows):
    p.error(f"--tile-rows: expected multiples of 128, got {args.tile_rows}")
  if min(args.slots) < 2:
    p.error(f"--slots: expected ints >= 2, got {args.slots}")
  return args


def selection(key, t, h, n, block, kind):
  """``[1, T, H, n]`` int32: slot 0 the current block, the rest random earlier blocks (``-1``
  where there is none)."""
  cur = jnp.arange(t, dtype=jnp.int32) // block
  if kind == "exact-corr":
    u = jax.random.uniform(key, (1, t // block + 1, h, n))[:, cur]
  else:
    u = jax.random.uniform(key, (1, t, h, n))
  ids = jnp.floor(u * cur[None, :, None, None]).astype(jnp.int32)
  ids = jnp.where(cur[None, :, None, None] == 0, -1, ids)
  return ids.at[..., 0].set(jnp.broadcast_to(cur[None, :, None], (1, t, h)))


def union_ratio(bi, *, block, tile_rows, group):
  """Mean union length per tile over ``n`` (the sparse kernels' masked work factor)."""
  t = bi.shape[1]
  r, _ = prep.tile_geometry(t, group, tile_rows)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), bi.shape[:2])
  _, _, counts = prep.tile_lists(bi, pos, r=r, block_size=block, num_blocks=-(-t // block))
  return float(jnp.mean(counts)) / bi.shape[-1]


def splash_causal(t, hq, h, block, interpret):
  """``(q, k, v) -> o`` dense causal splash attention (GQA: MQA kernel vmapped over KV heads)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  g = hq // h
  bs = min(block, t)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(g)])
  sizes = sa.BlockSizes(
    block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
    block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs,
  )  # fmt: skip
  kernel = sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

  def attend(q, k, v):  # [B, T, HQ, D], [B, T, H, D]
    b, _, _, d = q.shape
    qh = (q * d**-0.5).reshape(b, t, h, g, d).transpose(0, 2, 3, 1, 4)  # [B, H, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, T, D]
    o = jax.vmap(jax.vmap(kernel))(qh, kh, vh)  # [B, H, G, T, D]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)

  return attend


def timed(fn, args, reps):
  """Median ms of synchronised calls after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def grad_of(attn):
  def loss(q, k, v, w, *extra):
    return jnp.sum(attn(q, k, v, *extra).astype(jnp.float32) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(key, b, t, hq, h, d, dtype):
  ks = jax.random.split(key, 4)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32)
  return q, k, v, w


def check(args, config) -> list[str]:
  """Failures of the kernels against the float32 gathered op at ``--check-seq`` tokens."""
  t = args.check_seq
  q, k, v, w = inputs(jax.random.PRNGKey(0), 1, t, args.hq, args.h, args.d, jnp.bfloat16)
  bi = selection(jax.random.PRNGKey(1), t, args.h, args.n, args.block, "exact-random")
  kern = lambda q, k, v, bi: st.selected_attention_tpu(
    q, k, v, bi, block_size=args.block, config=config
  )
  ref = lambda q, k, v, bi: gathered_selected_attention(
    q, k, v, bi, block_size=args.block, softmax_scale=args.d**-0.5
  )
  f32 = lambda x: x.astype(jnp.float32)
  rel = lambda a, r: float(jnp.linalg.norm(f32(a) - r) / jnp.linalg.norm(r))
  fails = []
  err = rel(jax.jit(kern)(q, k, v, bi), jax.jit(ref)(f32(q), f32(k), f32(v), bi))
  print(f"check O: rel err {err:.2e}")
  if not err < 1e-2:
    fails.append(f"O rel err {err:.2e} >= 1e-2")
  got = grad_of(kern)(q, k, v, w, bi)
  want = grad_of(ref)(f32(q), f32(k), f32(v), w, bi)
  for name, a, r in zip(("dQ", "dK", "dV"), got, want):
    err = rel(a, r)
    print(f"check {name}: rel err {err:.2e}")
    if not err < 2e-2:
      fails.append(f"{name} rel err {err:.2e} >= 2e-2")
  return fails


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  interp = bool(args.interpret)
  ip = None
  if interp:
    from jax.experimental.pallas import tpu as pltpu

    ip = pltpu.InterpretParams()
  elif jax.default_backend() != "tpu":
    print(f"needs a TPU (default backend {jax.default_backend()!r}); --interpret for CPU")
    return 2
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  if args.check:
    fails = check(args, st.TpuConfig(interpret=ip))
    if fails:
      print("CHECK FAILED: " + "; ".join(fails))
      return 1
  b, hq, h, d, bs, n = 1, args.hq, args.h, args.d, args.block, args.n
  rows = []
  print(f"{'T':>6} {'kernel':>22} {'kind':>12} {'union/n':>7} {'fwd ms':>8} {'TF/s':>6}"
        + (f" {'f+b ms':>8} {'TF/s':>6}" if args.bwd else ""))  # fmt: skip
  for t in args.seqs:
    q, k, v, w = inputs(jax.random.PRNGKey(t), b, t, hq, h, d, jnp.bfloat16)
    dense_flops = b * hq * t * t * 2 * d
    sparse_flops = 2 * b * hq * t * n * bs * 2 * d
    runs = [("splash-causal", None, splash_causal(t, hq, h, args.splash_block, interp), None)]
    for kind in args.kinds:
      bi = selection(jax.random.PRNGKey(t + 1), t, h, n, bs, kind)
      for tr in args.tile_rows:
        for slots in args.slots:
          cfg = st.TpuConfig(tile_rows=tr, slots=slots, interpret=ip)
          fn = lambda q, k, v, bi, cfg=cfg: st.selected_attention_tpu(
            q, k, v, bi, block_size=bs, config=cfg
          )
          ratio = union_ratio(bi, block=bs, tile_rows=tr, group=hq // h)
          runs.append((f"tpu R={tr} slots={slots}", kind, fn, (bi, ratio)))
    for name, kind, fn, extra in runs:
      more = () if extra is None else (extra[0],)
      flops = dense_flops if extra is None else sparse_flops
      row = {
        "T": t,
        "kernel": name,
        "kind": kind,
        "union_over_n": None if extra is None else extra[1],
      }
      row["fwd_ms"] = timed(jax.jit(fn), (q, k, v, *more), args.reps)
      row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
      if args.bwd:
        row["fwd_bwd_ms"] = timed(grad_of(fn), (q, k, v, w, *more), args.reps)
        row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
      rows.append(row)
      ratio = "" if row["union_over_n"] is None else f"{row['union_over_n']:.2f}"
      line = f"{t:>6} {name:>22} {kind or '-':>12} {ratio:>7} {row['fwd_ms']:>8.3f} {row['fwd_tflops']:>6.1f}"
      if args.bwd:
        line += f" {row['fwd_bwd_ms']:>8.3f} {row['fwd_bwd_tflops']:>6.1f}"
      print(line)
  if args.out:
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "argv": argv}
    with open(args.out, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
