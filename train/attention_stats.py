"""Attention-sparsity report: ``python -m train.attention_stats --config CFG [--checkpoint PATH]
--out DIR [section.key=value ...]``.

Runs the model of ``CFG`` (randomly initialized, or restored from a checkpoint written by
``python -m train``) on held-out batches and measures, per layer, how concentrated *dense causal*
attention over its q/k is (:mod:`sparse_attention_jax.analysis.sparsity`): mass of the top-k
keys and top-k blocks per query, entropy and attention-sink mass. Prints a per-layer table and
writes ``DIR/attention_stats.json`` and ``DIR/attention_stats.png`` (top-k mass vs k per layer).

Example::

  python -m train.attention_stats --config configs/ssa_tiny.yaml \\
      --checkpoint runs/ssa_tiny/checkpoints/300 --out runs/ssa_tiny/stats
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _ints(text: str) -> tuple[int, ...]:
  try:
    out = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
  return out


def _parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m train.attention_stats",
    description="Per-layer attention-sparsity metrics of a model.",
  )
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--checkpoint", help="checkpoint folder (.../checkpoints/<step>); default: init")
  p.add_argument("--out", required=True, help="folder for attention_stats.json / .png")
  p.add_argument("--ks", type=_ints, default=(1, 2, 4, 8, 16, 32, 64), help="top-k sweep")
  p.add_argument("--block-size", type=int, default=16, help="key block size of block_mass")
  p.add_argument("--block-ks", type=_ints, default=(1, 2, 4, 8, 16), help="top-k blocks sweep")
  p.add_argument("--sink", type=int, default=4, help="sink = first SINK tokens of a document")
  p.add_argument("--batches", type=int, default=1, help="held-out batches measured")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def _plot(stats: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for s in stats["layers"]:
    if "skipped" in s:
      continue
    ks = sorted(s["topk_mass"])
    ax.plot(
      ks, [s["topk_mass"][k] for k in ks], marker="o", label=f"layer {s['layer']} ({s['kind']})"
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k (keys kept per query)")
  ax.set_ylabel("attention mass of the top-k keys")
  ax.set_ylim(0, 1.02)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  from train import cli

  config = cli.load_config_or_none(args.config, args.overrides)
  if config is None:
    return 2
  import jax.numpy as jnp

  from sparse_attention_jax.analysis.sparsity import (
    mean_over_batches,
    mean_over_layers,
    model_attention_stats,
  )

  tc = config.train
  model, _, batches = cli.model_and_batches(config, args.checkpoint, args.batches)
  kw = {"ks": args.ks, "block_size": args.block_size, "block_ks": args.block_ks, "sink": args.sink}
  per_batch = [
    model_attention_stats(
      model,
      jnp.asarray(b["tokens"]),
      jnp.asarray(b["positions"]),
      jnp.asarray(b["segment_ids"]),
      **kw,
    )
    for b in batches
  ]
  stats = mean_over_batches(per_batch)
  stats["mean"] = mean_over_layers(stats)
  stats["settings"] = {
    **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
    "config": args.config,
    "checkpoint": args.checkpoint,
    "batches": args.batches,
    "seq_len": tc.seq_len,
    "batch_size": tc.batch_size,
  }

  ks, bks = list(args.ks), list(args.block_ks)
  head = (
    f"{'layer':>5} {'kind':<10} {'entropy':>8} {'sink':>6} "
    + " ".join(f"{'top' + str(k):>7}" for k in ks)
    + " "
    + " ".join(f"{'blk' + str(k):>7}" for k in bks)
  )
  print(head)
  for s in stats["layers"]:
    if "skipped" in s:
      print(f"{s['layer']:>5} {s['kind']:<10} skipped: {s['skipped']}")
      continue
    print(
      f"{s['layer']:>5} {s['kind']:<10} {s['entropy']:8.3f} {s['sink_mass']:6.3f} "
      + " ".join(f"{s['topk_mass'][k]:7.3f}" for k in ks)
      + " "
      + " ".join(f"{s['block_mass'][k]:7.3f}" for k in bks)
    )
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "attention_stats.json")
  with open(json_path, "w") as f:
    json.dump(stats, f, indent=1)
  png_path = os.path.join(args.out, "attention_stats.png")
  _plot(stats, png_path)
  print(f"wrote {json_path} and {png_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
