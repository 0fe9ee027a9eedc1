"""The device mesh of a run and multi-process start-up.

The mesh has three named axes, sized by ``train.mesh`` (one of them may be -1 = all remaining
devices)::

  train:
    mesh: {data: 1, fsdp: -1, tensor: 1}

* ``data``: pure data parallelism (parameters replicated),
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
* ``tensor``: heads / MLP width / vocabulary split across devices (Megatron style).

The axes are ``AxisType.Auto``: parameters are placed by ``train.sharding`` (logical axis rules)
and XLA propagates shardings through the step, which is the path NNX logical annotations take
on every supported jax version.

Multi-process: :func:`initialize_distributed` calls ``jax.distributed.initialize()`` when
``train.distributed`` is true or the environment names a coordinator
(``JAX_COORDINATOR_ADDRESS`` with ``JAX_PROCESS_COUNT``/``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_INDEX``/``JAX_PROCESS_ID``); one process and N processes run the same code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from train.config import DEFAULT_MESH, MESH_AXES, validate_mesh_config


def mesh_shape(spec: Mapping[str, int] | None, num_devices: int) -> tuple[int, int, int]:
  """``(data, fsdp, tensor)`` sizes for ``num_devices`` devices (a -1 axis takes the rest).

  Raises:
    ValueError: the sizes do not multiply to ``num_devices`` (or the rest does not divide).
  """
  sizes = validate_mesh_config(spec)
  fixed = math.prod(n for n in sizes.values() if n != -1)
  free = [a for a, n in sizes.items() if n == -1]
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"train.mesh: the fixed axes {sizes} (product {fixed}) do not divide the "
        f"{num_devices} devices"
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"train.mesh: expected axis sizes whose product is the number of devices "
      f"({num_devices}), got {sizes} (product {math.prod(sizes.values())})"
    )
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(
  spec: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh with ``AxisType.Auto`` axes over ``devices`` (default:
  all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def describe(mesh: Mesh) -> str:
  """``"data=2 fsdp=2 tensor=2 (8 cpu devices, 1 process)"``."""
  axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  dev = mesh.devices.flat[0]
  return (
    f"{axes} ({mesh.devices.size} {dev.platform} devices, {jax.process_count()} "
    f"process{'es' if jax.process_count() > 1 else ''})"
  )


def _env(*names: str) -> str | None:
  for n in names:
    if os.environ.get(n):
      return os.environ[n]
  return None


def initialize_distributed(enabled: bool = False) -> bool:
  """Calls ``jax.distributed.initialize`` for a multi-process run; True if it did.

  It runs when ``enabled`` (``train.distributed``) is true or ``JAX_COORDINATOR_ADDRESS`` is set.
  The coordinator address, process count and process index come from the environment when set
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_PROCESS_COUNT`` or ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_INDEX`` or ``JAX_PROCESS_ID``); otherwise jax detects the cluster (SLURM, Cloud
  TPU, ...). Must run before anything touches a JAX device.
  """
  address = _env("JAX_COORDINATOR_ADDRESS")
  if not enabled and address is None:
    return False
  count = _env("JAX_PROCESS_COUNT", "JAX_NUM_PROCESSES")
  index = _env("JAX_PROCESS_INDEX", "JAX_PROCESS_ID")
  kwargs = {}
  if address is not None:
    kwargs["coordinator_address"] = address
  for key, raw, name in (
    ("num_processes", count, "JAX_PROCESS_COUNT"),
    ("process_id", index, "JAX_PROCESS_INDEX"),
  ):
    if raw is not None:
      try:
        kwargs[key] = int(raw)
      except ValueError:
        raise ValueError(f"{name}: expected an int, got {raw!r}") from None
  jax.distributed.initialize(**kwargs)
  return True


__all__ = [
  "DEFAULT_MESH",
  "MESH_AXES",
  "describe",
  "initialize_distributed",
  "make_mesh",
  "mesh_shape",
  "validate_mesh_config",
]
