"""Document-aligned key layout for packed rows (XLA side of the kernels' ``segment_ids`` path).

With packed documents the selection is DOCUMENT-RELATIVE: block ``j`` of a query ``t`` whose
document starts at row position ``ds(t)`` covers row positions ``[ds(t) + j*bs, ds(t) +
(j+1)*bs)``. Documents rarely start on the ``bs`` grid, so such a block straddles two row
blocks. The kernels instead read K and V in a *padded layout* where every document starts on a
block boundary:

* document ``D`` (row start ``ds_D``, length ``len_D``) occupies the padded blocks ``[P_D, P_D +
  ceil(len_D / bs))`` with ``P_D`` the sum of ``ceil(len / bs)`` over the earlier documents of
  the row; padded key position ``P_D*bs + i`` holds row position ``ds_D + i``; the rest of the
  ``num_blocks * bs`` padded positions hold zeros;
* query ``t`` sits at padded position ``t + shift(t)`` with ``shift(t) = P_D*bs - ds_D >= 0``,
  and its document-relative block ``j`` is padded block ``P_D + j``.

A query then sees padded key ``p`` iff it selected ``p // bs`` (in padded ids) and ``p <= t +
shift(t)``: selected blocks lie in the query's own document, and the zero keys after a
document's end are past every query of that document. No document mask is needed.

The padded length is static (``num_blocks``); a row needs :func:`packed_blocks_needed` blocks
(at most ``ceil(T / bs) + #documents - 1``). Rows that need more than ``num_blocks`` are not
served correctly (their late documents are dropped): callers check :func:`packed_blocks_needed`
and take another path for them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PackedLayout(NamedTuple):
  """Where every token of a packed row sits in the document-aligned padded layout.

  Attributes:
    block_start: ``[B, T]`` int32 ``P_D``, the first padded block of each token's document.
    shift: ``[B, T]`` int32 ``P_D*bs - ds(t) >= 0``: token ``t`` is at padded position
      ``t + shift``.
    source: ``[B, num_blocks*bs]`` int32 the row position each padded key position holds, ``T``
      for a zero (padding) position.
    doc_start: ``[B, T]`` int32 ``ds(t)``, the first row position of each token's document.
  """

  block_start: jax.Array
  shift: jax.Array
  source: jax.Array
  doc_start: jax.Array


def _check_segments(segment_ids, block_size: int) -> None:
  if not hasattr(segment_ids, "ndim") or segment_ids.ndim != 2:
    raise ValueError(
      f"segment_ids: expected a rank-2 array [B, T], got shape "
      f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}"
    )
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size!r}")


def _doc_bounds(segment_ids):
  """``(is_start, doc_start, doc_end)`` ``[B, T]``: documents are maximal runs of equal ids;
  ``doc_end`` is one past the last position of each token's document."""
  b, t = segment_ids.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  is_start = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  doc_start = jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)
  nxt = jnp.concatenate([jnp.where(is_start, pos, t)[:, 1:], jnp.full((b, 1), t, jnp.int32)], 1)
  doc_end = jax.lax.cummin(nxt, axis=1, reverse=True)
  return is_start, doc_start, doc_end


def packed_blocks_needed(segment_ids, block_size: int):
  """``[B]`` int32: padded blocks each row needs, ``sum over its documents of ceil(len / bs)``
  (``<= ceil(T / bs) + #documents - 1``). Jittable."""
  _check_segments(segment_ids, block_size)
  is_start, ds, de = _doc_bounds(jnp.asarray(segment_ids))
  blocks = -(-(de - ds) // block_size)
  return jnp.sum(jnp.where(is_start, blocks, 0), axis=1, dtype=jnp.int32)


def packed_layout(segment_ids, *, block_size: int, num_blocks: int) -> PackedLayout:
  """The padded layout of ``segment_ids [B, T]`` with ``num_blocks`` padded blocks of
  ``block_size`` (see the module docstring). Jittable; ``num_blocks`` is static."""
  _check_segments(segment_ids, block_size)
  if not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
  b, t = segment_ids.shape
  is_start, ds, de = _doc_bounds(jnp.asarray(segment_ids))
  blocks = -(-(de - ds) // block_size)  # [B, T] blocks of each token's document
  # inclusive sum over documents starting at or before t = P_D + blocks of t's own document
  block_start = jnp.cumsum(jnp.where(is_start, blocks, 0), axis=1, dtype=jnp.int32) - blocks
  shift = block_start * block_size - ds
  pos = jnp.arange(t, dtype=jnp.int32)
  dst = pos[None, :] + shift  # distinct within a row; past the end when the row does not fit
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  source = (
    jnp.full((b, num_blocks * block_size), t, jnp.int32)
    .at[rows, dst]
    .set(jnp.broadcast_to(pos, (b, t)), mode="drop")
  )
  return PackedLayout(block_start=block_start, shift=shift, source=source, doc_start=ds)


def padded_block_indices(block_indices, layout: PackedLayout, *, block_size: int):
  """Document-relative ``block_indices [B, T, H, n]`` -> padded block ids ``P_D(t) + j``.

  Entries that no key answers (``j < 0`` or ``j*bs > t - ds(t)``: a block that starts after the
  query) become ``-1``; the rest keep their order (duplicates stay duplicates)."""
  bi = jnp.asarray(block_indices, jnp.int32)
  pos = jnp.arange(bi.shape[1], dtype=jnp.int32)[None, :]
  last = ((pos - layout.doc_start) // block_size)[..., None, None]  # [B, T, 1, 1]
  ok = (bi >= 0) & (bi <= last)
  return jnp.where(ok, bi + layout.block_start[..., None, None], -1)


def padded_positions(layout: PackedLayout):
  """``[B, T]`` int32 padded position ``t + shift(t)`` of every query."""
  t = layout.shift.shape[1]
  return jnp.arange(t, dtype=jnp.int32)[None, :] + layout.shift


@jax.custom_vjp
def _gather_keys(x, source, dst):
  return _take_rows(x, source)


def _take_rows(x, idx):
  """``x [B, S, ...]``, ``idx [B, R]`` in ``[0, S]`` -> ``[B, R, ...]`` (index ``S``: zeros)."""
  xz = jnp.concatenate([x, jnp.zeros((x.shape[0], 1, *x.shape[2:]), x.dtype)], axis=1)
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))(xz, idx)


def _gather_keys_fwd(x, source, dst):
  return _take_rows(x, source), (source, dst)


def _gather_keys_bwd(res, g):
  source, dst = res
  r = g.shape[1]
  dx = _take_rows(g, jnp.where(dst < r, dst, r))  # each row position appears once (or never)
  zero = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
  return dx, zero(source), zero(dst)


_gather_keys.defvjp(_gather_keys_fwd, _gather_keys_bwd)


def pad_keys(x, layout: PackedLayout):
  """``x [B, T, H, D]`` (K or V) -> ``[B, num_blocks*bs, H, D]`` in the padded layout.

  Differentiable: the cotangent maps back by a gather (row ``t`` reads padded position ``t +
  shift(t)``; rows past the capacity get 0), not a scatter."""
  return _gather_keys(x, layout.source, padded_positions(layout))
