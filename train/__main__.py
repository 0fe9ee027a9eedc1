"""Training job: ``python -m train --config configs/tiny.yaml [section.key=value ...]``.

Builds the model of the ``model:`` section, trains it on the data of the ``data:`` section (default:
the embedded byte-level corpus of Python standard library sources; text/JSONL/ArrayRecord files,
optionally tokenized, or synthetic MQAR/needle tasks, see ``train.sources``) with the ``train:``
section, evaluates on held-out files, saves Orbax checkpoints and the resolved config under
``train.output_dir`` and samples a few bytes.

Checkpoints: every ``train.checkpoint_every`` steps and at least every
``train.checkpoint_every_minutes`` (asynchronous, with content checksums), and at the end; the
newest ``train.keep_checkpoints`` are kept. Everything (config, data, model, first batch) is
validated before the output folder is touched. A folder that holds a previous run is never
overwritten silently: ``--resume`` continues it from its newest checkpoint that verifies (a
damaged one is moved aside to ``<step>.corrupt``; model, optimizer, step and data position:
the same loss curve as an uninterrupted run; metrics.jsonl is trimmed to that step),
``--overwrite`` deletes it and starts fresh. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint after
the current step and exits with status 0 (a second Ctrl-C exits at once without saving); during
start-up they exit at once with a message. Errors are one ``error:`` line, exit status 2.

With more than one device (or process) the run is SPMD over the mesh ``train.mesh``; one device
in one process runs without a mesh.

Examples::

  python -m train --config configs/tiny.yaml
  python -m train --config configs/tiny.yaml train.steps=50 model.nsa.num_selected=3
  python -m train --config configs/tiny.yaml --resume train.checkpoint_every=50
  python -m train --config configs/tiny.yaml --overwrite
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# train.* fields whose change on --resume is expected (no warning).
_QUIET_ON_RESUME = frozenset(
  "train." + k
  for k in (
    "steps",
    "output_dir",
    "checkpoint_every",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "log_every",
    "eval_every",
    "eval_batches",
    "sample_bytes",
    "sample_prompt",
    "sample_temperature",
    "tensorboard",
    "peak_flops",
    "mesh",
    "distributed",
  )
)


class _Fail(Exception):
  """A one-line failure of the job (printed as ``error: ...``, exit status 2)."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m train",
    description=__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="overrides: section.key=value, e.g. train.steps=50 model.d_model=64 "
    "model.nsa.num_selected=3 (values are parsed as YAML)",
  )
  p.add_argument("--config", required=True, help="YAML file with model: and train: sections")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in train.output_dir from its newest checkpoint that verifies "
    "(an error when there is none)",
  )
  mode.add_argument(
    "--overwrite",
    action="store_true",
    help="delete the previous run in train.output_dir (config.yaml, metrics.jsonl, "
    "checkpoints/, tensorboard/) and start fresh; without it a fresh run refuses such a folder",
  )
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def _flat_config(d: dict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and not (prefix == "train." and k == "mesh"):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _config_changes(saved: dict, current: dict) -> list[str]:
  """``"key old -> new"`` for every field that differs between two run configs."""
  a, b = _flat_config(saved), _flat_config(current)
  return [
    f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
  ]


def _config_warnings(config) -> list[str]:
  """Settings that are valid but do not do what they say at this ``train.seq_len``."""
  out = []
  nsa, t = config.model.nsa, config.train.seq_len
  kinds = set(config.model.layer_kinds())
  if nsa is not None and kinds & {"nsa", "nosa", "ssa"}:  # The kinds that select blocks.
    blocks = -(-t // nsa.block_size)
    if nsa.num_selected > blocks:
      out.append(
        f"model.nsa.num_selected={nsa.num_selected}: a row of train.seq_len={t} has only "
        f"{blocks} blocks of {nsa.block_size}; selection is clamped to {blocks} (sparse "
        f"layers attend densely)"
      )
  return out


def _check_first_batch(train_it, local_batch: int, seq_len: int, vocab_size: int) -> None:
  """Peeks at the first training batch (the iterator's position is restored): its shape and
  that every token id is in ``[0, vocab_size)``."""
  import numpy as np

  state = train_it.get_state() if hasattr(train_it, "get_state") else None
  batch = next(train_it)
  if state is not None:
    train_it.set_state(state)
  tokens = np.asarray(batch["tokens"])
  if tokens.shape != (local_batch, seq_len):
    raise _Fail(
      f"data: expected batches of shape {(local_batch, seq_len)} (rows, train.seq_len), got "
      f"{tokens.shape}"
    )
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise _Fail(
      f"data: token ids must be in [0, model.vocab_size={vocab_size}), the first batch has "
      f"ids in [{lo}, {hi}]"
    )


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  from train import interrupts

  with interrupts.Interrupts() as sig:
    sig.startup()
    try:
      return _run(args, sig)
    except _Fail as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except interrupts.Interrupted as e:
      print(
        f"stopped by {e.signame} during start-up, before any training step: nothing was "
        f"saved{'; rerun with --resume to continue' if args.resume else ''}",
        file=sys.stderr,
      )
      return 0 if e.signame == "SIGTERM" else 130


def _run(args: argparse.Namespace, sig) -> int:
  t_start = time.perf_counter()

  # Everything that can be wrong with the config fails here, before JAX compiles anything.
  from train.config import load_config, save_config

  try:
    config = load_config(args.config, args.overrides)
  except (ValueError, FileNotFoundError) as e:
    raise _Fail(f"config: {e}") from None
  tc = config.train
  for line in _config_warnings(config):
    print(f"warning: {line}")

  import jax

  from train import mesh as mesh_lib

  try:
    mesh_lib.initialize_distributed(tc.distributed)  # Before anything touches a device.
  except ValueError as e:
    raise _Fail(f"config: {e}") from None

  from flax import nnx

  from sparse_attention_jax.nn import count_params
  from train import checkpoint, flops, loop, run_dir, sharding, sources
  from train.sample import sample_text

  nproc, pid = jax.process_count(), jax.process_index()
  if tc.batch_size % nproc:
    raise _Fail(
      f"config: train.batch_size: expected a multiple of the {nproc} processes, got {tc.batch_size}"
    )
  mesh = None
  if jax.device_count() > 1:
    try:
      mesh = mesh_lib.make_mesh(tc.mesh)
    except ValueError as e:
      raise _Fail(f"config: {e}") from None
    if tc.batch_size % sharding.batch_shards(mesh):
      raise _Fail(
        f"config: train.batch_size: expected a multiple of the "
        f"{sharding.batch_shards(mesh)} batch shards (train.mesh data x fsdp = "
        f"{mesh_lib.describe(mesh)}), got {tc.batch_size}"
      )
  local_batch = tc.batch_size // nproc

  # The output folder: refuse early (nothing is touched here), delete only after validation.
  out = tc.output_dir
  ckpt_dir = os.path.join(out, run_dir.CHECKPOINTS)
  previous = [] if args.resume else run_dir.previous_run(out)
  if args.resume and checkpoint.latest(ckpt_dir) is None:
    raise _Fail(
      f"--resume: nothing to resume in {out} (no checkpoint under {ckpt_dir}); run without "
      f"--resume to start fresh"
    )
  if previous and not args.overwrite:
    raise _Fail(
      f"{out} holds a previous run ({', '.join(previous)}); pass --resume to continue it "
      f"or --overwrite to delete it and start fresh"
    )

  # Data, model (abstract: no arrays) and the first batch, before the output folder is touched.
  try:
    setup = sources.make_data(config, shard_index=pid, shard_count=nproc, local_batch=local_batch)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise _Fail(f"data: {e}") from None
  try:
    nnx.eval_shape(lambda: loop.build(config))
  except (ValueError, TypeError, NotImplementedError) as e:
    raise _Fail(f"model: {' '.join(str(e).split())}") from None
  _check_first_batch(setup.train, local_batch, tc.seq_len, config.model.vocab_size)

  if previous and pid == 0:  # --overwrite, after everything validated.
    run_dir.remove(out)
    print(f"--overwrite: removed the previous run's {', '.join(previous)} from {out}")
  if nproc > 1:  # No process writes before every process has checked the folder.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("train_output_dir_checked")

  os.makedirs(out, exist_ok=True)
  config_path = os.path.join(out, run_dir.CONFIG)
  metrics_path = os.path.join(out, run_dir.METRICS)
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
    f"lr {tc.lr:g}, output {os.path.abspath(out)}"
  )

  trainer = loop.Trainer(model, optimizer, mesh=mesh, grad_accum_steps=tc.grad_accum_steps)
  ckpt = checkpoint.Checkpointer(
    ckpt_dir,
    every=tc.checkpoint_every,
    every_minutes=tc.checkpoint_every_minutes,
    keep=tc.keep_checkpoints,
    config=config.to_dict(),
  )
  try:
    resuming = False
    if args.resume:
      try:
        restored = ckpt.restore_latest(model, optimizer, train_it)
      except checkpoint.CheckpointMismatch as e:
        raise _Fail(f"--resume: {_mismatch_message(e, ckpt, config)}") from None
      if restored is None:
        raise _Fail(
          f"--resume: nothing to resume in {out}: no checkpoint under {ckpt_dir} restores "
          f"(the damaged ones were moved aside, see above); run with --overwrite to start fresh"
        )
      resuming = True
      trainer.refresh()
      step = restored.step
      print(
        f"resumed from {restored.path} (step {step} of {tc.steps}"
        f"{'' if restored.verified else '; saved without checksums: not verified'})"
      )
      if restored.config is not None:
        changes = [
          c
          for c in _config_changes(restored.config, config.to_dict())
          if c.split(" ", 1)[0] not in _QUIET_ON_RESUME
        ]
        if changes:
          print(
            f"warning: the config differs from the checkpoint's: {'; '.join(changes)} (the "
            f"resumed run is not the continuation of the saved one)"
          )
      if pid == 0:
        dropped = run_dir.trim_metrics(metrics_path, step)
        if dropped:
          print(f"metrics: dropped {dropped} event(s) after step {step} from {metrics_path}")
    if pid == 0:  # Process 0 writes the shared files (config, metrics).
      save_config(config, config_path)
    init_eval = trainer.evaluate(eval_set) if eval_set else None  # eval_batches=0: none
    if init_eval is not None:
      print(
        f"eval loss at {'init' if not resuming else 'resume'}: {init_eval:.4f} (uniform over "
        f"{config.model.vocab_size} ids: {math.log(config.model.vocab_size):.4f})"
      )
      if resuming and pid == 0:  # the resumed curve starts with a measured point
        run_dir.record_resume_eval(metrics_path, step, init_eval)

    def on_step(step: int, force: bool) -> None:
      ckpt.save(step, model, optimizer, train_it, force=force)

    sig.training()  # From here a signal stops the run at a step boundary, with a checkpoint.
    try:
      result = loop.train(
        trainer,
        tc,
        train_it,
        eval_set,
        metrics_path=metrics_path if pid == 0 else None,
        progress=not args.no_progress,
        on_step=on_step,
        stop=sig.stop,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        tensorboard_dir=(
          os.path.join(out, run_dir.TENSORBOARD) if tc.tensorboard and pid == 0 else None
        ),
      )
    except FloatingPointError as e:
      raise _Fail(str(e)) from None
    if not result.losses:  # Nothing left to run (resumed at the end): still save the state.
      ckpt.save(trainer.step_count, model, optimizer, train_it, force=True)
  finally:
    ckpt.close()
  ckpt_path = os.path.join(ckpt_dir, str(trainer.step_count))
  if result.stopped:
    print(
      f"stopped by {sig.stop.signame or 'a signal'} after step {trainer.step_count}; "
      f"checkpoint {ckpt_path}; rerun with --resume to continue"
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


def _mismatch_message(e: Exception, ckpt, config) -> str:
  """One line for a checkpoint that does not fit the current model: the changed model fields
  when the checkpoint has its config, else the mismatching arrays."""
  import json

  from train import checkpoint_integrity

  newest = ckpt.latest_step()
  meta_path = os.path.join(ckpt.directory, str(newest), "meta", checkpoint_integrity.META_FILE)
  try:
    with open(meta_path) as f:
      saved = json.load(f).get("config") or {}
  except (OSError, ValueError):
    saved = {}
  changes = [
    c for c in _config_changes({"model": saved.get("model", {})}, {"model": config.model.to_dict()})
  ]
  if saved and changes:
    return (
      f"checkpoint {os.path.join(ckpt.directory, str(newest))} was saved with another model "
      f"shape ({'; '.join(changes)}); resume with the checkpoint's model settings or start "
      f"fresh with --overwrite"
    )
  return " ".join(str(e).split())


if __name__ == "__main__":
  sys.exit(main())
