"""Pallas TPU (Mosaic) kernels of selected-block attention: forward, dQ and dK/dV.

Layouts and the XLA-side arrays are those of :mod:`pallas_kernels.selected_attention_tpu_prep`
(query rows on lanes: ``S^T = K Q^T`` is ``[bs, R]``). K and V stay in HBM as ``[B, H, NB*bs,
D]`` (``memory_space=pl.ANY``).

* Forward and dQ: grid ``(B, H, NT)``, one step per query tile. The tile's list (count + sorted
  block ids) is an SMEM block of the grid, so the pipeline prefetches the next tile's list and
  SMEM holds two lists whatever ``T`` is. The kernel walks exactly ``count`` blocks with a
  manual DMA of K/V through a ring of ``slots`` VMEM buffers (``pltpu.make_async_copy``:
  block ``j + slots - 1`` loads while block ``j`` computes), so padded list entries cost nothing (no grid steps, no copies).
  Per block: the row mask (the row's token picked the block: compare with its picks in ``meta``;
  causal: ``blk*bs + c <= position``), online softmax with ``m, l`` as ``[1, R]`` rows and the
  accumulator as ``[Dv, R]``; outputs ``O^T [Dv, R]`` and the LSE row.
* dK/dV: grid ``(B, H, NB)``, one step per KV block (K/V blocks and dK/dV accumulators through
  BlockSpecs); the block's query tiles come from the inverse CSR (``bounds`` SMEM block, tile ids
  read from HBM into SMEM ``chunk`` at a time) and each tile's Q, dO and ``meta`` stream in through
  the same kind of DMA ring. Every (block, tile) pair is visited once, so no atomics are needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selected_attention_tpu_prep import META_HEAD

NT_DIMS = (((1,), (1,)), ((), ()))  # A @ B^T
TN_DIMS = (((0,), (0,)), ((), ()))  # A^T @ B
NN_DIMS = (((1,), (0,)), ((), ()))  # A @ B


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one call (hashable: a ``custom_vjp`` nondiff argument).

  Attributes:
    softmax_scale: logit scale.
    group: ``G`` query heads per KV head.
    block_size: keys per block (``bs``).
    tile_rows: ``R`` query rows per tile (a multiple of 128).
    pair_chunk: dK/dV kernel: tile ids per SMEM refill.
    slots: DMA ring depth (K/V blocks in the forward and dQ kernels, query tiles in the dK/dV
      kernel), >= 2.
    interpret: ``None`` (compile with Mosaic) or a ``pallas_call`` ``interpret=`` value.
  """

  softmax_scale: float
  group: int
  block_size: int
  tile_rows: int = 128
  pair_chunk: int = 128
  slots: int = 4
  interpret: Any = None


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _row_mask(meta_head, sel, blk, bs: int):
  """``[bs, R]`` bool: row ``x`` sees key ``c`` of block ``blk`` (its token picked ``blk`` and
  ``blk*bs + c <= position``). ``meta_head [8, R]`` f32, ``sel [n8, R]`` int32."""
  pos = meta_head[0:1, :].astype(jnp.int32)  # [1, R]
  member = jnp.max(jnp.where(sel == blk, 1.0, 0.0), axis=0, keepdims=True) > 0.5  # [1, R]
  limit = jnp.where(member, pos - blk * bs, -1)
  key = lax.broadcasted_iota(jnp.int32, (bs, sel.shape[1]), 0)
  return key <= limit


def _ring_loop(count, slots: int, start_copies, wait_copies, body):
  """Walk over ``count`` items with a ring of ``slots`` DMA buffers: item ``j + slots - 1`` is
  issued before item ``j`` computes. ``start_copies(slot, j)`` issues item ``j``'s DMAs into
  ``slot`` (called for ``j = 0, 1, ...`` in order), ``wait_copies(slot)`` waits for them,
  ``body(slot, j)`` computes."""
  for j in range(slots - 1):  # prologue

    @pl.when(j < count)
    def _(j=j):
      start_copies(j, j)

  def step(j, carry):
    ahead = j + slots - 1

    @pl.when(ahead < count)
    def _():
      start_copies(ahead % slots, ahead)

    slot = j % slots
    wait_copies(slot)
    body(slot, j)
    return carry

  lax.fori_loop(0, count, step, 0)


def _block_copies(k_hbm, v_hbm, kbuf, vbuf, sem, bs):
  b, h = pl.program_id(0), pl.program_id(1)

  def copies(slot, blk):
    at = pl.ds(pl.multiple_of(blk * bs, bs), bs)
    return (
      pltpu.make_async_copy(k_hbm.at[b, h, at, :], kbuf.at[slot], sem.at[0, slot]),
      pltpu.make_async_copy(v_hbm.at[b, h, at, :], vbuf.at[slot], sem.at[1, slot]),
    )

  return copies


def _fwd_kernel(
  lists_ref, q_ref, meta_ref, k_hbm, v_hbm, o_ref, lse_ref, kbuf, vbuf, sem, m_scr, l_scr, acc,
  *, p: KernelParams,
):  # fmt: skip
  bs = p.block_size
  prec = _precision(q_ref.dtype)
  count = lists_ref[0, 0, 0, 0, 0]
  copies = _block_copies(k_hbm, v_hbm, kbuf, vbuf, sem, bs)
  m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
  l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
  acc[...] = jnp.zeros(acc.shape, jnp.float32)
  head = meta_ref[0, 0, 0, 0:META_HEAD, :]
  sel = meta_ref[0, 0, 0, META_HEAD:, :].astype(jnp.int32)

  def start(slot, j):
    for c in copies(slot, lists_ref[0, 0, 0, 0, 1 + j]):
      c.start()

  def wait(slot):
    for c in copies(slot, 0):
      c.wait()

  def body(slot, j):
    blk = lists_ref[0, 0, 0, 0, 1 + j]
    s = _dot(kbuf[slot], q_ref[0, 0], NT_DIMS, prec) * p.softmax_scale  # [bs, R]
    s = jnp.where(_row_mask(head, sel, blk, bs), s, -jnp.inf)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=0, keepdims=True))  # [1, R]
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_use)
    pt = jnp.exp(s - m_use)  # [bs, R]
    l_scr[...] = alpha * l_scr[...] + jnp.sum(pt, axis=0, keepdims=True)
    pv = _dot(vbuf[slot], pt.astype(vbuf.dtype), TN_DIMS, prec)  # [Dv, R]
    acc[...] = alpha * acc[...] + pv
    m_scr[...] = m_new

  _ring_loop(count, p.slots, start, wait, body)
  l = l_scr[...]
  seen = l > 0
  o_ref[0, 0, 0] = (acc[...] * jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)).astype(
    o_ref.dtype
  )
  lse_ref[0, 0, 0] = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def forward_call(lists, qt, meta, kf, vf, p: KernelParams):
  """Forward kernel.

  Args:
    lists: ``[B, H, NT, 1, 1 + L]`` int32; qt: ``[B, H, NT*R, Dk]``; meta: ``[B, H, NT, M, R]``;
    kf: ``[B, H, NB*bs, Dk]``; vf: ``[B, H, NB*bs, Dv]``.

  Returns:
    ``(oT [B, H, NT, Dv, R] in q's dtype, lse [B, H, NT, 1, R] float32)``.
  """
  b, h, nt, _, width = lists.shape
  rows, dk, dv = p.tile_rows, qt.shape[-1], vf.shape[-1]
  m = meta.shape[3]
  kernel = lambda *refs: _fwd_kernel(*refs, p=p)
  return pl.pallas_call(
    kernel,
    grid=(b, h, nt),
    in_specs=[
      pl.BlockSpec((1, 1, 1, 1, width), lambda i, j, t: (i, j, t, 0, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec((1, 1, rows, dk), lambda i, j, t: (i, j, t, 0)),
      pl.BlockSpec((1, 1, 1, m, rows), lambda i, j, t: (i, j, t, 0, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=[
      pl.BlockSpec((1, 1, 1, dv, rows), lambda i, j, t: (i, j, t, 0, 0)),
      pl.BlockSpec((1, 1, 1, 1, rows), lambda i, j, t: (i, j, t, 0, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, h, nt, dv, rows), qt.dtype),
      jax.ShapeDtypeStruct((b, h, nt, 1, rows), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((p.slots, p.block_size, dk), kf.dtype),
      pltpu.VMEM((p.slots, p.block_size, dv), vf.dtype),
      pltpu.SemaphoreType.DMA((2, p.slots)),
      pltpu.VMEM((1, rows), jnp.float32),
      pltpu.VMEM((1, rows), jnp.float32),
      pltpu.VMEM((dv, rows), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    interpret=p.interpret or False,
    name="selected_attention_tpu_fwd",
  )(lists, qt, meta, kf, vf)


def _dq_kernel(
  lists_ref, q_ref, do_ref, meta_ref, k_hbm, v_hbm, dq_ref, kbuf, vbuf, sem, acc,
  *, p: KernelParams,
):  # fmt: skip
  bs = p.block_size
  prec = _precision(q_ref.dtype)
  count = lists_ref[0, 0, 0, 0, 0]
  copies = _block_copies(k_hbm, v_hbm, kbuf, vbuf, sem, bs)
  acc[...] = jnp.zeros(acc.shape, jnp.float32)
  head = meta_ref[0, 0, 0, 0:META_HEAD, :]
  sel = meta_ref[0, 0, 0, META_HEAD:, :].astype(jnp.int32)
  lse, delta = head[1:2, :], head[2:3, :]

  def start(slot, j):
    for c in copies(slot, lists_ref[0, 0, 0, 0, 1 + j]):
      c.start()

  def wait(slot):
    for c in copies(slot, 0):
      c.wait()

  def body(slot, j):
    blk = lists_ref[0, 0, 0, 0, 1 + j]
    k = kbuf[slot]
    s = _dot(k, q_ref[0, 0], NT_DIMS, prec) * p.softmax_scale  # [bs, R]
    visible = _row_mask(head, sel, blk, bs)
    pt = jnp.where(visible, jnp.exp(jnp.where(visible, s - lse, 0.0)), 0.0)
    dpt = _dot(vbuf[slot], do_ref[0, 0], NT_DIMS, prec)  # [bs, R]
    dst = pt * (dpt - delta)
    acc[...] += _dot(k, dst.astype(k.dtype), TN_DIMS, prec)  # [Dk, R]

  _ring_loop(count, p.slots, start, wait, body)
  dq_ref[0, 0, 0] = (acc[...] * p.softmax_scale).astype(dq_ref.dtype)


def dq_call(lists, qt, dot_, meta, kf, vf, p: KernelParams):
  """dQ kernel: ``dqT [B, H, NT, Dk, R]`` in q's dtype (``meta`` carries LSE and δ)."""
  b, h, nt, _, width = lists.shape
  rows, dk, dv = p.tile_rows, qt.shape[-1], vf.shape[-1]
  m = meta.shape[3]
  kernel = lambda *refs: _dq_kernel(*refs, p=p)
  return pl.pallas_call(
    kernel,
    grid=(b, h, nt),
    in_specs=[
      pl.BlockSpec((1, 1, 1, 1, width), lambda i, j, t: (i, j, t, 0, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec((1, 1, rows, dk), lambda i, j, t: (i, j, t, 0)),
      pl.BlockSpec((1, 1, rows, dv), lambda i, j, t: (i, j, t, 0)),
      pl.BlockSpec((1, 1, 1, m, rows), lambda i, j, t: (i, j, t, 0, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=pl.BlockSpec((1, 1, 1, dk, rows), lambda i, j, t: (i, j, t, 0, 0)),
    out_shape=jax.ShapeDtypeStruct((b, h, nt, dk, rows), qt.dtype),
    scratch_shapes=[
      pltpu.VMEM((p.slots, p.block_size, dk), kf.dtype),
      pltpu.VMEM((p.slots, p.block_size, dv), vf.dtype),
      pltpu.SemaphoreType.DMA((2, p.slots)),
      pltpu.VMEM((dk, rows), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    interpret=p.interpret or False,
    name="selected_attention_tpu_dq",
  )(lists, qt, dot_, meta, kf, vf)


def _dkv_kernel(
  bounds_ref, k_ref, v_ref, tiles_hbm, q_hbm, do_hbm, meta_hbm, dk_ref, dv_ref,
  ids, qbuf, dobuf, metabuf, sem, dk_acc, dv_acc,
  *, p: KernelParams,
):  # fmt: skip
  b, h, blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bs, rows, chunk = p.block_size, p.tile_rows, p.pair_chunk
  prec = _precision(k_ref.dtype)
  first = bounds_ref[0, 0, 0, 0, 0]
  count = bounds_ref[0, 0, 0, 0, 1] - first
  dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
  dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def refill(c):  # tile ids of pairs [first + c*chunk, first + (c+1)*chunk) into SMEM
    pltpu.sync_copy(tiles_hbm.at[b, h, pl.ds(first + c * chunk, chunk)], ids)

  def copies(slot, tile):
    at = pl.ds(pl.multiple_of(tile * rows, rows), rows)
    return (
      pltpu.make_async_copy(q_hbm.at[b, h, at, :], qbuf.at[slot], sem.at[0, slot]),
      pltpu.make_async_copy(do_hbm.at[b, h, at, :], dobuf.at[slot], sem.at[1, slot]),
      pltpu.make_async_copy(meta_hbm.at[b, h, tile], metabuf.at[slot], sem.at[2, slot]),
    )

  @pl.when(count > 0)
  def _():
    refill(0)

  def start(slot, j):
    @pl.when(jnp.logical_and(j > 0, j % chunk == 0))
    def _():
      refill(j // chunk)

    for c in copies(slot, ids[j % chunk]):
      c.start()

  def wait(slot):
    for c in copies(slot, 0):
      c.wait()

  def body(slot, j):
    del j
    k, v = k_ref[0, 0], v_ref[0, 0]
    q, do = qbuf[slot], dobuf[slot]
    meta = metabuf[slot]
    head = meta[0:META_HEAD, :]
    sel = meta[META_HEAD:, :].astype(jnp.int32)
    lse, delta = head[1:2, :], head[2:3, :]
    s = _dot(k, q, NT_DIMS, prec) * p.softmax_scale  # [bs, R]
    visible = _row_mask(head, sel, blk, bs)
    pt = jnp.where(visible, jnp.exp(jnp.where(visible, s - lse, 0.0)), 0.0)
    dv_acc[...] += _dot(pt.astype(do.dtype), do, NN_DIMS, prec)  # [bs, Dv]
    dpt = _dot(v, do, NT_DIMS, prec)  # [bs, R]
    dst = pt * (dpt - delta)
    dk_acc[...] += _dot(dst.astype(q.dtype), q, NN_DIMS, prec)  # [bs, Dk]

  _ring_loop(count, p.slots, start, wait, body)
  dk_ref[0, 0] = (dk_acc[...] * p.softmax_scale).astype(dk_ref.dtype)
  dv_ref[0, 0] = dv_acc[...].astype(dv_ref.dtype)


def dkv_call(bounds, pair_tiles, qt, dot_, meta, kf, vf, p: KernelParams):
  """dK/dV kernel: ``(dk [B, H, NB*bs, Dk], dv [B, H, NB*bs, Dv])`` in K's / V's dtype."""
  b, h, nb = bounds.shape[:3]
  rows, bs, dk, dv = p.tile_rows, p.block_size, kf.shape[-1], vf.shape[-1]
  m = meta.shape[3]
  kernel = lambda *refs: _dkv_kernel(*refs, p=p)
  return pl.pallas_call(
    kernel,
    grid=(b, h, nb),
    in_specs=[
      pl.BlockSpec((1, 1, 1, 1, 2), lambda i, j, k: (i, j, k, 0, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec((1, 1, bs, dk), lambda i, j, k: (i, j, k, 0)),
      pl.BlockSpec((1, 1, bs, dv), lambda i, j, k: (i, j, k, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=[
      pl.BlockSpec((1, 1, bs, dk), lambda i, j, k: (i, j, k, 0)),
      pl.BlockSpec((1, 1, bs, dv), lambda i, j, k: (i, j, k, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(kf.shape, kf.dtype),
      jax.ShapeDtypeStruct(vf.shape, vf.dtype),
    ],
    scratch_shapes=[
      pltpu.SMEM((p.pair_chunk,), jnp.int32),
      pltpu.VMEM((p.slots, rows, dk), qt.dtype),
      pltpu.VMEM((p.slots, rows, dv), dot_.dtype),
      pltpu.VMEM((p.slots, m, rows), jnp.float32),
      pltpu.SemaphoreType.DMA((3, p.slots)),
      pltpu.VMEM((bs, dk), jnp.float32),
      pltpu.VMEM((bs, dv), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    interpret=p.interpret or False,
    name="selected_attention_tpu_dkv",
  )(bounds, kf, vf, pair_tiles, qt, dot_, meta)
