"""Integrity of training checkpoints: content checksums and the ``meta`` item.

Orbax already makes a save atomic (it writes into a temporary folder and renames it when every
item is finalized, so a killed save never looks like a checkpoint) and its zarr3 format guards
its chunk index with a CRC32C; it does not checksum the array values. So every
:class:`train.checkpoint.Checkpointer` step also writes a ``meta/meta.json`` (process 0):

* ``step``: the saved step;
* ``checksums``: per array ``{"model/...": "<16 hex digits>"}``, two 32-bit position-weighted sums
  of the array's bits (:func:`checksums`), computed on the device from the global arrays, so they
  do not depend on the mesh the arrays are sharded over (a checkpoint restored onto another mesh
  verifies); any change of a single word changes the first sum;
* ``config``: the run config (a resume compares it with the current one).

Restoring recomputes the checksums of what was read and raises :class:`CorruptCheckpoint` when
one differs.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

META_FILE = "meta.json"


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read back as saved (missing or damaged files, wrong checksum);
  the message names the step folder and what is wrong."""


class CheckpointMismatch(ValueError):
  """A readable checkpoint that does not fit the model/optimizer of the current config."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element, or two for 8-byte dtypes)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  small = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """``[2]`` uint32: ``sum_i w_i * v_i`` with odd position weights ``w_i`` (any single-word change
  alters it) and ``sum_i mix(v_i ^ h_i)`` (mod 2^32)."""
  v = _words(x)
  idx = jnp.zeros(v.shape, jnp.uint32)
  for d, n in enumerate(v.shape):  # Row-major linear index, built without a reshape (sharding).
    idx = idx * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, v.shape, d)
  h = idx * jnp.uint32(0x9E3779B1) + jnp.uint32(0x632BE5AB)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x85EBCA77)
  h = h ^ (h >> 13)
  a = jnp.sum(v * (h | jnp.uint32(1)), dtype=jnp.uint32)
  m = (v ^ h) * jnp.uint32(0xC2B2AE3D)
  b = jnp.sum(m ^ (m >> 16), dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def _tree_checksums(tree: dict) -> jax.Array:
  """``[N, 2]`` uint32: the checksums of the ``N`` arrays of ``tree`` in key order."""
  return jnp.stack([_leaf_checksum(tree[k]) for k in sorted(tree)])


def checksums(flat: dict[str, jax.Array]) -> dict[str, str]:
  """``{name: "<16 hex digits>"}`` of every array of ``flat`` (``{"model/...": array}``).

  Computed by one jitted program on the arrays where they live and fetched in one transfer;
  every process gets the same values (the sums reduce over the global arrays)."""
  arrays = {k: v for k, v in flat.items() if isinstance(v, jax.Array)}
  if not arrays:
    return {}
  sums = _tree_checksums(arrays)
  if jax.process_count() > 1 and not sums.is_fully_addressable:
    from jax.experimental import multihost_utils

    host = np.asarray(multihost_utils.process_allgather(sums, tiled=True))
  else:
    host = np.asarray(sums)
  return {k: f"{int(a):08x}{int(b):08x}" for k, (a, b) in zip(sorted(arrays), host)}


def verify(path: str, saved: dict[str, str], flat: dict[str, jax.Array]) -> None:
  """Raises :class:`CorruptCheckpoint` when an array of ``flat`` that ``saved`` has a checksum
  for reads back with another one (names up to three)."""
  names = [k for k in flat if k in saved]
  got = checksums({k: flat[k] for k in names})
  bad = [k for k in names if k in got and got[k] != saved[k]]
  if bad:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise CorruptCheckpoint(
      f"checkpoint {path}: content checksum mismatch in {len(bad)} array(s): {shown}"
    )


class JsonItemHandler(ocp.CheckpointHandler):
  """Base of the small JSON checkpoint items (``meta``, the data state): no metadata, structure
  or finalization of their own."""

  def metadata(self, directory: epath.Path) -> None:
    return None

  def structure(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


class MetaHandler(JsonItemHandler):
  """Writes/reads ``meta.json`` (process 0 writes; every process reads)."""

  def save(self, directory: epath.Path, args: MetaSave) -> None:
    if jax.process_index() == 0:
      (directory / META_FILE).write_text(json.dumps(args.meta))

  def restore(self, directory: epath.Path, args: MetaRestore | None = None) -> dict:
    path = directory / META_FILE
    if not path.exists():
      raise CorruptCheckpoint(f"checkpoint {directory}: {META_FILE} is missing")
    try:
      meta = json.loads(path.read_text())
    except ValueError as e:
      raise CorruptCheckpoint(f"checkpoint {directory}: {META_FILE} is not JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("checksums"), dict):
      raise CorruptCheckpoint(f"checkpoint {directory}: {META_FILE} has no checksums")
    return meta


@ocp.args.register_with_handler(MetaHandler, for_save=True)
@dataclasses.dataclass
class MetaSave(ocp.args.CheckpointArgs):
  meta: dict


@ocp.args.register_with_handler(MetaHandler, for_restore=True)
@dataclasses.dataclass
class MetaRestore(ocp.args.CheckpointArgs):
  pass
