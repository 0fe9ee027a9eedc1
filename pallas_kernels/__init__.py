"""Pallas kernels for sparse attention, and the registry the library dispatches through.

Registered: ``pallas_gpu`` (``selected_attention``, Mosaic GPU forward for Hopper; its module is
imported only when the op is first called, so importing this package on CPU stays cheap).
A backend is a named set of op implementations; :func:`sparse_attention_jax.nsa_attention` with
``impl="auto"`` tries the backends registered for the current platform in priority order and falls
back to the plain-JAX reference, while an explicitly requested backend that cannot serve a call
fails loudly.

An op implementation takes the same arguments as the library op of that name and raises
``NotImplementedError(reason)`` for configurations it cannot serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

KNOWN_BACKENDS: Mapping[str, str] = {
  "pallas_gpu": "Mosaic GPU kernels for NVIDIA Hopper (sm90)",
  "pallas_tpu": "Pallas TPU kernels",
}
"""Backend names the library reserves, with what each will be."""


@dataclasses.dataclass(frozen=True)
class Backend:
  """A kernel backend.

  Attributes:
    name: the ``impl=`` name users pass (e.g. ``"pallas_gpu"``).
    platforms: ``jax.default_backend()`` values it runs on (``"gpu"``, ``"tpu"``).
    ops: op name (``"nsa_attention"``, ``"selected_attention"``, ...) -> implementation.
    priority: higher runs first under ``impl="auto"``.
  """

  name: str
  platforms: tuple[str, ...]
  ops: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  priority: int = 0


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
  """Adds (or replaces) a backend."""
  _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def get(name: str) -> Backend | None:
  return _REGISTRY.get(name)


def backends_for(platform: str) -> list[Backend]:
  """Registered backends that run on ``platform``, highest priority first."""
  found = [b for b in _REGISTRY.values() if platform in b.platforms]
  return sorted(found, key=lambda b: -b.priority)


def registered() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _selected_attention_pallas_gpu(*args, **kwargs):
  """Lazy entry: imports the Mosaic GPU module on first use (see ``selected_attention_mgpu``)."""
  from pallas_kernels import selected_attention_mgpu

  return selected_attention_mgpu.selected_attention_op(*args, **kwargs)


register(
  Backend(
    name="pallas_gpu",
    platforms=("gpu",),
    ops={"selected_attention": _selected_attention_pallas_gpu},
    priority=10,
  )
)
