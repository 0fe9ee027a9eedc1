"""Held-out loss of one SSA checkpoint under full attention and a sweep of sparse budgets:
``python -m train.ssa_eval --config CFG --checkpoint PATH [--budgets 2,4,8] [--block-size N]
[section.key=value ...]``.

No retraining: :func:`sparse_attention_jax.nn.attention.ssa.set_inference` switches the SSA
layers to full attention, then to the sparse path with ``num_selected`` = each budget (and
``--block-size``, if given). The batches are the held-out ``train.eval_batches`` x
``train.batch_size`` rows of ``train.seq_len`` bytes that training evaluates on.

Example::

  python -m train.ssa_eval --config configs/ssa_tiny.yaml \\
      --checkpoint runs/ssa_tiny/checkpoints/300 --budgets 2,4,8
"""

from __future__ import annotations

import argparse
import sys


def evaluate(
  model, batches, mode: str, *, block_size: int | None = None, num_selected: int | None = None
) -> float:
  """Mean held-out cross-entropy (nats per byte) of ``model`` with its SSA layers set to
  ``mode`` (and the sparse budget), over ``batches``."""
  from flax import nnx

  from sparse_attention_jax.nn import set_inference
  from train import loop

  set_inference(model, mode, block_size=block_size, num_selected=num_selected)
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0.0
  for b in batches:
    t, c = loop._eval_step_jit(graphdef, state, {k: b[k] for k in loop._BATCH_KEYS})
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m train.ssa_eval",
    description="Held-out loss of an SSA checkpoint: full attention and "
    "sparse attention at several budgets.",
  )
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--checkpoint", required=True, help="checkpoint folder (.../checkpoints/<step>)")
  p.add_argument(
    "--budgets",
    default=None,
    help="comma-separated numbers of selected blocks (default: the config's)",
  )
  p.add_argument("--block-size", type=int, default=None, help="selection block size override")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = p.parse_args(argv)

  from train.config import load_config

  try:
    config = load_config(args.config, args.overrides)
    budgets = (
      [int(x) for x in args.budgets.split(",") if x.strip()]
      if args.budgets
      else [config.model.nsa.num_selected]
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: config: {e}", file=sys.stderr)
    return 2
  if not budgets or min(budgets) < 1:
    print(
      f"error: config: --budgets: expected positive ints, got {args.budgets!r}", file=sys.stderr
    )
    return 2
  if "ssa" not in config.model.layer_kinds():
    print(
      f"error: config: model.attention: expected 'ssa' layers, got {list(config.model.attention)}",
      file=sys.stderr,
    )
    return 2
  from train import cli

  tc = config.train
  try:
    model, step, batches = cli.model_and_batches(config, args.checkpoint, tc.eval_batches)
  except (ValueError, FileNotFoundError) as e:  # A missing, mismatching or damaged checkpoint.
    print(f"error: checkpoint: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(
    f"checkpoint {args.checkpoint} (step {step}); {tc.eval_batches} x {tc.batch_size} "
    f"held-out rows of {tc.seq_len} bytes"
  )
  full = evaluate(model, batches, "full")
  print(f"{'full':<28} eval loss {full:.4f} ({full / 0.6931471805599453:.3f} bits/byte)")
  for n in budgets:
    try:
      loss = evaluate(model, batches, "sparse", block_size=args.block_size, num_selected=n)
    except ValueError as e:
      print(f"error: sparse n={n}: {e}", file=sys.stderr)
      return 2
    bs = args.block_size or config.model.nsa.block_size
    label = f"sparse n={n} x l'={bs} ({n * bs} tok)"
    print(f"{label:<28} eval loss {loss:.4f} ({loss / 0.6931471805599453:.3f} bits/byte)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
