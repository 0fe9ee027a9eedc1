"""Selected-block attention (NSA eq. 12): queries attend over the tokens of their group's blocks.

Where no kernel serves a call (``impl="auto"`` on CPU, TPU, or a GPU without the Mosaic
kernels), small calls run the dense masked reference and calls whose ``[B, T, HQ, T]`` logits
would exceed :data:`DENSE_MAX_ELEMENTS` run the memory-lean gathered form
(:mod:`sparse_attention_jax.ops.selected_gathered`); ``impl="reference"`` is always the dense
reference.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_attention_jax.ops import _checks, dispatch
from sparse_attention_jax.ops.masked import causal_mask, masked_attention
from sparse_attention_jax.ops.selected_gathered import gathered_selected_attention

# Logit elements (B * T * HQ * T) above which the kernel-less fallback gathers the selected blocks
# instead of running the dense reference (2^26 float32 logits = 256 MiB per copy).
DENSE_MAX_ELEMENTS = 2**26


def selected_mask(block_indices, *, block_size: int, seq_len: int, segment_ids=None):
  """``[B, T, H, T]`` bool: key ``s`` visible to query ``t`` through KV head ``h``'s selection.

  ``s`` must lie in a listed block (``-1`` and out-of-range entries match nothing, duplicates count
  once), satisfy ``s <= t`` (causal inside the query's own block) and share the query's document.
  """
  nb = -(-seq_len // block_size)
  member = jnp.any(
    block_indices[..., None] == jnp.arange(nb, dtype=block_indices.dtype), axis=-2
  )  # [B, T, H, NB]
  key_block = jnp.arange(seq_len) // block_size
  return member[..., key_block] & causal_mask(seq_len, segment_ids)


def selected_attention(
  q,
  k,
  v,
  block_indices,
  *,
  block_size: int,
  segment_ids=None,
  softmax_scale: float | None = None,
  impl: str = "auto",
):
  """Attention restricted to selected key blocks.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` = padding), shared by the ``G`` query
      heads of KV head ``h``.
    block_size: l', tokens per block.
    segment_ids: optional ``[B, T]`` document ids.
    softmax_scale: defaults to ``Dk ** -0.5``.
    impl: ``"auto"``, ``"reference"`` or a backend name (see
      :mod:`sparse_attention_jax.ops.dispatch`; without a kernel, ``"auto"`` gathers the
      selected blocks when the dense logits would exceed :data:`DENSE_MAX_ELEMENTS`).

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``; a query whose selection holds no visible key gets 0.
  """
  b, t, s, _, h, _ = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  _checks.check_block_indices(block_indices, b, t, h)
  _checks.check_segment_ids(segment_ids, b, t)
  if not isinstance(block_size, int) or block_size < 1:
    _checks.fail("block_size", "a positive int", block_size)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  if impl == "reference":
    return _selected_reference(
      q, k, v, block_indices, block_size=block_size, segment_ids=segment_ids, softmax_scale=scale
    )
  return dispatch.run(
    "selected_attention",
    impl,
    _selected_fallback,
    q,
    k,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=scale,
  )


def _selected_fallback(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """No kernel: the dense reference for small calls, else the gathered form."""
  b, t, hq, _ = q.shape
  if b * t * hq * t <= DENSE_MAX_ELEMENTS:
    return _selected_reference(
      q,
      k,
      v,
      block_indices,
      block_size=block_size,
      segment_ids=segment_ids,
      softmax_scale=softmax_scale,
    )
  return gathered_selected_attention(
    q,
    k,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=softmax_scale,
  )


def _selected_reference(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  mask = selected_mask(
    block_indices, block_size=block_size, seq_len=q.shape[1], segment_ids=segment_ids
  )
  return masked_attention(q, k, v, mask, softmax_scale)[0]
