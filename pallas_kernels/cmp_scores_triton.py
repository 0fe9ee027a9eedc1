"""Selection scores of NSA's compressed branch in Pallas Triton kernels (GPU).

NSA picks each query's blocks from the compressed branch's probabilities ``p[t, hq, i]`` (query
``t``, query head ``hq``, compressed token ``i``): summed over the ``G`` query heads of a KV group
and pooled onto selection blocks. Materialized, ``p`` is ``[T, HQ, NC]`` float32 (16 GiB per row
at ``T = 65536``, ``HQ = 64``, ``NC = 1024``). These kernels recompute it tile by tile:

* log-sum-exp kernel: per (batch, KV head, tile of ``TQ`` tokens), a loop over the ``G`` heads
  and the visible compressed-key tiles keeps a running max and sum: the base-2 log-sum-exp of the
  scaled logits ``[B, H, G, T]`` (the logits are never stored);
* tile importance (shared by the two kernels below): for a token tile and a tile of ``TB``
  selection blocks, the ``TB * l'/d`` compressed tokens the block tile covers plus a *halo* of the
  ``l/d - 1`` tokens before it (NSA's windows overlap the previous block); for each head ``g``,
  ``p = exp2(s - lse)`` where visible, summed over ``g`` into ``acc [TQ, tokens]``; then one
  float32 matmul with a banded pooling matrix (``"sum"``: eq. 9's overlap weights) or, for
  ``"max"``, the maximum of one-hot selection matmuls over the band positions. The matrices depend
  only on ``(l, d, l', TB)``: the grid is translation invariant when tiles start on block
  boundaries;
* :func:`compressed_scores`: one program per (token tile, block tile) writes the pooled
  importance ``[B, H, T, NB]``;
* :func:`compressed_select`: one program per token tile walks its candidate block tiles and keeps
  an exact running top-``n`` per query, writing only ``[B, H, T, n]`` block ids.

Visibility: compressed token ``i`` (``0 <= i < NC``) is visible to a query at position ``t`` whose
document starts at position ``lo`` iff ``lo <= i*d`` and ``i*d + l - 1 <= t``. Rows without
documents have ``t`` = the row position and ``lo = 0``; packed rows use the block-aligned grid of
:mod:`pallas_kernels.packed_layout` (:func:`compressed_select`'s ``rows``). Block tiles no query
of the token tile can see skip their compute and write zeros.

Shapes are padded in XLA so every load is in bounds: K gets ``halo`` zero rows in front and is
padded at the end; token tiles past ``T`` are computed and dropped. Triton needs power-of-two
tiles: ``G`` and ``Dk`` must be powers of two (``Dk >= 16``), ``l'/d`` too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = 1.4426950408889634
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
  """Static shape of one call.

  Attributes:
    cmp_window, cmp_stride, block_size: ``l``, ``d``, ``l'``.
    pooling: ``"sum"`` or ``"max"``.
    softmax_scale: logit scale.
    num_selected, num_init_blocks, num_local_blocks: ``n`` and the forced blocks, for
      :func:`compressed_select`.
    tq: query tokens per tile; tb: selection blocks per tile; tkl: compressed keys per tile of
      the log-sum-exp kernel.
    num_warps, num_stages: Triton launch parameters.
  """

  cmp_window: int
  cmp_stride: int
  block_size: int
  pooling: str
  softmax_scale: float
  num_selected: int = 16
  num_init_blocks: int = 1
  num_local_blocks: int = 2
  tq: int = 64
  tb: int = 16
  tkl: int = 64
  num_warps: int = 4
  num_stages: int = 2

  @property
  def per_block(self) -> int:
    """Compressed tokens that start inside one selection block: ``l'/d``."""
    return self.block_size // self.cmp_stride

  @property
  def halo(self) -> int:
    """Tokens before a block tile loaded for the overlap (``l/d - 1`` rounded up to 16; 0 if
    none)."""
    e = self.cmp_window // self.cmp_stride - 1
    return 0 if e == 0 else -(-e // 16) * 16


def unsupported_reason(cfg: ScoresConfig, *, group: int, dk: int) -> str | None:
  """Why these kernels cannot serve a call (None if they can)."""
  pow2 = lambda x: x > 0 and x & (x - 1) == 0
  if cfg.pooling not in ("sum", "max"):
    return f"pooling {cfg.pooling!r} (expected 'sum' or 'max')"
  if cfg.block_size % cfg.cmp_stride or cfg.cmp_window % cfg.cmp_stride:
    return f"l'={cfg.block_size} and l={cfg.cmp_window} must be multiples of d={cfg.cmp_stride}"
  if not pow2(cfg.per_block) or cfg.tb * cfg.per_block < 16:
    return f"l'/d = {cfg.per_block} must be a power of two with tb * l'/d >= 16"
  if not pow2(group):
    return f"G = {group} query heads per KV head (Triton tiles need a power of two)"
  if not pow2(dk) or dk < 16:
    return f"Dk = {dk} (a power of two >= 16 needed)"
  return None


def pooling_matrices(cfg: ScoresConfig) -> tuple[np.ndarray, np.ndarray]:
  """``(main [R, TK, TB], halo [R, max(halo, 1), TB])`` float32 pooling matrices of one block
  tile: token ``i`` of the tile's ``TK = TB * l'/d`` tokens (``i - halo`` for the halo rows) and
  block ``j`` of its ``TB`` blocks; ``R = 1`` for ``"sum"`` (eq. 9 weights), the band length for
  ``"max"`` (one-hot per band position)."""
  l, d, bs, tb = cfg.cmp_window, cfg.cmp_stride, cfg.block_size, cfg.tb
  a, e = cfg.per_block, l // d - 1
  tk = tb * a
  rel = np.arange(-cfg.halo, tk)[:, None]  # token index relative to the tile's first token
  j = np.arange(tb)[None, :]
  overlap = np.minimum(rel * d + l, (j + 1) * bs) - np.maximum(rel * d, j * bs)
  weight = np.maximum(overlap, 0) // d  # [halo + TK, TB]
  if cfg.pooling == "sum":
    mats = weight[None].astype(np.float32)
  else:
    band = rel - (j * a - e)  # position of the token in block j's band, valid in [0, a + e)
    mats = np.stack([((band == r) & (weight > 0)) for r in range(a + e)]).astype(np.float32)
  main, halo = mats[:, cfg.halo :], mats[:, : cfg.halo]
  if cfg.halo == 0:
    halo = np.zeros((mats.shape[0], 1, tb), np.float32)
  return main, halo


def _dot(a, b, *, trans_b: bool = False, precision=None):
  """``a [M, K] @ b`` (``b [K, N]``, or ``[N, K]`` with ``trans_b``) with float32 accumulation."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(tok, t, lo, cfg: ScoresConfig, nc: int):
  """``[TQ, K]`` bool: compressed tokens ``tok [K]`` visible to queries at positions ``t [TQ]``
  whose document starts at position ``lo [TQ]``."""
  first = tok * cfg.cmp_stride
  ok = (tok >= 0) & (tok < nc)
  return (
    ok[None, :]
    & (first[None, :] + cfg.cmp_window - 1 <= t[:, None])
    & (first[None, :] >= lo[:, None])
  )


def _lse_kernel(
  q_ref, pos_ref, lo_ref, k_ref, lse_ref, *, cfg: ScoresConfig, nc: int, group: int, halo: int
):
  """``q_ref [TQ, G, Dk]``, ``pos_ref``/``lo_ref [TQ]`` (query positions and their documents'
  first positions), ``k_ref [NCP, Dk]`` (``halo`` zero rows first), ``lse_ref [G, TQ]``."""
  t, lo = pos_ref[...], lo_ref[...]
  n_vis = jnp.clip((jnp.max(t) - cfg.cmp_window + 1) // cfg.cmp_stride + 1, 0, nc)
  n_tiles = (n_vis + cfg.tkl - 1) // cfg.tkl
  first_tile = jnp.minimum(jnp.min(lo) // cfg.cmp_stride // cfg.tkl, n_tiles)
  scale2 = cfg.softmax_scale * LOG2E
  for g in range(group):
    qg = q_ref[:, g, :]

    def body(kt, carry, qg=qg):
      m, s_sum = carry
      k = k_ref[pl.ds(halo + kt * cfg.tkl, cfg.tkl), :]
      s = _dot(qg, k, trans_b=True) * scale2
      tok = kt * cfg.tkl + lax.iota(jnp.int32, cfg.tkl)
      vis = _visible(tok, t, lo, cfg, nc)
      s = jnp.where(vis, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
      return m_new, s_sum * jnp.exp2(m - m_new) + jnp.sum(p, axis=1)

    init = (jnp.full((cfg.tq,), _NEG, jnp.float32), jnp.zeros((cfg.tq,), jnp.float32))
    m, s_sum = lax.fori_loop(first_tile, n_tiles, body, init)
    seen = s_sum > 0.0
    lse_ref[g, :] = jnp.where(seen, m + jnp.log2(jnp.where(seen, s_sum, 1.0)), -jnp.inf)


def _tile_importance(q_ref, k_ref, lse_ref, wm_ref, wh_ref, jt, t, lo, *, cfg, nc: int, group: int):
  """``[TQ, TB]`` float32 pooled importance of block tile ``jt`` for the queries at positions
  ``t [TQ]`` with document starts ``lo [TQ]`` (zeros without compute when no query of the tile
  sees any of its compressed tokens)."""
  halo, tk = cfg.halo, cfg.tb * cfg.per_block
  t_max = jnp.max(t)
  i0 = jt * tk  # first compressed token of the block tile
  first = i0 - halo if halo else i0
  seen_any = (jnp.maximum(first, 0) * cfg.cmp_stride + cfg.cmp_window - 1 <= t_max) & (first < nc)
  scale2 = cfg.softmax_scale * LOG2E

  def compute():
    km = k_ref[pl.ds(halo + i0, tk), :]
    tok_m = i0 + lax.iota(jnp.int32, tk)
    vis_m = _visible(tok_m, t, lo, cfg, nc)
    acc_m = jnp.zeros((cfg.tq, tk), jnp.float32)
    if halo:
      kh = k_ref[pl.ds(i0, halo), :]
      tok_h = i0 - halo + lax.iota(jnp.int32, halo)
      vis_h = _visible(tok_h, t, lo, cfg, nc)
      acc_h = jnp.zeros((cfg.tq, halo), jnp.float32)
    for g in range(group):
      qg = q_ref[:, g, :]
      lse = lse_ref[g, :][:, None]
      s = _dot(qg, km, trans_b=True) * scale2
      acc_m += jnp.where(vis_m, jnp.exp2(s - lse), 0.0)
      if halo:
        s = _dot(qg, kh, trans_b=True) * scale2
        acc_h += jnp.where(vis_h, jnp.exp2(s - lse), 0.0)
    out = None
    for r in range(wm_ref.shape[0]):
      part = _dot(acc_m, wm_ref[r], precision=lax.Precision.HIGHEST)
      if halo:
        part += _dot(acc_h, wh_ref[r], precision=lax.Precision.HIGHEST)
      out = part if out is None else jnp.maximum(out, part)
    return out

  return lax.cond(seen_any, compute, lambda: jnp.zeros((cfg.tq, cfg.tb), jnp.float32))


def _scores_kernel(
  q_ref, pos_ref, lo_ref, k_ref, lse_ref, wm_ref, wh_ref, out_ref, *, cfg, nc: int, group: int
):
  """``q_ref [TQ, G, Dk]``, ``k_ref [NCP, Dk]``, ``lse_ref [G, TQ]`` (base 2), ``wm_ref [R, TK,
  TB]``, ``wh_ref [R, HALO|1, TB]``, ``out_ref [TQ, TB]``."""
  out_ref[...] = _tile_importance(
    q_ref,
    k_ref,
    lse_ref,
    wm_ref,
    wh_ref,
    pl.program_id(2),
    pos_ref[...],
    lo_ref[...],
    cfg=cfg,
    nc=nc,
    group=group,
  )


def _merge_top_n(vals, ids, score, cols, n: int):
  """Top-``n`` of the union of a running ``(vals, ids) [TQ, n]`` (descending, lower ids) and a new
  tile ``score [TQ, TB]`` with ids ``cols [TB]`` (all larger than ``ids``): ``n`` rounds, each
  taking the largest value, ties to the lower id, and removing it."""
  big = jnp.int32(2**30)
  slot = lax.iota(jnp.int32, n)[None, :]
  new_v = jnp.full(vals.shape, -jnp.inf, jnp.float32)
  new_i = jnp.zeros(ids.shape, jnp.int32)
  cols = jnp.broadcast_to(cols[None, :], score.shape)
  for r in range(n):
    m1 = jnp.max(vals, axis=1)
    m2 = jnp.max(score, axis=1)
    from_old = m1 >= m2  # equal values: the running entries have the lower ids
    id1 = jnp.min(jnp.where(vals == m1[:, None], ids, big), axis=1)
    id2 = jnp.min(jnp.where(score == m2[:, None], cols, big), axis=1)
    m = jnp.where(from_old, m1, m2)
    pick = jnp.where(from_old, id1, id2)
    new_v = jnp.where(slot == r, m[:, None], new_v)
    new_i = jnp.where(slot == r, pick[:, None], new_i)
    vals = jnp.where(from_old[:, None] & (ids == id1[:, None]), -jnp.inf, vals)
    score = jnp.where(~from_old[:, None] & (cols == id2[:, None]), -jnp.inf, score)
  return new_v, new_i


def _select_kernel(
  q_ref,
  pos_ref,
  lo_ref,
  k_ref,
  lse_ref,
  wm_ref,
  wh_ref,
  ids_ref,
  *,
  cfg: ScoresConfig,
  nc: int,
  group: int,
  nb: int,
):
  """Pooled importance of every candidate block tile with a running exact top-``n`` per query:
  ``ids_ref [TQ, n]`` int32 block ids, best first (``nb`` where fewer blocks are candidates).
  Block ``j`` is a candidate for a query at position ``t`` whose document starts at position
  ``lo`` (a block boundary) iff ``lo <= j*l' <= t``; forced blocks (the document's first
  ``num_init_blocks``, the ``num_local_blocks`` ending at the query's block) score ``+inf``. A tile
  whose scores all fall at or below a row's current ``n``-th best is not merged (later ids lose
  ties)."""
  n, bs, tb = cfg.num_selected, cfg.block_size, cfg.tb
  t, lo = pos_ref[...], lo_ref[...]
  first = lo // bs  # the document's first block
  last_tile = jnp.minimum(jnp.max(t) // bs, nb - 1) // tb + 1
  first_tile = jnp.minimum(jnp.min(first) // tb, last_tile)

  def body(jt, carry):
    vals, ids = carry
    imp = _tile_importance(
      q_ref, k_ref, lse_ref, wm_ref, wh_ref, jt, t, lo, cfg=cfg, nc=nc, group=group
    )
    cols = jt * tb + lax.iota(jnp.int32, tb)
    j, own, j0 = cols[None, :], (t // bs)[:, None], first[:, None]
    cand = (j * bs <= t[:, None]) & (j >= j0) & (j < nb)
    forced = (j - j0 < cfg.num_init_blocks) | ((j <= own) & (j > own - cfg.num_local_blocks))
    score = jnp.where(cand & forced, jnp.inf, imp)
    score = jnp.where(cand, score, -jnp.inf)
    thr = jnp.min(vals, axis=1)
    enters = jnp.any(score > thr[:, None])
    return lax.cond(enters, lambda: _merge_top_n(vals, ids, score, cols, n), lambda: (vals, ids))

  init = (jnp.full((cfg.tq, n), -jnp.inf, jnp.float32), jnp.full((cfg.tq, n), nb, jnp.int32))
  vals, ids = lax.fori_loop(first_tile, last_tile, body, init)
  ids_ref[...] = jnp.where(vals == -jnp.inf, nb, ids)


def _compiler_params(cfg: ScoresConfig):
  from jax.experimental.pallas import triton as pltriton

  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class _Call:
  """Padded operands and shared specs of one call (see the module docstring)."""

  def __init__(
    self, q, k_cmp, cfg: ScoresConfig, interpret: bool, name: str, rows=None, num_blocks=None
  ):
    b, t, hq, dk = q.shape
    self.nc, self.h = k_cmp.shape[1], k_cmp.shape[2]
    self.g = hq // self.h
    reason = unsupported_reason(cfg, group=self.g, dk=dk)
    if reason:
      raise NotImplementedError(f"{name}: {reason}")
    self.b, self.t, self.hq = b, t, hq
    tq, tb, halo = cfg.tq, cfg.tb, cfg.halo
    self.nb = -(-t // cfg.block_size) if num_blocks is None else num_blocks
    self.nbt = -(-self.nb // tb)
    self.nt = -(-t // tq)
    self.tp = self.nt * tq
    ncp = halo + max(self.nbt * tb * cfg.per_block, -(-self.nc // cfg.tkl) * cfg.tkl)
    q = lax.stop_gradient(q)
    kp = jnp.pad(lax.stop_gradient(k_cmp), ((0, 0), (halo, ncp - halo - self.nc), (0, 0), (0, 0)))
    self.kp = kp.astype(q.dtype)
    self.qp = jnp.pad(q, ((0, 0), (0, self.tp - t), (0, 0), (0, 0)))
    if rows is None:  # one document per row: positions 0 .. T-1
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      lo = jnp.zeros((b, t), jnp.int32)
    else:
      pos, lo = (jnp.asarray(x, jnp.int32) for x in rows)
    # padded query rows see nothing and take no part in the tiles' key ranges
    self.pos = jnp.pad(pos, ((0, 0), (0, self.tp - t)), constant_values=-1)
    self.lo = jnp.pad(lo, ((0, 0), (0, self.tp - t)), constant_values=2**30)
    h, g = self.h, self.g
    self.row_spec = pl.BlockSpec((None, tq), lambda bh, i, *_: (bh // h, i))
    self.q_spec = pl.BlockSpec((None, tq, g, dk), lambda bh, i, *_: (bh // h, i, bh % h, 0))
    self.k_spec = pl.BlockSpec((None, ncp, None, dk), lambda bh, *_: (bh // h, 0, bh % h, 0))
    self.lse_spec = pl.BlockSpec((None, None, g, tq), lambda bh, i, *_: (bh // h, bh % h, 0, i))
    self.cfg, self.interpret = cfg, interpret
    self.wm, self.wh = (jnp.asarray(x) for x in pooling_matrices(cfg))
    self.w_specs = [
      pl.BlockSpec(self.wm.shape, lambda *_: (0, 0, 0)),
      pl.BlockSpec(self.wh.shape, lambda *_: (0, 0, 0)),
    ]

  def lse2(self):
    """``[B, H, G, Tp]`` base-2 log-sum-exp of the scaled logits."""
    cfg = self.cfg
    return pl.pallas_call(
      functools.partial(_lse_kernel, cfg=cfg, nc=self.nc, group=self.g, halo=cfg.halo),
      grid=(self.b * self.h, self.nt),
      in_specs=[self.q_spec, self.row_spec, self.row_spec, self.k_spec],
      out_specs=self.lse_spec,
      out_shape=jax.ShapeDtypeStruct((self.b, self.h, self.g, self.tp), jnp.float32),
      compiler_params=_compiler_params(cfg),
      interpret=self.interpret,
      name="nsa_compressed_lse",
    )(self.qp, self.pos, self.lo, self.kp)

  def natural_lse(self, lse2):
    """``[B, T, HQ]`` natural-log log-sum-exp."""
    lse = jnp.transpose(lse2[..., : self.t], (0, 3, 1, 2))
    return lse.reshape(self.b, self.t, self.hq) / LOG2E


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def compressed_lse(q, k_cmp, cfg: ScoresConfig, *, interpret: bool = False):
  """``[B, T, HQ]`` float32 natural-log log-sum-exp of the compressed branch's scaled logits
  (``-inf`` where nothing is visible; no gradient). Arguments as :func:`compressed_scores`."""
  c = _Call(q, k_cmp, cfg, interpret, "compressed_lse")
  return c.natural_lse(c.lse2())


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def compressed_scores(q, k_cmp, cfg: ScoresConfig, *, interpret: bool = False):
  """Log-sum-exp and pooled block importance of the compressed branch.

  Args:
    q: ``[B, T, HQ, Dk]`` queries (bf16/f16/f32).
    k_cmp: ``[B, NC, H, Dk]`` compressed keys, ``NC >= 1``.
    cfg: :class:`ScoresConfig`.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    ``(lse [B, T, HQ] float32 natural-log log-sum-exp (-inf where nothing is visible),
    importance [B, H, T, NB] float32)`` with ``NB = ceil(T / l')``: probabilities summed over the
    ``G`` heads of each KV group and pooled onto blocks (no gradient).
  """
  c = _Call(q, k_cmp, cfg, interpret, "compressed_scores")
  lse2 = c.lse2()
  h, tq, tb = c.h, cfg.tq, cfg.tb
  imp = pl.pallas_call(
    functools.partial(_scores_kernel, cfg=cfg, nc=c.nc, group=c.g),
    grid=(c.b * h, c.nt, c.nbt),
    in_specs=[c.q_spec, c.row_spec, c.row_spec, c.k_spec, c.lse_spec, *c.w_specs],
    out_specs=pl.BlockSpec((None, None, tq, tb), lambda bh, i, j: (bh // h, bh % h, i, j)),
    out_shape=jax.ShapeDtypeStruct((c.b, h, c.tp, c.nbt * tb), jnp.float32),
    compiler_params=_compiler_params(cfg),
    interpret=interpret,
    name="nsa_compressed_scores",
  )(c.qp, c.pos, c.lo, c.kp, lse2, c.wm, c.wh)
  return c.natural_lse(lse2), imp[:, :, : c.t, : c.nb]


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "num_blocks"))
def compressed_select(
  q, k_cmp, cfg: ScoresConfig, *, rows=None, num_blocks=None, interpret: bool = False
):
  """Log-sum-exp and the top-``n`` blocks of the compressed branch's pooled importance, with the
  top-``n`` kept per query inside the kernel (no ``[B, H, T, NB]`` importance in memory).

  Selection as NSA's (no packed documents): block ``j`` is a candidate for query ``t`` iff
  ``j*l' <= t``; forced blocks (the first ``num_init_blocks``, the ``num_local_blocks`` ending at
  the query's block) are candidates that always win; the rest rank by importance, ties to the
  lower block.

  Args:
    q, k_cmp, cfg, interpret: as :func:`compressed_scores`; ``cfg.num_selected`` must be a
      power of two.
    rows: optional ``(pos, lo)``, both ``[B, T]`` int32, for packed documents laid out on a
      block-aligned grid (:mod:`pallas_kernels.packed_layout`): query ``t`` sits at grid position
      ``pos[t]`` and its document starts at grid position ``lo[t]`` (a multiple of ``l'``);
      ``k_cmp`` then holds the compressed tokens of that grid (slot ``i`` covers grid positions
      ``[i*d, i*d + l)``; slots whose window leaves a document zeroed) and a query sees slot
      ``i`` iff ``lo <= i*d`` and ``i*d + l - 1 <= pos``. None: ``pos = t``, ``lo = 0``.
    num_blocks: blocks of the grid (default ``ceil(T / l')``).

  Returns:
    ``(lse [B, T, HQ], block_indices [B, T, H, n] int32)``: grid block ids, ascending, ``-1``
    where fewer than ``n`` blocks are candidates (with ``rows``, subtract ``lo / l'`` for
    document-relative ids).
  """
  n = cfg.num_selected
  if n < 1 or n & (n - 1):
    raise NotImplementedError(f"compressed_select: n = {n} (a power of two needed)")
  c = _Call(q, k_cmp, cfg, interpret, "compressed_select", rows=rows, num_blocks=num_blocks)
  lse2 = c.lse2()
  h = c.h
  ids = pl.pallas_call(
    functools.partial(_select_kernel, cfg=cfg, nc=c.nc, group=c.g, nb=c.nb),
    grid=(c.b * h, c.nt),
    in_specs=[c.q_spec, c.row_spec, c.row_spec, c.k_spec, c.lse_spec, *c.w_specs],
    out_specs=pl.BlockSpec((None, None, cfg.tq, n), lambda bh, i: (bh // h, bh % h, i, 0)),
    out_shape=jax.ShapeDtypeStruct((c.b, h, c.tp, n), jnp.int32),
    compiler_params=_compiler_params(cfg),
    interpret=interpret,
    name="nsa_compressed_select",
  )(c.qp, c.pos, c.lo, c.kp, lse2, c.wm, c.wh)
  ids = jnp.sort(jnp.transpose(ids[:, :, : c.t], (0, 2, 1, 3)), axis=-1)
  return c.natural_lse(lse2), jnp.where(ids >= c.nb, -1, ids)


__all__ = [
  "ScoresConfig",
  "compressed_lse",
  "compressed_scores",
  "compressed_select",
  "pooling_matrices",
  "unsupported_reason",
]
