"""Orbax checkpoints of a model, its optimizer and the step.

Layout: ``<output_dir>/checkpoints/<step>/`` holds one Orbax ``StandardCheckpointer`` tree
``{"model": <model params>, "optimizer": <optimizer state>, "step": <int>}`` (plain nested dicts of
arrays, see ``nnx.to_pure_dict``), so it restores into any freshly built model/optimizer of the
same config.

Example::

  path = save(os.path.join(out, "checkpoints"), model, optimizer, step=300)
  model, optimizer = build(config)             # fresh, randomly initialized
  step = restore(path, model, optimizer)       # now holds the saved arrays
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _tree(model: nnx.Module, optimizer: nnx.Optimizer | None, step: int) -> dict:
  tree = {"model": nnx.to_pure_dict(nnx.state(model)), "step": np.asarray(step, np.int64)}
  if optimizer is not None:
    tree["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
  return tree


def save(directory: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None,
         step: int) -> str:
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
  steps = [int(n) for n in os.listdir(directory)
           if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
  return os.path.join(directory, str(max(steps))) if steps else None


def _flat(tree) -> dict[str, object]:
  """``{"model/layers/0/attn/...": leaf}`` (keys as strings: Orbax stores list indices so)."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(path: str, saved, abstract) -> None:
  """Raises a ValueError naming every array that is missing, unexpected or of another shape."""
  want, have = _flat(abstract), _flat(dict(saved))
  sections = {k.split("/", 1)[0] for k in want}
  problems = [f"{k}: not in the checkpoint" for k in sorted(want) if k not in have]
  problems += [f"{k}: in the checkpoint but not in the model/optimizer" for k in sorted(have)
               if k not in want and k.split("/", 1)[0] in sections]
  problems += [f"{k}: saved shape {tuple(have[k].shape)}, expected {tuple(want[k].shape)}"
               for k in sorted(want)
               if k in have and tuple(getattr(have[k], "shape", ())) != tuple(want[k].shape)]
  if problems:
    shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)"
                                       if len(problems) > 6 else "")
    raise ValueError(f"checkpoint {path}: does not match the model/optimizer built from the "
                     f"current config: {shown}")


def restore(path: str | os.PathLike, model: nnx.Module,
            optimizer: nnx.Optimizer | None = None) -> int:
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
    raise FileNotFoundError(f"checkpoint: expected a directory written by train.checkpoint.save, "
                            f"got {path!r}")
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata
    saved_keys = set(saved.keys()) if saved is not None else set()
    if optimizer is not None and "optimizer" not in saved_keys:
      raise ValueError(f"checkpoint {path}: has no optimizer state (saved {sorted(saved_keys)}); "
                       f"pass optimizer=None to restore parameters only")
    target = _tree(model, optimizer, 0)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _check_shapes(path, saved, abstract)
    try:
      if "optimizer" in saved_keys and optimizer is None:  # Parameters only.
        with ocp.PyTreeCheckpointer() as pytree_ckptr:
          restored = pytree_ckptr.restore(path, args=ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True))
      else:
        restored = ckptr.restore(path, abstract)
    except ValueError as e:
      raise ValueError(f"checkpoint {path}: does not match the model/optimizer built from the "
                       f"current config ({str(e)[:2000]})") from None
  model_state = nnx.state(model)
  nnx.replace_by_pure_dict(model_state, restored["model"])
  nnx.update(model, model_state)
  if optimizer is not None:
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(optimizer, opt_state)
  return int(restored["step"])
