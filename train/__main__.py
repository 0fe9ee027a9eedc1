"""Training job: ``python -m train --config configs/tiny.yaml [section.key=value ...]``.

Builds the model of the ``model:`` section, trains it on the data of the ``data:`` section (default:
the embedded byte-level corpus of Python standard library sources; text/JSONL/ArrayRecord files,
optionally tokenized, or synthetic MQAR/needle tasks, see ``train.sources``) with the ``train:``
section, evaluates on held-out files, saves Orbax
checkpoints (every ``train.checkpoint_every`` steps, asynchronously, and at the end) and the
resolved config under ``train.output_dir`` and samples a few bytes.

With more than one device (or process) the run is SPMD over the mesh ``train.mesh``; one device
in one process runs without a mesh. ``--resume`` continues from the newest checkpoint of
``train.output_dir`` (model, optimizer, step and data position: the same loss curve as an
uninterrupted run); without it a run starts fresh and deletes old checkpoints there. SIGTERM
saves a checkpoint after the current step and exits with status 0.

Examples::

  python -m train --config configs/tiny.yaml
  python -m train --config configs/tiny.yaml train.steps=50 model.nsa.num_selected=3
  python -m train --config configs/tiny.yaml --resume train.checkpoint_every=50
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m train",
    description=__doc__.split("\n\n")[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="overrides: section.key=value, e.g. train.steps=50 model.d_model=64 "
    "model.nsa.num_selected=3 (values are parsed as YAML)",
  )
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue from the newest checkpoint in train.output_dir (if any)",
  )
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

  from train import mesh as mesh_lib

  try:
    mesh_lib.initialize_distributed(tc.distributed)  # Before anything touches a device.
  except ValueError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2

  from sparse_attention_jax.nn import count_params
  from train import checkpoint, flops, loop, sharding, sources
  from train.sample import sample_text

  nproc, pid = jax.process_count(), jax.process_index()
  if tc.batch_size % nproc:
    print(
      f"config error: train.batch_size: expected a multiple of the {nproc} processes, got "
      f"{tc.batch_size}",
      file=sys.stderr,
    )
    return 2
  mesh = None
  if jax.device_count() > 1:
    try:
      mesh = mesh_lib.make_mesh(tc.mesh)
    except ValueError as e:
      print(f"config error: {e}", file=sys.stderr)
      return 2
    if tc.batch_size % sharding.batch_shards(mesh):
      print(
        f"config error: train.batch_size: expected a multiple of the "
        f"{sharding.batch_shards(mesh)} "
        f"batch shards (train.mesh data x fsdp = {mesh_lib.describe(mesh)}), got "
        f"{tc.batch_size}",
        file=sys.stderr,
      )
      return 2
  local_batch = tc.batch_size // nproc

  os.makedirs(tc.output_dir, exist_ok=True)
  config_path = os.path.join(tc.output_dir, "config.yaml")
  if pid == 0:  # Process 0 writes the shared files (config, metrics).
    save_config(config, config_path)
  metrics_path = os.path.join(tc.output_dir, "metrics.jsonl")
  ckpt_dir = os.path.join(tc.output_dir, "checkpoints")
  resuming = args.resume and checkpoint.latest(ckpt_dir) is not None
  if not resuming:
    if os.path.exists(metrics_path) and pid == 0:
      os.remove(metrics_path)  # A fresh run starts a fresh log.
    removed = checkpoint.clear(ckpt_dir)
    if removed:
      print(
        f"fresh run: removed {removed} old checkpoint(s) under {ckpt_dir} (use --resume to "
        f"continue them)"
      )

  try:
    setup = sources.make_data(config, shard_index=pid, shard_count=nproc, local_batch=local_batch)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"data error: {e}", file=sys.stderr)
    return 2
  print(setup.description)
  train_it, eval_set = setup.train, setup.eval

  model, optimizer = loop.build(config) if mesh is None else loop.build_sharded(config, mesh)
  dev = jax.devices()[0]
  print(
    f"model: {count_params(model):,} params, layers {list(config.model.layer_kinds())}, "
    f"d_model {config.model.d_model}, compute {config.model.dtype}, remat "
    f"{config.model.remat}"
  )
  if mesh is None:
    print(f"device: {dev.platform} ({dev.device_kind}), 1 device, no mesh")
  else:
    print(f"device: {dev.platform} ({dev.device_kind}), mesh {mesh_lib.describe(mesh)}")
  flops_per_token = flops.flops_per_token(config.model, tc.seq_len)
  peak = flops.peak_flops(dev.device_kind, tc.peak_flops)
  print(
    f"flops: {flops_per_token / 1e9:.3g} GFLOP per trained token (train.flops), peak "
    f"{'n/a (MFU n/a)' if peak is None else f'{peak / 1e12:g} TFLOP/s per device'}"
  )
  print(
    f"train: {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens"
    f"{f' ({tc.grad_accum_steps} microbatches)' if tc.grad_accum_steps > 1 else ''}, "
    f"lr {tc.lr:g}, output {os.path.abspath(tc.output_dir)}"
  )

  trainer = loop.Trainer(model, optimizer, mesh=mesh, grad_accum_steps=tc.grad_accum_steps)
  ckpt = checkpoint.Checkpointer(ckpt_dir, every=tc.checkpoint_every, keep=tc.keep_checkpoints)
  if resuming:
    step = ckpt.restore(model, optimizer, train_it)
    trainer.refresh()
    print(f"resumed from {os.path.join(ckpt_dir, str(step))} (step {step} of {tc.steps})")
  init_eval = trainer.evaluate(eval_set) if eval_set else None  # train.eval_batches=0: none
  if init_eval is not None:
    print(
      f"eval loss at {'init' if not resuming else 'resume'}: {init_eval:.4f} (uniform over "
      f"{config.model.vocab_size} ids: {math.log(config.model.vocab_size):.4f})"
    )

  def on_step(step: int, force: bool) -> None:
    ckpt.save(step, model, optimizer, train_it, force=force)

  try:
    result = loop.train(
      trainer,
      tc,
      train_it,
      eval_set,
      metrics_path=metrics_path if pid == 0 else None,
      progress=not args.no_progress,
      on_step=on_step,
      flops_per_token=flops_per_token,
      peak_flops=peak,
      tensorboard_dir=(
        os.path.join(tc.output_dir, "tensorboard") if tc.tensorboard and pid == 0 else None
      ),
    )
    if not result.losses:  # Nothing left to run (resumed at the end): still save the state.
      ckpt.save(trainer.step_count, model, optimizer, train_it, force=True)
  finally:
    ckpt.close()
  ckpt_path = os.path.join(ckpt_dir, str(trainer.step_count))
  if result.stopped:
    print(
      f"stopped by SIGTERM after step {trainer.step_count}; checkpoint {ckpt_path}; rerun "
      f"with --resume to continue"
    )
    return 0

  text = None
  if tc.sample_bytes > 0 and setup.text and config.data.tokenizer is None:
    text = sample_text(
      model,
      tc.sample_prompt,
      tc.sample_bytes,
      temperature=tc.sample_temperature,
      seed=tc.seed,
      max_len=tc.seq_len,
    )

  wall = time.perf_counter() - t_start
  print()
  print("=" * 72)
  print(
    f"train loss      first {result.first_loss:.4f} -> last {result.last_loss:.4f} "
    f"(mean of the last {min(tc.log_every, max(result.steps, 1))} steps)"
  )
  if result.eval_loss is not None:
    print(
      f"eval loss       {init_eval:.4f} at {'resume' if resuming else 'init'} -> "
      f"{result.eval_loss:.4f} "
      f"({result.eval_loss / 0.6931471805599453:.3f} bits/token) on "
      f"{tc.eval_batches} x {tc.batch_size} held-out rows"
    )
  if result.eval_accuracy is not None:
    print(f"answer accuracy {result.eval_accuracy:.3f} (held-out answer tokens, teacher-forced)")
  print(
    f"throughput      {result.tokens_per_s:,.0f} tokens/s (first step incl. compile: "
    f"{result.compile_s:.1f} s; training loop {result.train_s:.1f} s)"
  )
  print(f"checkpoint      {ckpt_path}")
  print(f"config, metrics {config_path}, {metrics_path}")
  if tc.sample_bytes > 0 and text is None:
    print(
      f"sample          skipped (byte sampling needs byte-level text; data.source="
      f"{config.data.source}, data.tokenizer={config.data.tokenizer})"
    )
  if text is not None:
    print(
      f"sample          prompt {tc.sample_prompt!r} + {tc.sample_bytes} sampled bytes "
      f"(temperature {tc.sample_temperature:g}):"
    )
    print("-" * 72)
    print(tc.sample_prompt + text)
    print("-" * 72)
  print(f"wall time       {wall:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
