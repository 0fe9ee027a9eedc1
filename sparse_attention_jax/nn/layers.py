"""Building blocks of the decoder: RMSNorm, SwiGLU MLP, token embedding, einsum projections.

Parameters are float32; each module computes in its ``dtype`` (the model's compute dtype) by
casting parameters at use, so a bfloat16 model keeps float32 master weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.parallel import param, partitioned


def as_dtype(name: str | jnp.dtype):
  """``"bfloat16"`` -> ``jnp.bfloat16`` (dtype objects pass through)."""
  return jnp.dtype(name)


def fan_in_init(in_axes: int | Sequence[int], out_axes: int | Sequence[int]):
  """LeCun (truncated) normal over a multi-axis kernel: variance ``1 / prod(kernel[in_axes])``."""
  return nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes
  )


def projection(
  einsum_str: str,
  kernel_shape: Sequence[int],
  *,
  in_axes,
  out_axes,
  dtype,
  rngs: nnx.Rngs,
  preferred_element_type=None,
  names: Sequence[str | None] | None = None,
) -> nnx.Einsum:
  """A bias-free :class:`nnx.Einsum` with a float32 kernel, computing in ``dtype``.

  Args:
    einsum_str: e.g. ``"btd,dhk->bthk"`` (input first, kernel second).
    kernel_shape: the kernel's shape, e.g. ``(d_model, heads, head_dim)``.
    in_axes, out_axes: kernel axes contracted with the input / produced, for the fan-in init.
    dtype: compute dtype.
    rngs: initialization rngs.
    preferred_element_type: optional accumulation/output dtype (e.g. float32 logits).
    names: logical axis names of the kernel's dims (see :mod:`sparse_attention_jax.nn.parallel`),
      e.g. ``("embed", "q_heads", "head_dim")``; None = no annotation.
  """
  init = fan_in_init(in_axes, out_axes)
  if names is not None:
    if len(names) != len(kernel_shape):
      raise ValueError(
        f"names: expected one logical axis name per kernel dim of "
        f"{tuple(kernel_shape)}, got {tuple(names)}"
      )
    init = partitioned(init, names)
  return nnx.Einsum(
    einsum_str,
    tuple(kernel_shape),
    None,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=init,
    preferred_element_type=preferred_element_type,
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learnable scale (initialized to 1).

  Statistics are computed in float32; the output is cast to ``dtype``.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype="float32", rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform constructor signature
    self.dim = dim
    self.eps = eps
    self.dtype = as_dtype(dtype)
    self.scale = param(jnp.ones((dim,), jnp.float32), ("norm",))

  def __call__(self, x):
    """``x [..., dim]`` -> ``[..., dim]`` in ``dtype``."""
    if x.shape[-1] != self.dim:
      raise ValueError(f"x: expected last dim {self.dim}, got shape {x.shape}")
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(self.dtype)


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``, bias-free (Llama MLP)."""

  def __init__(self, d_model: int, hidden: int, *, dtype="float32", rngs: nnx.Rngs):
    dt = as_dtype(dtype)
    self.gate = projection(
      "btd,df->btf",
      (d_model, hidden),
      in_axes=0,
      out_axes=1,
      dtype=dt,
      rngs=rngs,
      names=("embed", "mlp"),
    )
    self.up = projection(
      "btd,df->btf",
      (d_model, hidden),
      in_axes=0,
      out_axes=1,
      dtype=dt,
      rngs=rngs,
      names=("embed", "mlp"),
    )
    self.down = projection(
      "btf,fd->btd",
      (hidden, d_model),
      in_axes=0,
      out_axes=1,
      dtype=dt,
      rngs=rngs,
      names=("mlp", "embed"),
    )

  def __call__(self, x):
    """``x [B, T, d_model]`` -> ``[B, T, d_model]`` in the compute dtype."""
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Embed(nnx.Module):
  """Token embedding ``[V, d_model]`` (std ``1/sqrt(d_model)``), with :meth:`attend` for a tied
  output projection."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype="float32", rngs: nnx.Rngs):
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.dtype = as_dtype(dtype)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    self.embedding = param(
      init(rngs.params(), (vocab_size, d_model), jnp.float32), ("vocab", "embed")
    )

  def __call__(self, tokens):
    """``tokens [B, T]`` int -> ``[B, T, d_model]`` in ``dtype``."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    """Tied output projection: ``x [B, T, d_model]`` -> ``[B, T, V]`` float32 logits."""
    return jnp.einsum(
      "btd,vd->btv",
      x.astype(self.dtype),
      self.embedding[...].astype(self.dtype),
      preferred_element_type=jnp.float32,
    )


__all__ = ["Embed", "RMSNorm", "SwiGLU", "as_dtype", "fan_in_init", "projection"]
