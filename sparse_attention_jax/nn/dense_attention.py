"""The dense-like attention path of the modules (full causal or sliding window), memory-lean.

Used by ``FullAttention`` (``full``), ``SlidingWindowAttention`` (``swa``), ``MLALocalAttention``
(``asa_local``) and SSA's ``o_full``. Three implementations, all with the semantics of
:func:`~sparse_attention_jax.ops.masked.masked_attention` over a causal (windowed, same-document)
mask:

* cuDNN flash attention on GPU for bf16/f16 inputs, packed rows with a same-document mask up to
  a size limit (:mod:`sparse_attention_jax.ops.cudnn`, shared with NSA's window branch);
  ``implementation=None`` of ``jax.nn.dot_product_attention`` would be XLA's ``[B, HQ, T, T]``
  logits, so it is never used.
* the blocked plain-JAX op :func:`~sparse_attention_jax.ops.blocked.blocked_attention`
  (``O(T * C)`` memory, online softmax, custom VJP): packed rows, CPU, TPU, float32.
* ``impl="reference"``: the dense masked reference (``[B, T, HQ, T]`` logits; tests only).
"""

from __future__ import annotations

from sparse_attention_jax.ops import cudnn, dense_causal_attention, sliding_window_attention
from sparse_attention_jax.ops.blocked import blocked_attention


def causal_attention(
  q,
  k,
  v,
  *,
  segment_ids=None,
  window: int | None = None,
  softmax_scale: float | None = None,
  impl: str = "auto",
):
  """Causal GQA attention (over the last ``window`` keys incl. the query, if given) within
  documents.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    segment_ids: optional ``[B, T]`` int document ids (maximal runs of equal ids).
    window: keys per query including itself, or None for full causal attention.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"reference"`` = the dense masked reference; ``"blocked"`` = always the blocked op;
      anything else (``"auto"``, kernel backend names) = cuDNN where it serves (packed rows: with
      a document mask up to ``ops.cudnn.MASK_MAX_ELEMENTS``), else blocked.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if window is not None:  # the same routing as NSA's window branch
    return sliding_window_attention(
      q, k, v, window=window, segment_ids=segment_ids, softmax_scale=scale, impl=impl
    )
  if impl == "reference":
    return dense_causal_attention(
      q, k, v, segment_ids=segment_ids, softmax_scale=scale, impl="reference"
    )

  def blocked(q, k, v, segment_ids):
    return blocked_attention(q, k, v, segment_ids=segment_ids, softmax_scale=scale)[0]

  if impl == "blocked":
    return blocked(q, k, v, segment_ids)
  return cudnn.causal_attention_or(
    blocked, q, k, v, window=None, softmax_scale=scale, segment_ids=segment_ids
  )


__all__ = ["causal_attention"]
