"""Training job: ``python -m train --config configs/tiny.yaml [section.key=value ...]``.

Builds the model of the ``model:`` section, trains it on the embedded byte-level corpus (Python
standard library sources) with the ``train:`` section, evaluates on held-out files, saves an Orbax
checkpoint and the resolved config under ``train.output_dir`` and samples a few bytes.

Examples::

  python -m train --config configs/tiny.yaml
  python -m train --config configs/tiny.yaml train.steps=50 model.nsa.num_selected=3
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m train", description=__doc__.split("\n\n")[1],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="overrides: section.key=value, e.g. train.steps=50 model.d_model=64 "
             "model.nsa.num_selected=3 (values are parsed as YAML)")
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  t_start = time.perf_counter()

  # Everything that can be wrong with the config fails here, before JAX compiles anything.
  from train.config import load_config, save_config
  try:
    config = load_config(args.config, args.overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  tc = config.train

  import jax

  from sparse_attention_jax.nn import count_params
  from train import checkpoint, data, loop
  from train.sample import sample_text

  os.makedirs(tc.output_dir, exist_ok=True)
  config_path = os.path.join(tc.output_dir, "config.yaml")
  save_config(config, config_path)
  metrics_path = os.path.join(tc.output_dir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    os.remove(metrics_path)  # A fresh run starts a fresh log.

  corpus = data.load_corpus(tc.corpus_max_bytes, tc.heldout_fraction)
  print(f"corpus: Python {sys.version.split()[0]} standard library sources, "
        f"{len(corpus.train)} train files ({corpus.train_bytes / 1e6:.2f} MB), "
        f"{len(corpus.heldout)} held-out files ({corpus.heldout_bytes / 1e6:.2f} MB)")
  train_it = data.train_iterator(corpus.train, tc.seq_len, tc.batch_size, tc.seed)
  eval_set = data.eval_batches(corpus.heldout, tc.seq_len, tc.batch_size, tc.eval_batches)

  model, optimizer = loop.build(config)
  dev = jax.devices()[0]
  print(f"model: {count_params(model):,} params, layers {list(config.model.layer_kinds())}, "
        f"d_model {config.model.d_model}")
  print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); "
        f"using 1")
  print(f"train: {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, lr {tc.lr:g}, "
        f"output {os.path.abspath(tc.output_dir)}")

  trainer = loop.Trainer(model, optimizer)
  init_eval = trainer.evaluate(eval_set)
  print(f"eval loss at init: {init_eval:.4f} (uniform bytes: ln 256 = 5.5452)")
  result = loop.train(trainer, tc, train_it, eval_set, metrics_path=metrics_path,
                      progress=not args.no_progress)

  ckpt_path = checkpoint.save(os.path.join(tc.output_dir, "checkpoints"), model, optimizer,
                              trainer.step_count)

  text = None
  if tc.sample_bytes > 0:
    text = sample_text(model, tc.sample_prompt, tc.sample_bytes,
                       temperature=tc.sample_temperature, seed=tc.seed, max_len=tc.seq_len)

  wall = time.perf_counter() - t_start
  print()
  print("=" * 72)
  print(f"train loss      first {result.first_loss:.4f} -> last {result.last_loss:.4f} "
        f"(mean of the last {min(tc.log_every, tc.steps)} steps)")
  if result.eval_loss is not None:
    print(f"eval loss       {init_eval:.4f} at init -> {result.eval_loss:.4f} "
          f"({result.eval_loss / 0.6931471805599453:.3f} bits/byte) on "
          f"{tc.eval_batches} x {tc.batch_size} held-out rows")
  print(f"throughput      {result.tokens_per_s:,.0f} tokens/s (first step incl. compile: "
        f"{result.compile_s:.1f} s; training loop {result.train_s:.1f} s)")
  print(f"checkpoint      {ckpt_path}")
  print(f"config, metrics {config_path}, {metrics_path}")
  if text is not None:
    print(f"sample          prompt {tc.sample_prompt!r} + {tc.sample_bytes} sampled bytes "
          f"(temperature {tc.sample_temperature:g}):")
    print("-" * 72)
    print(tc.sample_prompt + text)
    print("-" * 72)
  print(f"wall time       {wall:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
