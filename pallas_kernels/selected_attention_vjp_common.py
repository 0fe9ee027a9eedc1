"""XLA side of the selected-attention backward kernels: their static configuration, the operands
they read (tiles, residuals, iteration lists and the dK/dV work items) and the reduction of the
dK/dV work items' partial sums (:mod:`pallas_kernels.selected_attention_vjp_kernel_sm90`)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.selected_attention_common import (
  BLOCK_SIZE,
  LOG2E,
  TILE_ROWS,
  share_selection,
  shift_tiles,
  to_tiles,
  tokens_per_tile,
)
from pallas_kernels.selection_tiles import (
  TileLists,
  WorkItems,
  inverse_work_items,
  tile_iteration_lists,
)

ROWS = TILE_ROWS
KEY_TILE = 64
"""Keys per dK/dV CTA (the wgmma M of ``Sᵀ = K Qᵀ``, one warpgroup)."""


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """Static parameters of the backward kernels.

  Attributes:
    num_stages: TMA ring depth of both kernels.
    chunk: the smallest cap on the query tiles of one dK/dV work item (the cap grows to
      ``cdiv(pairs, NB)`` so that at most ``2 NB`` items exist).
    direct: per-token TMA copies of Q/dO/dQ instead of XLA transposes to 64-row tiles,
      where :func:`use_direct` allows.
  """

  num_stages: int = 2
  chunk: int = 256
  direct: bool = True

  def __post_init__(self):
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"num_stages: expected a positive int, got {self.num_stages!r}")
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f"chunk: expected a positive int, got {self.chunk!r}")


class BwdOperands(NamedTuple):
  """XLA-side operands of the backward kernels (see :func:`prepare_backward`).

  Attributes:
    qx, dox: ``[B, H, NT*64, Dk]`` Q and ``[.., Dv]`` dO in 64-row tiles (``direct``:
      ``[B, NT*r, HQ, Dk|Dv]``, padded to whole tiles); lsex: ``[B, H, NT*64]`` LSE in log2
      units (``+inf`` for rows that saw no key, so their ``P`` is 0); dlx: ``[B, H, NT*64]``
      ``δ = rowsum(dO ∘ O)``; kp, vp: ``[B, NB*bs + tail, H, Dk|Dv]`` K and V padded to whole
      blocks (with packed documents: the padded layout's ``NB``); lists: the 64-row tiles'
      iteration lists; work: the dK/dV work items; docs: ``None`` or
      :func:`pallas_kernels.selected_attention_common.shift_tiles` of the 64-row tiles.
  """

  qx: jax.Array
  dox: jax.Array
  lsex: jax.Array
  dlx: jax.Array
  kp: jax.Array
  vp: jax.Array
  lists: TileLists
  work: WorkItems
  docs: tuple | None


def use_direct(g: int) -> bool:
  """Q/dO/dQ move by one TMA copy per token (no XLA transposes) when ``G % 8 == 0`` and ``G``
  divides 64 (so a tile has no padding rows)."""
  return g % 8 == 0 and ROWS % g == 0


def prepare_backward(
  q,
  k,
  v,
  o,
  lse,
  do,
  block_indices,
  *,
  mode: str,
  chunk: int,
  direct: bool = False,
  shift=None,
  block_size: int = BLOCK_SIZE,
) -> BwdOperands:
  """Tiles, residuals and index structures for the two kernels (shapes as :func:`backward`).

  K and V are zero padded to ``NB * bs`` rows (``NB = cdiv(Tk, bs)``), plus ``64 - bs`` when
  ``bs < 64`` (the dK/dV kernel's 64-key tile of the last block)."""
  t, hq = q.shape[1], q.shape[2]
  tk, h = k.shape[1], k.shape[2]
  r = tokens_per_tile(hq // h)
  bs = block_size
  nb = -(-tk // bs)
  if mode == "shared":
    block_indices = share_selection(block_indices, r)
  length = min(r * block_indices.shape[-1], nb)
  length = -(-length // 4) * 4  # 16-byte rows, as the forward's lists
  grid = {}
  if shift is not None:  # packed documents: padded key grid, shifted query positions
    grid = {"num_blocks": nb, "positions": jnp.arange(t, dtype=jnp.int32)[None, :] + shift}
  lists = tile_iteration_lists(
    block_indices, tokens_per_tile=r, block_size=bs, max_len=length, **grid
  )
  tp = lists.ids.shape[2] * r
  pad_t = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  if direct and tp == t:
    pad_t = lambda x: x
  rows = lambda x: to_tiles(pad_t(x), r, h)
  q_rows = pad_t if direct else rows
  delta = jnp.einsum("bthd,bthd->bth", o.astype(jnp.float32), do.astype(jnp.float32))
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  tail = max(0, KEY_TILE - bs)
  pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, nb * bs + tail - tk), (0, 0), (0, 0)))
  return BwdOperands(
    qx=q_rows(q),
    dox=q_rows(do.astype(q.dtype)),
    lsex=rows(lse2[..., None])[..., 0],
    dlx=rows(delta[..., None])[..., 0],
    kp=pad_kv(k),
    vp=pad_kv(v),
    lists=lists,
    work=inverse_work_items(lists, nb, chunk=chunk),
    docs=None if shift is None else shift_tiles(shift, hq // h, tp),
  )


def no_docs(b: int):
  """Placeholder document operands for kernels compiled without documents (never read)."""
  return jnp.zeros((b, ROWS), jnp.int32), jnp.zeros((b, 1), jnp.int32)


def reduce_items(part, item_block, *, num_blocks: int, seq_len: int, block_size: int = BLOCK_SIZE):
  """``[B, T, H, D]`` float32 sums of the work items' partial ``[B, H, 2NB*64, D]`` (``D`` is
  ``Dk`` for dK, ``Dv`` for dV): the first
  ``NB`` items are the blocks in order, the rest are added to their block."""
  b, h, _, d = part.shape
  bs = block_size
  part = part.astype(jnp.float32)
  first = part[:, :, : num_blocks * bs]  # [B, H, NB*64, D]
  extra = part[:, :, num_blocks * bs :].reshape(b, h, num_blocks, bs, d)
  seg = jnp.minimum(item_block[..., num_blocks:], num_blocks)  # NB: unused
  summed = jax.vmap(jax.vmap(lambda p, s: jax.ops.segment_sum(p, s, num_segments=num_blocks + 1)))(
    extra, seg
  )[:, :, :num_blocks].reshape(b, h, num_blocks * bs, d)
  return (first + summed)[:, :, :seq_len].transpose(0, 2, 1, 3)
