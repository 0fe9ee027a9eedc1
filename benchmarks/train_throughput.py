"""Benchmark: training throughput of the project's real (sharded) train step.

For each config it builds the model and optimizer of ``train/`` (``loop.build`` on one device,
``loop.build_sharded`` on a mesh), the jitted train step of ``loop.Trainer`` (AdamW, grad clip,
the config's remat and grad accumulation), feeds synthetic random tokens (one document per row;
no Grain, no data pipeline), warms up (the first step compiles) and times ``--steps`` steps, each
closed by ``jax.block_until_ready``. Reported per config: devices, mesh, global batch, median
step time, tokens/s (total and per device), model TFLOP/s per device (``train.flops``: 6N plus
the attention keys each layer kind visits), MFU against the device's dense bf16 peak
(``train.flops.PEAK_FLOPS`` or ``--peak-flops``; n/a on CPU) and the peak device memory.

With several configs each runs in its own subprocess (a fresh allocator, so the peak memory is
that config's); ``--in-process`` runs them in this process.

Usage (GPU)::

  python3 benchmarks/train_throughput.py                               # full/nsa 340M, T=8192
  python3 benchmarks/train_throughput.py --mesh data=1,fsdp=-1,tensor=1 --batch-size 8
  python3 benchmarks/train_throughput.py --config configs/tiny.yaml --seq-len 256 --steps 2  # CPU

Results go to ``--out`` (default ``$OUT/train_throughput.json``, ``$OUT`` default ``.``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ("configs/full_340m.yaml", "configs/nsa_340m.yaml")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=1,fsdp=-1,tensor=1"`` -> ``{"data": 1, "fsdp": -1, "tensor": 1}``."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    try:
      if not sep:
        raise ValueError
      out[name.strip()] = int(value)
    except ValueError:
      raise SystemExit(
        f"--mesh: expected axis=size pairs like data=1,fsdp=-1,tensor=1, got {text!r}"
      ) from None
  return out


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--config",
    action="append",
    default=None,
    help=f"config YAML (repeatable; default {' '.join(DEFAULT_CONFIGS)})",
  )
  p.add_argument("--seq-len", type=int, default=8192)
  p.add_argument(
    "--batch-size",
    type=int,
    default=0,
    help="global rows per step (0 = --rows-per-device x batch shards)",
  )
  p.add_argument("--rows-per-device", type=int, default=1)
  p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  p.add_argument("--dtype", default="bfloat16", help="model.dtype of every config")
  p.add_argument(
    "--peak-flops",
    type=float,
    default=0.0,
    help="peak FLOP/s per device (0 = table by device kind)",
  )
  p.add_argument("--out", default=None, help="JSON path (default $OUT/train_throughput.json)")
  p.add_argument("--in-process", action="store_true", help="no subprocess per config")
  p.add_argument(
    "--override",
    action="append",
    default=[],
    help="extra section.key=value override for every config (repeatable)",
  )
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def run_one(path: str, args: argparse.Namespace) -> dict:
  """Builds, warms up and times one config; returns the result row."""
  import jax
  import numpy as np

  from sparse_attention_jax.nn import count_params
  from train import flops as flops_lib
  from train import loop, sharding
  from train import mesh as mesh_lib
  from train.config import load_config

  spec = parse_mesh(args.mesh)
  n_dev = jax.device_count()
  mesh = mesh_lib.make_mesh(spec) if n_dev > 1 else None
  shards = sharding.batch_shards(mesh) if mesh is not None else 1
  batch = args.batch_size or args.rows_per_device * shards
  overrides = [
    f"train.seq_len={args.seq_len}",
    f"train.batch_size={batch}",
    f"model.dtype={args.dtype}",
    *args.override,
  ]
  config = load_config(os.path.join(ROOT, path) if not os.path.isabs(path) else path, overrides)
  model, optimizer = loop.build(config) if mesh is None else loop.build_sharded(config, mesh)
  trainer = loop.Trainer(
    model, optimizer, mesh=mesh, grad_accum_steps=config.train.grad_accum_steps
  )

  t, vocab = args.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, t + 1), dtype=np.int32)
  data = {
    "tokens": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t)).copy(),
    "segment_ids": np.ones((batch, t), np.int32),
    "loss_mask": np.ones((batch, t), np.float32),
  }

  t0 = time.perf_counter()
  for _ in range(max(args.warmup, 1)):
    jax.block_until_ready(trainer.step(data))
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    metrics = jax.block_until_ready(trainer.step(data))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tok_s = batch * t / step_s
  fpt = flops_lib.flops_per_token(config.model, t)
  dev = jax.devices()[0]
  peak = flops_lib.peak_flops(dev.device_kind, args.peak_flops)
  tflops_dev = fpt * tok_s / n_dev / 1e12
  mem = flops_lib.peak_memory_bytes()
  return {
    "config": path,
    "device_kind": dev.device_kind,
    "platform": dev.platform,
    "devices": n_dev,
    "mesh": (
      "none"
      if mesh is None
      else ",".join(f"{a}={mesh.shape[a]}" for a in ("data", "fsdp", "tensor"))
    ),
    "global_batch": batch,
    "seq_len": t,
    "dtype": args.dtype,
    "params": count_params(model),
    "flops_per_token": fpt,
    "step_ms": step_s * 1e3,
    "step_ms_min": min(times) * 1e3,
    "warmup_s": warm_s,
    "tokens_per_s": tok_s,
    "tokens_per_s_per_device": tok_s / n_dev,
    "tflops_per_device": tflops_dev,
    "mfu": flops_lib.mfu(tflops_dev * 1e12, peak),
    "peak_flops": peak,
    "peak_memory_gib": mem / 2**30 if mem is not None else None,
    "loss": float(metrics["loss"]),
    "steps": args.steps,
  }


def _fmt(v, spec):
  return "n/a" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
  head = (
    f"{'config':<26} {'dev':>3} {'mesh':<22} {'batch':>5} {'step ms':>9} {'tok/s':>10} "
    f"{'tok/s/dev':>10} {'TFLOP/s/dev':>11} {'MFU':>6} {'peak GiB':>8}"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    name = os.path.basename(r["config"])
    if "error" in r:
      print(f"{name:<26} error: {r['error']}")
      continue
    print(
      f"{name:<26} {r['devices']:>3} {r['mesh']:<22} {r['global_batch']:>5} "
      f"{r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} "
      f"{r['tokens_per_s_per_device']:>10,.0f} "
      f"{r['tflops_per_device']:>11.2f} "
      f"{'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%':>6} "
      f"{_fmt(r['peak_memory_gib'], '.1f'):>8}"
    )


def _child_argv(args: argparse.Namespace, path: str, out: str) -> list[str]:
  argv = [
    sys.executable,
    os.path.abspath(__file__),
    "--config",
    path,
    "--seq-len",
    str(args.seq_len),
    "--batch-size",
    str(args.batch_size),
    "--rows-per-device",
    str(args.rows_per_device),
    "--mesh",
    args.mesh,
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--dtype",
    args.dtype,
    "--peak-flops",
    str(args.peak_flops),
    "--_child",
    out,
  ]
  for o in args.override:
    argv += ["--override", o]
  return argv


def main(argv=None) -> int:
  args = _args(argv)
  configs = args.config or list(DEFAULT_CONFIGS)
  parse_mesh(args.mesh)
  if args._child:  # One config in a subprocess: write its row and exit.
    try:
      row = run_one(configs[0], args)
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. out of memory).
      row = {"config": configs[0], "error": f"{type(e).__name__}: {str(e)[:300]}"}
    with open(args._child, "w") as f:
      json.dump(row, f)
    return 0
  out = args.out or os.path.join(os.environ.get("OUT", "runs/bench"), "train_throughput.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  rows = []
  for path in configs:
    if args.in_process or len(configs) == 1:
      try:
        rows.append(run_one(path, args))
      except Exception as e:  # noqa: BLE001
        if len(configs) == 1:
          raise
        rows.append({"config": path, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    else:
      tmp = out + f".{len(rows)}.part"
      proc = subprocess.run(_child_argv(args, path, tmp), check=False)
      if os.path.exists(tmp):
        with open(tmp) as f:
          rows.append(json.load(f))
        os.remove(tmp)
      else:
        rows.append({"config": path, "error": f"subprocess exited with {proc.returncode}"})
    print(json.dumps(rows[-1]), flush=True)
  print()
  print_table(rows)
  with open(out, "w") as f:
    json.dump({"seq_len": args.seq_len, "mesh": args.mesh, "results": rows}, f, indent=2)
  print(f"\nwrote {out}")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
