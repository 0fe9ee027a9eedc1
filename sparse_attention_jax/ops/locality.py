"""Selection locality (``docs/algorithms.md``): how much of a query's block selection the previous query
already had, ``gamma(t) = |Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|``.

With NOSI's eviction policy (device slots hold exactly the selection) ``gamma(t)`` is the cache
hit rate of decode step ``t`` and ``|Gamma(t) \\ Gamma(t-1)|`` the blocks it loads from the host.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_attention_jax.ops import _checks


def _members(block_indices):
  nb = int(jnp.max(block_indices)) + 1 if block_indices.size else 0
  nb = max(nb, 1)
  return jnp.any(block_indices[..., None] == jnp.arange(nb, dtype=block_indices.dtype), axis=-2)


def selection_locality(block_indices):
  """Per-step locality and new blocks of a selection.

  Args:
    block_indices: ``[B, T, H, n]`` int block ids per query (``-1`` padding, duplicates count
      once), e.g. ``nosa_select`` / ``select_blocks`` output.

  Returns:
    ``(gamma, new)``, both ``[B, T - 1, H]`` for ``t = 1 .. T - 1``: ``gamma`` float32
    ``|Gamma(t) ∩ Gamma(t-1)| / |Gamma(t)|`` (1 where ``Gamma(t)`` is empty) and ``new`` int32
    ``|Gamma(t) \\ Gamma(t-1)|``.
  """
  _checks.check_rank("block_indices", block_indices, 4, "[B, T, H, n]")
  m = _members(jnp.asarray(block_indices))  # [B, T, H, NB]
  cur, prev = m[:, 1:], m[:, :-1]
  size = jnp.sum(cur, axis=-1)
  inter = jnp.sum(cur & prev, axis=-1)
  gamma = jnp.where(size > 0, inter / jnp.maximum(size, 1), 1.0).astype(jnp.float32)
  return gamma, (size - inter).astype(jnp.int32)


__all__ = ["selection_locality"]
