"""Benchmark: compile time of a model's training gradient, layers unrolled vs ``model.scan_layers``.

For each setting the gradient of ``mean(logits)`` w.r.t. the parameters (the bulk of a train
step) is traced, lowered and compiled for one ``[batch, seq_len]`` input; the table shows the
seconds of each stage and the lowered program's size. ``--execute`` also materializes the model
and runs the compiled gradient twice: the first run includes work done when an executable is
loaded (Mosaic GPU kernels compile then, cached in memory per process, not in the persistent
compilation cache), the second is one steady-state step. Mosaic kernels compile once per process,
so the mode measured first pays them: ``--modes unrolled`` / ``--modes scan`` measure one mode per
process for a fair first-run time. ``scanK`` (e.g. ``scan4``) is ``scan_layers`` with
``model.scan_unroll=K`` (K layers per loop iteration).

  python3 benchmarks/compile_time.py --config configs/nsa_340m.yaml --seq-len 8192 --execute

Writes ``<out>/compile_time.json``. CPU smoke: ``--config configs/tiny.yaml --seq-len 256``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_attention_jax.nn import load_model_config  # noqa: E402
from sparse_attention_jax.nn.model import DecoderLM  # noqa: E402


def measure(cfg, batch: int, seq_len: int, execute: bool) -> dict:
  """Seconds of trace+lower, compile (and with ``execute`` the first and second run)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def loss(params, tokens):
    return jnp.mean(nnx.merge(graphdef, params)(tokens))

  grad = jax.jit(jax.grad(loss))
  t0 = time.perf_counter()
  lowered = grad.trace(state, tokens).lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  row = {
    "scan_layers": cfg.scan_layers,
    "trace_lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "hlo_chars": len(lowered.as_text()),
  }
  if execute:
    params = nnx.state(DecoderLM(cfg, rngs=nnx.Rngs(0)))
    toks = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
    for key in ("first_run_s", "second_run_s"):
      t = time.perf_counter()
      jax.block_until_ready(compiled(params, toks))
      row[key] = time.perf_counter() - t
  return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/nsa_340m.yaml")
  ap.add_argument("--seq-len", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  ap.add_argument("--execute", action="store_true", help="also run the compiled gradient twice")
  ap.add_argument(
    "--remat",
    default=None,
    choices=("none", "full", "dots"),
    help="model.remat (default: the config's)",
  )
  ap.add_argument("--num-layers", type=int, default=0, help="model.num_layers (0: the config's)")
  ap.add_argument(
    "--modes",
    default="unrolled,scan",
    help="comma-separated layer modes to measure, in order: unrolled, scan, "
    "scanK (scan with K layers per loop iteration)",
  )
  ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
  args = ap.parse_args(argv)
  if args.num_layers < 0:
    ap.error(f"--num-layers: expected 0 (the config's) or a positive int, got {args.num_layers}")
  for name in ("seq_len", "batch"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]

  def unroll_of(mode):  # None: unrolled; K >= 1: scanned, K layers per iteration; 0: invalid
    m = re.fullmatch(r"scan(\d*)", mode)
    return None if mode == "unrolled" else (int(m.group(1) or 1) if m else 0)

  if not modes or any(unroll_of(m) == 0 for m in modes):
    ap.error(
      f"--modes: expected a comma-separated list of 'unrolled', 'scan' and 'scanK' "
      f"(K >= 1), got {args.modes!r}"
    )
  base = dataclasses.replace(load_model_config(args.config), dtype=args.dtype)
  if args.remat is not None:
    base = dataclasses.replace(base, remat=args.remat)
  if args.num_layers:
    base = dataclasses.replace(base, num_layers=args.num_layers)
  dev = jax.devices()[0]
  meta = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "config": args.config,
    "layers": base.num_layers,
    "kinds": sorted(set(base.layer_kinds())),
    "batch": args.batch,
    "seq_len": args.seq_len,
    "dtype": args.dtype,
    "remat": base.remat,
  }
  print(
    f"{meta['device']}, jax {jax.__version__}: {args.config} ({base.num_layers} layers), "
    f"B {args.batch} T {args.seq_len} {args.dtype}, remat {base.remat}",
    flush=True,
  )
  print(
    f"{'mode':<12} {'trace+lower s':>13} {'compile s':>10} {'HLO M chars':>12} "
    f"{'1st run s':>10} {'2nd run s':>10}",
    flush=True,
  )
  rows = []
  for mode in modes:
    unroll = unroll_of(mode)
    cfg = dataclasses.replace(base, scan_layers=unroll is not None, scan_unroll=unroll or 1)
    row = {
      "mode": mode,
      "scan_unroll": unroll or 1,
      **measure(cfg, args.batch, args.seq_len, args.execute),
    }
    rows.append(row)
    fmt = lambda key, row=row: f"{row[key]:>10.2f}" if key in row else f"{'-':>10}"
    print(
      f"{mode:<12} {row['trace_lower_s']:>13.2f} {row['compile_s']:>10.2f} "
      f"{row['hlo_chars'] / 1e6:>12.2f} {fmt('first_run_s')} {fmt('second_run_s')}",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"compile_time{'' if len(modes) > 1 else '_' + modes[0]}.json")
  with open(path, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
