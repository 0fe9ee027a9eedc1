"""Logical-to-mesh axis rules (the one table of the run) and the shardings they give.

Parameters carry logical axis names (see :mod:`sparse_attention_jax.nn.parallel`); :data:`RULES`
maps each to mesh axes of :mod:`train.mesh`. A dim whose size the mesh axes do not divide stays
replicated (e.g. one KV head on ``tensor=2``), and a mesh axis is used at most once per array.

Example::

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with activate(mesh):                      # jax.set_mesh + nnx.logical_axis_rules(RULES)
    shardings = state_shardings(nnx.state(model), mesh)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# logical axis -> mesh axes (a name, a tuple of names, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),  # activations and input batches
  ("embed", "fsdp"),  # d_model dim of every weight: FSDP / ZeRO-3
  ("vocab", "tensor"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("norm", None),
  ("compressor", None),
)


def _rule(logical: str | None, rules) -> tuple[str, ...]:
  if logical is None:
    return ()
  for name, target in rules:
    if name == logical:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  raise ValueError(
    f"logical axis {logical!r}: expected one of the rules' names {[n for n, _ in rules]}"
  )


def logical_to_spec(
  names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES
) -> P:
  """The ``PartitionSpec`` of an array of ``shape`` whose dims have logical ``names``.

  Mesh axes of size 1 are dropped; a dim not divisible by its mesh axes (or whose axes another
  dim already uses) is replicated.
  """
  if len(names) != len(shape):
    raise ValueError(
      f"names: expected one logical name per dim of shape {tuple(shape)}, got {tuple(names)}"
    )
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    axes = tuple(a for a in _rule(name, rules) if mesh.shape.get(a, 1) > 1 and a not in used)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return P(*out)


def _logical_names(var: nnx.Variable) -> tuple | None:
  meta = var.get_metadata()
  names = meta.get("out_sharding", meta.get("sharding", meta.get("sharding_names")))
  return None if names is None else tuple(names)


def state_shardings(state: Any, mesh: Mesh, rules=RULES) -> Any:
  """``NamedSharding`` s for an NNX state (model or optimizer; arrays or ShapeDtypeStructs).

  Every :class:`nnx.Variable` with logical names (optimizer moments inherit their parameter's)
  is sharded by :func:`logical_to_spec`; everything else (step counters, unannotated variables)
  is replicated. The result has the structure of ``state`` (usable as ``jax.jit`` shardings).
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      names = _logical_names(x)
      shape = np.shape(x.get_value()) if hasattr(x, "get_value") else np.shape(x[...])
      spec = P() if names is None else logical_to_spec(names, shape, mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P()) if hasattr(x, "shape") else None

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh, ndim: int = 2, rules=RULES) -> P:
  """``P(("data", "fsdp"), None, ...)``: rows over the batch mesh axes (size-1 axes dropped)."""
  axes = tuple(a for a in _rule("batch", rules) if mesh.shape.get(a, 1) > 1)
  return P(axes or None, *([None] * (ndim - 1)))


def batch_shards(mesh: Mesh, rules=RULES) -> int:
  """How many ways the batch is split (the product of the batch mesh axes)."""
  return math.prod(mesh.shape.get(a, 1) for a in _rule("batch", rules))


def put_batch(local: dict[str, np.ndarray], mesh: Mesh, rules=RULES) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the batch mesh axes.

  Each process passes its own ``[B / process_count, ...]`` rows; the global batch is their
  concatenation in process order (``jax.make_array_from_process_local_data``).
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
      NamedSharding(mesh, batch_spec(mesh, v.ndim, rules)), v
    )
  return out


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules=RULES) -> Iterator[None]:
  """``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` (nothing when mesh is None).

  Trace sharded steps inside it: the attention modules read the mesh and the rules to run the op
  per shard (:func:`sparse_attention_jax.nn.parallel.sharded_call`).
  """
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def describe_state(state: Any) -> dict[str, str]:
  """``{"embed/embedding": "P('tensor', 'fsdp')", ...}`` of the arrays of a placed state."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    keys = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    out[keys] = str(getattr(getattr(x, "sharding", None), "spec", None))
  return out


__all__ = [
  "RULES",
  "activate",
  "batch_shards",
  "batch_spec",
  "describe_state",
  "logical_to_spec",
  "put_batch",
  "state_shardings",
]
