"""cuDNN flash attention for causal (windowed) attention within documents, with a fallback.

The ``"cudnn"`` implementation of :func:`~sparse_attention_jax.ops.causal.causal_attention` (dense
causal and sliding-window attention: the public ops, NSA's window branch and the modules' dense
path). On GPU, for bf16/f16 inputs:

* rows without ``segment_ids``: ``jax.nn.dot_product_attention(implementation="cudnn")``;
* packed rows (several documents): the same call with a ``[B, 1, T, T]`` boolean same-document
  mask (documents = maximal runs of equal ids) while ``B * T * T <= MASK_MAX_ELEMENTS``; cuDNN
  makes a constant additive bias of it (no bias gradient), and since the mask depends only on
  the segment ids, XLA builds it once per step for all layers;
* longer packed rows: a runtime ``lax.cond``, cuDNN without a mask when every row is one
  document, else the blocked plain-JAX op.

``Dk != Dv`` is served by zero-padding the narrower side. Anything cuDNN refuses at trace time
(no GPU, float32, unsupported shapes) raises ``NotImplementedError``: ``impl="auto"`` then takes
the blocked op, ``impl="cudnn"`` fails.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops.blocked import blocked_attention
from sparse_attention_jax.ops.documents import same_document

log = logging.getLogger("sparse_attention_jax")

_DTYPES = (jnp.bfloat16, jnp.float16)

# Packed rows take cuDNN with a [B, 1, T, T] document mask up to this many mask elements (the
# bf16 bias cuDNN makes of it is 512 MiB there: 8k rows up to B = 4, one 16k row).
MASK_MAX_ELEMENTS = 2**28


def _sdpa(q, k, v, mask, *, scale, local_window_size):
  """cuDNN's fused attention (tests swap in ``implementation="xla"`` to run the path on a CPU)."""
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    scale=scale,
    is_causal=True,
    local_window_size=local_window_size,
    implementation="cudnn",
  )


def attention(q, k, v, *, window: int | None, softmax_scale: float, segment_ids=None):
  """One cuDNN call: causal attention over the last ``window`` keys (None: all), with a
  same-document mask when ``segment_ids`` ``[B, T]`` is given.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (bf16/f16).

  Returns:
    ``[B, T, HQ, Dv]``.
  """
  dk, dv = q.shape[-1], v.shape[-1]
  width = max(dk, dv)

  def pad(y):
    return jnp.pad(y, [(0, 0)] * 3 + [(0, width - y.shape[-1])])

  mask = None
  if segment_ids is not None:  # [B, 1, T(query), S(key)]: shared by all heads
    mask = same_document(segment_ids)[:, None]
  local = None if window is None else (window - 1, 0)
  o = _sdpa(pad(q), pad(k), pad(v), mask, scale=softmax_scale, local_window_size=local)
  return o[..., :dv]


def usable(q, k, v, window, scale, segment_ids=None) -> bool:
  """Whether cuDNN serves this call: GPU, bf16/f16, and it traces (shape checks pass)."""
  if jax.default_backend() != "gpu" or q.dtype not in _DTYPES:
    return False
  try:
    jax.eval_shape(
      lambda a, b, c, s: attention(a, b, c, window=window, softmax_scale=scale, segment_ids=s),
      q,
      k,
      v,
      segment_ids,
    )
  except Exception as e:  # noqa: BLE001 -- any trace-time refusal means "use the fallback"
    log.debug(
      "cuDNN attention cannot serve q %s k %s v %s (mask: %s; %s); using the fallback",
      q.shape,
      k.shape,
      v.shape,
      segment_ids is not None,
      e,
    )
    return False
  return True


def causal_attention(q, k, v, *, window: int | None, segment_ids, softmax_scale: float, chunk=None):
  """The ``"cudnn"`` implementation of :func:`~sparse_attention_jax.ops.causal.causal_attention`.

  Raises ``NotImplementedError`` where cuDNN cannot serve the call (see :func:`usable`); packed
  rows past :data:`MASK_MAX_ELEMENTS` take the blocked op at run time unless every row is one
  document (module docstring).

  Args:
    q, k, v, window, softmax_scale, segment_ids: as :func:`attention`.
    chunk: tokens per chunk of the blocked op in the run-time fallback.
  """
  if not usable(q, k, v, window, softmax_scale):
    raise NotImplementedError(
      f"cuDNN attention needs a GPU and bf16/f16 inputs it accepts; got {q.dtype} q {q.shape}, "
      f"k {k.shape}, v {v.shape} on {jax.default_backend()!r}"
    )

  def plain(q, k, v, segment_ids):
    del segment_ids
    return attention(q, k, v, window=window, softmax_scale=softmax_scale)

  def blocked(q, k, v, segment_ids):
    return blocked_attention(
      q, k, v, window=window, segment_ids=segment_ids, softmax_scale=softmax_scale, chunk=chunk
    )[0]

  if segment_ids is None:
    return plain(q, k, v, None)
  b, t = segment_ids.shape
  if b * t * t <= MASK_MAX_ELEMENTS and usable(q, k, v, window, softmax_scale, segment_ids):
    return attention(q, k, v, window=window, softmax_scale=softmax_scale, segment_ids=segment_ids)
  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return jax.lax.cond(one_document, plain, blocked, q, k, v, segment_ids)


__all__ = ["MASK_MAX_ELEMENTS", "attention", "causal_attention", "usable"]
