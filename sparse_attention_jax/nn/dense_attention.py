"""The dense-like attention path of the modules (full causal or sliding window), memory-lean.

Used by ``FullAttention`` (``full``), ``SlidingWindowAttention`` (``swa``), ``MLALocalAttention``
(``asa_local``) and SSA's ``o_full``. Three implementations, all with the semantics of
:func:`~sparse_attention_jax.ops.masked.masked_attention` over a causal (windowed, same-document)
mask:

* cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``) on GPU for
  bf16/f16 inputs. Rows without ``segment_ids`` go straight to it. Packed rows (several documents)
  go to it with a ``[B, 1, T, T]`` boolean same-document mask while ``B * T * T`` is at most
  :data:`MASK_MAX_ELEMENTS` (2^28: 8k rows up to B=4, one 16k row); cuDNN turns a boolean mask
  into a constant additive bias (no bias gradient), and the mask is built from ``segment_ids``
  alone, so XLA computes it once per step for all layers. Longer packed rows use a runtime
  ``lax.cond``: cuDNN without a mask when every row is one run of equal ids, else the blocked op.
  ``implementation=None`` would be XLA's ``[B, HQ, T, T]`` logits, so it is never used.
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


# Packed rows take cuDNN with a [B, 1, T, T] document mask up to this many mask elements (the
# bf16 bias cuDNN makes of it is 512 MiB there); beyond it they take the blocked op.
MASK_MAX_ELEMENTS = 2**28


def _sdpa(q, k, v, mask, *, scale, local_window_size):
  """cuDNN's fused attention (tests swap in ``implementation="xla"`` to run the path on a CPU)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                      local_window_size=local_window_size,
                                      implementation="cudnn")


def _cudnn_attention(q, k, v, *, window: int | None, softmax_scale: float, segment_ids=None):
  """cuDNN causal (windowed) attention; ``segment_ids`` ``[B, T]`` given: a same-document mask.

  ``Dk != Dv`` is zero-padded to the wider of the two.
  """
  dk, dv = q.shape[-1], v.shape[-1]
  width = max(dk, dv)

  def pad(y):
    return jnp.pad(y, [(0, 0)] * 3 + [(0, width - y.shape[-1])])

  mask = None
  if segment_ids is not None:     # documents are maximal runs of equal ids: number the runs
    new_run = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(new_run, axis=1, dtype=jnp.int32)                      # [B, T]
    mask = (run[:, :, None] == run[:, None, :])[:, None]   # [B, 1, T(query), S(key)]: all heads
  local = None if window is None else (window - 1, 0)
  o = _sdpa(pad(q), pad(k), pad(v), mask, scale=softmax_scale, local_window_size=local)
  return o[..., :dv]


def _cudnn_usable(q, k, v, window, scale, segment_ids=None) -> bool:
  """Whether cuDNN serves this call: GPU, bf16/f16, and it traces (shape checks pass)."""
  if jax.default_backend() != "gpu" or q.dtype not in _CUDNN_DTYPES:
    return False
  try:
    jax.eval_shape(lambda a, b, c, s: _cudnn_attention(a, b, c, window=window,
                                                       softmax_scale=scale, segment_ids=s),
                   q, k, v, segment_ids)
  except Exception as e:  # noqa: BLE001 -- any trace-time refusal means "use the blocked op"
    log.debug("cuDNN attention cannot serve q %s k %s v %s (mask: %s; %s); using the blocked op",
              q.shape, k.shape, v.shape, segment_ids is not None, e)
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
      anything else (``"auto"``, kernel backend names) = cuDNN where it serves (packed rows: with
      a document mask up to :data:`MASK_MAX_ELEMENTS`), else blocked.

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
  b, t = segment_ids.shape
  if b * t * t <= MASK_MAX_ELEMENTS and _cudnn_usable(q, k, v, window, scale, segment_ids):
    return _cudnn_attention(q, k, v, window=window, softmax_scale=scale, segment_ids=segment_ids)
  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return jax.lax.cond(one_document, cudnn, blocked, q, k, v, segment_ids)


__all__ = ["causal_attention"]
