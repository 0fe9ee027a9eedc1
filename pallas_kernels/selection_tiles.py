"""Tile iteration lists for selected-block attention kernels, built with plain XLA ops.

A kernel tile holds ``r`` consecutive tokens of one KV head (``r * G`` query rows: row ``i*G + g``
is token ``t0 + i``, query head ``h*G + g``). Per tile:

* **iteration list** ``ids``: the sorted, deduplicated union of the KV blocks the tile's tokens
  selected, keeping only blocks that some token can see (``0 <= id < NB`` and ``id * block_size <=
  t``, i.e. the block starts at or before the token). Entries past ``counts`` repeat the last valid
  id (``0`` when the tile has none), so a kernel that runs a fixed number of steps fetches nothing
  new on padded steps and skips their compute.
* **membership** ``member_lo`` / ``member_hi``: bit ``i`` (token ``i < 32`` in ``lo``, token
  ``i - 32`` in ``hi``) says token ``t0 + i`` itself selected block ``ids[j]``: the per-row mask of
  exact per-token selection. The causal mask inside a block is left to the kernel.
* **shared mode** (ASA): the tile iterates over its first token's list only (this is exact
  per-token selection applied to
  :func:`pallas_kernels.selected_attention_common.share_selection`).

The inverse map (KV block -> query tiles whose iteration list holds it) is what a dK/dV kernel
without atomics iterates over; it is built by one sort.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_TOKENS_PER_TILE = 64
"""Membership is two 32-bit words per (tile, step), so a tile holds at most 64 tokens."""


class TileLists(NamedTuple):
  """Per-tile iteration lists (see the module docstring).

  Attributes:
    ids: ``[B, H, NT, L]`` int32 KV block ids, ascending, padded by repeating the last valid id.
    counts: ``[B, H, NT]`` int32 number of valid entries of ``ids``.
    member_lo: ``[B, H, NT, L]`` int32 bit ``i`` = token ``i`` (``i < 32``) selected ``ids[j]``.
    member_hi: ``[B, H, NT, L]`` int32 bit ``i - 32`` = token ``i`` (``32 <= i < 64``) selected it.
  """

  ids: jax.Array
  counts: jax.Array
  member_lo: jax.Array
  member_hi: jax.Array


def _check(block_indices, tokens_per_tile: int, block_size: int) -> None:
  if not hasattr(block_indices, "ndim") or block_indices.ndim != 4:
    raise ValueError(
      f"block_indices: expected a rank-4 array [B, T, H, n], got shape "
      f"{getattr(block_indices, 'shape', type(block_indices).__name__)}"
    )
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"block_indices: expected an integer dtype, got {block_indices.dtype}")
  if not isinstance(tokens_per_tile, int) or not 1 <= tokens_per_tile <= MAX_TOKENS_PER_TILE:
    raise ValueError(
      f"tokens_per_tile: expected an int in [1, {MAX_TOKENS_PER_TILE}], got {tokens_per_tile!r}"
    )
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size!r}")


def tile_iteration_lists(
  block_indices,
  *,
  tokens_per_tile: int,
  block_size: int,
  shared: bool = False,
  max_len: int | None = None,
  positions=None,
  num_blocks: int | None = None,
) -> TileLists:
  """Builds the iteration list and per-row membership of every query tile.

  Args:
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` padding; duplicates count once).
    tokens_per_tile: ``r``, consecutive tokens per tile (tiles start at multiples of ``r``; the
      last one is padded with tokens that select nothing).
    block_size: tokens per KV block.
    shared: iterate over each tile's first token's list (ASA shared selection) instead of the
      union of its tokens' lists; every token of the tile is then a member of every entry.
    max_len: ``L``; defaults to the worst case ``min(r * n, NB)`` (``min(n, NB)`` when shared).
      A smaller value truncates longer lists (``counts`` is clipped to ``L``).
    positions: optional ``[B, T]`` int32 key-grid position of each token, in place of ``t``
      (packed documents: the padded position ``t + shift(t)`` of
      :mod:`pallas_kernels.packed_layout`); a token keeps blocks with ``id * block_size <=
      position``, a shared tile those with ``id * block_size <=`` the largest position of its
      tokens.
    num_blocks: ``NB``, blocks of the key grid; defaults to ``cdiv(T, block_size)``.

  Returns:
    :class:`TileLists` with ``NT = cdiv(T, r)``.
  """
  _check(block_indices, tokens_per_tile, block_size)
  b, t, h, n = block_indices.shape
  r = tokens_per_tile
  nt = -(-t // r)
  nb = -(-t // block_size) if num_blocks is None else num_blocks
  if not isinstance(nb, int) or nb < 1:
    raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
  per_tile = n if shared else r * n
  length = min(per_tile, nb) if max_len is None else max_len
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"max_len: expected a positive int, got {max_len!r}")

  bi = jnp.asarray(block_indices, jnp.int32)
  bi = jnp.pad(bi, ((0, 0), (0, nt * r - t), (0, 0), (0, 0)), constant_values=-1)
  bi = bi.reshape(b, nt, r, h, n).transpose(0, 3, 1, 2, 4)  # [B, H, NT, r, n]
  tok = jnp.arange(nt * r, dtype=jnp.int32).reshape(nt, r)  # [NT, r]
  if positions is not None:
    pos = jnp.asarray(positions, jnp.int32)
    if pos.shape != (b, t):
      raise ValueError(f"positions: expected shape {(b, t)}, got {pos.shape}")
    pos = jnp.pad(pos, ((0, 0), (0, nt * r - t)), constant_values=-1).reshape(b, 1, nt, r, 1)
  if shared:
    bi = bi[:, :, :, :1, :]  # first token's list
    last = tok[:, -1:]  # [NT, 1]
    visible_to = jnp.minimum(last, t - 1)[None, None, :, :, None]  # [1, 1, NT, 1, 1]
    if positions is not None:
      visible_to = jnp.max(pos, axis=3, keepdims=True)  # [B, 1, NT, 1, 1]
    token_of = jnp.zeros((1, 1, 1, 1, 1), jnp.int32)
    rr = 1
  else:
    visible_to = tok[None, None, :, :, None] if positions is None else pos  # [., ., NT, r, 1]
    token_of = jnp.arange(r, dtype=jnp.int32)[None, None, None, :, None]
    rr = r
  valid = (bi >= 0) & (bi < nb) & (bi * block_size <= visible_to)

  # One sort of (block id, token) pairs per tile; key = id * 64 + token.
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(valid, bi * MAX_TOKENS_PER_TILE + token_of, big)
  key = jnp.sort(key.reshape(b, h, nt, rr * n), axis=-1)  # [B, H, NT, rr*n]
  ok = key != big
  blk = key // MAX_TOKENS_PER_TILE
  tk = key % MAX_TOKENS_PER_TILE
  prev_key = jnp.pad(key, ((0, 0), (0, 0), (0, 0), (1, 0)), constant_values=-1)[..., :-1]
  prev_blk = prev_key // MAX_TOKENS_PER_TILE
  new_pair = ok & (key != prev_key)
  new_blk = ok & ((blk != prev_blk) | (prev_key < 0))
  rank = jnp.cumsum(new_blk.astype(jnp.int32), axis=-1) - 1  # [B, H, NT, rr*n]
  counts = jnp.minimum(jnp.sum(new_blk, axis=-1, dtype=jnp.int32), length)

  # One scatter-add into a [.., L + 1, 3] table (id, lo bits, hi bits) whose last row swallows
  # invalid / truncated entries. Each rank gets its id from exactly one entry (the first of its
  # run), and distinct (block, token) pairs set distinct bits, so adding is OR.
  col = jnp.where(ok & (rank < length), rank, length)
  ib, ih, it, _ = jnp.indices(key.shape, sparse=True)
  id_part = jnp.where(new_blk, blk, 0).astype(jnp.uint32)
  if shared:
    bits_lo = jnp.where(new_blk, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))
    bits_hi = bits_lo
  else:
    one = jnp.uint32(1)
    bits_lo = jnp.where(
      new_pair & (tk < 32), one << jnp.minimum(tk, 31).astype(jnp.uint32), jnp.uint32(0)
    )
    bits_hi = jnp.where(
      new_pair & (tk >= 32), one << jnp.maximum(tk - 32, 0).astype(jnp.uint32), jnp.uint32(0)
    )
  table = (
    jnp.zeros((b, h, nt, length + 1, 3), jnp.uint32)
    .at[ib, ih, it, col]
    .add(jnp.stack([id_part, bits_lo, bits_hi], axis=-1))[..., :length, :]
  )
  ids = table[..., 0].astype(jnp.int32)
  lo, hi = table[..., 1], table[..., 2]

  # Pad past counts: repeat the last valid id (0 for an empty tile), membership 0.
  j = jnp.arange(length, dtype=jnp.int32)
  in_list = j < counts[..., None]
  last_id = jnp.take_along_axis(ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  ids = jnp.where(in_list, ids, last_id)
  lo = jnp.where(in_list, lo, 0)
  hi = jnp.where(in_list, hi, 0)
  as_i32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
  return TileLists(ids=ids, counts=counts, member_lo=as_i32(lo), member_hi=as_i32(hi))


class InverseMap(NamedTuple):
  """KV block -> query tiles, as CSR sorted by (block, tile).

  Attributes:
    tiles: ``[B, H, NT * L]`` int32 query-tile ids; block ``k``'s tiles are
      ``tiles[..., offsets[k]:offsets[k + 1]]`` (ascending); entries past ``offsets[NB]`` repeat
      the last valid tile id (``0`` when there is none).
    offsets: ``[B, H, NB + 1]`` int32 row starts.
  """

  tiles: jax.Array
  offsets: jax.Array


def inverse_tile_map(lists: TileLists, num_blocks: int) -> InverseMap:
  """For every KV block, the query tiles whose iteration list holds it (a future dK/dV grid).

  Args:
    lists: the forward's :class:`TileLists` (``ids [B, H, NT, L]``, ``counts [B, H, NT]``).
    num_blocks: ``NB``, KV blocks per sequence.

  Returns:
    :class:`InverseMap`.
  """
  if not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
  b, h, nt, length = lists.ids.shape
  valid = jnp.arange(length, dtype=jnp.int32) < lists.counts[..., None]  # [B, H, NT, L]
  tile = jnp.arange(nt, dtype=jnp.int32)[:, None]
  big = jnp.iinfo(jnp.int32).max
  if num_blocks * nt >= big:
    raise ValueError(f"num_blocks: {num_blocks} blocks x {nt} tiles overflow int32 sort keys")
  key = jnp.where(valid, lists.ids * nt + tile, big).reshape(b, h, nt * length)
  key = jnp.sort(key, axis=-1)
  total = jnp.sum(key != big, axis=-1, dtype=jnp.int32)  # [B, H]
  bounds = jnp.arange(num_blocks + 1, dtype=jnp.int32) * nt  # [NB + 1]
  offsets = jax.vmap(jax.vmap(lambda kk: jnp.searchsorted(kk, bounds, side="left")))(key)
  tiles = key % nt
  last = jnp.take_along_axis(tiles, jnp.maximum(total - 1, 0)[..., None], axis=-1)
  last = jnp.where(total[..., None] > 0, last, 0)
  pos = jnp.arange(nt * length, dtype=jnp.int32)
  tiles = jnp.where(pos < total[..., None], tiles, last)
  return InverseMap(tiles=tiles.astype(jnp.int32), offsets=offsets.astype(jnp.int32))


def inverse_tile_map_padded(inv: InverseMap, cap: int) -> tuple[jax.Array, jax.Array]:
  """Dense padded view of :func:`inverse_tile_map`, one row of ``cap`` tiles per KV block.

  Args:
    inv: the CSR map.
    cap: static row length; longer rows are truncated (``counts`` keeps the true length).

  Returns:
    ``(tiles [B, H, NB, cap], counts [B, H, NB])`` int32; row entries past the count repeat the
    row's last valid tile (``0`` for an empty row).
  """
  if not isinstance(cap, int) or cap < 1:
    raise ValueError(f"cap: expected a positive int, got {cap!r}")
  start, end = inv.offsets[..., :-1], inv.offsets[..., 1:]  # [B, H, NB]
  counts = end - start
  c = jnp.arange(cap, dtype=jnp.int32)
  pos = start[..., None] + jnp.minimum(c, jnp.maximum(counts - 1, 0)[..., None])
  b, h, nb = start.shape
  got = jnp.take_along_axis(inv.tiles, pos.reshape(b, h, nb * cap), axis=-1).reshape(b, h, nb, cap)
  return jnp.where(counts[..., None] > 0, got, 0), counts


class WorkItems(NamedTuple):
  """The inverse map cut into dK/dV work items (see :func:`inverse_work_items`).

  Items ``0 .. NB-1`` are the first chunk of block ``0 .. NB-1`` (a block no tile selected gets an
  empty item), items ``NB .. 2NB-1`` are the further chunks of blocks with many pairs, in block
  order, and unused ones are marked by block ``NB``.

  Attributes:
    tiles: ``[B, H, P]`` int32 query tiles of the (block, tile) pairs sorted by (block, tile),
      ``P = NT * L``; entries past the number of pairs are 0.
    member_lo, member_hi: ``[B, H, P]`` int32 the pair's membership words (as
      :class:`TileLists`): which tokens of the tile selected the block.
    item_block: ``[B, H, 2NB]`` int32 KV block of each item; ``NB`` marks an unused item.
    item_start: ``[B, H, 2NB]`` int32 first pair of the item (index into ``tiles``).
    item_count: ``[B, H, 2NB]`` int32 pairs in the item (0 for an unused item or a block no tile
      selected).
  """

  tiles: jax.Array
  member_lo: jax.Array
  member_hi: jax.Array
  item_block: jax.Array
  item_start: jax.Array
  item_count: jax.Array


def inverse_work_items(lists: TileLists, num_blocks: int, *, chunk: int) -> WorkItems:
  """KV block -> query tiles (with membership), cut into ``2 NB`` work items.

  A block with many pairs (the forced initial block is in every tile's list) is spread over
  several items so that it does not serialize the grid: items hold at most ``c = max(chunk,
  cdiv(pairs, NB))`` pairs, which bounds the further chunks of all blocks together by ``NB``. The
  partial dK/dV of a block's items are summed afterwards.

  Args:
    lists: the tile lists the kernels iterate over (``ids, counts, member_lo, member_hi``).
    num_blocks: ``NB``.
    chunk: the smallest item size ``c`` (pairs).

  Returns:
    :class:`WorkItems`.
  """
  if not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
  b, h, nt, length = lists.ids.shape
  big = jnp.iinfo(jnp.int32).max
  if num_blocks * nt >= big:
    raise ValueError(f"num_blocks: {num_blocks} blocks x {nt} tiles overflow int32 sort keys")
  p = nt * length
  valid = jnp.arange(length, dtype=jnp.int32) < lists.counts[..., None]  # [B, H, NT, L]
  tile = jnp.arange(nt, dtype=jnp.int32)[:, None]
  # One (uint32 key, int32 position) pair sort, which XLA on GPU can hand to CUB's radix sort;
  # the membership words follow through the permutation.
  key = jnp.where(valid, lists.ids * nt + tile, big).reshape(b, h, p).astype(jnp.uint32)
  pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, h, p))
  key, perm = jax.lax.sort((key, pos), dimension=2, num_keys=1)
  key = key.astype(jnp.int32)  # big stays big
  ok = key != big
  tiles = jnp.where(ok, key % nt, 0)
  take = lambda x: jnp.take_along_axis(x.reshape(b, h, p), perm, axis=-1)
  lo = jnp.where(ok, take(lists.member_lo), 0)
  hi = jnp.where(ok, take(lists.member_hi), 0)

  bounds = jnp.arange(num_blocks + 1, dtype=jnp.int32) * nt
  search = lambda a, v: jax.vmap(jax.vmap(lambda x: jnp.searchsorted(x, v, side="right")))(a)
  offsets = search(key, bounds - 1).astype(jnp.int32)  # [B, H, NB + 1]
  pairs = offsets[..., 1:] - offsets[..., :-1]  # [B, H, NB]
  total = jnp.sum(ok, axis=-1, dtype=jnp.int32)[..., None]  # [B, H, 1]
  c = jnp.maximum(chunk, -(-total // num_blocks))  # [B, H, 1]
  first_count = jnp.minimum(pairs, c)
  extra = jnp.maximum(0, -(-pairs // c) - 1)  # further chunks
  ends = jnp.cumsum(extra, axis=-1)  # inclusive, <= NB
  e = jnp.arange(num_blocks, dtype=jnp.int32)
  block = search(ends, e).astype(jnp.int32)  # [B, H, NB]; NB=unused
  used = block < num_blocks
  bc = jnp.minimum(block, num_blocks - 1)
  part = e - jnp.take_along_axis(ends - extra, bc, axis=-1) + 1  # chunk >= 1 of block
  start = jnp.take_along_axis(offsets[..., :-1], bc, axis=-1) + part * c
  count = jnp.clip(jnp.take_along_axis(pairs, bc, axis=-1) - part * c, 0, c)
  first_block = jnp.broadcast_to(e, (b, h, num_blocks))
  cat = lambda x, y: jnp.concatenate([x, y], axis=-1).astype(jnp.int32)
  return WorkItems(
    tiles=tiles,
    member_lo=lo,
    member_hi=hi,
    item_block=cat(first_block, block),
    item_start=cat(offsets[..., :-1], jnp.where(used, start, 0)),
    item_count=cat(first_count, jnp.where(used, count, 0)),
  )
