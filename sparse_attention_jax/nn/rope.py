"""Rotary position embeddings (RoPE), "rotate_half" convention.

The head dim ``D`` is split into halves ``(x1, x2)``; frequency ``i`` (``0 <= i < D/2``) rotates the
pair ``(x1[i], x2[i])`` by ``positions * theta ** (-2i / D)``. This is the layout of Llama-style
checkpoints in the Hugging Face / fla ecosystem (not the interleaved-pairs layout of GPT-J).
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions, head_dim: int, theta: float):
  """``[B, T, D/2]`` float32 rotation angles ``positions * theta ** (-2i / D)``.

  Args:
    positions: ``[B, T]`` integer token positions (restarting at 0 per packed document).
    head_dim: D, even.
    theta: RoPE base.
  """
  if head_dim % 2:
    raise ValueError(f"head_dim: expected an even head dim for RoPE, got {head_dim}")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
  return positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]


def apply_rope(x, positions, theta: float = 10000.0):
  """Rotates ``x`` by its tokens' positions.

  Args:
    x: ``[B, T, N, D]`` queries or keys (``N`` heads, ``D`` even).
    positions: ``[B, T]`` integer positions; packed documents restart at 0 per document, so a
      document's attention depends only on relative positions inside it.
    theta: RoPE base.

  Returns:
    ``[B, T, N, D]`` in ``x.dtype`` (the rotation is computed in float32).
  """
  if x.ndim != 4:
    raise ValueError(f"x: expected [B, T, N, D], got shape {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions: expected shape [B, T] = {x.shape[:2]}, got {positions.shape}")
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions: expected an integer dtype, got {positions.dtype}")
  angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]  # [B,T,1,D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


__all__ = ["apply_rope", "rope_angles"]
