"""Selected-block attention forward on Hopper: a Mosaic GPU (``plgpu.kernel``) kernel.

Tiling (see ``/work/shared/docs/KERNEL_DESIGN.md``): a CTA owns one 64-row query tile of one KV
head, ``r = 64 // G`` consecutive tokens x the ``G`` query heads of the group (row ``i*G + g`` is
token ``t0 + i``, head ``h*G + g``; rows ``r*G .. 63`` are padding when ``G`` does not divide 64).
It walks the tile's iteration list (:mod:`pallas_kernels.selection_tiles`): per listed KV block,
TMA copies K (64 x Dk) and V (64 x Dv) into a ring of SMEM slots, ``S = Q Kᵀ`` runs on the tensor cores
(``wgmma``), the scores are masked (the token's own selection via the membership bits, causality
inside the block and, with packed documents, the first key of the row's document: see
:func:`doc_tiles`), an online softmax in base 2 (scale folded into ``log2 e``) runs in registers,
and ``O += P V`` is a second ``wgmma``. O and the natural-log LSE are written once at the end.

Two selection modes:

* ``"exact"``: per-token selection; the tile iterates over the union of its tokens' lists and
  masks each row to its own token's blocks (masked rows still cost MMA work).
* ``"shared"``: ASA's shared selection; every token uses the list of the first token of its
  aligned run of ``r`` tokens (equal to the reference on
  :func:`sparse_attention_jax.ops.selection.share_selection` ``(block_indices, r)``).

Two kernels: ``tile_rows=64`` runs one warpgroup per CTA that prefetches its own K/V ring
(about two CTAs per SM); ``tile_rows=128`` runs two compute warpgroups (64 rows each, two
consecutive 64-row tiles, iterating over the union of their lists) that share one K/V ring fed
by a producer warpgroup, FA3-style (``set_max_registers`` 232 / 40, optional ping-pong schedule
barrier); ``persistent=True`` runs that kernel on one CTA per SM, each walking many tiles with
double-buffered Q and lists (:mod:`pallas_kernels.selected_attention_mgpu_persistent`). With
``q_layout="direct"`` (128-row tiles, ``G % 8 == 0``) Q and O move by one TMA
copy per token (``G`` contiguous heads), so no XLA transpose; otherwise Q/O go through an XLA
transpose to ``[B, H, NT * 64, D]``. The tile's ids and membership words are first copied to SMEM
so the K/V loop does no global scalar loads.

Head dims: the q/k dim ``Dk`` and the v dim ``Dv`` are independent multiples of 64 inside the
kernels (e.g. 192/128); the public wrapper zero pads other dims (the ASA GLA global layer's
160 -> 192) and the ring depth is lowered to fit the 227 KiB of SMEM of a CTA
(:mod:`pallas_kernels.selected_attention_dims`).

The backward (:mod:`pallas_kernels.selected_attention_mgpu_bwd`) recomputes the probabilities from
the saved LSE: a dQ kernel over the same query tiles and a dK/dV kernel over the inverse map (KV
block -> query tiles), so the forward saves only ``O`` and ``LSE``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import selected_attention_dims as dims
from pallas_kernels.selection_tiles import tile_iteration_lists
from sparse_attention_jax.ops.masked import document_starts

TILE_ROWS = 64
"""Query rows per tile (one warpgroup's wgmma M)."""

BLOCK_SIZE = 64
"""The default KV block size."""

BLOCK_SIZES = (32, 64, 128)
"""KV block sizes served: one block is one K/V tile of the forward and dQ kernels (the wgmma N of
``S = Q Kᵀ`` and K of ``P V``); 32-key tiles need the 64-byte swizzle (:func:`smem_transforms`)."""


def smem_transforms(block_size: int):
  """SMEM tiling + swizzle of the 16-bit operand tiles: 128-byte swizzle (64-element rows), or
  64-byte (32 elements) when the block is 32 keys, since a wgmma K step spans one swizzle."""
  cols = 64 if block_size % 64 == 0 else 32
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(2 * cols))


DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MODES = ("exact", "shared")
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel parameters (hashable: a ``custom_vjp`` nondiff argument)."""

  softmax_scale: float
  mode: str
  block_size: int = BLOCK_SIZE
  num_stages: int = 2
  tile_rows: int = TILE_ROWS  # 64: one warpgroup; 128: two compute warpgroups + producer
  q_layout: str = "tiles"  # "tiles": XLA transpose to [B, H, NT*rows, D]; "direct"
  group_size: int = 0  # G, filled in by _forward
  ping_pong: bool = True  # 128 rows: alternate the two warpgroups' softmax and MMA
  smem_index: bool = True  # copy the tile's ids / membership words to SMEM first
  mask_skip: bool = True  # no mask on blocks every row of the warpgroup fully sees
  backward: str = "kernel"  # "kernel": dQ and dK/dV kernels; "reference": XLA VJP
  bwd_direct: bool = True  # backward: per-token TMA for Q/dO/dQ where G allows
  bwd_chunk: int = 256  # backward: smallest cap on a dK/dV work item's tiles
  has_docs: bool = False  # packed documents: per-row first visible key
  persistent: bool = False  # 128 rows: one CTA per SM walking many tiles
  num_ctas: int = 0  # persistent CTAs (0: the device's SM count)


def tokens_per_tile(num_groups: int) -> int:
  """``r = 64 // G`` tokens of one KV head per 64-row tile."""
  return TILE_ROWS // num_groups


def unsupported_reason(
  q, k, v, block_indices, *, block_size, segment_ids=None, mode: str = "exact"
) -> str | None:
  """Why the kernel cannot serve this call, or ``None`` when it can (static checks only)."""
  if mode not in MODES:
    return f"mode={mode!r} (expected one of {MODES})"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or block_indices.ndim != 4:
    return "q, k, v and block_indices must be rank 4"
  if jnp.dtype(q.dtype) not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (only bfloat16 and float16, all equal)"
  dk, dv = q.shape[-1], v.shape[-1]
  if k.shape[-1] != dk:
    return f"k head dim {k.shape[-1]} (expected Dk={dk}, the q head dim)"
  reason = dims.head_dims_reason(dk, dv)
  if reason is not None:
    return reason
  if block_size not in BLOCK_SIZES:
    return f"block_size={block_size} (expected one of {BLOCK_SIZES})"
  hq, h = q.shape[2], k.shape[2]
  if h < 1 or hq % h:
    return f"HQ={hq} is not a multiple of H={h}"
  g = hq // h
  if g > TILE_ROWS:
    return f"G={g} query heads per KV head (at most {TILE_ROWS})"
  if k.shape[1] != q.shape[1]:
    return "k must have the query length (self-attention)"
  # Shared memory at one ring stage, with the longest tile list any tile_rows can build.
  r64 = TILE_ROWS // g
  r_max = 2 * r64 if 2 * r64 <= 64 else r64
  nb = -(-q.shape[1] // block_size)
  length = -(-min(r_max * block_indices.shape[-1], nb) // 4) * 4
  pk, pv = dims.padded_head_dim(dk), dims.padded_head_dim(dv)
  for kernel in ("fwd64", "fwd128", "dq", "dkv"):
    need = dims.smem_bytes(
      kernel,
      dk=pk,
      dv=pv,
      stages=1,
      length=length,
      block_size=block_size,
      itemsize=jnp.dtype(q.dtype).itemsize,
    )
    if need > dims.SMEM_LIMIT:
      return (
        f"shared memory: the {kernel} kernel needs {need} bytes at one stage for padded "
        f"Dk={pk}, Dv={pv}, list length {length} (expected <= {dims.SMEM_LIMIT})"
      )
  return None


def _to_tiles(x, r: int, h: int, rows: int = TILE_ROWS):
  """``[B, T, H*G, D] -> [B, H, NT * rows, D]``: rows ``(i, g)`` of each tile, zero padded."""
  b, t, hq, d = x.shape
  g = hq // h
  nt = -(-t // r)
  x = jnp.pad(x, ((0, 0), (0, nt * r - t), (0, 0), (0, 0)))
  x = x.reshape(b, nt, r, h, g, d).transpose(0, 3, 1, 2, 4, 5)  # [B, H, NT, r, G, D]
  x = x.reshape(b, h, nt, r * g, d)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, rows - r * g), (0, 0)))
  return x.reshape(b, h, nt * rows, d)


def _from_tiles(x, t: int, g: int, rows: int = TILE_ROWS):
  """Inverse of :func:`_to_tiles`: ``[B, H, NT * rows, ...] -> [B, T, H*G, ...]``."""
  b, h, n_rows = x.shape[:3]
  rest = x.shape[3:]
  nt = n_rows // rows
  r = rows // g
  x = x.reshape(b, h, nt, rows, *rest)[:, :, :, : r * g]
  x = x.reshape(b, h, nt, r, g, *rest)
  perm = (0, 2, 3, 1, 4) + tuple(range(5, 5 + len(rest)))
  x = x.transpose(perm).reshape(b, nt * r, h * g, *rest)
  return x[:, :t]


def _row_tokens(g: int, bs: int):
  """``(col_ids [64, bs] int32 WGMMA layout, tok [64] row vector)``: key column of each element
  and token (within the 64-row group) of each row, computed once before the KV loop."""
  layout = plgpu.Layout.WGMMA
  row_ids = plgpu.broadcasted_iota(jnp.int32, (TILE_ROWS, bs), 0, layout=layout)
  col_ids = plgpu.broadcasted_iota(jnp.int32, (TILE_ROWS, bs), 1, layout=layout)
  tok = lax.div(row_ids, jnp.int32(g)).max(axis=1)  # [64] reduce(1)
  return col_ids, tok


def _masked_scores(
  s, col_ids, tok, *, tok_base, t_base, blk, bs, lo, hi, need, skip, first=None, first_max=None
):
  """Raw scores with invisible keys at ``-inf``.

  Row ``i`` (token ``tok[i] + tok_base`` within the tile, absolute ``tok[i] + t_base``) sees key
  column ``c`` of block ``blk`` iff the token selected the block (membership bit; skipped when
  ``lo`` is ``None``) and ``blk*bs + c <= t``. Both fold into one per-row limit, so each element
  costs a compare and a select. With ``skip``, a block that lies wholly before the first token
  and that every token of the group selected (``(lo, hi) & need == need``) takes a branch with
  no mask at all (the common case: only the diagonal and partly selected blocks pay).

  Packed documents: ``first`` ([64] row vector) is the absolute position of the first token of
  each row's document, and a row sees key ``blk*bs + c`` only if it is ``>= first`` (documents
  are contiguous runs, so with causality this is "same document"); ``first_max`` (scalar) is
  the largest ``first`` of the group, so a block at or after it needs no document mask.
  """

  def masked(s):
    limit = tok + (t_base - blk * bs)  # [64] row vector
    if lo is not None:
      tt = tok + tok_base
      word = jnp.where(tt < 32, lo, hi)
      shift = jnp.where(tt < 32, tt, tt - 32)
      member = (lax.shift_right_logical(word, shift) & 1) == 1
      limit = jnp.where(member, limit, -1)
    visible = col_ids <= lax.broadcast_in_dim(limit, s.shape, [0])
    if first is not None:
      visible = visible & (col_ids >= lax.broadcast_in_dim(first - blk * bs, s.shape, [0]))
    return jnp.where(visible, s, -jnp.inf)

  if not skip:
    return masked(s)
  full = blk * bs + (bs - 1) <= t_base
  if first is not None:
    full = full & (blk * bs >= first_max)
  if lo is not None:
    need_lo, need_hi = need
    full = full & ((lo & need_lo) == need_lo) & ((hi & need_hi) == need_hi)
  return lax.cond(full, lambda s: s, masked, s)


def _need_words(tok_base: int, r: int) -> tuple[int, int]:
  """int32 ``(lo, hi)`` words with the bits of tokens ``tok_base .. tok_base + r - 1`` set."""
  bits = ((1 << r) - 1) << tok_base
  as_i32 = lambda x: x - (1 << 32) if x >= 1 << 31 else x
  return as_i32(bits & 0xFFFFFFFF), as_i32(bits >> 32)


def _online_softmax(s, m_i, l_i, acc, scale2):
  """One online-softmax update on raw scores ``s [64, bs]`` (``-inf`` = masked).

  ``m_i`` is kept in raw score units; ``scale2 = softmax_scale * log2(e) > 0`` is applied in
  the exponent (one FMA per element). Returns ``(p, m_new, l_new, acc_rescaled)``.
  """
  m_new = jnp.maximum(m_i, s.max(axis=1))
  m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked rows
  alpha = jnp.exp2((m_i - m_use) * scale2)
  p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_use * scale2, s.shape, [0]))
  l_i = l_i * alpha + p.sum(axis=1)
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
  return p, m_new, l_i, acc


def _kernel(
  q_ref,
  k_ref,
  v_ref,
  ids_ref,
  cnt_ref,
  lo_ref,
  hi_ref,  # inputs (GMEM)
  doc_ref,
  dmax_ref,
  o_ref,
  lse_ref,  # outputs (GMEM)
  q_smem,
  k_smem,
  v_smem,
  lse_smem,
  q_bar,
  k_bar,
  v_bar,  # scratch
  ids_smem,
  lo_smem,
  hi_smem,
  idx_bar,
  doc_smem,
  *o_smem,
  num_heads: int,
  g: int,
  cfg: _Config,
  dtype,
):
  """One CTA: query tile ``tile`` of (batch, KV head) ``bh``.

  Refs: ``q_ref [B, H, NT*64, Dk]``, ``k_ref [B, Tk, H, Dk]``, ``v_ref [B, Tk, H, Dv]``,
  ``ids_ref/lo_ref/hi_ref [B, H, NT, L]``, ``cnt_ref [B, H, NT]``, ``o_ref [B, H, NT*64, Dv]``,
  ``lse_ref [B, H, NT*64]``; SMEM ``q_smem [64, Dk]``, ``k_smem [S, bs, Dk]``, ``v_smem
  [S, bs, Dv]``, ``lse_smem [64]``, ``ids_smem/lo_smem/hi_smem [L]`` (the tile's list, read per
  step without a global load). O is staged in ``q_smem`` when ``Dk == Dv``, else in V slot 0
  (free after the loop; ``bs == 64``), else in the optional trailing ``o_smem [64, Dv]``.
  With ``cfg.has_docs``: ``doc_ref [B, NT*64]`` first position of each row's document and
  ``dmax_ref [B, NT]`` its maximum per tile (:func:`doc_tiles`), ``doc_smem [64]``.
  """
  tile = lax.axis_index("tile")
  bh = lax.axis_index("bh")
  b = lax.div(bh, jnp.int32(num_heads))
  h = lax.rem(bh, jnp.int32(num_heads))
  r = TILE_ROWS // g
  bs = cfg.block_size
  stages = cfg.num_stages
  dv = v_smem.shape[-1]
  count = cnt_ref[b, h, tile]
  rows = pl.ds(tile * TILE_ROWS, TILE_ROWS)
  if o_smem:
    (o_smem,) = o_smem
  elif q_smem.shape[-1] == dv:
    o_smem = q_smem
  else:
    o_smem = v_smem.at[0]  # [bs == 64, Dv], no copy in flight after loop

  plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar)
  if cfg.has_docs:
    plgpu.copy_gmem_to_smem(doc_ref.at[b, rows], doc_smem, q_bar)
  if cfg.smem_index:
    for src, dst in ((ids_ref, ids_smem), (lo_ref, lo_smem), (hi_ref, hi_smem)):
      plgpu.copy_gmem_to_smem(src.at[b, h, tile], dst, idx_bar)
  read = lambda ref, smem, j: smem[j] if cfg.smem_index else ref[b, h, tile, j]

  def fetch(j, slot, from_gmem=False):
    blk = ids_ref[b, h, tile, j] if from_gmem else read(ids_ref, ids_smem, j)
    keys = pl.ds(blk * bs, bs)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])

  for s in range(stages):
    pl.when(s < count)(functools.partial(fetch, jnp.int32(s), s, True))

  layout = plgpu.Layout.WGMMA
  col_ids, tok = _row_tokens(g, bs)
  scale2 = cfg.softmax_scale * _LOG2E

  m_i = plgpu.layout_cast(jnp.full((TILE_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
  l_i = plgpu.layout_cast(jnp.full((TILE_ROWS,), 0.0, jnp.float32), layout.reduce(1))
  acc = plgpu.layout_cast(jnp.full((TILE_ROWS, dv), 0.0, jnp.float32), layout)
  plgpu.barrier_wait(q_bar)
  if cfg.smem_index:
    plgpu.barrier_wait(idx_bar)
  docs = {}
  if cfg.has_docs:
    docs = {"first": plgpu.load(doc_smem, layout=layout.reduce(1)), "first_max": dmax_ref[b, tile]}

  def step(j, carry):
    acc, m_i, l_i = carry
    slot = lax.rem(j, jnp.int32(stages))
    blk = read(ids_ref, ids_smem, j)
    plgpu.barrier_wait(k_bar.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((TILE_ROWS, bs), jnp.float32))  # [64 rows, 64 keys]

    exact = cfg.mode == "exact"
    lo = read(lo_ref, lo_smem, j) if exact else None
    hi = read(hi_ref, hi_smem, j) if exact else None
    s = _masked_scores(
      s,
      col_ids,
      tok,
      tok_base=0,
      t_base=tile * r,
      blk=blk,
      bs=bs,
      lo=lo,
      hi=hi,
      need=_need_words(0, r),
      skip=cfg.mask_skip,
      **docs,
    )
    p, m_new, l_i, acc = _online_softmax(s, m_i, l_i, acc, scale2)
    p16 = p.astype(dtype)
    plgpu.barrier_wait(v_bar.at[slot])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    # Slot `slot` is free again (both wgmmas retired): prefetch step j + S into it.
    nxt = j + stages
    pl.when(nxt < count)(lambda: fetch(nxt, slot))
    return acc, m_new, l_i

  acc, m_i, l_i = lax.fori_loop(0, count, step, (acc, m_i, l_i))

  seen = l_i > 0.0
  l_div = jnp.where(seen, l_i, 1.0)
  acc = acc / lax.broadcast_in_dim(l_div, acc.shape, [0])
  o_smem[...] = acc.astype(dtype)
  lse_smem[...] = jnp.where(seen, (m_i * scale2 + jnp.log(l_div) * _LOG2E) * _LN2, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, rows])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
  plgpu.wait_smem_to_gmem(0)


def ws_consumer_step(
  carry,
  *,
  slot,
  blk,
  read_words,
  q_smem,
  k_smem,
  v_smem,
  k_bar,
  v_bar,
  consumed,
  sched,
  mask_kw,
  scale2,
  bs,
  dtype,
):
  """One listed K/V block for a compute warpgroup of the warp-specialized 128-row kernels
  (:func:`_kernel_ws` and the persistent one): wait for K in ring ``slot``, ``S = Q Kᵀ``, mask
  (``read_words()`` gives the block's membership words ``(lo, hi)``; ``mask_kw``: the other
  arguments of :func:`_masked_scores`), online softmax, wait for V, ``O += P V``, and release
  the slot to the producer. ``sched``: the ping-pong schedule barrier, or ``None`` for none.
  ``carry = (acc [64, Dv], m_i [64], l_i [64])``; returns the updated carry."""
  acc, m_i, l_i = carry
  rows = q_smem.shape[0]
  plgpu.barrier_wait(k_bar.at[slot])

  def qk(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
    if sched is not None:  # hand the tensor cores to the other warpgroup
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)
    return acc_ref[...]

  s = pl.run_scoped(qk, plgpu.ACC((rows, bs), jnp.float32))

  lo, hi = read_words()
  s = _masked_scores(s, blk=blk, bs=bs, lo=lo, hi=hi, **mask_kw)
  p, m_new, l_i, acc = _online_softmax(s, m_i, l_i, acc, scale2)
  p16 = p.astype(dtype)
  if sched is not None:
    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
    plgpu.barrier_arrive(sched)  # softmax done
  plgpu.barrier_wait(v_bar.at[slot])
  if sched is not None:
    plgpu.barrier_wait(sched)  # tensor cores free

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

  acc = pl.run_state(pv)(plgpu.ACC.init(acc))
  plgpu.barrier_arrive(consumed.at[slot])
  return acc, m_new, l_i


def _kernel_ws(
  q_ref,
  k_ref,
  v_ref,
  ids_ref,
  cnt_ref,
  lo_ref,
  hi_ref,
  doc_ref,
  dmax_ref,
  o_ref,
  lse_ref,
  *,
  num_heads: int,
  g: int,
  cfg: _Config,
  dtype,
):
  """One CTA, 128 query rows: two compute warpgroups (64 rows each) share one K/V stream that a
  third (producer) warpgroup feeds with TMA through a ring of ``S`` slots.

  ``cfg.q_layout == "tiles"``: ``q_ref [B, H, NT*128, Dk]``, ``o_ref [B, H, NT*128, Dv]``,
  ``lse_ref [B, H, NT*128]``. ``cfg.q_layout == "direct"``: ``q_ref [B, Tp, HQ, Dk]``, ``o_ref
  [B, Tp, HQ, Dv]``, ``lse_ref [B, Tp, HQ]`` (needs ``G % 8 == 0``): each token's ``G`` rows are
  one TMA copy, so Q and O skip the transposes. ``k_ref [B, Tk, H, Dk]``, ``v_ref [B, Tk, H,
  Dv]``. SMEM: Q ``[2, 64, Dk]`` (reused for O when ``Dk == Dv``, else O ``[2, 64, Dv]``), K and
  V rings ``[S, bs, Dk]`` / ``[S, bs, Dv]`` (:mod:`pallas_kernels.selected_attention_dims`).
  ``doc_ref [B, NT*128]`` / ``dmax_ref [B, 2*NT]``: documents per 64-row group, as in
  :func:`_kernel` (read only with ``cfg.has_docs``).
  """
  tile = lax.axis_index("tile")
  bh = lax.axis_index("bh")
  b = lax.div(bh, jnp.int32(num_heads))
  h = lax.rem(bh, jnp.int32(num_heads))
  rows_wg = TILE_ROWS
  r_wg = rows_wg // g  # tokens per warpgroup
  bs = cfg.block_size
  stages = cfg.num_stages
  dk, dv = q_ref.shape[-1], v_ref.shape[-1]
  length = ids_ref.shape[-1]
  count = cnt_ref[b, h, tile]
  direct = cfg.q_layout == "direct"

  def body(
    q_smem2,
    k_smem,
    v_smem,
    lse_smem2,
    q_bar,
    k_bar,
    v_bar,
    consumed,
    sched,
    ids_smem,
    lo_smem,
    hi_smem,
    idx_bar,
    doc_smem2,
    *o_smem2,
  ):
    o_smem2 = o_smem2[0] if o_smem2 else q_smem2
    wg = lax.axis_index("wg")
    pp = cfg.ping_pong
    read = lambda ref, smem, j: smem[j] if cfg.smem_index else ref[b, h, tile, j]

    def schedule_barrier():
      # FA3 ping-pong: the two compute warpgroups take turns on the tensor cores, so one's
      # softmax overlaps the other's wgmma (both walk the same list, so the turns pair up).
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    def q_rows(w):
      return pl.ds(tile * (2 * rows_wg) + w * rows_wg, rows_wg)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg]
      o_smem = o_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      t_first = tile * (2 * r_wg) + wg * r_wg  # first token of wg
      if direct:
        for i in range(r_wg):
          plgpu.copy_gmem_to_smem(
            q_ref.at[b, t_first + i, pl.ds(h * g, g)], q_smem.at[pl.ds(i * g, g)], q_bar.at[wg]
          )
      else:
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, q_rows(wg)], q_smem, q_bar.at[wg])
      if cfg.has_docs:
        plgpu.copy_gmem_to_smem(doc_ref.at[b, q_rows(wg)], doc_smem2.at[wg], q_bar.at[wg])

      layout = plgpu.Layout.WGMMA
      col_ids, tok = _row_tokens(g, bs)
      scale2 = cfg.softmax_scale * _LOG2E
      need0, need1 = _need_words(0, r_wg), _need_words(r_wg, r_wg)
      need = tuple(jnp.where(wg == 0, jnp.int32(a), jnp.int32(c)) for a, c in zip(need0, need1))
      m_i = plgpu.layout_cast(jnp.full((rows_wg,), -jnp.inf, jnp.float32), layout.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((rows_wg,), 0.0, jnp.float32), layout.reduce(1))
      acc = plgpu.layout_cast(jnp.full((rows_wg, dv), 0.0, jnp.float32), layout)
      plgpu.barrier_wait(q_bar.at[wg])
      if cfg.smem_index:
        plgpu.barrier_wait(idx_bar)
      docs = {}
      if cfg.has_docs:
        docs = {
          "first": plgpu.load(doc_smem2.at[wg], layout=layout.reduce(1)),
          "first_max": dmax_ref[b, tile * 2 + wg],
        }
      if pp:
        pl.when(wg == 1)(schedule_barrier)

      mask_kw = dict(
        col_ids=col_ids,
        tok=tok,
        tok_base=wg * r_wg,
        t_base=t_first,
        need=need,
        skip=cfg.mask_skip,
        **docs,
      )

      def step(j, carry):
        slot = lax.rem(j, jnp.int32(stages))
        return ws_consumer_step(
          carry,
          slot=slot,
          blk=read(ids_ref, ids_smem, j),
          read_words=lambda: (read(lo_ref, lo_smem, j), read(hi_ref, hi_smem, j)),
          q_smem=q_smem,
          k_smem=k_smem,
          v_smem=v_smem,
          k_bar=k_bar,
          v_bar=v_bar,
          consumed=consumed,
          sched=sched if pp else None,
          mask_kw=mask_kw,
          scale2=scale2,
          bs=bs,
          dtype=dtype,
        )

      acc, m_i, l_i = lax.fori_loop(0, count, step, (acc, m_i, l_i))
      if pp:
        pl.when(wg == 0)(schedule_barrier)
      seen = l_i > 0.0
      l_div = jnp.where(seen, l_i, 1.0)
      acc = acc / lax.broadcast_in_dim(l_div, acc.shape, [0])
      o_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(seen, (m_i * scale2 + jnp.log(l_div) * _LOG2E) * _LN2, -jnp.inf)
      plgpu.commit_smem()
      if direct:
        for i in range(r_wg):
          plgpu.copy_smem_to_gmem(
            o_smem.at[pl.ds(i * g, g)], o_ref.at[b, t_first + i, pl.ds(h * g, g)]
          )
          plgpu.copy_smem_to_gmem(
            lse_smem.at[pl.ds(i * g, g)], lse_ref.at[b, t_first + i, pl.ds(h * g, g)]
          )
      else:
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, q_rows(wg)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, q_rows(wg)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      if cfg.smem_index:
        for src, dst in ((ids_ref, ids_smem), (lo_ref, lo_smem), (hi_ref, hi_smem)):
          plgpu.copy_gmem_to_smem(src.at[b, h, tile], dst, idx_bar)
        plgpu.barrier_wait(idx_bar)

      def produce(j, _):
        slot = lax.rem(j, jnp.int32(stages))
        pl.when(j >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
        blk = read(ids_ref, ids_smem, j)
        keys = pl.ds(blk * bs, bs)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])
        return _

      lax.fori_loop(0, count, produce, None)

  transforms = smem_transforms(bs)
  q_arrivals = (r_wg if direct else 1) + int(cfg.has_docs)
  o_extra = [] if dk == dv else [plgpu.SMEM((2, rows_wg, dv), dtype, transforms=transforms)]
  pl.run_scoped(
    body,
    plgpu.SMEM((2, rows_wg, dk), dtype, transforms=transforms),
    plgpu.SMEM((stages, bs, dk), dtype, transforms=transforms),
    plgpu.SMEM((stages, bs, dv), dtype, transforms=transforms),
    plgpu.SMEM((2, rows_wg), jnp.float32),
    plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=2),
    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    plgpu.Barrier(num_arrivals=2),
    plgpu.SMEM((length,), jnp.int32),
    plgpu.SMEM((length,), jnp.int32),
    plgpu.SMEM((length,), jnp.int32),
    plgpu.Barrier(num_arrivals=3),
    plgpu.SMEM((2, rows_wg), jnp.int32),
    *o_extra,
    collective_axes="wg",
  )


def resolve_config(cfg: _Config, g: int) -> _Config:
  """Falls back to what a group size supports: 128-row tiles need at most 64 tokens per tile
  (``G >= 2``), the direct Q/O layout and the persistent grid need 128-row tiles, the direct
  layout also ``G % 8 == 0``."""
  if cfg.tile_rows not in (64, 128):
    raise ValueError(f"tile_rows: expected 64 or 128, got {cfg.tile_rows!r}")
  if cfg.q_layout not in ("tiles", "direct"):
    raise ValueError(f"q_layout: expected 'tiles' or 'direct', got {cfg.q_layout!r}")
  if not isinstance(cfg.num_ctas, int) or cfg.num_ctas < 0:
    raise ValueError(f"num_ctas: expected an int >= 0 (0 = one per SM), got {cfg.num_ctas!r}")
  rows = cfg.tile_rows if 2 * (TILE_ROWS // g) <= 64 else TILE_ROWS
  layout = cfg.q_layout if rows == 128 and g % 8 == 0 and g <= TILE_ROWS else "tiles"
  return dataclasses.replace(
    cfg, tile_rows=rows, q_layout=layout, persistent=cfg.persistent and rows == 128
  )


def prepare(q, block_indices, cfg: _Config, num_kv_heads: int):
  """XLA-side preparation: ``(q operand, TileLists)`` for :func:`call_kernel` (cfg resolved).

  A tile is ``tile_rows // 64`` row groups of 64, each holding ``64 // G`` tokens (padded rows
  at the end of each group), so a 128-row tile is two consecutive 64-row tiles.
  """
  _, t, hq, _ = q.shape
  g = hq // num_kv_heads
  r64 = tokens_per_tile(g)
  r_tile = (cfg.tile_rows // TILE_ROWS) * r64
  n = block_indices.shape[-1]
  nb = -(-t // cfg.block_size)
  one_list = cfg.mode == "shared" and cfg.tile_rows == TILE_ROWS
  length = min(n if one_list else r_tile * n, nb)
  length = -(-length // 4) * 4  # 16-byte rows for the TMA copy to SMEM
  if one_list:
    lists = tile_iteration_lists(
      block_indices, tokens_per_tile=r_tile, block_size=cfg.block_size, shared=True, max_len=length
    )
  else:
    if cfg.mode == "shared":  # two 64-row groups: union of their lists
      from sparse_attention_jax.ops.selection import share_selection

      block_indices = share_selection(block_indices, r64)
    lists = tile_iteration_lists(
      block_indices, tokens_per_tile=r_tile, block_size=cfg.block_size, max_len=length
    )
  tp = -(-t // r_tile) * r_tile
  qx = q if tp == t else jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  if cfg.q_layout == "tiles":
    qx = _to_tiles(qx, r64, num_kv_heads)  # [B, H, NT*rows, D]
  return qx, lists


def doc_tiles(doc_start, g: int, num_tokens: int):
  """Per-row document starts in 64-row groups, for the kernels' document mask.

  Args:
    doc_start: ``[B, T]`` int32 first position of each token's document
      (:func:`sparse_attention_jax.ops.masked.document_starts`).
    g: query heads per KV head (``r = 64 // g`` tokens per 64-row group).
    num_tokens: ``Tp``, the padded token count (a multiple of ``r``).

  Returns:
    ``(rows [B, NG*64], group_max [B, NG])`` int32 with ``NG = Tp // r``: row ``i*G + g`` of
    group ``n`` holds ``doc_start[n*r + i]`` (padding rows and tokens 0), and ``group_max`` the
    largest start of the group's tokens.
  """
  b, t = doc_start.shape
  r = TILE_ROWS // g
  ng = num_tokens // r
  ds = jnp.pad(doc_start.astype(jnp.int32), ((0, 0), (0, num_tokens - t))).reshape(b, ng, r)
  rows = jnp.broadcast_to(ds[..., None], (b, ng, r, g)).reshape(b, ng, r * g)
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, TILE_ROWS - r * g))).reshape(b, ng * TILE_ROWS)
  return rows, jnp.max(ds, axis=-1)


def fit_config(cfg: _Config, *, dk: int, dv: int, length: int, itemsize: int) -> _Config:
  """The resolved ``cfg`` fitted to shared memory for padded dims and list ``length``.

  * ``persistent`` is dropped where its double-buffered Q does not fit next to one K/V stage;
  * the ring depth is lowered until the kernel fits (:func:`dims.fit_stages`; per-tile kernels
    also need no more stages than list entries, a persistent ring runs on across tiles);
  * ``ping_pong`` is dropped at one stage: with a single K/V slot the warpgroup ahead would wait
    at the schedule barrier for the other's next ``Q Kᵀ``, whose block the producer may load only
    after both consumed the current one (a deadlock: the hang of Dk 192 / Dv 128 / block 128).
  """
  kw = {
    "dk": dk,
    "dv": dv,
    "length": length,
    "block_size": cfg.block_size,
    "itemsize": itemsize,
    "has_docs": cfg.has_docs,
  }
  if cfg.persistent and dims.smem_bytes("fwd128p", stages=1, **kw) > dims.SMEM_LIMIT:
    cfg = dataclasses.replace(cfg, persistent=False)
  name = "fwd64" if cfg.tile_rows == TILE_ROWS else "fwd128p" if cfg.persistent else "fwd128"
  want = cfg.num_stages if cfg.persistent else min(cfg.num_stages, length)
  stages = dims.fit_stages(name, max(1, want), **kw)
  return dataclasses.replace(cfg, num_stages=stages, ping_pong=cfg.ping_pong and stages > 1)


def call_kernel(qx, k, v, lists, cfg: _Config, *, num_kv_heads: int, seq_len: int, docs=None):
  """Runs the kernel on prepared operands; returns ``(o [B, T, HQ, Dv], lse [B, T, HQ])``.

  ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]`` with ``Dk``, ``Dv`` multiples of 64. ``cfg`` is
  fitted to shared memory first (:func:`fit_config`).
  ``docs``: :func:`doc_tiles` output (required iff ``cfg.has_docs``)."""
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  bs = cfg.block_size
  nb = -(-t // bs)
  hq = qx.shape[2] if cfg.q_layout == "direct" else None
  kp = k if nb * bs == t else jnp.pad(k, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
  vp = v if nb * bs == t else jnp.pad(v, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
  nt, length = lists.ids.shape[2:]
  dtype = qx.dtype
  cfg = fit_config(cfg, dk=dk, dv=dv, length=length, itemsize=jnp.dtype(dtype).itemsize)
  stages = cfg.num_stages
  if cfg.has_docs != (docs is not None):
    raise ValueError(
      f"docs: expected {'doc_tiles(...)' if cfg.has_docs else 'None'} for has_docs={cfg.has_docs}"
    )
  if docs is None:  # never read: has_docs is static
    docs = (jnp.zeros((b, TILE_ROWS), jnp.int32), jnp.zeros((b, 1), jnp.int32))
  args = (qx, kp, vp, lists.ids, lists.counts, lists.member_lo, lists.member_hi, *docs)
  params = plgpu.CompilerParams(approx_math=True)
  g = cfg.group_size
  if cfg.tile_rows == TILE_ROWS:
    transforms = smem_transforms(bs)
    scratch = [
      plgpu.SMEM((TILE_ROWS, dk), dtype, transforms=transforms),
      plgpu.SMEM((stages, bs, dk), dtype, transforms=transforms),
      plgpu.SMEM((stages, bs, dv), dtype, transforms=transforms),
      plgpu.SMEM((TILE_ROWS,), jnp.float32),
      plgpu.Barrier(num_arrivals=1 + int(cfg.has_docs)),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      plgpu.SMEM((length,), jnp.int32),
      plgpu.SMEM((length,), jnp.int32),
      plgpu.SMEM((length,), jnp.int32),
      plgpu.Barrier(num_arrivals=3),
      plgpu.SMEM((TILE_ROWS,), jnp.int32),
    ]
    if dk != dv and bs != TILE_ROWS:  # O cannot live in a V slot
      scratch.append(plgpu.SMEM((TILE_ROWS, dv), dtype, transforms=transforms))
    n_rows = qx.shape[2]
    out_type = (
      jax.ShapeDtypeStruct((b, h, n_rows, dv), dtype),
      jax.ShapeDtypeStruct((b, h, n_rows), jnp.float32),
    )
    kernel = functools.partial(_kernel, num_heads=h, g=g, cfg=cfg, dtype=dtype)
    ot, lset = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(nt, b * h),
      grid_names=("tile", "bh"),
      compiler_params=params,
    )(*args)
    return (_from_tiles(ot, seq_len, g), _from_tiles(lset, seq_len, g))
  if cfg.q_layout == "direct":
    tp = qx.shape[1]
    out_type = (
      jax.ShapeDtypeStruct((b, tp, hq, dv), dtype),
      jax.ShapeDtypeStruct((b, tp, hq), jnp.float32),
    )
  else:
    out_type = (
      jax.ShapeDtypeStruct((*qx.shape[:3], dv), dtype),
      jax.ShapeDtypeStruct(qx.shape[:3], jnp.float32),
    )
  if cfg.persistent:
    from pallas_kernels import selected_attention_mgpu_persistent as persistent

    ot, lset = persistent.call(
      args,
      out_type,
      cfg,
      num_heads=h,
      num_tiles=nt,
      batch=b,
      dtype=dtype,
      num_ctas=cfg.num_ctas or None,
    )
  else:
    kernel = functools.partial(_kernel_ws, num_heads=h, g=g, cfg=cfg, dtype=dtype)
    ot, lset = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(nt, b * h),
      grid_names=("tile", "bh"),
      num_threads=3,
      thread_name="wg",
      compiler_params=params,
    )(*args)
  if cfg.q_layout == "direct":
    return ot[:, :seq_len], lset[:, :seq_len]
  return _from_tiles(ot, seq_len, g), _from_tiles(lset, seq_len, g)


def _forward(q, k, v, block_indices, doc_start, cfg: _Config):
  """Kernel forward: ``(o [B, T, HQ, D], lse [B, T, HQ] float32 natural log)``."""
  h = k.shape[2]
  g = q.shape[2] // h
  cfg = resolve_config(dataclasses.replace(cfg, group_size=g, has_docs=doc_start is not None), g)
  qx, lists = prepare(q, block_indices, cfg, h)
  docs = None
  if doc_start is not None:
    docs = doc_tiles(
      doc_start, g, lists.ids.shape[2] * (cfg.tile_rows // TILE_ROWS) * tokens_per_tile(g)
    )
  return call_kernel(qx, k, v, lists, cfg, num_kv_heads=h, seq_len=q.shape[1], docs=docs)


def _reference(q, k, v, block_indices, doc_start, cfg: _Config):
  """Plain-JAX reference with the same semantics (``backward="reference"``)."""
  from sparse_attention_jax.ops.selected import _selected_reference
  from sparse_attention_jax.ops.selection import share_selection

  if cfg.mode == "shared":
    block_indices = share_selection(block_indices, tokens_per_tile(q.shape[2] // k.shape[2]))
  return _selected_reference(
    q,
    k,
    v,
    block_indices,
    block_size=cfg.block_size,
    segment_ids=doc_start,
    softmax_scale=cfg.softmax_scale,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, block_indices, doc_start, cfg: _Config):
  return _forward(q, k, v, block_indices, doc_start, cfg)[0]


def _attention_fwd(q, k, v, block_indices, doc_start, cfg: _Config):
  o, lse = _forward(q, k, v, block_indices, doc_start, cfg)
  return o, (q, k, v, o, lse, block_indices, doc_start)


def _attention_bwd(cfg: _Config, res, do):
  q, k, v, o, lse, block_indices, doc_start = res
  if cfg.backward == "reference":
    _, vjp = jax.vjp(
      lambda q_, k_, v_: _reference(q_, k_, v_, block_indices, doc_start, cfg), q, k, v
    )
    dq, dk, dv = vjp(do)
  else:
    from pallas_kernels import selected_attention_mgpu_bwd as bwd

    dq, dk, dv = bwd.backward(
      q,
      k,
      v,
      o,
      lse,
      do,
      block_indices,
      doc_start=doc_start,
      softmax_scale=cfg.softmax_scale,
      mode=cfg.mode,
      cfg=bwd.BwdConfig(chunk=cfg.bwd_chunk, direct=cfg.bwd_direct),
      block_size=cfg.block_size,
    )
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def selected_attention_mgpu(
  q,
  k,
  v,
  block_indices,
  *,
  block_size: int = BLOCK_SIZE,
  segment_ids=None,
  softmax_scale: float | None = None,
  mode: str = "exact",
  return_lse: bool = False,
  num_stages: int = 2,
  tile_rows: int | None = None,
  q_layout: str = "direct",
  ping_pong: bool = True,
  backward: str = "kernel",
  persistent: bool | None = None,
  num_ctas: int = 0,
):
  """Selected-block attention with the Mosaic GPU forward kernel.

  Args:
    q: ``[B, T, HQ, Dk]`` bfloat16/float16 queries; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
      ``Dk`` and ``Dv`` are independent; each is zero padded to a multiple of 64 (at most 256,
      and padded ``Dk + Dv <= 384``; :mod:`pallas_kernels.selected_attention_dims`). Padding
      costs an XLA pad copy of q/k (v) and ``Dk'/Dk`` more Q Kᵀ work and Q/K traffic (``Dv'/Dv``
      for P V, O, dO), e.g. 1.2x for Dk 160 -> 192; O is sliced back to ``Dv``.
    block_indices: ``[B, T, H, n]`` int block ids (``-1`` padding, duplicates count once).
    block_size: KV block size, 32, 64 or 128.
    segment_ids: optional ``[B, T]`` document ids (documents are maximal runs of equal ids); a
      query sees only keys of its own document.
    softmax_scale: defaults to ``Dk ** -0.5`` of the *unpadded* ``Dk``.
    mode: ``"exact"`` (per-token selection) or ``"shared"`` (tokens of each aligned run of
      ``r = 64 // G`` share their first token's list).
    return_lse: also return the ``[B, T, HQ]`` float32 natural-log LSE (no gradient through it).
    num_stages: K/V SMEM ring depth (lowered to what fits in the 227 KiB of a CTA).
    tile_rows: 64 (one warpgroup per CTA, prefetching its own K/V) or 128 (two compute
      warpgroups sharing one K/V stream fed by a producer warpgroup; falls back to 64 for G = 1).
      ``None``: 128 for ``"exact"`` (fastest measured), 64 for ``"shared"`` (a 128-row tile
      would iterate over the union of two shared lists).
    q_layout: ``"tiles"`` (Q/O through an XLA transpose) or ``"direct"`` (per-token TMA copies of
      Q/O, no transpose; only with 128-row tiles and ``G % 8 == 0``, else falls back to tiles).
    ping_pong: with 128-row tiles, alternate the two warpgroups' softmax and wgmma (FA3).
    persistent: with 128-row tiles, launch ``num_ctas`` CTAs (0: one per SM) that each walk many
      tiles, loading the next tile's Q and K/V while the current one computes
      (:mod:`pallas_kernels.selected_attention_mgpu_persistent`; H200, standard shape: forward
      0.55 vs 0.63 ms at 8k, 4.7 vs 5.3 ms at 64k, back-to-back calls); falls back to one CTA per
      tile where the double-buffered Q does not fit in shared memory. ``False``: one CTA per tile.
      ``None`` (default): persistent, with or without ``segment_ids`` (its document masks
      passed the GPU checks, ``check_selected_mgpu_bwd.py --persistent-docs``, H200,
      2026-11-30).
    backward: ``"kernel"`` (the dQ and dK/dV Mosaic GPU kernels) or ``"reference"`` (the VJP of
      the plain-JAX reference with dense masks; for checks).

  Returns:
    ``o [B, T, HQ, Dv]`` in ``q.dtype`` (or ``(o, lse)``); rows that see no key get 0.

  Raises:
    NotImplementedError: for a configuration the kernel does not serve (the message says why).
  """
  reason = unsupported_reason(
    q, k, v, block_indices, block_size=block_size, segment_ids=segment_ids, mode=mode
  )
  if reason is not None:
    raise NotImplementedError(f"pallas_gpu selected_attention: {reason}")
  if not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"num_stages: expected a positive int, got {num_stages!r}")
  scale = float(softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
  if not scale > 0:
    raise NotImplementedError(
      f"pallas_gpu selected_attention: softmax_scale={scale} (the kernel "
      "keeps the running max in raw score units, so it needs scale > 0)"
    )
  if backward not in ("kernel", "reference"):
    raise ValueError(f"backward: expected 'kernel' or 'reference', got {backward!r}")
  if tile_rows is None:
    tile_rows = 2 * TILE_ROWS if mode == "exact" else TILE_ROWS
  if persistent is None:
    persistent = True
  cfg = _Config(
    softmax_scale=scale,
    mode=mode,
    block_size=block_size,
    num_stages=num_stages,
    tile_rows=tile_rows,
    q_layout=q_layout,
    ping_pong=ping_pong,
    backward=backward,
    persistent=persistent,
    num_ctas=num_ctas,
  )
  resolve_config(cfg, q.shape[2] // k.shape[2])  # validates
  doc_start = None
  if segment_ids is not None:
    doc_start = document_starts(segment_ids, q.shape[0], q.shape[1])
  fn = _forward if return_lse else _attention
  return dims.with_padded_head_dims(fn, q, k, v, block_indices, doc_start, cfg)


def selected_attention_op(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """The ``selected_attention`` op of backend ``pallas_gpu`` (exact per-token selection)."""
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
      f"pallas_gpu selected_attention: needs a Hopper GPU, the default "
      f"backend is {jax.default_backend()!r}"
    )
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is not None and not str(cc).startswith("9"):
    raise NotImplementedError(
      f"pallas_gpu selected_attention: needs a Hopper GPU (sm90, wgmma), "
      f"got compute capability {cc}"
    )
  return selected_attention_mgpu(
    q,
    k,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=softmax_scale,
  )
