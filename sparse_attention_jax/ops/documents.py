"""Packed documents: the one home of what ``segment_ids`` mean and of the per-document grids.

A row ``[B, T]`` of ``segment_ids`` holds one or more documents: maximal runs of equal ids (an id
that comes back later, ``0 0 1 1 0 0``, starts a new document). No branch attends across
documents, and every block structure restarts at each document, as if the document were a
sequence of its own (the convention of the variable-length ``cu_seqlens`` APIs):

* a token's *document position* is ``u = t - ds(t)``, with ``ds(t)`` the row position of the first
  token of its document;
* compressed token ``i`` of a document covers its tokens ``[i*d, i*d + l)``; a document of length
  ``L`` has ``num_cmp_tokens(L)`` of them and a query at document position ``u`` sees those with
  ``i*d + l - 1 <= u``;
* selection block ``j`` covers document tokens ``[j*l', (j+1)*l')``: **block indices are
  document-relative** (row positions ``[ds + j*l', ds + (j+1)*l')``); forced initial blocks are the
  document's first blocks and local blocks are counted from ``u``.

Compressed tokens of a packed row are laid out like a variable-length batch: the documents'
compressed tokens one after the other, in row order, in the ``NC = num_cmp_tokens(T)`` slots of
the row (they always fit: a document of length ``L`` has at most ``floor((L - l)/d) + 1`` and these
add up to at most ``NC``); slots past the last one are unused (:func:`cmp_layout`).

Conversions for code written against variable-length APIs: :func:`cu_seqlens_from_segment_ids` and
:func:`segment_ids_from_cu_seqlens`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _starts_mask(segment_ids):
  """``[B, T]`` bool: the token starts a document."""
  return jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )


def document_ids(segment_ids):
  """``[B, T]`` int32 run index of each token's document (1 for the first document of a row)."""
  return jnp.cumsum(_starts_mask(segment_ids), axis=1, dtype=jnp.int32)


def same_document(segment_ids):
  """``[B, T, T]`` bool: tokens ``t`` and ``s`` belong to the same document."""
  doc = document_ids(segment_ids)
  return doc[:, :, None] == doc[:, None, :]


def document_starts(segment_ids, batch: int, seq_len: int):
  """``[B, T]`` int32: row position of the first token of each token's document (0 without ids)."""
  if segment_ids is None:
    return jnp.zeros((batch, seq_len), jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(_starts_mask(segment_ids), pos[None, :], 0), axis=1)


def document_ends(segment_ids, batch: int, seq_len: int):
  """``[B, T]`` int32: row position one past the last token of each token's document (``T``
  without ids)."""
  if segment_ids is None:
    return jnp.full((batch, seq_len), seq_len, jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  nxt = jnp.where(_starts_mask(segment_ids), pos[None, :], seq_len)[:, 1:]  # a start after t
  nxt = jnp.concatenate([nxt, jnp.full((batch, 1), seq_len, jnp.int32)], axis=1)
  return jax.lax.cummin(nxt, axis=1, reverse=True)


def document_positions(segment_ids, batch: int, seq_len: int):
  """``[B, T]`` int32 document position ``u = t - ds(t)`` of each token (``t`` without ids)."""
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
  return jnp.broadcast_to(pos - document_starts(segment_ids, batch, seq_len), (batch, seq_len))


class CmpLayout(NamedTuple):
  """Where each document's compressed tokens live in a packed row (see the module docstring).

  Attributes:
    slot_start: ``[B, NC]`` int32 row position of the first token of slot ``k``'s window
      (0 for unused slots).
    slot_doc: ``[B, NC]`` int32 row position of the first token of slot ``k``'s document
      (``-1`` for unused slots).
    slot_index: ``[B, NC]`` int32 index ``i`` of slot ``k``'s compressed token in its document.
    offset: ``[B, T]`` int32 slot of compressed token 0 of each token's document.
    count: ``[B, T]`` int32 compressed tokens of each token's document.
  """

  slot_start: jax.Array
  slot_doc: jax.Array
  slot_index: jax.Array
  offset: jax.Array
  count: jax.Array


def cmp_layout(config, segment_ids, batch: int, seq_len: int) -> CmpLayout:
  """The packed layout of compressed tokens for ``segment_ids [B, T]`` (or one document per row
  when ``segment_ids`` is None).

  Args:
    config: an :class:`~sparse_attention_jax.config.NSAConfig` (``cmp_window`` l,
      ``cmp_stride`` d).
    segment_ids: ``[B, T]`` integer document ids, or None.
    batch, seq_len: ``B`` and ``T``.

  Returns:
    :class:`CmpLayout` with ``NC = config.num_cmp_tokens(T)``.
  """
  l, d = config.cmp_window, config.cmp_stride
  nc = config.num_cmp_tokens(seq_len)
  k = jnp.arange(nc, dtype=jnp.int32)
  if segment_ids is None:
    shape = (batch, nc)
    return CmpLayout(
      slot_start=jnp.broadcast_to(k * d, shape),
      slot_doc=jnp.zeros(shape, jnp.int32),
      slot_index=jnp.broadcast_to(k, shape),
      offset=jnp.zeros((batch, seq_len), jnp.int32),
      count=jnp.full((batch, seq_len), nc, jnp.int32),
    )
  start = document_starts(segment_ids, batch, seq_len)
  length = document_ends(segment_ids, batch, seq_len) - start
  count = jnp.where(length >= l, (length - l) // d + 1, 0).astype(jnp.int32)  # [B, T]
  first = _starts_mask(segment_ids)
  upto = jnp.cumsum(jnp.where(first, count, 0), axis=1, dtype=jnp.int32)  # slots of docs <= t
  offset = upto - count
  # Slot k belongs to the first document whose cumulative count exceeds k: its first token is
  # the first row position where ``upto > k``.
  owner = jax.vmap(lambda u: jnp.searchsorted(u, k, side="right"))(upto).astype(jnp.int32)
  used = owner < seq_len
  owner = jnp.minimum(owner, seq_len - 1)
  index = k[None, :] - jnp.take_along_axis(offset, owner, axis=1)
  return CmpLayout(
    slot_start=jnp.where(used, owner + index * d, 0),
    slot_doc=jnp.where(used, owner, -1),
    slot_index=jnp.where(used, index, 0),
    offset=offset,
    count=count,
  )


# ------------------------------------------------------------------------- cu_seqlens helpers
def cu_seqlens_from_segment_ids(segment_ids, max_documents: int | None = None):
  """Offsets of the documents of packed rows in the flattened ``B*T`` token stream.

  Args:
    segment_ids: ``[B, T]`` integer document ids (documents never cross rows).
    max_documents: static length of the result for use under ``jit``: the offsets are padded by
      repeating ``B*T`` (empty documents). None (outside ``jit`` only) returns exactly the
      documents present.

  Returns:
    ``(cu_seqlens, num_documents)``: ``cu_seqlens`` int32 ``[D + 1]`` (``D = max_documents`` or the
    number of documents) with ``cu_seqlens[0] = 0`` and document ``i`` at flat positions
    ``[cu_seqlens[i], cu_seqlens[i + 1])``; ``num_documents`` an int32 scalar. Raises
    ``ValueError`` (outside ``jit``) when ``max_documents`` is too small.
  """
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.ndim != 2:
    raise ValueError(f"segment_ids: expected a [B, T] array, got shape {segment_ids.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
  b, t = segment_ids.shape
  flat_start = _starts_mask(segment_ids).reshape(b * t)
  num = jnp.sum(flat_start, dtype=jnp.int32)
  if max_documents is None:
    starts = np.flatnonzero(np.asarray(flat_start))
    return jnp.asarray(np.append(starts, b * t), jnp.int32), num
  if not isinstance(max_documents, int) or max_documents < 1:
    raise ValueError(f"max_documents: expected a positive int or None, got {max_documents!r}")
  if not isinstance(num, jax.core.Tracer) and int(num) > max_documents:
    raise ValueError(
      f"max_documents: expected at least the {int(num)} documents, got {max_documents}"
    )
  (starts,) = jnp.nonzero(flat_start, size=max_documents + 1, fill_value=b * t)
  starts = jnp.where(jnp.arange(max_documents + 1) < num, starts, b * t)
  return starts.astype(jnp.int32), num


def segment_ids_from_cu_seqlens(cu_seqlens, total_len: int):
  """``[total_len]`` int32 document index (1-based; 0 past the last document) of each token of a
  flat stream whose documents start at ``cu_seqlens [D + 1]`` (non-decreasing, ``cu_seqlens[0] =
  0``; repeated entries are empty documents). Reshape to ``[B, T]`` for packed rows."""
  cu = jnp.asarray(cu_seqlens)
  if cu.ndim != 1 or cu.shape[0] < 1:
    raise ValueError(f"cu_seqlens: expected a [D + 1] vector, got shape {cu.shape}")
  if not jnp.issubdtype(cu.dtype, jnp.integer):
    raise ValueError(f"cu_seqlens: expected an integer dtype, got {cu.dtype}")
  if not isinstance(total_len, int) or total_len < 1:
    raise ValueError(f"total_len: expected a positive int, got {total_len!r}")
  pos = jnp.arange(total_len, dtype=jnp.int32)
  idx = jnp.searchsorted(cu.astype(jnp.int32), pos, side="right").astype(jnp.int32)
  return jnp.where(pos < cu[-1], idx, 0)


__all__ = [
  "CmpLayout",
  "cmp_layout",
  "cu_seqlens_from_segment_ids",
  "document_ends",
  "document_ids",
  "document_positions",
  "document_starts",
  "same_document",
  "segment_ids_from_cu_seqlens",
]
