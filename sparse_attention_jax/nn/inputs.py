"""Checks of the model's token inputs: errors name the argument, what was expected and what came.

Shapes and dtypes are checked at trace time. Token id *values* can only be checked where they are
known: :func:`check_tokens` checks concrete (host or un-traced device) arrays on the host and
skips traced ones; :func:`check_token_ids` is the run-time check for jitted code, built on
:mod:`jax.experimental.checkify`. Out-of-range ids are otherwise silent: ids ``>= vocab_size``
give NaN embeddings (and logits) and negative ids wrap around.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def is_concrete(x) -> bool:
  """True when ``x``'s values can be read on this host now: not a tracer (of ``jit``, ``grad``,
  ``eval_shape``, ...) nor an array with shards on other processes."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_tokens(tokens, vocab_size: int | None = None, *, name: str = "tokens") -> None:
  """``tokens`` must be a rank-2 integer ``[B, T]`` array with ``B >= 1`` and ``T >= 1``.

  When ``tokens`` is concrete and ``vocab_size`` is given, every id must also lie in
  ``[0, vocab_size)`` (checked on the host: one reduction and a device-to-host copy of two
  scalars). Traced tokens get only the static checks; use :func:`check_token_ids` there.
  """
  if not hasattr(tokens, "shape") or len(tokens.shape) != 2:
    got = f"shape {tokens.shape}" if hasattr(tokens, "shape") else type(tokens).__name__
    raise ValueError(f"{name}: expected a rank-2 [B, T] array of token ids, got {got}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name}: expected an integer dtype (token ids), got {tokens.dtype}")
  b, t = tokens.shape
  if b < 1:
    raise ValueError(f"{name}.shape[0]: expected a batch size B >= 1, got {b}")
  if t < 1:
    raise ValueError(f"{name}.shape[1]: expected a length T >= 1, got {t}")
  if vocab_size is not None and is_concrete(tokens):
    ids = np.asarray(tokens)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(
        f"{name}: expected token ids in [0, vocab_size={vocab_size}), got ids in [{lo}, {hi}]"
      )


def check_token_ids(tokens, vocab_size: int, *, name: str = "tokens") -> None:
  """Run-time check, for jitted code, that every id of ``tokens`` lies in ``[0, vocab_size)``.

  A :func:`jax.experimental.checkify.check` in debug mode: under
  :func:`~jax.experimental.checkify.checkify` it becomes an error value to ``throw()``; without
  it the check is removed (no cost, no effect). Works on any shape and integer dtype.

  Example::

    from jax.experimental import checkify

    @jax.jit
    @checkify.checkify
    def logits(tokens):
      check_token_ids(tokens, model.config.vocab_size)
      return model(tokens)

    err, out = logits(tokens)
    err.throw()  # a JaxRuntimeError naming `tokens` when an id is out of range
  """
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name}: expected an integer dtype (token ids), got {tokens.dtype}")
  tokens = jnp.asarray(tokens)
  checkify.check(
    jnp.all((tokens >= 0) & (tokens < vocab_size)),
    f"{name}: expected token ids in [0, vocab_size={vocab_size}), got ids in [{{lo}}, {{hi}}]",
    lo=jnp.min(tokens),
    hi=jnp.max(tokens),
    debug=True,
  )


__all__ = ["check_token_ids", "check_tokens", "is_concrete"]
