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
* ``impl="cudnn_packed"`` (experimental, not used by ``auto``): cuDNN's packed-sequence layout,
  each document of a row one cuDNN sequence (offsets and lengths from the ids, at most
  ``MAX_SEGMENTS`` per row, else the blocked op), through the private
  ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` (the public function takes
  no offsets). Its first H200 run (jax 0.11.2, 2026-11-29) returned NaN for packed rows (the
  descriptors then ended with an extra end offset, since removed; not re-run) and compiled to an
  8 GiB temporary at T=8192 (HQ 32), the size of ``[B, HQ, T, T]`` float32 logits, against
  0.16 GiB for the one-document call: see ``tests/gpu/check_dense_paths.py``.
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

MAX_SEGMENTS = 64
"""Documents per row that the packed cuDNN path serves (a static shape of its offsets)."""


def _pad_to(y, width):
  return jnp.pad(y, [(0, 0)] * 3 + [(0, width - y.shape[-1])])


def packed_segments(segment_ids, max_segments: int):
  """cuDNN packed-layout descriptors of each row's documents (maximal runs of equal ids).

  Args:
    segment_ids: ``[B, T]`` int document ids.
    max_segments: ``M``, the most documents per row the descriptors hold.

  Returns:
    ``(seqlens [B, M] int32, offsets [B, M + 1] int32, count [B] int32)``: row ``b``'s document
    ``m < count[b]`` starts at ``offsets[b, m]`` and has ``seqlens[b, m]`` tokens; every other
    entry is ``-1`` (cuDNN's packed convention: starts only, no end offset). Rows with
    ``count > M`` keep their first ``M`` starts and are not valid descriptors (callers check
    ``count <= M``).
  """
  b, t = segment_ids.shape
  m = max_segments
  seg = segment_ids.astype(jnp.int32)
  start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)  # [B, T]
  count = jnp.sum(start, axis=1, dtype=jnp.int32)                                       # [B]
  rank = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1                                 # [B, T]
  slot = jnp.where(start, rank, m + 1)                      # non-starts write out of range
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, slot].set(pos, mode="drop")
  ends = offsets.at[jnp.arange(b), count].set(t, mode="drop")       # + the end of the last one
  m_ids = jnp.arange(m, dtype=jnp.int32)[None]
  seqlens = jnp.where(m_ids < count[:, None], ends[:, 1:] - ends[:, :-1], -1)
  return seqlens, offsets, count


def _cudnn_packed_attention(q, k, v, segment_ids, *, window: int | None, softmax_scale: float,
                            max_segments: int = MAX_SEGMENTS):
  """cuDNN causal (windowed) attention over packed documents (rows with <= ``max_segments``)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa  # private: see module doc
  dv = v.shape[-1]
  width = max(q.shape[-1], dv)
  seqlens, offsets, _ = packed_segments(segment_ids, max_segments)
  o = cudnn_sdpa.dot_product_attention(
      _pad_to(q, width), _pad_to(k, width), _pad_to(v, width), q_seqlen=seqlens,
      kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets, scale=softmax_scale,
      mask_type=cudnn_sdpa.MaskType.PADDING_CAUSAL, sliding_window_length=window)
  return o[..., :dv]


def _cudnn_attention(q, k, v, *, window: int | None, softmax_scale: float):
  """cuDNN causal (windowed) attention of one-document rows; ``Dk != Dv`` zero-padded."""
  dv = v.shape[-1]
  width = max(q.shape[-1], dv)
  local = None if window is None else (window - 1, 0)
  o = jax.nn.dot_product_attention(_pad_to(q, width), _pad_to(k, width), _pad_to(v, width),
                                   scale=softmax_scale, is_causal=True, local_window_size=local,
                                   implementation="cudnn")
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


def _cudnn_packed_usable(q, k, v, segment_ids, window, scale) -> bool:
  """Whether the packed cuDNN path traces for this call (checked after :func:`_cudnn_usable`)."""
  try:
    jax.eval_shape(lambda a, b, c, s: _cudnn_packed_attention(a, b, c, s, window=window,
                                                              softmax_scale=scale),
                   q, k, v, segment_ids)
  except Exception as e:  # noqa: BLE001 -- missing private API or a refusal: other paths
    log.debug("packed cuDNN attention cannot serve q %s (%s); one-document rows only", q.shape,
              e)
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
      ``"cudnn_packed"`` = experimental packed-layout cuDNN for packed rows (see the module
      docstring: not verified on a GPU); anything else (``"auto"``, kernel backend names) =
      cuDNN for one-document rows, else blocked.

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
  if impl == "cudnn_packed" and _cudnn_packed_usable(q, k, v, segment_ids, window, scale):
    def packed(q, k, v, segment_ids):
      return _cudnn_packed_attention(q, k, v, segment_ids, window=window, softmax_scale=scale)
    fits = jnp.all(packed_segments(segment_ids, MAX_SEGMENTS)[2] <= MAX_SEGMENTS)
    return jax.lax.cond(fits, packed, blocked, q, k, v, segment_ids)
  one_document = jnp.all(segment_ids == segment_ids[:, :1])
  return jax.lax.cond(one_document, cudnn, blocked, q, k, v, segment_ids)


__all__ = ["MAX_SEGMENTS", "causal_attention", "packed_segments"]
