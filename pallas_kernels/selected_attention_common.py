"""Shared pieces of the Hopper selected-attention kernels (forward, persistent forward, backward).

Layout, masking and softmax helpers used inside the kernels (:func:`row_tokens`,
:func:`masked_scores`, :func:`need_words`, :func:`online_softmax`, :func:`ws_consumer_step`),
the XLA-side preparation of their operands (:func:`to_tiles`, :func:`from_tiles`,
:func:`prepare`, :func:`shift_tiles`, :func:`document_starts`, :func:`share_selection`), the static
per-call configuration (:class:`KernelConfig`, :func:`resolve_config`, :func:`fit_config`) and
the static checks of what the kernels serve (:func:`unsupported_reason`).

Row layout: a 64-row query tile holds ``r = 64 // G`` consecutive tokens x the ``G`` query heads
of one KV head (row ``i*G + g`` is token ``t0 + i``, head ``h*G + g``; rows ``r*G .. 63`` are
padding when ``G`` does not divide 64); a 128-row tile is two consecutive 64-row tiles.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import selected_attention_dims as dims
from pallas_kernels.selection_tiles import tile_iteration_lists

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
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static parameters of one call, resolved from the public tuning and the operands.

  Hashable (a ``custom_vjp`` nondiff argument). The tuning fields are those of the public
  ``TuningConfig`` (:mod:`pallas_kernels.selected_attention_mgpu`) after the fallbacks of
  :func:`resolve_config` (``tile_rows`` is 64 or 128); the call adds ``softmax_scale``,
  ``group_size`` (``G`` query heads per KV head) and ``has_docs`` (packed documents: keys in the
  document-aligned padded layout, a per-row position shift; :mod:`pallas_kernels.packed_layout`). Built by ``selected_attention_mgpu.kernel_config``.
  """

  softmax_scale: float
  mode: str
  group_size: int
  has_docs: bool = False
  block_size: int = BLOCK_SIZE
  num_stages: int = 2
  tile_rows: int = TILE_ROWS  # 64: one warpgroup; 128: two compute warpgroups + producer
  q_layout: str = "tiles"  # "tiles": XLA transpose to [B, H, NT*rows, D]; "direct"
  ping_pong: bool = True  # 128 rows: alternate the two warpgroups' softmax and MMA
  persistent: bool = False  # 128 rows: one CTA per SM walking many tiles
  num_ctas: int = 0  # persistent CTAs (0: the device's SM count)
  bwd_direct: bool = True  # backward: per-token TMA for Q/dO/dQ where G allows
  bwd_chunk: int = 256  # backward: smallest cap on a dK/dV work item's tiles


def tokens_per_tile(num_groups: int) -> int:
  """``r = 64 // G`` tokens of one KV head per 64-row tile."""
  return TILE_ROWS // num_groups


def unsupported_reason(
  q, k, v, block_indices, *, block_size, mode: str = "exact", num_blocks: int | None = None
) -> str | None:
  """Why the kernels cannot serve this call, or ``None`` when they can (static checks of shapes,
  dtypes, head dims, block size, mode and shared memory). ``num_blocks``: blocks of the key grid
  (default ``cdiv(T, block_size)``; packed documents: the padded layout's)."""
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
  nb = -(-q.shape[1] // block_size) if num_blocks is None else num_blocks
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


def document_starts(segment_ids, batch: int, seq_len: int):
  """``[B, T]`` int32: position of the first token of each token's document (documents are
  maximal runs of equal ``segment_ids [B, T]``; all zeros without ids)."""
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids is None:
    return jnp.zeros((batch, seq_len), jnp.int32)
  is_start = jnp.concatenate(
    [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return jax.lax.cummax(jnp.where(is_start, pos[None, :], 0), axis=1)


def share_selection(block_indices, r: int, doc_start=None):
  """Shared selection: token ``t`` uses the list of token ``t - t % r``.

  Args:
    block_indices: ``[B, T, H, n]`` int block ids.
    r: tokens per shared run (a positive int).
    doc_start: optional ``[B, T]`` int32 first position of each token's document: the runs are
      then aligned to each document's start (token ``t`` uses token ``t - (t - ds) % r``).

  Returns:
    ``[B, T, H, n]``: row ``t`` holds ``block_indices[:, t - t % r]``.
  """
  t = block_indices.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  if doc_start is None:
    return jnp.take(block_indices, (pos // r) * r, axis=1)
  leader = pos[None, :] - (pos[None, :] - doc_start) % r  # [B, T]
  return jnp.take_along_axis(block_indices, leader[:, :, None, None], axis=1)


def to_tiles(x, r: int, h: int, rows: int = TILE_ROWS):
  """``[B, T, H*G, D] -> [B, H, NT * rows, D]``: rows ``(i, g)`` of each tile, zero padded."""
  b, t, hq, d = x.shape
  g = hq // h
  nt = -(-t // r)
  x = jnp.pad(x, ((0, 0), (0, nt * r - t), (0, 0), (0, 0)))
  x = x.reshape(b, nt, r, h, g, d).transpose(0, 3, 1, 2, 4, 5)  # [B, H, NT, r, G, D]
  x = x.reshape(b, h, nt, r * g, d)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, rows - r * g), (0, 0)))
  return x.reshape(b, h, nt * rows, d)


def from_tiles(x, t: int, g: int, rows: int = TILE_ROWS):
  """Inverse of :func:`to_tiles`: ``[B, H, NT * rows, ...] -> [B, T, H*G, ...]``."""
  b, h, n_rows = x.shape[:3]
  rest = x.shape[3:]
  nt = n_rows // rows
  r = rows // g
  x = x.reshape(b, h, nt, rows, *rest)[:, :, :, : r * g]
  x = x.reshape(b, h, nt, r, g, *rest)
  perm = (0, 2, 3, 1, 4) + tuple(range(5, 5 + len(rest)))
  x = x.transpose(perm).reshape(b, nt * r, h * g, *rest)
  return x[:, :t]


def row_tokens(g: int, bs: int):
  """``(col_ids [64, bs] int32 WGMMA layout, tok [64] row vector)``: key column of each element
  and token (within the 64-row group) of each row, computed once before the KV loop."""
  layout = plgpu.Layout.WGMMA
  row_ids = plgpu.broadcasted_iota(jnp.int32, (TILE_ROWS, bs), 0, layout=layout)
  col_ids = plgpu.broadcasted_iota(jnp.int32, (TILE_ROWS, bs), 1, layout=layout)
  tok = lax.div(row_ids, jnp.int32(g)).max(axis=1)  # [64] reduce(1)
  return col_ids, tok


def masked_scores(
  s, col_ids, tok, *, tok_base, t_base, blk, bs, lo, hi, need, shift=None, shift_min=None
):
  """Raw scores with invisible keys at ``-inf``.

  Row ``i`` (token ``tok[i] + tok_base`` within the tile, absolute ``tok[i] + t_base``) sees key
  column ``c`` of block ``blk`` iff the token selected the block (membership bit; skipped when
  ``lo`` is ``None``) and ``blk*bs + c <= t``. Both fold into one per-row limit, so each element
  costs a compare and a select. A block that lies wholly before the first token and that every
  token of the group selected (``(lo, hi) & need == need``) takes a branch with no mask at all (the common case: only the diagonal and partly selected blocks pay).

  Packed documents (:mod:`pallas_kernels.packed_layout`): keys are in the document-aligned
  padded layout and ``shift`` ([64] row vector) moves each row to its padded position ``t +
  shift``, so the limit becomes ``blk*bs + c <= t + shift`` (the membership bits only name blocks
  of the row's own document); ``shift_min`` (scalar) is the smallest ``shift`` of the group, so
  the no-mask test ``blk*bs + bs - 1 <= t_base + shift_min`` stays conservative.
  """

  def masked(s):
    limit = tok + (t_base - blk * bs)  # [64] row vector
    if shift is not None:
      limit = limit + shift
    if lo is not None:
      tt = tok + tok_base
      word = jnp.where(tt < 32, lo, hi)
      bit = jnp.where(tt < 32, tt, tt - 32)
      member = (lax.shift_right_logical(word, bit) & 1) == 1
      limit = jnp.where(member, limit, -1)
    visible = col_ids <= lax.broadcast_in_dim(limit, s.shape, [0])
    return jnp.where(visible, s, -jnp.inf)

  if shift is None:
    full = blk * bs + (bs - 1) <= t_base
  else:
    full = blk * bs + (bs - 1) <= t_base + shift_min
  if lo is not None:
    need_lo, need_hi = need
    full = full & ((lo & need_lo) == need_lo) & ((hi & need_hi) == need_hi)
  return lax.cond(full, lambda s: s, masked, s)


def need_words(tok_base: int, r: int) -> tuple[int, int]:
  """int32 ``(lo, hi)`` words with the bits of tokens ``tok_base .. tok_base + r - 1`` set."""
  bits = ((1 << r) - 1) << tok_base
  as_i32 = lambda x: x - (1 << 32) if x >= 1 << 31 else x
  return as_i32(bits & 0xFFFFFFFF), as_i32(bits >> 32)


def online_softmax(s, m_i, l_i, acc, scale2):
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
  (:mod:`pallas_kernels.selected_attention_kernel_sm90` and the persistent one): wait for K in ring ``slot``, ``S = Q Kᵀ``, mask
  (``read_words()`` gives the block's membership words ``(lo, hi)``; ``mask_kw``: the other
  arguments of :func:`masked_scores`), online softmax, wait for V, ``O += P V``, and release
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
  s = masked_scores(s, blk=blk, bs=bs, lo=lo, hi=hi, **mask_kw)
  p, m_new, l_i, acc = online_softmax(s, m_i, l_i, acc, scale2)
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


def resolve_config(cfg: KernelConfig, g: int) -> KernelConfig:
  """Falls back to what a group size supports: 128-row tiles need at most 64 tokens per tile
  (``G >= 2``), the direct Q/O layout and the persistent grid need 128-row tiles, the direct
  layout also ``G % 8 == 0`` (fields validated by the public ``TuningConfig``)."""
  rows = cfg.tile_rows if 2 * (TILE_ROWS // g) <= 64 else TILE_ROWS
  layout = cfg.q_layout if rows == 128 and g % 8 == 0 and g <= TILE_ROWS else "tiles"
  return dataclasses.replace(
    cfg, tile_rows=rows, q_layout=layout, persistent=cfg.persistent and rows == 128
  )


def prepare(
  q, block_indices, cfg: KernelConfig, num_kv_heads: int, *, num_blocks=None, positions=None
):
  """XLA-side preparation: ``(q operand, TileLists)`` for :func:`call_kernel` (cfg resolved).

  A tile is ``tile_rows // 64`` row groups of 64, each holding ``64 // G`` tokens (padded rows
  at the end of each group), so a 128-row tile is two consecutive 64-row tiles. ``num_blocks``
  (default ``cdiv(T, bs)``) and ``positions`` (``[B, T]``, default ``t``): the key grid and the
  queries' positions on it (packed documents: :mod:`pallas_kernels.packed_layout`).
  """
  _, t, hq, _ = q.shape
  g = hq // num_kv_heads
  r64 = tokens_per_tile(g)
  r_tile = (cfg.tile_rows // TILE_ROWS) * r64
  n = block_indices.shape[-1]
  nb = -(-t // cfg.block_size) if num_blocks is None else num_blocks
  one_list = cfg.mode == "shared" and cfg.tile_rows == TILE_ROWS
  length = min(n if one_list else r_tile * n, nb)
  length = -(-length // 4) * 4  # 16-byte rows for the TMA copy to SMEM
  grid = {}
  if num_blocks is not None or positions is not None:
    grid = {"num_blocks": nb, "positions": positions}
  if one_list:
    lists = tile_iteration_lists(
      block_indices,
      tokens_per_tile=r_tile,
      block_size=cfg.block_size,
      shared=True,
      max_len=length,
      **grid,
    )
  else:
    if cfg.mode == "shared":  # two 64-row groups: union of their lists
      block_indices = share_selection(block_indices, r64)
    lists = tile_iteration_lists(
      block_indices, tokens_per_tile=r_tile, block_size=cfg.block_size, max_len=length, **grid
    )
  tp = -(-t // r_tile) * r_tile
  qx = q if tp == t else jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  if cfg.q_layout == "tiles":
    qx = to_tiles(qx, r64, num_kv_heads)  # [B, H, NT*rows, D]
  return qx, lists


def shift_tiles(shift, g: int, num_tokens: int):
  """Per-row padded-position shifts in 64-row groups, for the kernels' packed-document mask.

  Args:
    shift: ``[B, T]`` int32 ``shift(t) >= 0``: token ``t`` is at padded key position ``t +
      shift(t)`` (:class:`pallas_kernels.packed_layout.PackedLayout`).
    g: query heads per KV head (``r = 64 // g`` tokens per 64-row group).
    num_tokens: ``Tp``, the padded token count (a multiple of ``r``).

  Returns:
    ``(rows [B, NG*64], group_min [B, NG])`` int32 with ``NG = Tp // r``: row ``i*G + g`` of
    group ``n`` holds ``shift[n*r + i]`` (padding rows and tokens 0), and ``group_min`` the
    smallest shift of the group's tokens (padding tokens included: 0, which is conservative).
  """
  b, t = shift.shape
  r = TILE_ROWS // g
  ng = num_tokens // r
  sh = jnp.pad(shift.astype(jnp.int32), ((0, 0), (0, num_tokens - t))).reshape(b, ng, r)
  rows = jnp.broadcast_to(sh[..., None], (b, ng, r, g)).reshape(b, ng, r * g)
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, TILE_ROWS - r * g))).reshape(b, ng * TILE_ROWS)
  return rows, jnp.min(sh, axis=-1)


def fit_config(cfg: KernelConfig, *, dk: int, dv: int, length: int, itemsize: int) -> KernelConfig:
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
