"""The dense-like attention path of the modules (full causal or sliding window), memory-lean.

Used by ``FullAttention`` (``full``), ``SlidingWindowAttention`` (``swa``), ``MLALocalAttention``
(``asa_local``) and SSA's ``o_full``. Three implementations, all with the semantics of
:func:`~sparse_attention_jax.ops.masked.masked_attention` over a causal (windowed, same-document)
mask:

* cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``) on GPU for
  bf16/f16 inputs, when the rows hold one document each (``segment_ids`` None, or every row one
  run of equal ids: a runtime ``lax.cond`` then picks cuDNN). It takes no segment ids, and
  ``implementation=None`` would be XLA's ``[B, HQ, T, T]`` logits, so neither is used otherwise.
  ``Dk != Dv`` is served by zero-padding the narrower side (zero value columns add zero outputs,
  zero q/k columns add zero logits). If cuDNN cannot serve the call at trace time (no cuDNN,
  unsupported shape), the blocked op runs.
* the blocked plain-JAX op :func:`~sparse_attention_jax.ops.blocked.blocked_attention`
  (``O(T * C)`` memory, online softmax, custom VJP): packed rows, CPU, TPU, float32.
* ``impl="reference"``: the dense masked reference (``[B, T, HQ, T]`` logits; tests only).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sparse_attention_jax.ops import dense_causal_attention, sliding_window_attention
from sparse_attention_jax.ops.blocked import blocked_attention

log = logging.getLogger("sparse_attention_jax")

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_attention(q, k, v, *, window: int | None, softmax_scale: float):
  """cuDNN causal (windowed) attention of one-document rows; ``Dk != Dv`` zero-padded."""
  dk, dv = q.shape[-1], v.shape[-1]
  width = max(dk, dv)

  def pad(y):
    return jnp.pad(y, [(0, 0)] * 3 + [(0, width - y.shape[-1])])

  local = None if window is None else (window - 1, 0)
  o = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=softmax_scale, is_causal=True,
                                   local_window_size=local, implementation="cudnn")
  return o[..., :dv]


def _cudnn_usable(q, k, v, window, scale) -> bool:
  """Whether cuDNN serves this call: GPU, bf16/f16, and it traces (shape checks pass)."""
  if jax.default_backend() != "gpu" or q.dtype not in _CUDNN_DTYPES:
    return False
  try:
    jax.eval_shape(lambda a, b, c: _cudnn_attention(a, b, c, window=window, softmax_scale=scale),
                   q, k, v)
  except Exception as e:  # noqa: BLE001 -- any trace-time refusal means "use the blocked op"
    log.debug("cuDNN attention cannot serve q %s k %s v %s (%s); using the blocked op", q.shape,
              k.shape, v.shape, e)
    return False
  return True


def causal_attention(q, k, v, *, segment_ids=None, window: int | None = None,
                     softmax_scale: float | None = None, impl: str = "auto"):
  """Causal GQA attention (over the last ``window`` keys incl. the query, if given) within
  documents.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    segment_ids: optional ``[B, T]`` int document ids (maximal runs of equal ids).
    window: keys per query including itself, or None for full causal attention.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"reference"`` = the dense masked reference; ``"blocked"`` = always the blocked op;
      anything else (``"auto"``, kernel backend names) = cuDNN where it serves, else blocked.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if impl == "reference":
    if window is None:
      return dense_causal_attention(q, k, v, segment_ids=segment_ids, softmax_scale=scale,
                                    impl="reference")
    return sliding_window_attention(q, k, v, window=window, segment_ids=segment_ids,
                                    softmax_scale=scale, impl="reference")

  def blocked(q, k, v, segment_ids):
    return blocked_attention(q, k, v, window=window, segment_ids=segment_ids,
                             softmax_scale=scale)[0]

  if impl == "blocked" or not _cudnn_usable(q, k, v, window, scale):
    return blocked(q, k, v, segment_ids)

  def cudnn(q, k, v, segment_ids):
    del segment_ids
    return _cudnn_attention(q, k, v, window=window, softmax_scale=scale)

  if segment_ids is None:
    return cudnn(q, k, v, None)
  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return jax.lax.cond(one_document, cudnn, blocked, q, k, v, segment_ids)


__all__ = ["causal_attention"]
