"""SPMD helpers of the modules: logical axis names of parameters and sharded attention calls.

The modules never name mesh axes. Parameters carry *logical* axis names (``"embed"``,
``"q_heads"``, ...) as Flax ``out_sharding`` metadata (with eager sharding off, so a model builds
with no mesh at all), and a training job maps them to mesh axes with one rules table (see
``train/sharding.py``) activated by ``nnx.logical_axis_rules(rules)`` together with
``jax.set_mesh(mesh)``.

With such a mesh and rules active, :func:`sharded_call` runs an attention op per shard inside
``jax.shard_map(..., check_vma=False)``: batch over the mesh axes of the logical ``"batch"`` rule,
heads over those of ``"kv_heads"``. With no mesh (or no rules) it simply calls the op.

Logical axis names used by the modules:

=============== ===================================================
``vocab``        vocabulary axis of the embedding and output head
``embed``        the residual width ``d_model``
``q_heads``      query heads ``HQ``
``kv_heads``     KV heads ``H`` (also the leading axis of phi)
``head_dim``     per-head feature dims ``Dk``/``Dv``
``mlp``          SwiGLU hidden width
``norm``         RMSNorm scales
``compressor``   inner axes of the learnable compressor phi
``batch``        activations: the batch axis (used by :func:`sharded_call`)
=============== ===================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

LOGICAL_AXES = (
  "vocab",
  "embed",
  "q_heads",
  "kv_heads",
  "head_dim",
  "mlp",
  "norm",
  "compressor",
  "batch",
)


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
  """An :class:`nnx.Param` annotated with logical axis ``names`` (one per dim, None = never
  sharded); eager sharding is off, so no mesh is needed to create it."""
  if len(names) != value.ndim:
    raise ValueError(
      f"names: expected one logical axis name per dim of a shape {value.shape} "
      f"parameter, got {tuple(names)}"
    )
  return nnx.Param(value, sharding=tuple(names), eager_sharding=False)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
  """``init`` wrapped so the parameter it creates carries logical axis ``names``."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _active_mesh():
  """The abstract mesh set by ``jax.set_mesh`` (None when there is none or it has one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  return mesh


def mesh_axes(logical: str, mesh=None) -> tuple[str, ...]:
  """Mesh axes (of size > 1) that the active logical rules map ``logical`` to; ``()`` if none."""
  mesh = _active_mesh() if mesh is None else mesh
  if mesh is None:
    return ()
  for name, target in spmd.get_logical_axis_rules():
    if name == logical:
      if target is None:
        return ()
      target = (target,) if isinstance(target, str) else tuple(target)
      return tuple(a for a in target if a in mesh.shape and mesh.shape[a] > 1)
  return ()


def _fits(size: int, axes: tuple[str, ...], mesh) -> tuple[str, ...] | None:
  """``axes`` if ``size`` splits evenly over them, else None (the dim stays replicated)."""
  if not axes:
    return None
  return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else None


def constrain_batch(x: jax.Array) -> jax.Array:
  """Constrains an activation ``[B, ...]`` to be sharded over the batch mesh axes (no-op without
  a mesh or when ``B`` does not split evenly)."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  axes = _fits(x.shape[0], mesh_axes("batch", mesh), mesh)
  if axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def sharded_call(
  fn: Callable[..., jax.Array], args: dict[str, Any], layouts: dict[str, str], *, num_kv_heads: int
) -> jax.Array:
  """``fn(**args)`` per shard (batch and heads) when a mesh and logical rules are active.

  Args:
    fn: the attention op over keyword arguments; returns ``[B, T, HQ, Dv]``.
    args: its keyword arguments (arrays, pytrees of arrays, or None).
    layouts: for every key of ``args``: ``"bthd"`` (``[B, T, heads, ...]``, sharded over batch
      and heads), ``"bt"`` (``[B, T]``, batch only) or ``"h"`` (every leaf has a leading
      KV-head axis, e.g. the compressor phi; heads only).
    num_kv_heads: ``H``; heads are sharded only if the head mesh axes divide it (query heads
      ``HQ = G * H`` then split the same way, so every shard keeps whole GQA groups). Otherwise
      the heads stay replicated and only the batch is split.

  Returns:
    ``fn``'s output ``[B, T, HQ, Dv]`` (sharded like the queries under a mesh).
  """
  mesh = _active_mesh()
  if mesh is None or not spmd.get_logical_axis_rules():
    return fn(**args)
  missing = sorted(set(args) - set(layouts))
  if missing:
    raise ValueError(f"layouts: expected a layout for every argument, missing {missing}")
  batch = next(
    jax.tree.leaves(args[k])
    for k in args
    if layouts[k] in ("bthd", "bt") and jax.tree.leaves(args[k])
  )[0].shape[0]
  b_axes = _fits(batch, mesh_axes("batch", mesh), mesh)
  h_axes = _fits(num_kv_heads, mesh_axes("kv_heads", mesh), mesh)
  if b_axes is None and h_axes is None:
    return fn(**args)

  def spec(layout: str, x) -> P:
    if layout == "bthd":
      return P(b_axes, None, h_axes, *([None] * (x.ndim - 3)))
    if layout == "bt":
      return P(b_axes, *([None] * (x.ndim - 1)))
    if layout == "h":
      return P(h_axes, *([None] * (x.ndim - 1)))
    raise ValueError(f"layouts: expected 'bthd', 'bt' or 'h', got {layout!r}")

  present = {k: v for k, v in args.items() if jax.tree.leaves(v)}
  absent = {k: v for k, v in args.items() if k not in present}  # None: passed through as is.
  in_specs = {
    k: jax.tree.map(lambda x, lay=layouts[k]: spec(lay, x), v) for k, v in present.items()
  }
  out_spec = P(b_axes, None, h_axes, None)
  mapped = jax.shard_map(
    lambda a: fn(**a, **absent),
    mesh=mesh,
    in_specs=(in_specs,),
    out_specs=out_spec,
    check_vma=False,
  )
  return mapped(present)


__all__ = ["LOGICAL_AXES", "constrain_batch", "mesh_axes", "param", "partitioned", "sharded_call"]
