"""Causal attention over all earlier keys or a sliding window, within documents.

One routing serves :func:`dense_causal_attention`, :func:`sliding_window_attention` (NSA's
window branch) and the modules' dense path (:func:`causal_attention`, which ``full``, ``swa``,
``asa_local`` and SSA's ``o_full`` call):
op ``"causal_attention"`` of :mod:`sparse_attention_jax.ops.dispatch`, whose implementations are

* ``"cudnn"`` (``"auto"`` tries it first on GPU): cuDNN flash attention for bf16/f16, packed rows
  with a same-document mask (:mod:`sparse_attention_jax.ops.cudnn`);
* ``"blocked"`` (``"auto"``'s fallback, every platform): the plain-JAX flash-style op of
  :mod:`sparse_attention_jax.ops.blocked`, ``O(T * C)`` memory, custom VJP;
* ``"reference"`` (never under ``"auto"``): :func:`~sparse_attention_jax.ops.masked.
  masked_attention` over :func:`~sparse_attention_jax.ops.masked.causal_mask` (dense
  ``[B, T, HQ, T]`` logits), what the others are tested against.

Semantics: key ``s`` is visible to query ``t`` iff ``s <= t``, ``t - s < window`` (if a window is
given: ``window`` keys including the query's own token, fla's convention) and both lie in the same
document (maximal run of equal segment ids).
"""

from __future__ import annotations

from sparse_attention_jax.ops import _checks, dispatch
from sparse_attention_jax.ops.blocked import blocked_attention
from sparse_attention_jax.ops.masked import causal_mask, masked_attention


def causal_attention(
  q,
  k,
  v,
  *,
  window: int | None = None,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
  chunk: int | None = None,
):
  """Causal GQA attention (over the last ``window`` keys, if given) within documents.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    window: ``w >= 1`` keys per query including itself, or None for full causal attention.
    segment_ids: optional ``[B, T]`` int document ids.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"auto"``, ``"cudnn"``, ``"blocked"`` or ``"reference"`` (module docstring).
    chunk: tokens per chunk of the blocked op (default
      :func:`~sparse_attention_jax.ops.blocked.default_chunk`).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``.
  """
  b, t, s, _, _, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  if window is not None and (not isinstance(window, int) or window < 1):
    _checks.fail("window", "a positive int (or None for full causal attention)", window)
  _checks.check_segment_ids(segment_ids, b, t)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  return dispatch.run(
    "causal_attention",
    impl,
    q,
    k,
    v,
    window=window,
    segment_ids=segment_ids,
    softmax_scale=scale,
    chunk=chunk,
  )


def dense_causal_attention(
  q,
  k,
  v,
  *,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
  chunk: int | None = None,
):
  """Dense causal (GQA) attention, the baseline every sparse branch reduces to:
  :func:`causal_attention` without a window (same arguments, same ``impl=`` routing)."""
  return causal_attention(
    q, k, v, segment_ids=segment_ids, softmax_scale=softmax_scale, impl=impl, chunk=chunk
  )


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
  """Causal attention over the last ``window`` keys (``w >= 1``, the query's own token
  included): :func:`causal_attention` with a window (same arguments, same ``impl=`` routing)."""
  if not isinstance(window, int) or window < 1:
    _checks.fail("window", "a positive int", window)
  return causal_attention(
    q,
    k,
    v,
    window=window,
    segment_ids=segment_ids,
    softmax_scale=softmax_scale,
    impl=impl,
    chunk=chunk,
  )


def blocked_impl(q, k, v, *, window, segment_ids, softmax_scale, chunk):
  """The ``"blocked"`` entry."""
  return blocked_attention(
    q, k, v, window=window, segment_ids=segment_ids, softmax_scale=softmax_scale, chunk=chunk
  )[0]


def reference_impl(q, k, v, *, window, segment_ids, softmax_scale, chunk):
  """The ``"reference"`` entry (``chunk`` is ignored)."""
  del chunk
  return masked_attention(q, k, v, causal_mask(q.shape[1], segment_ids, window), softmax_scale)[0]


__all__ = ["causal_attention", "dense_causal_attention", "sliding_window_attention"]
