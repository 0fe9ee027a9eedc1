"""``impl=``: one table of implementations per op, and the rule that picks one.

Implementation names (:data:`IMPLS`; the same meaning for every op that takes ``impl=``):

* ``"auto"``: the op's implementations in table order, skipping those not made for the current
  platform (``jax.default_backend()``) and those whose auto-only guard declines the call; one that
  raises ``NotImplementedError(reason)`` is skipped with a debug log, and the next is tried.
* ``"reference"``: the plain-JAX masked reference (:mod:`sparse_attention_jax.ops.masked`), the
  semantics every other implementation is tested against; dense ``[B, T, HQ, S]`` logits.
* ``"blocked"``: plain-JAX flash-style chunks (:mod:`sparse_attention_jax.ops.blocked`), for causal
  and sliding-window attention, ``O(T * C)`` memory.
* ``"gathered"``: plain-JAX gathers of the selected blocks per query chunk (selected attention).
* ``"cudnn"``: cuDNN flash attention (GPU, bf16/f16; :mod:`sparse_attention_jax.ops.cudnn`).
* ``"pallas_gpu"``: the Pallas Mosaic GPU kernels of ``pallas_kernels`` (NVIDIA Hopper), imported
  on first use.
* ``"pallas_tpu"``: the Pallas TPU (Mosaic) kernels of ``pallas_kernels`` (selected attention),
  imported on first use.

A named implementation (anything but ``"auto"``) runs without guards and fails loudly: an unknown
name raises ``ValueError``; a name the op has no entry for, or an entry that cannot serve the call,
raises ``NotImplementedError``. A *composite* op (``nsa_attention``: a pipeline of other
dispatched ops) runs its pipeline when the name has no entry for the whole op, and the pipeline
passes the name on to its branch ops (see :func:`sparse_attention_jax.ops.nsa_attention`).

Table entries name their function as ``"module:attribute"``, imported when called: the table costs
no import, and ``pallas_kernels`` is never imported before a ``pallas_gpu`` or ``pallas_tpu`` entry is
called.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping

import jax

log = logging.getLogger("sparse_attention_jax")

IMPLS: Mapping[str, str] = {
  "auto": "each implementation of the op for this platform, in table order",
  "reference": "plain-JAX masked reference (dense logits, float32 softmax)",
  "blocked": "plain-JAX flash-style chunks with online softmax, O(T * C) memory",
  "gathered": "plain-JAX gathers of the selected blocks per query chunk",
  "cudnn": "cuDNN flash attention (GPU, bf16/f16)",
  "pallas_gpu": "Pallas GPU kernels (Mosaic GPU for NVIDIA Hopper sm90; Triton for scores)",
  "pallas_tpu": "Pallas TPU (Mosaic) kernels (selected attention)",
}
"""Every implementation name the library defines, with what it is."""


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One entry of the table.

  Attributes:
    name: the ``impl=`` name.
    target: the function, or ``"module:attribute"`` imported when called. It takes the op's
      arguments (validated, defaults filled in) and raises ``NotImplementedError(reason)`` for a
      call it cannot serve.
    platforms: ``jax.default_backend()`` values ``"auto"`` tries it on (None: every platform).
      A user who names it gets it anywhere (it may then decline).
    auto: whether ``"auto"`` tries it at all.
    guard: ``"auto"`` only: ``guard(*args, **kwargs)`` returns a reason to skip the call (e.g.
      the dense reference above a memory budget) or None; a function or ``"module:attribute"``.
    composite: the target is a pipeline of dispatched ops; it receives ``impl=`` (the name that
      was asked for) and passes it on.
  """

  name: str
  target: str | Callable
  platforms: tuple[str, ...] | None = None
  auto: bool = True
  guard: str | Callable | None = None
  composite: bool = False


def _entries(*impls: Implementation) -> dict[str, Implementation]:
  return {i.name: i for i in impls}


_OPS = "sparse_attention_jax.ops"

# op name -> its implementations, in the order "auto" tries them.
_TABLE: dict[str, dict[str, Implementation]] = {
  "causal_attention": _entries(
    Implementation("cudnn", f"{_OPS}.cudnn:causal_attention", platforms=("gpu",)),
    Implementation("blocked", f"{_OPS}.causal:blocked_impl"),
    Implementation("reference", f"{_OPS}.causal:reference_impl", auto=False),
  ),
  "selected_attention": _entries(
    Implementation(
      "pallas_gpu",
      f"{_OPS}.selected:pallas_gpu_impl",
      platforms=("gpu",),
    ),
    Implementation("pallas_tpu", f"{_OPS}.selected:pallas_tpu_impl", platforms=("tpu",)),
    Implementation(
      "reference", f"{_OPS}.selected:reference_impl", guard=f"{_OPS}.selected:dense_too_large"
    ),
    Implementation("gathered", f"{_OPS}.selected:gathered_selected_attention"),
  ),
  "compressed_selection": _entries(
    Implementation("pallas_gpu", f"{_OPS}.cmp_selection:pallas_gpu_impl", platforms=("gpu",)),
    Implementation("cudnn", f"{_OPS}.cmp_selection:cudnn_impl", platforms=("gpu",)),
    Implementation(
      "reference",
      f"{_OPS}.cmp_selection:reference_impl",
      guard=f"{_OPS}.cmp_selection:probs_too_large",
    ),
    Implementation("blocked", f"{_OPS}.cmp_selection:blocked_impl"),
  ),
  "nsa_attention": _entries(
    Implementation("reference", f"{_OPS}.nsa:nsa_pipeline", composite=True),
  ),
}


def _resolve(target, impl: str):
  if callable(target):
    return target
  module, attr = target.split(":")
  try:
    return getattr(importlib.import_module(module), attr)
  except ImportError as e:
    raise NotImplementedError(f"impl={impl!r} is not available in this build ({e})") from e


_DECLARED: dict[str, str] = {}  # names added by declare() (extensions, tests)


def declare(name: str, description: str) -> None:
  """Makes ``name`` a valid ``impl=`` before (or without) any entry of that name."""
  _DECLARED[name] = description


def undeclare(name: str) -> None:
  _DECLARED.pop(name, None)


def ops() -> tuple[str, ...]:
  """Op names with an entry in the table."""
  return tuple(_TABLE)


def valid_impls() -> tuple[str, ...]:
  """Every name ``impl=`` accepts: :data:`IMPLS` and any registered later."""
  extra = sorted(
    ({n for entries in _TABLE.values() for n in entries} | set(_DECLARED)) - set(IMPLS)
  )
  return (*IMPLS, *extra)


def implementations(op: str) -> tuple[Implementation, ...]:
  """The entries of ``op``, in the order ``"auto"`` tries them."""
  return tuple(_op_entries(op).values())


def implements(op: str, impl: str) -> bool:
  """Whether ``impl`` has an entry for ``op`` (``"auto"`` always does)."""
  return impl == "auto" or impl in _op_entries(op)


def platform() -> str:
  """The platform ``"auto"`` chooses for: ``jax.default_backend()``."""
  return jax.default_backend()


def available_impls(op: str, platform_name: str | None = None) -> tuple[str, ...]:
  """Names with an entry for ``op`` made for ``platform_name`` (default: :func:`platform`)."""
  plat = platform() if platform_name is None else platform_name
  return tuple(i.name for i in implementations(op) if i.platforms is None or plat in i.platforms)


def register(op: str, impl: Implementation, *, position: int | None = None) -> None:
  """Adds (or replaces, keeping its place) an entry of ``op``; ``position`` in the auto order
  (default: before the last entry, so the op's final fallback stays last)."""
  entries = _TABLE.setdefault(op, {})
  if impl.name in entries:
    entries[impl.name] = impl
    return
  items = list(entries.values())
  at = max(len(items) - 1, 0) if position is None else position
  items.insert(at, impl)
  _TABLE[op] = _entries(*items)


def unregister(op: str, name: str) -> None:
  """Removes an entry (no error if absent)."""
  _TABLE.get(op, {}).pop(name, None)


def _op_entries(op: str) -> dict[str, Implementation]:
  if op not in _TABLE:
    raise ValueError(f"op: expected one of {ops()}, got {op!r}")
  return _TABLE[op]


def check_impl(impl) -> None:
  """Raises ``ValueError`` naming ``impl`` unless it is one of :func:`valid_impls`."""
  if impl not in valid_impls():
    raise ValueError(f"impl: expected one of {valid_impls()}, got {impl!r}")


def _call(entry: Implementation, impl: str, args, kwargs):
  fn = _resolve(entry.target, entry.name)
  if entry.composite:
    return fn(*args, impl=impl, **kwargs)
  return fn(*args, **kwargs)


def run(op: str, impl: str, *args, **kwargs):
  """Runs ``op`` with the implementation ``impl`` selects (see the module docstring)."""
  check_impl(impl)
  entries = _op_entries(op)
  if impl != "auto":
    entry = entries.get(impl)
    if entry is None:
      composite = next((e for e in entries.values() if e.composite), None)
      if composite is not None:
        return _call(composite, impl, args, kwargs)
      raise NotImplementedError(
        f"impl={impl!r} ({IMPLS.get(impl) or _DECLARED.get(impl, 'registered')}) does not "
        f"implement {op}; "
        f"its implementations are {tuple(entries)} (or 'auto')"
      )
    return _call(entry, impl, args, kwargs)
  plat = platform()
  tried = []
  for entry in entries.values():
    if not entry.auto or (entry.platforms is not None and plat not in entry.platforms):
      continue
    if entry.guard is not None:
      reason = _resolve(entry.guard, entry.name)(*args, **kwargs)
      if reason:
        log.debug("%s: auto skips %r (%s)", op, entry.name, reason)
        tried.append(f"{entry.name}: {reason}")
        continue
    try:
      return _call(entry, "auto", args, kwargs)
    except NotImplementedError as e:
      log.debug("%s: %r cannot serve this call (%s); trying the next", op, entry.name, e)
      tried.append(f"{entry.name}: {e}")
  raise NotImplementedError(f"{op}: no implementation serves this call on {plat!r}: {tried}")


__all__ = [
  "IMPLS",
  "Implementation",
  "available_impls",
  "check_impl",
  "declare",
  "implementations",
  "implements",
  "ops",
  "platform",
  "register",
  "run",
  "undeclare",
  "unregister",
  "valid_impls",
]
