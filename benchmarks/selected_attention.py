"""Benchmark: Mosaic GPU selected-block attention forward vs cuDNN dense causal forward.

Standard NSA shape (B=1, HQ=64, H=4, D=128, bf16, block 64, n=16 with the current block forced),
T in {8192, 16384, 32768, 65536}. Two timings per measurement, after warm-up: ``ms`` is the median
of timed repeats with ``jax.block_until_ready`` around each call (host clock: includes the
dispatch and synchronisation latency of one call, 0.25-0.35 ms on the H200 host for cuDNN and
these kernels alike), ``pipe_ms`` the mean of
``reps`` calls issued back to back and waited for once (the device time per call in steady state,
as CUDA-event benchmarks such as ``triton.testing.do_bench`` report it; the dispatch of the next
call overlaps the device work of the previous one). Effective TFLOP/s use
``2*B*HQ*T*(n*64)*(Dk+Dv)`` for the sparse kernel and ``B*HQ*T^2*(Dk+Dv)`` for dense causal
(unpadded dims). ``--dk/--dv`` (default 128/128) set the q/k and v head dims (e.g. 192/128, or the
ASA GLA global layer's 160/128 with ``--hq 32 --h 2``; dims that are not multiples of 64 are zero
padded by the wrapper, and the padding copies are inside the timed calls).

Selections:
* ``shared``: ASA shared selection (one list per 4-token tile, list length n).
* ``exact-random``: independent random picks per token (worst case for the tile union).
* ``exact-corr``: tokens of each 64-token block share random picks (besides the forced current
  block), a proxy for the strong correlation of real NSA selections between neighbours.

``meta`` records both timings of a program that adds 1 to 8 numbers (``noop_sync_ms``,
``noop_pipe_ms``): the fixed cost of a synchronised call on the machine; and of one bf16 GEMM
``[8192, 4096] @ [4096, 8192]`` (``gemm_*``, 0.55 TFLOP, about the 8k forward's device time).

Per variant it also times the XLA preparation alone (``prep``: tile lists, plus the Q transpose
for the ``tiles`` layout) and the kernel on prepared operands (``kern``: includes the O transpose
back for the ``tiles`` layout).

With ``--bwd`` it also times forward+backward (``jax.grad`` of ``sum(o * w)`` through the kernel's
``custom_vjp``: forward kernel, dQ kernel, dK/dV kernel and their XLA preparation) against cuDNN
dense fwd+bwd, with effective TFLOP/s at 3.5x the forward FLOPs, and reports the XLA temporary
memory of each compiled fwd+bwd (``memory_analysis().temp_size_in_bytes``).

Usage: ``PYTHONPATH=$PWD python3 benchmarks/selected_attention.py --out bench.json [--bwd]
[--dk 192 --dv 128] [--hq 64 --h 4] [--block 128 --n 8]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import selected_attention_dims as dims
from pallas_kernels import selected_attention_mgpu as mg
from pallas_kernels import selected_attention_vjp_common as vc
from pallas_kernels import selected_attention_vjp_kernel_sm90 as bw
from pallas_kernels.selected_attention_common import prepare
from pallas_kernels.selected_attention_kernel_sm90 import call_kernel

B, HQ, H, D, BS, N = 1, 64, 4, 128, 64, 16


def selection(key, t, kind):
  """``[1, T, H, N]`` int32 ids: slot 0 = current block, others random earlier blocks."""
  cur = jnp.arange(t, dtype=jnp.int32) // BS  # [T]
  if kind == "exact-corr":
    u = jax.random.uniform(key, (1, t // BS + 1, H, N))[:, cur]  # same per block
  else:
    u = jax.random.uniform(key, (1, t, H, N))
  ids = jnp.floor(u * cur[None, :, None, None]).astype(jnp.int32)  # in [0, cur)
  ids = jnp.where(cur[None, :, None, None] == 0, -1, ids)
  return ids.at[..., 0].set(jnp.broadcast_to(cur[None, :, None], (1, t, H)))


def bench(fn, args, warmup=2, reps=10):
  """``(median ms, min ms)`` of synchronised calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3, min(times) * 1e3


def bench_pipelined(fn, args, reps=10, rounds=3):
  """Mean ms per call of ``reps`` calls issued back to back (one wait at the end); the best of
  ``rounds`` rounds. Outputs of earlier calls are kept until the end (no reuse of their buffers
  while the device still runs, as in a training step that keeps its activations)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t0) / reps)
    del outs
  return best * 1e3


def grad_fn(attn):
  """``(q, k, v, w, *extra) -> (dq, dk, dv)`` of ``sum(attn(q, k, v, *extra) * w)``, jitted.

  Every array is an argument (e.g. the block indices in ``extra``): an array captured by the
  function would become an HLO constant, and XLA could fold the work that depends only on it
  (the kernels' list building, the backward's inverse map) into the executable.
  """

  def loss(q, k, v, w, *extra):
    return jnp.sum(attn(q, k, v, *extra).astype(jnp.float32) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def fwd_bwd(attn, q, k, v, w, reps, *extra):
  """Median fwd+bwd ms, pipelined ms and the compiled XLA temp memory in MiB (``extra``:
  non-differentiated arguments of ``attn`` after ``q, k, v``)."""
  g = grad_fn(attn)
  temp = g.lower(q, k, v, w, *extra).compile().memory_analysis()
  temp_mib = getattr(temp, "temp_size_in_bytes", float("nan")) / 2**20
  ms, _ = bench(g, (q, k, v, w, *extra), reps=reps)
  return ms, bench_pipelined(g, (q, k, v, w, *extra), reps=reps), temp_mib


def backward_parts(q, k, v, w, bi, tuning, cfg, reps):
  """Median ms of the backward's XLA preparation, its dQ call and its dK/dV call (each with
  its XLA epilogue) on operands prepared once (``cfg``: ``mg.kernel_config`` of ``tuning``)."""
  q, k, v = dims.pad_head_dims(q, k, v)  # the kernels' dims
  w = jnp.pad(w, ((0, 0),) * 3 + ((0, v.shape[-1] - w.shape[-1]),))
  o, lse = jax.jit(
    lambda q, k, v, bi: mg.selected_attention_mgpu(
      q, k, v, bi, softmax_scale=cfg.softmax_scale, return_lse=True, tuning=tuning
    )
  )(q, k, v, bi)
  do = w.astype(q.dtype)
  bcfg = vc.BwdConfig(chunk=cfg.bwd_chunk, direct=cfg.bwd_direct)
  direct = bcfg.direct and vc.use_direct(HQ // H)
  t = q.shape[1]
  prep = jax.jit(
    lambda q, k, v, o, lse, do, bi: vc.prepare_backward(
      q,
      k,
      v,
      o,
      lse,
      do,
      bi,
      mode=cfg.mode,
      chunk=bcfg.chunk,
      direct=direct,
      block_size=cfg.block_size,
    )
  )
  ops = prep(q, k, v, o, lse, do, bi)
  kw = {
    "softmax_scale": cfg.softmax_scale,
    "seq_len": t,
    "num_q_heads": HQ,
    "cfg": bcfg,
    "direct": direct,
    "block_size": cfg.block_size,
  }
  dq = jax.jit(lambda ops: bw.dq_call(ops, **kw))
  dkv = jax.jit(lambda ops: bw.dkv_call(ops, **kw))
  n_items = int(jnp.sum(ops.work.item_count > 0))
  return {
    "bwd_prep_ms": bench(prep, (q, k, v, o, lse, do, bi), reps=reps)[0],
    "bwd_dq_ms": bench(dq, (ops,), reps=reps)[0],
    "bwd_dkv_ms": bench(dkv, (ops,), reps=reps)[0],
    "bwd_items_used": n_items,
    "bwd_items": int(ops.work.item_count.size),
  }


def main():
  global HQ, H, BS, N
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None, help="JSON output path")
  ap.add_argument("--seqs", default="8192,16384,32768,65536")
  ap.add_argument("--kinds", default="shared,exact-corr,exact-random")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--bwd", action="store_true", help="also time forward+backward")
  ap.add_argument(
    "--bwd-parts",
    action="store_true",
    help="with --bwd: also time the backward's preparation, dQ and dK/dV calls",
  )
  ap.add_argument(
    "--variants",
    default="64:tiles,128:tiles,128:direct",
    help="tile_rows:q_layout[:nopp][:bwdtiles][:s<stages>]"
    "[:persist][:ctas<N>] list (persist: one CTA per SM walking many 128-row "
    "tiles; ctas<N>: persistent with N CTAs)",
  )
  ap.add_argument("--dk", type=int, default=D, help="q/k head dim")
  ap.add_argument("--dv", type=int, default=D, help="v head dim")
  ap.add_argument("--hq", type=int, default=HQ, help="query heads")
  ap.add_argument("--h", type=int, default=H, help="KV heads")
  ap.add_argument("--block", type=int, default=BS, help="KV block size (32, 64 or 128)")
  ap.add_argument("--n", type=int, default=N, help="selected blocks per token")
  args = ap.parse_args()
  HQ, H, BS, N = args.hq, args.h, args.block, args.n
  dk, dv = args.dk, args.dv
  dev = jax.devices()[0]
  meta = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "B": B,
    "HQ": HQ,
    "H": H,
    "Dk": dk,
    "Dv": dv,
    "block": BS,
    "n": N,
    "dtype": "bfloat16",
  }
  # The fixed cost of one synchronised call, from a program that does almost nothing: the part of
  # every "ms" figure that is dispatch and waiting, not device work.
  tiny = jnp.zeros((8,), jnp.float32)
  noop = jax.jit(lambda x: x + 1)
  meta["noop_sync_ms"] = bench(noop, (tiny,), reps=max(args.reps, 20))[0]
  meta["noop_pipe_ms"] = bench_pipelined(noop, (tiny,), reps=max(args.reps, 20))
  # One cuBLAS GEMM of ~0.5 ms device time: the two clocks' gap for a single-kernel program
  # of about the forward's length (if it matches the kernels' gap, the gap is the host's wait).
  a = jax.random.normal(
    jax.random.key(0), (8192 if dev.platform == "gpu" else 64, 4096), jnp.bfloat16
  )
  gemm = jax.jit(lambda a: a @ a.T)
  meta["gemm_sync_ms"] = bench(gemm, (a,), reps=max(args.reps, 20))[0]
  meta["gemm_pipe_ms"] = bench_pipelined(gemm, (a,), reps=max(args.reps, 20))
  del a
  print(meta, flush=True)
  rows = []
  for t in [int(x) for x in args.seqs.split(",")]:
    key = jax.random.key(t)
    kq, kk, kv, ks = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, t, HQ, dk), jnp.bfloat16)
    k = jax.random.normal(kk, (B, t, H, dk), jnp.bfloat16)
    v = jax.random.normal(kv, (B, t, H, dv), jnp.bfloat16)
    w = jax.random.normal(jax.random.fold_in(key, 1), (B, t, HQ, dv), jnp.float32)
    qp, kp, vp = dims.pad_head_dims(q, k, v)  # kernel operands
    sparse_flops = 2 * B * HQ * t * (N * BS) * (dk + dv)
    dense_flops = B * HQ * t * t * (dk + dv)
    for kind in args.kinds.split(","):
      bi = selection(ks, t, kind)
      mode = "shared" if kind == "shared" else "exact"
      for variant in args.variants.split(","):
        rows_s, layout, *flags = variant.split(":")
        stages = [int(f[1:]) for f in flags if f.startswith("s")] or [2]
        ctas = [int(f[4:]) for f in flags if f.startswith("ctas")] or [0]
        tuning = mg.TuningConfig(
          mode=mode,
          block_size=BS,
          bwd_direct="bwdtiles" not in flags,
          tile_rows=int(rows_s),
          q_layout=layout,
          ping_pong="nopp" not in flags,
          num_stages=stages[0],
          persistent="persist" in flags or ctas != [0],
          num_ctas=ctas[0],
        )
        cfg = mg.kernel_config(
          tuning, softmax_scale=dk**-0.5, group_size=HQ // H, has_docs=False
        )  # the resolved per-call configuration, for the prepare / kernel timings
        name = "-".join([f"mgpu-{kind}-{cfg.tile_rows}-{cfg.q_layout}", *flags])
        attn = lambda q, k, v, bi, tuning=tuning: mg.selected_attention_mgpu(
          q, k, v, bi, softmax_scale=dk**-0.5, tuning=tuning
        )
        f = jax.jit(attn)
        prep = jax.jit(functools.partial(prepare, cfg=cfg, num_kv_heads=H))  # "jit_prepare"
        kern = jax.jit(
          lambda qx, k, v, lists, cfg=cfg, t=t: call_kernel(
            qx, k, v, lists, cfg, num_kv_heads=H, seq_len=t
          )[0]
        )
        try:
          ms, ms_min = bench(f, (q, k, v, bi), reps=args.reps)
          pipe_ms = bench_pipelined(f, (q, k, v, bi), reps=args.reps)
          prep_ms, _ = bench(prep, (qp, bi), reps=args.reps)
          prep_pipe_ms = bench_pipelined(prep, (qp, bi), reps=args.reps)
          qx, lists = prep(qp, bi)
          kern_ms, _ = bench(kern, (qx, kp, vp, lists), reps=args.reps)
          kern_pipe_ms = bench_pipelined(kern, (qx, kp, vp, lists), reps=args.reps)
          mean_list = float(jnp.mean(lists.counts.astype(jnp.float32)))
          del qx, lists
          row = {
            "T": t,
            "impl": name,
            "ms": ms,
            "ms_min": ms_min,
            "pipe_ms": pipe_ms,
            "tflops": sparse_flops / ms / 1e9,
            "pipe_tflops": sparse_flops / pipe_ms / 1e9,
            "prep_ms": prep_ms,
            "prep_pipe_ms": prep_pipe_ms,
            "kernel_plus_out_ms": kern_ms,
            "kernel_plus_out_pipe_ms": kern_pipe_ms,
            "kernel_tflops": sparse_flops / kern_ms / 1e9,
            "mean_list_len": mean_list,
            "union_over_n": mean_list / N,
          }
          if args.bwd:
            fb_ms, fb_pipe, temp = fwd_bwd(attn, q, k, v, w, args.reps, bi)
            row.update(
              fb_ms=fb_ms,
              fb_tflops=3.5 * sparse_flops / fb_ms / 1e9,
              fb_temp_mib=temp,
              fb_pipe_ms=fb_pipe,
              fb_pipe_tflops=3.5 * sparse_flops / fb_pipe / 1e9,
            )
          if args.bwd and args.bwd_parts:
            row.update(backward_parts(q, k, v, w, bi, tuning, cfg, args.reps))
        except Exception as e:  # noqa: BLE001  (report the failure, time the other variants)
          row = {"T": t, "impl": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        rows.append(row)
        print(row, flush=True)
    # jax.nn.dot_product_attention needs Dv == Dk: v is zero padded to Dk (output sliced)
    dense_name = "cudnn-dense-causal" + ("" if dv == dk else f"-v-padded-to-{dk}")

    def dense_attn(q, k, v):
      vd = jnp.pad(v, ((0, 0),) * 3 + ((0, max(dk - dv, 0)),))
      qd, kd = (jnp.pad(x, ((0, 0),) * 3 + ((0, max(dv - dk, 0)),)) for x in (q, k))
      o = jax.nn.dot_product_attention(
        qd, kd, vd, is_causal=True, implementation="cudnn", scale=dk**-0.5
      )
      return o[..., :dv]

    try:
      dense = jax.jit(dense_attn)
      ms, ms_min = bench(dense, (q, k, v), reps=args.reps)
      pipe_ms = bench_pipelined(dense, (q, k, v), reps=args.reps)
      row = {
        "T": t,
        "impl": dense_name,
        "ms": ms,
        "ms_min": ms_min,
        "pipe_ms": pipe_ms,
        "tflops": dense_flops / ms / 1e9,
        "pipe_tflops": dense_flops / pipe_ms / 1e9,
      }
      if args.bwd:
        fb_ms, fb_pipe, temp = fwd_bwd(dense_attn, q, k, v, w, args.reps)
        row.update(
          fb_ms=fb_ms,
          fb_tflops=3.5 * dense_flops / fb_ms / 1e9,
          fb_temp_mib=temp,
          fb_pipe_ms=fb_pipe,
          fb_pipe_tflops=3.5 * dense_flops / fb_pipe / 1e9,
        )
    except Exception as e:  # noqa: BLE001  (report the failure, keep the sparse rows)
      row = {"T": t, "impl": dense_name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    rows.append(row)
    print(row, flush=True)
    del q, k, v, w, qp, kp, vp
  print()
  print("ms: synchronised calls (median); pipe: back-to-back calls (mean per call)")
  print(
    f"{'T':>6} {'impl':34} {'ms':>9} {'pipe':>7} {'TFLOP/s':>8} {'prep ms':>8} {'pipe':>6} "
    f"{'kern ms':>8} {'pipe':>6} {'list/n':>7} {'f+b ms':>8} {'pipe':>7} {'f+b TF/s':>8} "
    f"{'f+b MiB':>8}"
  )
  for r in rows:
    if "error" in r:
      print(f"{r['T']:>6} {r['impl']:34} ERROR {r['error'][:80]}")
      continue
    if "bwd_prep_ms" in r:
      print(
        f"{'':>6} {'  backward parts':34} prep {r['bwd_prep_ms']:.3f} ms, dQ {r['bwd_dq_ms']:.3f} "
        f"ms, dK/dV {r['bwd_dkv_ms']:.3f} ms ({r['bwd_items_used']}/{r['bwd_items']} items)"
      )
    nan = float("nan")
    print(
      f"{r['T']:>6} {r['impl']:34} {r['ms']:9.3f} {r['pipe_ms']:7.3f} {r['tflops']:8.1f} "
      f"{r.get('prep_ms', nan):8.3f} {r.get('prep_pipe_ms', nan):6.3f} "
      f"{r.get('kernel_plus_out_ms', nan):8.3f} {r.get('kernel_plus_out_pipe_ms', nan):6.3f} "
      f"{r.get('union_over_n', nan):7.2f} {r.get('fb_ms', nan):8.3f} "
      f"{r.get('fb_pipe_ms', nan):7.3f} {r.get('fb_tflops', nan):8.1f} "
      f"{r.get('fb_temp_mib', nan):8.0f}"
    )
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
