"""Loss, optimizer, jitted train/eval steps and the training loop.

The trainer keeps the model and optimizer as split NNX state (``nnx.split``) and runs plain
``jax.jit`` steps that take the state and return the updated state (donated, so the update is in
place in device memory), then writes the new arrays back into the Python objects.

With a mesh (``Trainer(..., mesh=make_mesh(...))``) the state is placed by the logical axis rules
of :mod:`train.sharding` (optimizer moments like their parameters), the step is jitted with those
``in_shardings``/``out_shardings`` and traced under ``jax.set_mesh`` + the rules (so attention
runs per shard), and batches are assembled from each process's rows into global arrays.
``grad_accum_steps > 1`` scans microbatches and applies one update with the gradient of the mean
loss over the whole batch.

Models with SSA layers (kind ``"ssa"``, docs/algorithms.md §6) train on ``CE + align_weight *
mean_layers(term1 + term2)``: each forward pass (step, or microbatch) draws one Bernoulli mode
shared by all SSA layers (:func:`~sparse_attention_jax.nn.attention.ssa.draw_mode`), and the
metrics add ``total_loss``, ``align_full`` (term1), ``align_sparse`` (term2) and ``mode_full``;
``loss`` stays the cross-entropy. Models without SSA layers run exactly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_attention_jax.nn import DecoderLM
from sparse_attention_jax.nn.attention import ssa as ssa_lib
from sparse_attention_jax.nn.parallel import mesh_axes
from sparse_attention_jax.nn.ssa_config import SSAConfig
from train import interrupts, scalars
from train import sharding as shd
from train.config import RunConfig, TrainConfig

Batch = dict[str, Any]

# Leaf names never decayed even when they are >= 2-D (e.g. per-head biases of shape [H, D]).
_NO_DECAY_NAMES = frozenset({"bias", "scale", "b1", "b2"})


def cross_entropy(
  logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over unmasked targets and the number of targets.

  Args:
    logits: ``[B, T, V]``.
    targets: ``[B, T]`` int32.
    loss_mask: ``[B, T]``, 1 where the target counts.

  Returns:
    ``(sum of losses, count)`` as float32 scalars; the mean is ``sum / max(count, 1)``.
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def loss_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean cross-entropy of ``model`` on a packed batch (see :func:`train.data.shift_rows`)."""
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  total, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
  return total / jnp.maximum(count, 1.0), (total, count)


def ssa_loss_fn(model: nnx.Module, batch: Batch, align_weight: float):
  """SSA objective ``CE + align_weight * (term1 + term2)`` (terms averaged over SSA layers) of a
  model whose SSA layers are in training form
  (:func:`sparse_attention_jax.nn.attention.ssa.set_training`).

  Returns:
    ``(total, (ce, count, terms))``: ``ce`` the mean cross-entropy, ``terms [2]`` float32.
  """
  ce, (_, count) = loss_fn(model, batch)
  terms = ssa_lib.alignment_terms(model)
  return ce + align_weight * jnp.sum(terms), (ce, count, terms)


def _ssa_settings(model: nnx.Module) -> SSAConfig | None:
  """The model's SSA settings when it has SSA layers, else None."""
  if not ssa_lib.ssa_layers(model):
    return None
  return model.config.ssa or SSAConfig()


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: matrices (ndim >= 2) that are not biases/scales."""

  def keep(path, x):
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", last))
    return bool(x.ndim >= 2 and str(name) not in _NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine decay to ``lr*min_lr_ratio``.

  ``warmup_steps`` is clamped to ``steps``; the decay ends at step ``steps``.
  """
  warmup = min(cfg.warmup_steps, cfg.steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(cfg.steps, warmup + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


# The TrainConfig fields that define the optimizer (not e.g. the seed or the output folder).
_TX_FIELDS = (
  "lr",
  "warmup_steps",
  "steps",
  "min_lr_ratio",
  "adam_b1",
  "adam_b2",
  "weight_decay",
  "grad_clip",
)


@functools.lru_cache(maxsize=32)
def _cached_tx(**fields) -> optax.GradientTransformation:
  cfg = TrainConfig(**fields)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(
    optax.adamw(
      lr_schedule(cfg),
      b1=cfg.adam_b1,
      b2=cfg.adam_b2,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping (if ``grad_clip > 0``) then AdamW with the schedule and decay mask.

  Equal optimizer settings return the same object, so optimizers built from equal settings have
  equal NNX graph definitions and share the compiled train step.
  """
  return _cached_tx(**{name: getattr(cfg, name) for name in _TX_FIELDS})


def build(config: RunConfig) -> tuple[DecoderLM, nnx.Optimizer]:
  """A freshly initialized model (seeded by ``train.seed``) and its optimizer."""
  model = DecoderLM(config.model, rngs=nnx.Rngs(config.train.seed))
  optimizer = nnx.Optimizer(model, make_tx(config.train), wrt=nnx.Param)
  return model, optimizer


def build_sharded(config: RunConfig, mesh) -> tuple[DecoderLM, nnx.Optimizer]:
  """:func:`build` placed on ``mesh`` with the rules' shardings.

  One process: :func:`build` runs eagerly (on the default device) and the state is then
  ``device_put`` onto its shardings, so the values equal the one-device run's bit for bit and
  nothing large compiles (a jitted sharded initializer of the 340M model took ~3 minutes to
  compile on 2 H200s). Several processes: :func:`build` runs inside ``jax.jit`` with the output
  shardings, so every process creates only its shards (same values up to compiler rounding of
  the initializers).
  """
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: build(config)))
  shardings = shd.state_shardings(abs_state, mesh)
  if jax.process_count() == 1:
    state = jax.device_put(nnx.split(build(config))[1], shardings)
  else:
    with shd.activate(mesh):
      state = jax.jit(lambda: nnx.split(build(config))[1], out_shardings=shardings)()
  model, optimizer = nnx.merge(graphdef, state)
  return model, optimizer


def _grads_accumulated(model, batch, accum: int, ssa: SSAConfig | None = None, step=None):
  """Mean loss, target count and gradients over ``accum`` microbatches scanned in turn.

  Rows ``i, i + accum, ...`` form microbatch ``i`` (a reshape that keeps each device's rows on
  that device); the gradient is of the summed loss divided by the total target count, i.e. the
  gradient of the mean loss of the whole batch. With SSA settings ``ssa`` every microbatch
  draws its own mode (forward pass ``step * accum + i``) and the objective adds ``align_weight``
  times the mean over microbatches of ``term1 + term2``; the fourth output is then ``(mean terms
  [2], fraction of full-mode microbatches)``, else None.
  """
  rows = batch["tokens"].shape[0]
  if rows % accum:
    raise ValueError(
      f"train.grad_accum_steps: expected a divisor of the batch's {rows} rows, got {accum}"
    )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  axes = mesh_axes("batch")  # () without a mesh and rules.
  shards = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)

  def split(x):
    x = x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    if axes and (rows // accum) % shards == 0:
      x = jax.lax.with_sharding_constraint(x, P(None, axes, *([None] * (x.ndim - 2))))
    return x

  micro = jax.tree.map(split, batch)

  def summed(p, mb):
    m = nnx.merge(graphdef, p, rest)
    logits = m(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"])
    return cross_entropy(logits, mb["targets"], mb["loss_mask"])

  def body(carry, mb):
    g_acc, total_acc, count_acc = carry
    (total, count), g = jax.value_and_grad(summed, has_aux=True)(params, mb)
    return (jax.tree.map(jnp.add, g_acc, g), total_acc + total, count_acc + count), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  if ssa is not None:
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def ssa_objective(p, r, mb, i):  # A copy of `r`: the layers write mode and terms into it.
      m = nnx.merge(graphdef, p, r, copy=True)
      mode = ssa_lib.draw_mode(step * accum + i, ssa.full_prob)
      ssa_lib.set_training(m, mode)
      logits = m(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"])
      total, count = cross_entropy(logits, mb["targets"], mb["loss_mask"])
      terms = ssa_lib.alignment_terms(m)
      obj = total / denom + ssa.align_weight / accum * jnp.sum(terms)
      return obj, (total, count, terms, mode.astype(jnp.float32))

    def ssa_body(carry, xs):
      g_acc, total_acc, count_acc, terms_acc, full_acc = carry
      mb, i = xs
      (_, (total, count, terms, full)), g = jax.value_and_grad(ssa_objective, has_aux=True)(
        params, rest, mb, i
      )
      return (
        jax.tree.map(jnp.add, g_acc, g),
        total_acc + total,
        count_acc + count,
        terms_acc + terms,
        full_acc + full,
      ), None

    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.zeros((2,), jnp.float32), jnp.float32(0))
    (g, total, count, terms, full), _ = jax.lax.scan(
      ssa_body, init, (micro, jnp.arange(accum, dtype=jnp.uint32))
    )
    return total / denom, count, g, (terms / accum, full / accum)
  (g, total, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
  denom = jnp.maximum(count, 1.0)
  return total / denom, count, jax.tree.map(lambda x: x / denom, g), None


def _train_step(model_def, opt_def, accum, model_state, opt_state, batch):
  model = nnx.merge(model_def, model_state)
  opt = nnx.merge(opt_def, opt_state)
  ssa = _ssa_settings(model)
  extra = None
  if ssa is not None and accum == 1:
    mode = ssa_lib.draw_mode(opt.step[...], ssa.full_prob)
    ssa_lib.set_training(model, mode)
    grad_fn = nnx.value_and_grad(ssa_loss_fn, has_aux=True)
    (_, (loss, count, terms)), grads = grad_fn(model, batch, ssa.align_weight)
    extra = (terms, mode.astype(jnp.float32))
  elif accum == 1:
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, (_, count)), grads = grad_fn(model, batch)
  else:
    loss, count, grads, extra = _grads_accumulated(model, batch, accum, ssa, opt.step[...])
  opt.update(model, grads)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "targets": count}
  if extra is not None:
    terms, full = extra
    metrics.update(
      total_loss=loss + ssa.align_weight * jnp.sum(terms),
      align_full=terms[0],
      align_sparse=terms[1],
      mode_full=full,
    )
  return nnx.state(model), nnx.state(opt), metrics


def _eval_step(model_def, model_state, batch):
  _, (total, count) = loss_fn(nnx.merge(model_def, model_state), batch)
  return total, count


def _answer_step(model_def, model_state, batch):
  """Summed cross-entropy, correct argmax predictions and count over ``answer_mask``."""
  model = nnx.merge(model_def, model_state)
  logits = model(
    batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
  ).astype(jnp.float32)
  mask = batch["answer_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)


# Module-level jits keyed on the (hashable) graph definitions: trainers of the same model and
# optimizer structure share one compilation (single device; mesh trainers jit their own).
_train_step_jit = jax.jit(_train_step, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
_eval_step_jit = jax.jit(_eval_step, static_argnums=(0,))
_answer_step_jit = jax.jit(_answer_step, static_argnums=(0,))

# Extra metrics of SSA models (means over the log window in the log line and metrics.jsonl).
_SSA_METRICS = ("align_full", "align_sparse", "total_loss", "mode_full")


def _any_process(flag: bool) -> bool:
  """``flag`` of any process: a signal that reaches one process of a multi-process job stops
  every process at the same step boundary (one small all-gather per step), so none is left
  waiting at a collective of the next step."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


_BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


class Trainer:
  """Jitted train and eval steps over split NNX state.

  The steps donate the old state, and after every step the new arrays are written back into
  :attr:`model` and :attr:`optimizer`, so both objects are always current (and safe to read,
  save or sample from) between steps.

  Attributes:
    model: the model being trained.
    optimizer: its optimizer.
    mesh: the device mesh (None = one device, no sharding).
    grad_accum_steps: microbatches per optimizer step.
  """

  def __init__(
    self, model: nnx.Module, optimizer: nnx.Optimizer, *, mesh=None, grad_accum_steps: int = 1
  ):
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps: expected an int >= 1, got {grad_accum_steps!r}")
    self.model, self.optimizer = model, optimizer
    self.mesh, self.grad_accum_steps = mesh, grad_accum_steps
    self._model_def, self._model_state = nnx.split(model)
    self._opt_def, self._opt_state = nnx.split(optimizer)
    if mesh is None:
      return
    self.model_shardings = shd.state_shardings(self._model_state, mesh)
    self.opt_shardings = shd.state_shardings(self._opt_state, mesh)
    data = {k: NamedSharding(mesh, shd.batch_spec(mesh, 2)) for k in _BATCH_KEYS}
    self._train_jit = jax.jit(
      functools.partial(_train_step, self._model_def, self._opt_def, grad_accum_steps),
      in_shardings=(self.model_shardings, self.opt_shardings, data),
      out_shardings=(self.model_shardings, self.opt_shardings, None),
      donate_argnums=(0, 1),
    )
    self._eval_jit = jax.jit(
      functools.partial(_eval_step, self._model_def),
      in_shardings=(self.model_shardings, data),
      out_shardings=None,
    )
    answer_data = {**data, "answer_mask": data["loss_mask"]}
    self._answer_jit = jax.jit(
      functools.partial(_answer_step, self._model_def),
      in_shardings=(self.model_shardings, answer_data),
      out_shardings=None,
    )
    self.refresh()

  def refresh(self) -> None:
    """Re-reads :attr:`model` and :attr:`optimizer` (e.g. after a checkpoint restore) and, under
    a mesh, places their arrays by the sharding rules."""
    self._model_state = nnx.state(self.model)
    self._opt_state = nnx.state(self.optimizer)
    if self.mesh is not None:
      self._model_state = jax.device_put(self._model_state, self.model_shardings)
      self._opt_state = jax.device_put(self._opt_state, self.opt_shardings)
      nnx.update(self.model, self._model_state)
      nnx.update(self.optimizer, self._opt_state)

  def _put(self, batch: Batch, keys=_BATCH_KEYS) -> Batch:
    batch = {k: batch[k] for k in keys}
    return batch if self.mesh is None else shd.put_batch(batch, self.mesh)

  def step(self, batch: Batch) -> dict[str, jax.Array]:
    """One optimizer step; returns ``loss``, ``grad_norm`` and ``targets`` (device scalars).

    Under a mesh, ``batch`` holds this process's rows (numpy); they are assembled into global
    arrays sharded over the batch mesh axes.
    """
    batch = self._put(batch)
    if self.mesh is None:
      self._model_state, self._opt_state, metrics = _train_step_jit(
        self._model_def,
        self._opt_def,
        self.grad_accum_steps,
        self._model_state,
        self._opt_state,
        batch,
      )
    else:
      with shd.activate(self.mesh):
        self._model_state, self._opt_state, metrics = self._train_jit(
          self._model_state, self._opt_state, batch
        )
    nnx.update(self.model, self._model_state)
    nnx.update(self.optimizer, self._opt_state)
    return metrics

  def evaluate(self, batches: list[Batch]) -> float:
    """Mean cross-entropy (nats per byte) over all unmasked targets of ``batches``."""
    if not batches:
      raise ValueError("batches: expected at least one evaluation batch, got none")
    total, count = 0.0, 0.0
    for b in batches:
      b = self._put(b)
      if self.mesh is None:
        t, c = _eval_step_jit(self._model_def, self._model_state, b)
      else:
        with shd.activate(self.mesh):
          t, c = self._eval_jit(self._model_state, b)
      total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)

  def evaluate_answers(self, batches: list[Batch]) -> dict[str, float]:
    """Answer metrics of synthetic-task batches (with ``answer_mask``, :mod:`train.synthetic`):
    ``answer_accuracy`` (fraction of answer tokens whose argmax prediction, teacher-forced, is
    right) and ``answer_loss`` (their mean cross-entropy)."""
    if not batches:
      raise ValueError("batches: expected at least one evaluation batch, got none")
    ce, correct, count = 0.0, 0.0, 0.0
    for b in batches:
      if "answer_mask" not in b:
        raise ValueError(
          f"batches: expected synthetic-task batches with 'answer_mask', got keys {sorted(b)}"
        )
      b = self._put(b, _BATCH_KEYS + ("answer_mask",))
      if self.mesh is None:
        s, c, n = _answer_step_jit(self._model_def, self._model_state, b)
      else:
        with shd.activate(self.mesh):
          s, c, n = self._answer_jit(self._model_state, b)
      ce, correct, count = ce + float(s), correct + float(c), count + float(n)
    return {"answer_accuracy": correct / max(count, 1.0), "answer_loss": ce / max(count, 1.0)}

  @property
  def step_count(self) -> int:
    """Optimizer steps taken (restored checkpoints included)."""
    return int(self._opt_state["step"][...])


@dataclasses.dataclass
class TrainResult:
  """What a run did.

  Attributes:
    first_loss: train loss of the first step.
    last_loss: mean train loss over the last ``log_every`` steps.
    eval_loss: final held-out loss (nats per byte), or None when there was no evaluation.
    eval_history: ``(step, eval loss)`` pairs.
    tokens_per_s: training throughput excluding the first (compiling) step.
    compile_s: wall time of the first step (trace + compile + run).
    train_s: wall time of the training loop.
    steps: steps run (this call; a resumed run counts from its checkpoint).
    losses: the train loss of every step run, in order.
    stopped: True when a signal (SIGTERM, SIGINT) stopped the run early (after saving).
    eval_accuracy: final held-out answer accuracy of synthetic tasks (None otherwise).
  """

  first_loss: float
  last_loss: float
  eval_loss: float | None
  eval_history: list[tuple[int, float]]
  tokens_per_s: float
  compile_s: float
  train_s: float
  steps: int
  losses: list[float] = dataclasses.field(default_factory=list)
  stopped: bool = False
  eval_accuracy: float | None = None


def _tokens(batch: Batch) -> int:
  return int(np.prod(np.shape(batch["tokens"])))


def train(
  trainer: Trainer,
  config: TrainConfig,
  train_batches: Iterator[Batch],
  eval_batches: list[Batch] | None = None,
  *,
  metrics_path: str | None = None,
  progress: bool = True,
  log: Callable[[str], None] | None = None,
  on_step: Callable[[int, bool], None] | None = None,
  handle_sigterm: bool = True,
  stop: Any = None,
  flops_per_token: float = 0.0,
  peak_flops: float | None = None,
  tensorboard_dir: str | None = None,
) -> TrainResult:
  """Trains up to step ``config.steps`` with a tqdm bar, periodic log lines, evaluation, metrics.

  A trainer restored from a checkpoint at step ``k`` runs steps ``k+1 .. config.steps``, so a
  resumed run ends where the uninterrupted one would.

  Args:
    trainer: the jitted steps and state.
    config: the ``train:`` section (steps, log_every, eval_every).
    train_batches: an iterator of training batches.
    eval_batches: held-out batches (None or empty = no evaluation).
    metrics_path: a ``metrics.jsonl`` file to append one JSON object per log/eval event.
    progress: show the tqdm bar.
    log: where log lines go (default: ``tqdm.write`` to stdout).
    on_step: called as ``on_step(step, force)`` after every step (e.g. a periodic checkpoint);
      ``force=True`` when the run stops on a signal and the state must be saved now.
    handle_sigterm: while training (in the main thread), SIGTERM or SIGINT finishes the current
      step, calls ``on_step(step, True)`` and returns with ``stopped=True`` instead of dying; a
      second SIGINT exits at once (:mod:`train.interrupts`).
    stop: an event (e.g. :attr:`train.interrupts.Interrupts.stop`) that, once set, stops the
      run the same way; given, the loop installs no signal handlers itself.
    flops_per_token: model training FLOPs per token (:func:`train.flops.flops_per_token`);
      with it the log adds ``tflops_per_device`` and ``mfu`` (0 = not logged).
    peak_flops: peak FLOP/s of one device for the MFU (None = MFU n/a).
    tensorboard_dir: also write every logged scalar there as TensorBoard events (None = no).

  Raises:
    FloatingPointError: the train loss is NaN or infinite (names the step).

  Returns:
    A :class:`TrainResult`; ``trainer.model`` and ``trainer.optimizer`` hold the trained state.
  """
  from tqdm.auto import tqdm  # Lazy: step-only users (benchmarks/) need no tqdm.

  log = log or (lambda s: tqdm.write(s, file=sys.stdout))
  with contextlib.ExitStack() as stack:
    metrics_file = None
    if metrics_path:
      os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
      metrics_file = stack.enter_context(open(metrics_path, "a"))
    if stop is None:
      if handle_sigterm:
        sig = stack.enter_context(interrupts.Interrupts())
        sig.training()
        stop = sig.stop
      else:
        stop = threading.Event()
    tb = stack.enter_context(scalars.ScalarLog(tensorboard_dir, warn=log))
    perf = (flops_per_token, peak_flops, jax.device_count())
    return _train(
      trainer,
      config,
      train_batches,
      eval_batches,
      metrics_file,
      progress,
      log,
      on_step,
      stop,
      tb,
      perf,
    )


def _train(
  trainer, config, train_batches, eval_batches, metrics_file, progress, log, on_step, stop, tb, perf
):
  """:func:`train` with the metrics file (or None) and TensorBoard writer already open and the
  stop flag set up; ``perf = (flops_per_token, peak_flops, num_devices)``."""
  from tqdm.auto import tqdm

  schedule = lr_schedule(config)
  flops_per_token, peak_flops, num_devices = perf

  def record(event: dict[str, Any]) -> None:
    if metrics_file is not None:
      metrics_file.write(json.dumps(event) + "\n")
      metrics_file.flush()
    tb.write(event)

  first_loss, eval_loss, eval_history, losses, stopped = None, None, [], [], False
  eval_accuracy = None
  last_window: list[float] = []
  window_losses, window_tokens, window_s = [], 0, 0.0
  window_extra: dict[str, list[float]] = {}
  timed_tokens, timed_s = 0, 0.0
  compile_s = 0.0
  start = time.perf_counter()
  step0 = trainer.step_count
  todo = max(config.steps - step0, 0)
  bar = tqdm(
    total=config.steps,
    initial=min(step0, config.steps),
    desc="train",
    unit="step",
    disable=not progress,
    file=sys.stdout,
    dynamic_ncols=True,
    mininterval=0.5,
  )
  try:
    for i in range(todo):
      step = step0 + i + 1
      t_data = time.perf_counter()
      batch = next(train_batches)
      t0 = time.perf_counter()
      metrics = trainer.step(batch)
      loss = float(metrics["loss"])  # Blocks: per-step timing and a finite-loss check.
      dt = time.perf_counter() - t0
      if not np.isfinite(loss):
        raise FloatingPointError(
          f"train loss is {loss} at step {step}; lower train.lr or set train.grad_clip"
        )
      if i == 0:
        first_loss, compile_s = loss, dt
      else:  # Throughput counts data + step time after the compiling step, never evaluation.
        timed_tokens += _tokens(batch)
        timed_s += time.perf_counter() - t_data
        window_tokens += _tokens(batch)
        window_s += time.perf_counter() - t_data
      window_losses.append(loss)
      losses.append(loss)
      if "align_full" in metrics:  # SSA: cross-entropy, both alignment terms, total, mode.
        for name in _SSA_METRICS:
          window_extra.setdefault(name, []).append(float(metrics[name]))
      tok_s = timed_tokens / timed_s if timed_s > 0 else 0.0
      postfix = {"loss": f"{loss:.3f}", "tok_s": f"{tok_s:,.0f}"}
      if flops_per_token > 0 and peak_flops:
        postfix["mfu"] = f"{100 * flops_per_token * tok_s / num_devices / peak_flops:.1f}%"
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)

      if step % config.log_every == 0 or i == todo - 1:
        mean_loss = float(np.mean(window_losses))
        rate = window_tokens / window_s if window_s > 0 else 0.0
        event = {
          "step": step,
          "loss": mean_loss,
          "lr": float(schedule(step - 1)),
          "grad_norm": float(metrics["grad_norm"]),
          "tokens_per_s": rate,
          "elapsed_s": time.perf_counter() - start,
        }
        perf_fields = scalars.throughput_fields(rate, flops_per_token, num_devices, peak_flops)
        event.update({k: v for k, v in perf_fields.items() if v is not None})
        ssa_text = ""
        if window_extra:
          event.update({k: float(np.mean(v)) for k, v in window_extra.items()})
          ssa_text = (
            f" | ce {mean_loss:.4f} align full {event['align_full']:.4f} sparse "
            f"{event['align_sparse']:.4f} total {event['total_loss']:.4f} full-mode "
            f"{event['mode_full']:.2f}"
          )
        log(
          f"step {step:5d} | loss {mean_loss:.4f} | lr {event['lr']:.2e} | "
          f"grad_norm {event['grad_norm']:.3f} | {rate:,.0f} tok/s"
          f"{scalars.describe_throughput(perf_fields)}{ssa_text}"
        )
        record(event)
        last_window = window_losses
        window_losses, window_tokens, window_s = [], 0, 0.0
        window_extra = {}

      last = i == todo - 1
      due = (config.eval_every and step % config.eval_every == 0) or last
      if eval_batches and due:
        eval_loss = trainer.evaluate(eval_batches)
        eval_history.append((step, eval_loss))
        eval_event = {"step": step, "eval_loss": eval_loss}
        answer_text = ""
        if "answer_mask" in eval_batches[0]:
          answers = trainer.evaluate_answers(eval_batches)
          eval_event.update({f"eval_{k}": v for k, v in answers.items()})
          eval_accuracy = answers["answer_accuracy"]
          answer_text = (
            f" | answer accuracy {answers['answer_accuracy']:.3f} loss {answers['answer_loss']:.4f}"
          )
        log(
          f"step {step:5d} | eval loss {eval_loss:.4f} ({eval_loss / np.log(2):.3f} "
          f"bits/token){answer_text}"
        )
        record(eval_event)
      if _any_process(stop.is_set()):
        if not stop.is_set():  # the signal reached another process of the job
          stop.signame = "a signal to another process"
          stop.set()
        if on_step is not None:
          on_step(step, True)
        name = getattr(stop, "signame", None) or "stop"
        log(f"step {step:5d} | {name}: saved and stopping")
        record({"step": step, "stopped": name})
        last_window = window_losses or last_window
        stopped = True
        break
      if on_step is not None:
        on_step(step, last)
  finally:
    bar.close()
  train_s = time.perf_counter() - start
  last_window = last_window or window_losses
  return TrainResult(
    first_loss=first_loss if first_loss is not None else float("nan"),
    last_loss=float(np.mean(last_window)) if last_window else float("nan"),
    eval_loss=eval_loss,
    eval_history=eval_history,
    tokens_per_s=timed_tokens / timed_s if timed_s > 0 else 0.0,
    compile_s=compile_s,
    train_s=train_s,
    steps=len(losses),
    losses=losses,
    stopped=stopped,
    eval_accuracy=eval_accuracy,
  )
