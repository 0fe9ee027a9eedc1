"""Selection-locality report: ``python -m train.locality --config CFG [--checkpoint PATH]
[--out DIR] [--num-selected K] [--query-selected KQ] [section.key=value ...]``.

Runs the model of ``CFG`` (randomly initialized, or restored from a checkpoint written by
``python -m train``) on held-out batches and measures, per layer, the locality
``gamma(t) = |Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|`` of NSA, InfLLM-V2-style and NOSA block
selection over the layer's own q/k (:mod:`sparse_attention_jax.analysis.locality`). Prints a table
(mean gamma and new blocks per step per method) and writes ``DIR/locality.json`` (default
``<train.output_dir>/locality``).

Example::

  python -m train.locality --config configs/nosa_tiny.yaml \\
      --checkpoint runs/nosa_tiny/checkpoints/300
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m train.locality", description="Per-layer block-selection locality of a model."
  )
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--checkpoint", help="checkpoint folder (.../checkpoints/<step>); default: init")
  p.add_argument("--out", help="folder for locality.json (default <train.output_dir>/locality)")
  p.add_argument("--num-selected", type=int, default=None, help="k (default model.nsa)")
  p.add_argument(
    "--query-selected",
    type=int,
    default=None,
    help="k_q (default model.nosa, else half of the non-forced budget)",
  )
  p.add_argument("--batches", type=int, default=1, help="held-out batches measured")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  from train import cli

  config = cli.load_config_or_none(args.config, args.overrides)
  if config is None:
    return 2
  import jax.numpy as jnp

  from sparse_attention_jax.analysis.locality import mean_over_batches, model_selection_locality

  tc = config.train
  model, _, batches = cli.model_and_batches(config, args.checkpoint, args.batches)
  try:
    runs = [
      model_selection_locality(
        model,
        jnp.asarray(b["tokens"]),
        jnp.asarray(b["positions"]),
        jnp.asarray(b["segment_ids"]),
        num_selected=args.num_selected,
        num_query_selected=args.query_selected,
      )
      for b in batches
    ]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  stats = mean_over_batches(runs)
  stats["settings"] = {
    "config": args.config,
    "checkpoint": args.checkpoint,
    "batches": args.batches,
    "seq_len": tc.seq_len,
    "batch_size": tc.batch_size,
    "block_size": config.model.nsa.block_size,
  }
  print(
    f"k = {stats['k']} blocks, k_q = {stats['k_q']}, NOSA bound on in-block steps "
    f"1 - k_q/k = {stats['bound_static_steps']:.3f}"
  )
  head = (
    f"{'layer':>5} {'kind':<10} {'evict':<6} "
    + " ".join(f"{'gamma ' + m:>15}" for m in ("nsa", "infllm_v2", "nosa"))
    + " "
    + " ".join(f"{'new/step ' + m:>18}" for m in ("nsa", "infllm_v2", "nosa"))
  )
  print(head)
  for s in stats["layers"]:
    if "skipped" in s:
      print(f"{s['layer']:>5} {s['kind']:<10} skipped: {s['skipped']}")
      continue
    print(
      f"{s['layer']:>5} {s['kind']:<10} {s['eviction']:<6} "
      + " ".join(f"{s[m]['mean']:15.3f}" for m in ("nsa", "infllm_v2", "nosa"))
      + " "
      + " ".join(f"{s[m]['new_blocks_per_step']:18.3f}" for m in ("nsa", "infllm_v2", "nosa"))
    )
  out_dir = args.out or os.path.join(tc.output_dir, "locality")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "locality.json")
  with open(path, "w") as f:
    json.dump(stats, f, indent=1)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
