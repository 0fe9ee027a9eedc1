"""The whole NSA op vs cuDNN dense attention over sequence lengths, and its compressed stage.

Standard shape (B = 1, HQ = 64, H = 4, D = 128, bf16, l' = 64, n = 16, w = 512), fresh random
inputs, for the ``fla`` preset (mean pooling, l = d = l' = 64) and the ``paper`` preset (phi-MLP,
l = 32, d = 16). Rows per (config, T):

* ``nsa``: ``nsa_attention(impl="auto")`` with gates and the paper's per-branch K/V;
* ``cmp+select <impl>``: the compressed branch fused with block selection
  (``ops.compressed_selection``) for each ``--cmp-impls`` entry: ``cudnn`` (output from one cuDNN
  call, selection from query chunks), ``blocked`` (query chunks for both), ``reference`` (the
  full ``[B, T, HQ, NC]`` probabilities; skipped above ``--reference-max-t``);
* ``dense``: cuDNN causal attention of the same q/k/v (``jax.nn.dot_product_attention``);
* with ``--scores``: the selection's pieces alone, forward only: ``scores tb=<TB>`` (the Pallas
  Triton log-sum-exp and pooled-scores kernels of ``pallas_kernels.cmp_scores_triton`` with
  ``TB`` blocks per tile; GPU only) and the top-``n`` of random ``[B, H, T, NB]`` scores:
  ``top-n top_n_blocks`` (the library's, with forced blocks and candidates: argmax rounds for
  ``n <= 32``) and ``top-n lax.top_k`` (the bare XLA op).

Each row: ``fwd_ms`` and ``fb_ms`` (``jax.grad`` of ``sum(out * w)`` w.r.t. every float input),
medians of ``--reps`` synchronised calls after a warm-up; ``fwd_temp_gib`` / ``fb_temp_gib``: the
XLA temporary buffers of the compiled call (``memory_analysis``); ``compile_s``: lowering +
compilation of the fwd+bwd call. Errors (e.g. out of memory) are recorded in the row. The JSON
(``--out``) is rewritten after every row, so a run cut short keeps what it measured; ``--plot``
writes a log-log plot of ms vs T.

Usage (GPU): ``PYTHONPATH=$PWD python3 benchmarks/nsa_op.py --seqs 8192,65536 --out op.json
[--configs fla,paper] [--cmp-impls cudnn,blocked] [--plot op.png]``; ``--tiny`` for a CPU smoke
run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import (
  CompressorParams,
  compress,
  compressed_selection,
  init_mlp_compressor,
  nsa_attention,
)
from sparse_attention_jax.ops.causal import causal_attention

CONFIGS = ("fla", "paper")


def _config(name: str, tiny: bool) -> NSAConfig:
  if tiny:
    small = dict(block_size=16, num_selected=4, window=32)
    if name == "fla":
      return NSAConfig.fla(cmp_window=16, cmp_stride=16, **small)
    return NSAConfig.paper(cmp_window=16, cmp_stride=8, **small)
  return NSAConfig.fla() if name == "fla" else NSAConfig.paper()


def _time(compiled, args, reps: int) -> float:
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _temp_gib(compiled) -> float:
  return getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan")) / 2**30


def measure(fn, args, argnums, w, reps: int, bwd: bool = True) -> dict:
  """fwd and fwd+bwd of ``fn(*args)`` (its first output when a tuple)."""
  first = lambda *a: jax.tree.leaves(fn(*a))[0]
  row = {}
  fwd = jax.jit(fn).lower(*args).compile()
  row["fwd_temp_gib"] = _temp_gib(fwd)
  row["fwd_ms"] = _time(fwd, args, reps)
  if bwd:

    def loss(*a):
      return jnp.sum(first(*a[:-1]).astype(jnp.float32) * a[-1])

    t0 = time.perf_counter()
    fb = jax.jit(jax.grad(loss, argnums)).lower(*args, w).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["fb_temp_gib"] = _temp_gib(fb)
    row["fb_ms"] = _time(fb, (*args, w), reps)
  return row


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seqs", default="8192,32768,65536")
  ap.add_argument("--configs", default="fla,paper")
  ap.add_argument("--cmp-impls", default="cudnn,blocked,reference")
  ap.add_argument("--reference-max-t", type=int, default=16384)
  ap.add_argument("--no-nsa", action="store_true", help="skip the whole-op rows")
  ap.add_argument("--scores", action="store_true", help="also time the selection's pieces")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke shapes (T 256, HQ 8, H 2, D 32)")
  ap.add_argument("--out", default=None, help="JSON output path")
  ap.add_argument("--plot", default=None, help="PNG path of a log-log plot of ms vs T")
  args = ap.parse_args(argv)
  try:
    seqs = [int(x) for x in args.seqs.split(",")]
  except ValueError:
    ap.error(f"--seqs: expected comma-separated ints, got {args.seqs!r}")
  configs = args.configs.split(",")
  if any(c not in CONFIGS for c in configs):
    ap.error(f"--configs: expected a list of {CONFIGS}, got {args.configs!r}")
  b, hq, h, d = 1, 64, 4, 128
  if args.tiny:
    seqs, hq, h, d, args.reps = [256], 8, 2, 32, 1
  dev = jax.devices()[0]
  result = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "shape": {"B": b, "HQ": hq, "H": h, "D": d, "dtype": "bfloat16"},
    "command": "python3 benchmarks/nsa_op.py " + " ".join(argv or []),
    "rows": [],
  }

  def save():
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

  def add(row):
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()

  dt = jnp.bfloat16
  for t in seqs:
    keys = iter(jax.random.split(jax.random.key(t), 16))
    rnd = lambda *s, dt=dt, keys=keys: jax.random.normal(next(keys), s, jnp.float32).astype(dt)
    q, k, v = rnd(b, t, hq, d), rnd(b, t, h, d), rnd(b, t, h, d)
    k2, v2 = rnd(b, t, h, d), rnd(b, t, h, d)
    gates = jax.nn.sigmoid(rnd(b, t, hq, 3, dt=jnp.float32))
    w = rnd(b, t, hq, d, dt=jnp.float32)
    for name in configs:
      cfg = _config(name, args.tiny).for_length(t)
      params = None
      if cfg.compression == "mlp":
        params = CompressorParams(
          *(
            init_mlp_compressor(next(keys), num_kv_heads=h, window=cfg.cmp_window, in_dim=d)
            for _ in range(2)
          )
        )
      base = {"config": name, "T": t}
      if not args.no_nsa:
        row = {**base, "stage": "nsa"}
        try:
          row.update(
            measure(
              lambda q, k, v, g, p, k2, v2, cfg=cfg: nsa_attention(
                q, k, v, g, config=cfg, compress_params=p, k_slc=k2, v_slc=v2, k_win=k2, v_win=v2
              ),
              (q, k, v, gates, params, k2, v2),
              (0, 1, 2, 3, 4, 5, 6),
              w,
              args.reps,
            )
          )
        except Exception as e:  # noqa: BLE001  (record it, go on)
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        add(row)
      kc = compress(k, cfg, None if params is None else params.k, name="k")
      vc = compress(v, cfg, None if params is None else params.v, name="v")
      for impl in args.cmp_impls.split(","):
        row = {**base, "stage": f"cmp+select {impl}"}
        if impl == "reference" and t > args.reference_max_t:
          continue
        try:
          row.update(
            measure(
              lambda q, kc, vc, cfg=cfg, impl=impl: compressed_selection(q, kc, vc, cfg, impl=impl)[
                ::2
              ],
              (q, kc, vc),
              (0, 1, 2),
              w,
              args.reps,
            )
          )
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        add(row)
      if args.scores:
        for row in _score_rows(q, kc, cfg, h, args.reps):
          add({**base, **row})
    row = {"config": "-", "T": t, "stage": "dense"}
    try:
      row.update(
        measure(lambda q, k, v: causal_attention(q, k, v), (q, k, v), (0, 1, 2), w, args.reps)
      )
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    add(row)

  print(f"\n{result['device']}, jax {result['jax']}; ms = median of synchronised calls")
  print(f"{'config':7} {'T':>7} {'stage':22} {'fwd ms':>9} {'f+b ms':>9} {'temp GiB f/fb':>14}")
  for r in result["rows"]:
    if "error" in r:
      print(f"{r['config']:7} {r['T']:>7} {r['stage']:22} error: {r['error'][:60]}")
      continue
    temps = f"{r.get('fwd_temp_gib', float('nan')):.2f}/{r.get('fb_temp_gib', float('nan')):.2f}"
    print(
      f"{r['config']:7} {r['T']:>7} {r['stage']:22} {r['fwd_ms']:9.2f} "
      f"{r.get('fb_ms', float('nan')):9.2f} {temps:>14}"
    )
  if args.plot:
    _plot(result, args.plot)
  return result


def _score_rows(q, kc, cfg: NSAConfig, h: int, reps: int) -> list[dict]:
  """Forward-only rows of the selection's pieces (see the module docstring)."""
  from sparse_attention_jax.ops import selection

  rows = []
  if jax.default_backend() == "gpu":
    from pallas_kernels import cmp_scores_triton as kern

    for tb in (16, 32):
      sc = kern.ScoresConfig(
        cfg.cmp_window,
        cfg.cmp_stride,
        cfg.block_size,
        cfg.score_pooling,
        cfg.scale(q.shape[-1]),
        tb=tb,
      )
      row = {"stage": f"scores tb={tb}"}
      try:
        row.update(
          measure(
            lambda q, kc, sc=sc: kern.compressed_scores(q, kc, sc),
            (q, kc),
            (),
            None,
            reps,
            bwd=False,
          )
        )
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      rows.append(row)
  b, t = q.shape[:2]
  nb = cfg.num_blocks(t)
  imp = jax.random.uniform(jax.random.key(1), (b, h, t, nb), jnp.float32)
  u = jnp.arange(t, dtype=jnp.int32)[None]
  cand, forced = selection.candidate_and_forced_at(cfg, nb, u)
  tops = {
    "top_n_blocks": lambda imp: selection.top_n_blocks(
      imp, cand[:, None], forced[:, None], cfg.num_selected
    ),
    "lax.top_k": lambda imp: jax.lax.top_k(imp, cfg.num_selected)[1],
  }
  for method, top in tops.items():
    row = {"stage": f"top-n {method}"}
    row.update(measure(top, (imp,), (), None, reps, bwd=False))
    rows.append(row)
  return rows


def _plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  series = {}
  for r in result["rows"]:
    if "error" in r:
      continue
    key = r["stage"] if r["config"] == "-" else f"{r['config']} {r['stage']}"
    series.setdefault(key, []).append(r)
  for ax, metric in zip(axes, ("fwd_ms", "fb_ms"), strict=True):
    for key, rows in series.items():
      rows = [r for r in rows if metric in r]
      if rows:
        ax.plot([r["T"] for r in rows], [r[metric] for r in rows], "o-", label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"NSA op vs cuDNN dense, {result['device']}, jax {result['jax']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
