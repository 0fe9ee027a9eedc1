"""Orbax checkpoints of a model, its optimizer, the step and the data iterator's position.

Two writers share one tree ``{"model": <model params>, "optimizer": <optimizer state>,
"step": <int>}`` (plain nested dicts of arrays, see ``nnx.to_pure_dict``), so a checkpoint
restores into any freshly built model/optimizer of the same config, on any mesh:

* :class:`Checkpointer` (the training job): an Orbax ``CheckpointManager`` over
  ``<output_dir>/checkpoints/<step>/{state,data,meta}/`` with asynchronous saves by steps and by
  time, keep-last-N, the Grain iterator state of every process
  (``data/process_<i>-of-<n>.json``, so a resumed run sees exactly the same batches) and content
  checksums plus the run config (``meta/meta.json``, :mod:`train.checkpoint_integrity`).
  :meth:`Checkpointer.restore_latest` walks back from the newest step to the newest one that
  reads back and verifies, moving damaged ones aside to ``<step>.corrupt``.
* :func:`save` / :func:`restore`: one synchronous tree at ``<dir>/<step>/`` (tools, tests);
  :func:`restore` also reads (and verifies) the ``state`` item of a :class:`Checkpointer` step.

Restoring reads every array straight into the sharding of the corresponding array of the target
model/optimizer (resharding: a checkpoint saved on mesh (2, 2, 2) restores onto (1, 8, 1) or one
device).

Example::

  ckpt = Checkpointer(os.path.join(out, "checkpoints"), every=100, every_minutes=30, keep=3)
  ckpt.save(step, model, optimizer, data_iterator)            # async; returns at once
  restored = ckpt.restore_latest(model, optimizer, data_iterator)   # newest good step, in place
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from train import checkpoint_integrity as integrity
from train.checkpoint_integrity import CheckpointMismatch, CorruptCheckpoint

__all__ = [
  "CheckpointMismatch",
  "Checkpointer",
  "CorruptCheckpoint",
  "Restored",
  "latest",
  "restore",
  "save",
]


# The items of a Checkpointer step.
_STATE, _DATA, _META = "state", "data", "meta"


def _tree(model: nnx.Module, optimizer: nnx.Optimizer | None, step: int) -> dict:
  tree = {"model": nnx.to_pure_dict(nnx.state(model)), "step": np.asarray(step, np.int64)}
  if optimizer is not None:
    tree["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
  return tree


def save(
  directory: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None, step: int
) -> str:
  """Saves ``model`` (and ``optimizer``) to ``directory/<step>`` and waits until it is written.

  Args:
    directory: the checkpoints folder (created if missing).
    model: the NNX model.
    optimizer: its ``nnx.Optimizer`` or None (parameters only).
    step: the training step; names the checkpoint folder (an existing one is replaced).

  Returns:
    The absolute path of the checkpoint.
  """
  if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
    raise ValueError(f"step: expected an int >= 0, got {step!r}")
  path = os.path.join(os.path.abspath(os.fspath(directory)), str(int(step)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, _tree(model, optimizer, int(step)), force=True)
    ckptr.wait_until_finished()
  return path


def latest(directory: str | os.PathLike) -> str | None:
  """The checkpoint of the highest step under ``directory``, or None."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    return None
  steps = [
    int(n)
    for n in os.listdir(directory)
    if n.isdigit() and os.path.isdir(os.path.join(directory, n))
  ]
  return os.path.join(directory, str(max(steps))) if steps else None


def _flat(tree) -> dict[str, object]:
  """``{"model/layers/0/attn/...": leaf}`` (keys as strings: Orbax stores list indices so)."""

  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

  return {
    "/".join(name(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _check_shapes(path: str, saved, abstract) -> None:
  """Raises a ValueError naming every array that is missing, unexpected or of another shape."""
  want, have = _flat(abstract), _flat(dict(saved))
  sections = {k.split("/", 1)[0] for k in want}
  problems = [f"{k}: not in the checkpoint" for k in sorted(want) if k not in have]
  problems += [
    f"{k}: in the checkpoint but not in the model/optimizer"
    for k in sorted(have)
    if k not in want and k.split("/", 1)[0] in sections
  ]
  problems += [
    f"{k}: saved shape {tuple(have[k].shape)}, expected {tuple(want[k].shape)}"
    for k in sorted(want)
    if k in have and tuple(getattr(have[k], "shape", ())) != tuple(want[k].shape)
  ]
  if problems:
    shown = "; ".join(problems[:6]) + (
      f"; ... ({len(problems)} in all)" if len(problems) > 6 else ""
    )
    raise ValueError(
      f"checkpoint {path}: does not match the model/optimizer built from the "
      f"current config: {shown}"
    )


def restore(
  path: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None = None
) -> int:
  """Loads a checkpoint written by :func:`save` into ``model`` (and ``optimizer``) in place.

  Args:
    path: a checkpoint folder (``.../checkpoints/<step>``).
    model: a model built from the same config (its current values are replaced).
    optimizer: its optimizer, or None to load parameters only.

  Returns:
    The saved step.

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: the checkpoint does not match the model/optimizer (names the mismatch), or it
      has no optimizer state but one was asked for.
    CorruptCheckpoint: a :class:`Checkpointer` step whose content fails its saved checksums.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"checkpoint: expected a directory written by train.checkpoint.save, got {path!r}"
    )
  if not os.path.isdir(os.path.join(path, _STATE)) and not os.path.exists(
    os.path.join(path, "_METADATA")
  ):
    steps = sorted(int(n) for n in os.listdir(path) if n.isdigit())
    if steps:
      raise FileNotFoundError(
        f"checkpoint: {path} is a checkpoints folder (steps {steps}); pass one step, e.g. "
        f"{os.path.join(path, str(steps[-1]))}"
      )
  meta = None
  if os.path.isdir(os.path.join(path, _STATE)):  # A Checkpointer step: read its state item.
    meta_path = os.path.join(path, _META, integrity.META_FILE)
    if os.path.isfile(meta_path):
      meta = integrity.MetaHandler().restore(epath.Path(path) / _META)
    path = os.path.join(path, _STATE)
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata
    saved_keys = set(saved.keys()) if saved is not None else set()
    if optimizer is not None and "optimizer" not in saved_keys:
      raise ValueError(
        f"checkpoint {path}: has no optimizer state (saved {sorted(saved_keys)}); "
        f"pass optimizer=None to restore parameters only"
      )
    target = _tree(model, optimizer, 0)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _check_shapes(path, saved, abstract)
    try:
      if "optimizer" in saved_keys and optimizer is None:  # Parameters only.
        with ocp.PyTreeCheckpointer() as pytree_ckptr:
          restored = pytree_ckptr.restore(
            path,
            args=ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True,
            ),
          )
      else:
        restored = ckptr.restore(path, abstract)
    except ValueError as e:
      raise ValueError(
        f"checkpoint {path}: does not match the model/optimizer built from the "
        f"current config ({str(e)[:2000]})"
      ) from None
    except Exception as e:  # Orbax/TensorStore raise many kinds: all mean "unreadable".
      raise CorruptCheckpoint(
        f"checkpoint {path}: unreadable ({type(e).__name__}: {_one_line(e)})"
      ) from None
  if meta is not None:
    integrity.verify(os.path.dirname(path), meta["checksums"], _flat(restored))
  model_state = nnx.state(model)
  nnx.replace_by_pure_dict(model_state, restored["model"])
  nnx.update(model, model_state)
  if optimizer is not None:
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(optimizer, opt_state)
  return int(restored["step"])


# ----------------------------------------------------------------------------------------------
# CheckpointManager: periodic async saves with the data iterator


class _DataStateHandler(integrity.JsonItemHandler):
  """Writes this process's data-iterator state (a JSON-able dict captured when the save was
  requested) to ``process_<i>-of-<n>.json``; every process writes its own file."""

  def save(self, directory: epath.Path, args: DataStateSave) -> None:
    i, n = jax.process_index(), jax.process_count()
    (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> dict:
    i, n = jax.process_index(), jax.process_count()
    path = directory / f"process_{i}-of-{n}.json"
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      if not any(n.startswith("process_") for n in found):
        raise integrity.CorruptCheckpoint(f"checkpoint {directory}: no data-iterator state")
      raise ValueError(
        f"checkpoint {directory}: expected the data state of process {i} of {n} "
        f"({path.name}), found {found} (the process count changed?)"
      )
    return json.loads(path.read_text())


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass
class Restored:
  """What :meth:`Checkpointer.restore_latest` restored.

  Attributes:
    step: the restored step.
    path: its folder.
    skipped: ``(step, reason, moved_to)`` of every newer checkpoint that failed to restore or
      verify (moved aside to ``moved_to``), newest first.
    config: the run config saved with it (None for checkpoints without a ``meta`` item).
    verified: True when its content checksums were checked.
  """

  step: int
  path: str
  skipped: list[tuple[int, str, str]]
  config: dict | None
  verified: bool


def _all_agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one process: ``ok``)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


class Checkpointer:
  """Periodic asynchronous checkpoints of model + optimizer + step + data-iterator state.

  Every step folder holds the items ``state`` (arrays), ``data`` (each process's iterator
  position) and ``meta`` (step, content checksums, run config; :mod:`train.checkpoint_integrity`).

  Args:
    directory: the checkpoints folder (``<output_dir>/checkpoints``), created if missing.
    every: :meth:`save` writes when ``step % every == 0`` (0 = no step period).
    every_minutes: :meth:`save` also writes when this many minutes passed since the last save
      (or since the Checkpointer was made); 0 = no time period. Several processes follow
      process 0's clock.
    keep: keep the newest ``keep`` checkpoints (older ones are deleted).
    async_save: write in a background thread (the arrays are copied off the device first, so
      training continues at once); :meth:`wait` / :meth:`close` block until written.
    config: the run config as a dict, saved with every checkpoint (see :class:`Restored`).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    every: int = 0,
    every_minutes: float = 0.0,
    keep: int = 3,
    async_save: bool = True,
    config: dict | None = None,
  ):
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
      raise ValueError(f"every (train.checkpoint_every): expected an int >= 0, got {every!r}")
    if (
      not isinstance(every_minutes, (int, float))
      or isinstance(every_minutes, bool)
      or not every_minutes >= 0
    ):
      raise ValueError(
        f"every_minutes (train.checkpoint_every_minutes): expected a number >= 0, got "
        f"{every_minutes!r}"
      )
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep (train.keep_checkpoints): expected an int >= 1, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    self.every_s = 60.0 * every_minutes
    self.config = config
    self._last_save = time.monotonic()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=(_STATE, _DATA, _META),
      options=options,
      item_handlers={
        _STATE: ocp.StandardCheckpointHandler(),
        _DATA: _DataStateHandler(),
        _META: integrity.MetaHandler(),
      },
    )

  def steps(self) -> list[int]:
    """Saved steps (finished or in flight), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def _due(self, step: int, force: bool) -> bool:
    if force or (self.every and step % self.every == 0):
      return True
    if not self.every_s:
      return False
    late = time.monotonic() - self._last_save >= self.every_s
    if jax.process_count() > 1:  # Every process must take the same decision: process 0's.
      from jax.experimental import multihost_utils

      late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
    return late

  def save(
    self,
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    data_iterator: Any = None,
    *,
    force: bool = False,
  ) -> bool:
    """Saves when ``force``, ``step`` is a multiple of ``every`` or ``every_minutes`` passed since
    the last save; True if a save started.

    Args:
      step: the optimizer step (names the checkpoint).
      model, optimizer: their current arrays are saved (sharded arrays: each process writes
        its shards), with their content checksums.
      data_iterator: an iterator with ``get_state()`` (Grain), or None.
      force: save regardless of the periods (the last step, a stop signal).
    """
    if not self._due(step, force):
      return False
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a periodic save of the final step).
    tree = _tree(model, optimizer, step)
    meta = {"step": int(step), "checksums": integrity.checksums(_flat(tree)), "config": self.config}
    data_state = {} if data_iterator is None else data_iterator.get_state()
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(tree),
        _DATA: DataStateSave(data_state),
        _META: integrity.MetaSave(meta),
      }
    )
    self._last_save = time.monotonic()
    return bool(self._manager.save(step, args=args, force=True))

  def restore(
    self,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    data_iterator: Any = None,
    *,
    step: int | None = None,
  ) -> int:
    """Loads ``step`` (default: the newest) into the objects in place; returns the step.

    Every array is read directly into the sharding of the target's current array, so the
    objects decide the layout (a Trainer's mesh, or one device). The content is verified against
    the checksums saved with it before anything is replaced.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) under the directory.
      CheckpointMismatch (a ValueError): the checkpoint does not match the model/optimizer
        (names the arrays).
      CorruptCheckpoint: the checkpoint is damaged (missing or unreadable files, checksums).
    """
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"checkpoint: expected a saved step under {self.directory}, got "
        f"{step!r} (saved: {self.steps()})"
      )
    return self._restore_step(step, model, optimizer, data_iterator)[0]

  def _restore_step(self, step, model, optimizer, data_iterator) -> tuple[int, dict | None]:
    """Reads and verifies ``step``, then loads it; ``(step, meta or None)``."""
    path = os.path.join(self.directory, str(step))
    if optimizer is None:  # Parameters only: read through the single-tree reader.
      return restore(path, model), None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(model, optimizer, 0))
    for item in (_STATE, _DATA) if data_iterator is not None else (_STATE,):
      if not os.path.isdir(os.path.join(path, item)):
        raise integrity.CorruptCheckpoint(f"checkpoint {path}: the {item}/ item is missing")
    try:
      saved = self._manager.item_metadata(step)
      state_meta = saved[_STATE] if saved is not None else None
      if state_meta is None:
        raise integrity.CorruptCheckpoint(f"checkpoint {path}: no readable state metadata")
    except integrity.CorruptCheckpoint:
      raise
    except Exception as e:  # Orbax/TensorStore raise many kinds: all mean "unreadable".
      raise integrity.CorruptCheckpoint(
        f"checkpoint {path}: unreadable metadata ({type(e).__name__}: {_one_line(e)})"
      ) from None
    try:
      _check_shapes(path, state_meta, abstract)
    except ValueError as e:
      raise integrity.CheckpointMismatch(str(e)) from None
    has_meta = os.path.isdir(os.path.join(path, _META))
    items = {_STATE: ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items[_DATA] = DataStateRestore()
    if has_meta:
      items[_META] = integrity.MetaRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (integrity.CorruptCheckpoint, integrity.CheckpointMismatch):
      raise
    except Exception as e:
      if "process count changed" in str(e):
        raise integrity.CheckpointMismatch(_one_line(e, 1000)) from None
      raise integrity.CorruptCheckpoint(
        f"checkpoint {path}: unreadable ({type(e).__name__}: {_one_line(e)})"
      ) from None
    state = restored[_STATE]
    meta = restored[_META] if has_meta else None
    if meta is not None:
      if int(meta.get("step", -1)) != int(state["step"]):
        raise integrity.CorruptCheckpoint(
          f"checkpoint {path}: meta step {meta.get('step')} != saved step {int(state['step'])}"
        )
      integrity.verify(path, meta["checksums"], _flat(state))
    if data_iterator is not None and not restored[_DATA]:
      raise integrity.CorruptCheckpoint(f"checkpoint {path}: has no data-iterator state")
    model_state = nnx.state(model)
    nnx.replace_by_pure_dict(model_state, state["model"])
    nnx.update(model, model_state)
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, state["optimizer"])
    nnx.update(optimizer, opt_state)
    if data_iterator is not None:
      data_iterator.set_state(restored[_DATA])
    return int(state["step"]), meta

  def restore_latest(
    self,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    data_iterator: Any = None,
    *,
    log=print,
  ) -> Restored | None:
    """Restores the newest checkpoint that reads back and verifies, walking back from the newest.

    A damaged checkpoint (:class:`CorruptCheckpoint`) is logged and moved aside to
    ``<directory>/<step>.corrupt`` (never deleted), and the next older one is tried. A checkpoint
    that does not fit the current model (:class:`CheckpointMismatch`) stops the walk: that is a
    config change, not damage.

    Returns:
      What was restored, or None when no checkpoint is left (the skipped ones are then logged).

    Raises:
      CheckpointMismatch: the newest readable checkpoint does not fit the model/optimizer.
    """
    self.wait()
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        got, meta = self._restore_step(step, model, optimizer, data_iterator)
        ok, reason = True, ""
      except integrity.CorruptCheckpoint as e:
        ok, reason = False, str(e)
      if _all_agree(ok):
        return Restored(
          step=got,
          path=os.path.join(self.directory, str(step)),
          skipped=skipped,
          config=None if meta is None else meta.get("config"),
          verified=meta is not None,
        )
      reason = reason or "another process could not restore it"
      moved = self._move_aside(step)
      log(f"checkpoint: skipped step {step}: {reason}; moved aside to {moved}")
      skipped.append((step, reason, moved))
    return None

  def _move_aside(self, step: int) -> str:
    """Renames ``<directory>/<step>`` to ``<step>.corrupt`` (``.corrupt-2``, ... if taken)."""
    src = os.path.join(self.directory, str(step))
    dst, n = src + ".corrupt", 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt-{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self._manager.reload()
    return dst

  def wait(self) -> None:
    """Blocks until every started save is written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
