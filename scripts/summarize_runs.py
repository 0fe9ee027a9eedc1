"""Summary table of finished training runs: ``python scripts/summarize_runs.py RUN [RUN ...]``.

For each run folder (written by ``python -m train``: ``metrics.jsonl`` and ``config.yaml``) reports
the attention kinds, the parameter count (shape evaluation of the saved config), the train loss
averaged over the last ``--tail`` logged steps, every eval loss, the final eval loss in nats and in
bits per byte (byte-level data: one token = one byte), and the median logged tokens/s (the first
log, which includes compilation, is skipped). Runs named ``NAME_sSEED`` are also grouped by NAME
(mean and half-range over seeds). Writes the JSON to ``--out`` and prints markdown tables;
``--plot PNG`` draws each group's held-out loss (mean over seeds, min-max bars) and mean train
loss, one color per group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys


def read_run(run: str, tail: int = 5) -> dict:
  """The summary dict of one run folder (see the module docstring)."""
  # Imported here so that ``--help`` works without JAX.
  from sparse_attention_jax.nn.model import param_count
  from train.config import load_config

  path = os.path.join(run, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"run: expected a run folder with metrics.jsonl, got {run!r}")
  train, evals, speeds = [], [], []  # (step, loss), (step, eval loss), tokens/s
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      event = json.loads(line)
      if "loss" in event and "step" in event:
        train.append((int(event["step"]), float(event["loss"])))
        if "tokens_per_s" in event:
          speeds.append(float(event["tokens_per_s"]))
      if "eval_loss" in event and "step" in event:
        evals.append((int(event["step"]), float(event["eval_loss"])))
  if not train or not evals:
    raise ValueError(
      f"run: expected train and eval losses in {path}, got {len(train)} train and "
      f"{len(evals)} eval events"
    )
  cfg = load_config(os.path.join(run, "config.yaml"))
  final_eval = evals[-1][1]
  return {
    "run": os.path.basename(os.path.normpath(run)),
    "attention": list(cfg.model.layer_kinds()),
    "params": param_count(cfg.model),
    "seed": cfg.train.seed,
    "steps": train[-1][0],
    "train_loss_tail": statistics.fmean(v for _, v in train[-tail:]),
    "eval_losses": {str(s): v for s, v in evals},
    "final_eval_loss": final_eval,
    "final_eval_bits_per_byte": final_eval / math.log(2),
    "median_tokens_per_s": statistics.median(speeds[1:] or speeds),
    "train_losses": {str(s): v for s, v in train},
  }


def group_by_name(rows: list[dict]) -> dict[str, dict]:
  """Runs named ``NAME_sSEED`` grouped by NAME: mean and half-range of the final eval loss."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    name = re.sub(r"_s\d+$", "", r["run"])
    groups.setdefault(name, []).append(r)
  out = {}
  for name, rs in groups.items():
    losses = [r["final_eval_loss"] for r in rs]
    out[name] = {
      "seeds": [r["seed"] for r in rs],
      "final_eval_loss_mean": statistics.fmean(losses),
      "final_eval_loss_half_range": (max(losses) - min(losses)) / 2,
      "final_eval_bits_per_byte_mean": statistics.fmean(losses) / math.log(2),
      "train_loss_tail_mean": statistics.fmean(r["train_loss_tail"] for r in rs),
      "params": rs[0]["params"],
    }
  return out


def plot_groups(rows: list[dict], out: str, title: str | None = None) -> str:
  """Per group (``NAME_sSEED`` -> NAME): mean eval loss with min-max bars, mean train loss."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(re.sub(r"_s\d+$", "", r["run"]), []).append(r)
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, rs) in enumerate(groups.items()):
    color = f"C{i % 10}"
    for key, style in (("train_losses", "-"), ("eval_losses", "o--")):
      steps = sorted(
        {int(s) for r in rs for s in r[key]}.intersection(*({int(s) for s in r[key]} for r in rs))
      )
      vals = [[r[key][str(s)] for r in rs] for s in steps]
      mean = [statistics.fmean(v) for v in vals]
      label = f"{name} {'train' if key == 'train_losses' else 'eval'} (mean of {len(rs)})"
      if key == "eval_losses":
        err = [[m - min(v) for m, v in zip(mean, vals)], [max(v) - m for m, v in zip(mean, vals)]]
        ax.errorbar(steps, mean, yerr=err, fmt=style, color=color, capsize=4, label=label)
      else:
        ax.plot(steps, mean, style, color=color, alpha=0.5, linewidth=1, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title or "loss by config (bars: min-max over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def markdown(rows: list[dict], groups: dict[str, dict]) -> str:
  steps = sorted({int(s) for r in rows for s in r["eval_losses"]})
  head = (
    "| run | attention | params | "
    + " | ".join(f"eval@{s}" for s in steps)
    + " | final bits/byte | train loss (last logs) | median tok/s |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    ev = " | ".join(
      f"{r['eval_losses'][str(s)]:.4f}" if str(s) in r["eval_losses"] else "-" for s in steps
    )
    lines.append(
      f"| {r['run']} | {','.join(r['attention'])} | {r['params']:,} | {ev} | "
      f"{r['final_eval_bits_per_byte']:.4f} | {r['train_loss_tail']:.4f} | "
      f"{r['median_tokens_per_s']:,.0f} |"
    )
  lines += [
    "",
    "| config | seeds | final eval loss (mean ± half-range) | bits/byte | params |",
    "|---|---|---|---|---|",
  ]
  for name, g in groups.items():
    lines.append(
      f"| {name} | {g['seeds']} | {g['final_eval_loss_mean']:.4f} ± "
      f"{g['final_eval_loss_half_range']:.4f} | {g['final_eval_bits_per_byte_mean']:.4f}"
      f" | {g['params']:,} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python scripts/summarize_runs.py",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("runs", nargs="+", help="run folders (train.output_dir of python -m train)")
  p.add_argument("--out", default=None, help="JSON file to write (default: none)")
  p.add_argument("--plot", default=None, help="PNG of the per-config curves (default: none)")
  p.add_argument("--title", default=None, help="title of --plot")
  p.add_argument("--tail", type=int, default=5, help="logged train steps averaged (default 5)")
  args = p.parse_args(argv)
  rows = [read_run(r, args.tail) for r in args.runs]
  groups = group_by_name(rows)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"runs": rows, "groups": groups}, f, indent=1)
  print(markdown(rows, groups))
  if args.plot:
    print(f"wrote {plot_groups(rows, args.plot, args.title)}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
