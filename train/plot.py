"""Loss curves of one or more runs: ``python -m train.plot RUN_DIR [RUN_DIR ...] --out loss.png``.

Reads ``RUN_DIR/metrics.jsonl`` (the training job's log: ``loss`` events every ``log_every``
steps, ``eval_loss`` events at evaluations) and draws, on one figure, each run's train loss
(solid) and eval loss (dashed, markers) against the step, one color per run. A run may also be
given as the ``metrics.jsonl`` path itself. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(run: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
  """``(train, eval)`` lists of ``(step, loss)`` from a run folder or a metrics.jsonl file.

  Raises:
    FileNotFoundError: no metrics.jsonl there.
    ValueError: a line that is not JSON (names the file and line).
  """
  path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"run: expected a run folder with metrics.jsonl (or the file), got {run!r}"
    )
  train, evals = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        event = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{path}:{n}: expected a JSON object, got {line[:80]!r}") from None
      if "loss" in event and "step" in event:
        train.append((int(event["step"]), float(event["loss"])))
      if "eval_loss" in event and "step" in event:
        evals.append((int(event["step"]), float(event["eval_loss"])))
  return train, evals


def plot_runs(
  runs: list[str],
  out: str,
  *,
  labels: list[str] | None = None,
  title: str | None = None,
  logy: bool = False,
) -> str:
  """Writes the figure of ``runs`` to ``out`` (PNG, or any matplotlib format by extension)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not runs:
    raise ValueError("runs: expected at least one run folder, got none")
  if labels is not None and len(labels) != len(runs):
    raise ValueError(f"labels: expected {len(runs)} labels (one per run), got {len(labels)}")
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, run in enumerate(runs):
    train, evals = read_metrics(run)
    name = labels[i] if labels else os.path.basename(os.path.normpath(run)) or run
    color = f"C{i % 10}"
    if train:
      ax.plot(*zip(*train), color=color, lw=1.5, label=f"{name} train")
    if evals:
      ax.plot(*zip(*evals), color=color, lw=1.5, ls="--", marker="o", ms=4, label=f"{name} eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "train / eval loss")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", metavar="RUN_DIR")
  p.add_argument("--out", default="loss.png")
  p.add_argument("--labels", default=None, help="comma-separated names, one per run")
  p.add_argument("--title", default=None)
  p.add_argument("--logy", action="store_true", help="log-scale loss axis")
  args = p.parse_args(argv)
  try:
    plot_runs(
      args.runs,
      args.out,
      labels=args.labels.split(",") if args.labels else None,
      title=args.title,
      logy=args.logy,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
