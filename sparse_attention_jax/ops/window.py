"""Sliding-window attention: query ``t`` sees keys ``t - w + 1 .. t`` (``w`` keys incl. itself).

On GPU (bf16/f16) cuDNN's windowed flash attention serves it (packed rows with a same-document
mask up to a size limit, :mod:`sparse_attention_jax.ops.cudnn`); elsewhere, and with
``impl="blocked"``, the blocked op of :mod:`sparse_attention_jax.ops.blocked` (``O(T * w)``
memory); ``impl="reference"`` runs the dense masked reference (``[B, T, HQ, T]`` logits) both are
tested against.
"""

from __future__ import annotations

from sparse_attention_jax.ops import _checks, cudnn
from sparse_attention_jax.ops.blocked import blocked_attention
from sparse_attention_jax.ops.masked import causal_mask, masked_attention


def sliding_window_attention(
  q,
  k,
  v,
  *,
  window: int,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
  chunk: int | None = None,
):
  """Causal attention over the last ``window`` keys.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    window: w >= 1, keys per query including the query's own token (fla convention).
    segment_ids: optional ``[B, T]`` document ids.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"reference"`` for the dense masked reference; ``"blocked"`` for the blocked op;
      anything else (``"auto"``, a kernel backend name passed on by ``nsa_attention``): cuDNN
      where it serves, else the blocked op.
    chunk: tokens per chunk of the blocked op (default
      :func:`~sparse_attention_jax.ops.blocked.default_chunk`).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  b, t, s, _, _, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  if not isinstance(window, int) or window < 1:
    _checks.fail("window", "a positive int", window)
  _checks.check_segment_ids(segment_ids, b, t)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if impl == "reference":
    return masked_attention(q, k, v, causal_mask(t, segment_ids, window), scale)[0]

  def blocked(q, k, v, segment_ids):
    return blocked_attention(
      q, k, v, window=window, segment_ids=segment_ids, softmax_scale=scale, chunk=chunk
    )[0]

  if impl == "blocked":
    return blocked(q, k, v, segment_ids)
  return cudnn.causal_attention_or(
    blocked, q, k, v, window=window, softmax_scale=scale, segment_ids=segment_ids
  )
