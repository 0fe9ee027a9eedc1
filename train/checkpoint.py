"""Orbax checkpoints of a model, its optimizer, the step and the data iterator's position.

Two writers share one tree ``{"model": <model params>, "optimizer": <optimizer state>,
"step": <int>}`` (plain nested dicts of arrays, see ``nnx.to_pure_dict``), so a checkpoint
restores into any freshly built model/optimizer of the same config, on any mesh:

* :class:`Checkpointer` (the training job): an Orbax ``CheckpointManager`` over
  ``<output_dir>/checkpoints/<step>/{state,data}/`` with asynchronous saves, keep-last-N, and the
  Grain iterator state of every process (``data/process_<i>-of-<n>.json``), so a resumed run sees
  exactly the same batches.
* :func:`save` / :func:`restore`: one synchronous tree at ``<dir>/<step>/`` (tools, tests);
  :func:`restore` also reads the ``state`` item of a :class:`Checkpointer` step.

Restoring reads every array straight into the sharding of the corresponding array of the target
model/optimizer (resharding: a checkpoint saved on mesh (2, 2, 2) restores onto (1, 8, 1) or one
device).

Example::

  ckpt = Checkpointer(os.path.join(out, "checkpoints"), every=100, keep=3)
  ckpt.save(step, model, optimizer, data_iterator)            # async; returns at once
  step = ckpt.restore(model, optimizer, data_iterator)        # latest step, in place
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx


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
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"checkpoint: expected a directory written by train.checkpoint.save, got {path!r}"
    )
  if os.path.isdir(os.path.join(path, _STATE)):  # A Checkpointer step: read its state item.
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

_STATE, _DATA = "state", "data"


class _DataStateHandler(ocp.CheckpointHandler):
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
      raise ValueError(
        f"checkpoint {directory}: expected the data state of process {i} of {n} "
        f"({path.name}), found {found} (the process count changed?)"
      )
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def structure(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Periodic asynchronous checkpoints of model + optimizer + step + data-iterator state.

  Args:
    directory: the checkpoints folder (``<output_dir>/checkpoints``), created if missing.
    every: :meth:`save` writes when ``step % every == 0`` (0 = only when forced).
    keep: keep the newest ``keep`` checkpoints (older ones are deleted).
    async_save: write in a background thread (the arrays are copied off the device first, so
      training continues at once); :meth:`wait` / :meth:`close` block until written.
  """

  def __init__(
    self, directory: str | os.PathLike, *, every: int = 0, keep: int = 3, async_save: bool = True
  ):
    if not isinstance(every, int) or every < 0:
      raise ValueError(f"every (train.checkpoint_every): expected an int >= 0, got {every!r}")
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep (train.keep_checkpoints): expected an int >= 1, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_names=(_STATE, _DATA),
      options=options,
      item_handlers={_STATE: ocp.StandardCheckpointHandler(), _DATA: _DataStateHandler()},
    )

  def steps(self) -> list[int]:
    """Saved steps (finished or in flight), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def save(
    self,
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    data_iterator: Any = None,
    *,
    force: bool = False,
  ) -> bool:
    """Saves when ``force`` or ``step`` is a multiple of ``every``; True if a save started.

    Args:
      step: the optimizer step (names the checkpoint).
      model, optimizer: their current arrays are saved (sharded arrays: each process writes
        its shards).
      data_iterator: an iterator with ``get_state()`` (Grain), or None.
      force: save regardless of ``every`` (the last step, SIGTERM).
    """
    if not (force or (self.every and step % self.every == 0)):
      return False
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a periodic save of the final step).
    data_state = {} if data_iterator is None else data_iterator.get_state()
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(_tree(model, optimizer, step)),
        _DATA: DataStateSave(data_state),
      }
    )
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
    objects decide the layout (a Trainer's mesh, or one device).

    Raises:
      FileNotFoundError: no checkpoint (or not that step) under the directory.
      ValueError: the checkpoint does not match the model/optimizer (names the arrays).
    """
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"checkpoint: expected a saved step under {self.directory}, got "
        f"{step!r} (saved: {self.steps()})"
      )
    path = os.path.join(self.directory, str(step))
    target = _tree(model, optimizer, 0)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if optimizer is None:  # Parameters only: read through the single-tree reader.
      restore(path, model)
      return step
    saved = self._manager.item_metadata(step)
    _check_shapes(path, saved[_STATE], abstract)
    items = {_STATE: ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items[_DATA] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = restored[_STATE]
    model_state = nnx.state(model)
    nnx.replace_by_pure_dict(model_state, state["model"])
    nnx.update(model, model_state)
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, state["optimizer"])
    nnx.update(optimizer, opt_state)
    if data_iterator is not None:
      data_state = restored[_DATA]
      if not data_state:
        raise ValueError(f"checkpoint {path}: has no data-iterator state to restore")
      data_iterator.set_state(data_state)
    return int(state["step"])

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


def clear(directory: str | os.PathLike) -> int:
  """Deletes the numbered checkpoints under ``directory`` (a fresh run); returns how many."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory) or jax.process_index() != 0:
    return 0
  names = [n for n in os.listdir(directory) if n.isdigit()]
  for n in names:
    shutil.rmtree(os.path.join(directory, n))
  return len(names)
