"""XLA side of the TPU selected-attention kernels: tile layout, iteration lists, per-row data and
the inverse map (:mod:`pallas_kernels.selected_attention_tpu` runs the kernels).

Orientation: the kernels put a tile's query rows on the 128 lanes and keys on sublanes
(``S^T = K Q^T`` is ``[block, rows]``), so every per-row quantity (position, selection, LSE, δ) is
a lane-dense row vector and the softmax reduces over sublanes.

Tile: ``r = R // G`` consecutive tokens of one KV head x its ``G`` query heads, ``R`` rows (a
multiple of 128; row ``i*G + g`` is token ``t0 + i``, query head ``h*G + g``; rows ``r*G .. R-1``
are padding that sees nothing).

Arrays built here (``NT = cdiv(T, r)`` tiles, ``NB`` key blocks, ``n`` picks per token):

* ``lists [B, H, NT, 1, 1 + L]`` int32: entry 0 is the tile's count, then the sorted union of
  its tokens' visible picks, padded by repeating the last id (``L = min(r*n, NB)``, never
  truncated). One ``1 + L`` row is an SMEM block of the forward and dQ grids.
* ``meta [B, H, NT, 8 + n8, R]`` float32 (``n8 = round_up(n, 8)``): row 0 the row's key-grid
  position (``-1`` for padding rows), row 1 its LSE, row 2 its δ, rows ``8 ..`` its token's picks
  (``-1`` padding). Positions and ids are exact in float32 below ``2**24``.
* ``bounds [B, H, NB, 1, 2]`` int32 and ``pair_tiles [B, H, NT*L + chunk]`` int32: the inverse
  map (for each KV block the query tiles whose list holds it, as CSR sorted by (block, tile),
  :func:`pallas_kernels.selection_tiles.inverse_tile_map`) for the dK/dV grid, with no atomics.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.selection_tiles import TileLists, inverse_tile_map

META_HEAD = 8
"""Rows of ``meta`` before the picks: position, LSE, δ, then padding to one sublane tile."""


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def tile_geometry(seq_len: int, group: int, tile_rows: int) -> tuple[int, int]:
  """``(r, NT)``: tokens per tile ``R // G`` and tiles ``cdiv(T, r)``."""
  r = tile_rows // group
  return r, -(-seq_len // r)


def to_tiles(x, num_kv_heads: int, r: int, tile_rows: int):
  """``[B, T, H*G, D] -> [B, H, NT * R, D]``: tile rows ``(i, g)``, zero padded."""
  b, t, hq, d = x.shape
  g = hq // num_kv_heads
  nt = -(-t // r)
  x = jnp.pad(x, ((0, 0), (0, nt * r - t), (0, 0), (0, 0)))
  x = x.reshape(b, nt, r, num_kv_heads, g, d).transpose(0, 3, 1, 2, 4, 5)  # [B, H, NT, r, G, D]
  x = x.reshape(b, num_kv_heads, nt, r * g, d)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, tile_rows - r * g), (0, 0)))
  return x.reshape(b, num_kv_heads, nt * tile_rows, d)


def from_tiles_t(x, seq_len: int, group: int):
  """Inverse of :func:`to_tiles` for transposed tiles: ``[B, H, NT, D, R] -> [B, T, H*G, D]``."""
  b, h, nt, d, rows = x.shape
  r = rows // group
  x = x[..., : r * group].reshape(b, h, nt, d, r, group)
  x = x.transpose(0, 2, 4, 1, 5, 3).reshape(b, nt * r, h * group, d)  # [B, NT*r, HQ, D]
  return x[:, :seq_len]


def row_values(x, num_kv_heads: int, r: int, tile_rows: int, fill):
  """Per-row values of tiles: ``[B, T, H*G] -> [B, H, NT, R]`` (padding rows ``fill``)."""
  b, t, hq = x.shape
  g = hq // num_kv_heads
  nt = -(-t // r)
  x = jnp.pad(x, ((0, 0), (0, nt * r - t), (0, 0)), constant_values=fill)
  x = x.reshape(b, nt, r, num_kv_heads, g).transpose(0, 3, 1, 2, 4).reshape(b, -1, nt, r * g)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, tile_rows - r * g)), constant_values=fill)


def kv_heads_major(x, num_blocks: int, block_size: int):
  """``[B, S, H, D] -> [B, H, NB * bs, D]`` (zero padded keys at the end)."""
  x = jnp.pad(x, ((0, 0), (0, num_blocks * block_size - x.shape[1]), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3)


def tile_lists(block_indices, positions, *, r: int, block_size: int, num_blocks: int):
  """Per-tile iteration lists.

  Args:
    block_indices: ``[B, T, H, n]`` int block ids on the key grid (``-1`` padding; duplicates
      count once).
    positions: ``[B, T]`` int32 key-grid position of each token (``t``, or ``t + shift`` with
      packed documents); a pick counts when ``0 <= id < NB`` and ``id * bs <= position``.
    r: tokens per tile.
    block_size: keys per block.
    num_blocks: ``NB``.

  Returns:
    ``(lists [B, H, NT, 1, 1 + L], ids [B, H, NT, L], counts [B, H, NT])`` int32.
  """
  b, t, h, n = block_indices.shape
  nt = -(-t // r)
  length = min(r * n, num_blocks)
  bi = jnp.pad(jnp.asarray(block_indices, jnp.int32), ((0, 0), (0, nt * r - t), (0, 0), (0, 0)))
  pos = jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, nt * r - t)), constant_values=-1)
  valid = (bi >= 0) & (bi < num_blocks) & (bi * block_size <= pos[:, :, None, None])
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(valid, bi, big).reshape(b, nt, r, h, n).transpose(0, 3, 1, 2, 4)
  key = jnp.sort(key.reshape(b, h, nt, r * n), axis=-1)  # [B, H, NT, r*n]
  prev = jnp.pad(key, ((0, 0), (0, 0), (0, 0), (1, 0)), constant_values=-1)[..., :-1]
  new = (key != big) & (key != prev)
  rank = jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1
  counts = jnp.sum(new, axis=-1, dtype=jnp.int32)  # <= length by construction
  col = jnp.where(new, rank, length)  # the extra column swallows the rest
  ib, ih, it, _ = jnp.indices(key.shape, sparse=True)
  ids = jnp.zeros((b, h, nt, length + 1), jnp.int32).at[ib, ih, it, col].set(key)[..., :length]
  last = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  ids = jnp.where(jnp.arange(length) < counts[..., None], ids, last)
  lists = jnp.concatenate([counts[..., None], ids], axis=-1)[:, :, :, None, :]
  return lists, ids, counts


def tile_meta(
  block_indices, positions, *, group: int, r: int, tile_rows: int, lse=None, delta=None
):
  """``meta [B, H, NT, 8 + n8, R]`` float32 (module docstring).

  Args:
    block_indices: ``[B, T, H, n]`` int ids on the key grid.
    positions: ``[B, T]`` int32 key-grid positions.
    group: ``G``; r: tokens per tile; tile_rows: ``R``.
    lse, delta: optional ``[B, T, HQ]`` float32 (backward; a non-finite LSE becomes 0: such a
      row sees no key).
  """
  b, t, h, n = block_indices.shape
  nt = -(-t // r)
  rows = r * group
  n8 = round_up(n, 8)
  bi = jnp.pad(
    jnp.asarray(block_indices, jnp.int32), ((0, 0), (0, 0), (0, 0), (0, n8 - n)), constant_values=-1
  )

  def per_row(x, fill):  # [B, T, H, k] per token -> [B, H, NT, k, R]
    x = jnp.pad(x, ((0, 0), (0, nt * r - t), (0, 0), (0, 0)), constant_values=fill)
    k = x.shape[-1]
    x = x.reshape(b, nt, r, h, k, 1).transpose(0, 3, 1, 4, 2, 5)  # [B, H, NT, k, r, 1]
    x = jnp.broadcast_to(x, (b, h, nt, k, r, group)).reshape(b, h, nt, k, rows)
    return jnp.pad(x, ((0, 0),) * 4 + ((0, tile_rows - rows),), constant_values=fill)

  pos = per_row(jnp.broadcast_to(positions[:, :, None, None], (b, t, h, 1)), -1)
  head = [pos.astype(jnp.float32)]
  for x in (lse, delta):
    if x is None:
      head.append(jnp.zeros(pos.shape, jnp.float32))
    else:
      x = jnp.where(jnp.isfinite(x), x, 0.0).astype(jnp.float32)
      head.append(row_values(x, h, r, tile_rows, 0.0)[:, :, :, None, :])
  pad = jnp.zeros((b, h, nt, META_HEAD - len(head), tile_rows), jnp.float32)
  return jnp.concatenate([*head, pad, per_row(bi, -1).astype(jnp.float32)], axis=3)


def inverse_pairs(ids, counts, *, num_blocks: int, chunk: int):
  """The dK/dV grid's inverse map.

  Args:
    ids, counts: the forward's lists (``[B, H, NT, L]``, ``[B, H, NT]``).
    num_blocks: ``NB``.
    chunk: tile ids read per SMEM refill (the tail padding of ``pair_tiles``).

  Returns:
    ``(bounds [B, H, NB, 1, 2], pair_tiles [B, H, NT*L + chunk])`` int32: block ``k``'s query
    tiles are ``pair_tiles[..., bounds[k, 0, 0]:bounds[k, 0, 1]]``, ascending.
  """
  inv = inverse_tile_map(TileLists(ids, counts, None, None), num_blocks)
  bounds = jnp.stack([inv.offsets[..., :-1], inv.offsets[..., 1:]], axis=-1)[:, :, :, None, :]
  tiles = jnp.pad(inv.tiles, ((0, 0), (0, 0), (0, chunk)))
  return bounds, tiles


def shared_picks(block_indices, r: int, doc_start=None):
  """ASA's shared selection: token ``t`` uses the picks of the first token of its aligned run of
  ``r`` (aligned to each document's start when ``doc_start [B, T]`` is given)."""
  t = block_indices.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  if doc_start is None:
    return jnp.take(block_indices, (pos // r) * r, axis=1)
  leader = pos[None, :] - (pos[None, :] - doc_start) % r
  return jnp.take_along_axis(block_indices, leader[:, :, None, None], axis=1)


def check_positions_exact(grid_len: int) -> str | None:
  """Positions and ids travel as float32 in ``meta`` (exact below ``2**24``): a reason when a key
  grid of ``grid_len`` positions reaches ``2**23`` (kept one bit short for margin)."""
  if grid_len >= 2**23:
    return f"key grid of {grid_len} positions (positions travel in float32 below 2**23)"
  return None


__all__ = [
  "META_HEAD",
  "check_positions_exact",
  "from_tiles_t",
  "inverse_pairs",
  "kv_heads_major",
  "row_values",
  "shared_picks",
  "tile_geometry",
  "tile_lists",
  "tile_meta",
  "to_tiles",
]
