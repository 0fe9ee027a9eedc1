"""``impl=`` dispatch between the plain-JAX reference and the kernel backends of ``pallas_kernels``.

* ``"reference"``: always the plain-JAX reference.
* ``"auto"``: each backend registered for the current platform, in priority order; a backend that
  raises ``NotImplementedError`` is skipped with a debug log saying why; then the reference.
* a backend name (``"pallas_gpu"``, ...): that backend or a loud error. For a *composite* op
  (``nsa_attention``) that the backend does not implement as a whole, the reference pipeline runs
  and passes the name on to the branch ops, each of which must then be served by the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax

import pallas_kernels

log = logging.getLogger("sparse_attention_jax")


def valid_impls() -> tuple[str, ...]:
  return (
    "auto",
    "reference",
    *sorted(set(pallas_kernels.KNOWN_BACKENDS) | set(pallas_kernels.registered())),
  )


def run(op: str, impl: str, reference: Callable, *args, composite: bool = False, **kwargs):
  """Runs ``op`` with the implementation ``impl`` selects (see the module docstring).

  ``composite``: ``reference`` is a pipeline of other dispatched ops that receives ``impl``.
  """
  if impl == "reference":
    return reference(*args, **kwargs)
  if impl == "auto":
    platform = jax.default_backend()
    for backend in pallas_kernels.backends_for(platform):
      fn = backend.ops.get(op)
      if fn is None:
        continue
      try:
        return fn(*args, **kwargs)
      except NotImplementedError as e:
        log.debug(
          "%s: backend %r cannot serve this call (%s); trying the next", op, backend.name, e
        )
    log.debug("%s: using the plain-JAX reference on platform %r", op, platform)
    return reference(*args, **kwargs)
  backend = pallas_kernels.get(impl)
  if backend is None:
    if impl in pallas_kernels.KNOWN_BACKENDS:
      raise NotImplementedError(
        f"impl={impl!r} ({pallas_kernels.KNOWN_BACKENDS[impl]}) is not available in this build; "
        "use impl='auto' to fall back to the reference"
      )
    raise ValueError(f"impl: expected one of {valid_impls()}, got {impl!r}")
  fn = backend.ops.get(op)
  if fn is None:
    if composite:
      return reference(*args, **kwargs)
    raise NotImplementedError(f"impl={impl!r} does not implement {op}")
  return fn(*args, **kwargs)
