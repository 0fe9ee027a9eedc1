"""Selected-block attention forward on Hopper: the per-tile Mosaic GPU kernels and their launcher.

A CTA owns a query tile of one KV head (64-row layout: :mod:`pallas_kernels.
selected_attention_common`). It walks the tile's iteration list
(:mod:`pallas_kernels.selection_tiles`): per listed KV block, TMA copies K ``[bs, Dk]`` and V
``[bs, Dv]`` into a ring of SMEM slots, ``S = Q Kᵀ`` runs on the tensor cores (``wgmma``), the
scores are masked (the token's own selection via the membership bits and causality inside the
block; with packed documents K/V are in the document-aligned padded layout of
:mod:`pallas_kernels.packed_layout` and each row's position is shifted), an online softmax in base 2
(scale folded into ``log2 e``) runs in registers, and ``O += P V`` is a second ``wgmma``. O and
the natural-log LSE are written once at the end. The tile's ids and membership words are first
copied to SMEM so the K/V loop does no global scalar loads.

* :func:`forward_64_kernel` (``tile_rows=64``): one warpgroup per CTA that prefetches its own K/V
  ring (about two CTAs per SM).
* :func:`forward_128_kernel` (``tile_rows=128``): two compute warpgroups (64 rows each, two
  consecutive 64-row tiles, iterating over the union of their lists) share one K/V ring fed by a
  producer warpgroup, FA3-style (``set_max_registers`` 232 / 40, optional ping-pong schedule
  barrier). With ``q_layout="direct"`` (``G % 8 == 0``) Q and O move by one TMA copy per token
  (``G`` contiguous heads), so no XLA transpose; otherwise Q/O go through an XLA transpose to
  ``[B, H, NT * rows, D]``.
* :func:`call_kernel` launches one of them, or the persistent variant
  (:mod:`pallas_kernels.selected_attention_persistent_kernel_sm90`), on prepared operands.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import selected_attention_persistent_kernel_sm90 as persistent
from pallas_kernels.selected_attention_common import (
  LN2,
  LOG2E,
  TILE_ROWS,
  KernelConfig,
  fit_config,
  from_tiles,
  masked_scores,
  need_words,
  online_softmax,
  row_tokens,
  smem_transforms,
  ws_consumer_step,
)


def forward_64_kernel(
  q_ref,
  k_ref,
  v_ref,
  ids_ref,
  cnt_ref,
  lo_ref,
  hi_ref,  # inputs (GMEM)
  shift_ref,
  smin_ref,
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
  shift_smem,
  *o_smem,
  num_heads: int,
  g: int,
  cfg: KernelConfig,
  dtype,
):
  """One CTA: query tile ``tile`` of (batch, KV head) ``bh``.

  Refs: ``q_ref [B, H, NT*64, Dk]``, ``k_ref [B, Tk, H, Dk]``, ``v_ref [B, Tk, H, Dv]``,
  ``ids_ref/lo_ref/hi_ref [B, H, NT, L]``, ``cnt_ref [B, H, NT]``, ``o_ref [B, H, NT*64, Dv]``,
  ``lse_ref [B, H, NT*64]``; SMEM ``q_smem [64, Dk]``, ``k_smem [S, bs, Dk]``, ``v_smem
  [S, bs, Dv]``, ``lse_smem [64]``, ``ids_smem/lo_smem/hi_smem [L]`` (the tile's list, read per
  step without a global load). O is staged in ``q_smem`` when ``Dk == Dv``, else in V slot 0
  (free after the loop; ``bs == 64``), else in the optional trailing ``o_smem [64, Dv]``.
  With ``cfg.has_docs``: ``k_ref``/``v_ref`` hold the padded layout, ``shift_ref [B, NT*64]``
  each row's padded-position shift and ``smin_ref [B, NT]`` its minimum per tile
  (:func:`pallas_kernels.selected_attention_common.shift_tiles`), ``shift_smem [64]``.
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
    plgpu.copy_gmem_to_smem(shift_ref.at[b, rows], shift_smem, q_bar)
  for src, dst in ((ids_ref, ids_smem), (lo_ref, lo_smem), (hi_ref, hi_smem)):
    plgpu.copy_gmem_to_smem(src.at[b, h, tile], dst, idx_bar)

  def fetch(j, slot, from_gmem=False):
    blk = ids_ref[b, h, tile, j] if from_gmem else ids_smem[j]
    keys = pl.ds(blk * bs, bs)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])

  for s in range(stages):
    pl.when(s < count)(functools.partial(fetch, jnp.int32(s), s, True))

  layout = plgpu.Layout.WGMMA
  col_ids, tok = row_tokens(g, bs)
  scale2 = cfg.softmax_scale * LOG2E

  m_i = plgpu.layout_cast(jnp.full((TILE_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
  l_i = plgpu.layout_cast(jnp.full((TILE_ROWS,), 0.0, jnp.float32), layout.reduce(1))
  acc = plgpu.layout_cast(jnp.full((TILE_ROWS, dv), 0.0, jnp.float32), layout)
  plgpu.barrier_wait(q_bar)
  plgpu.barrier_wait(idx_bar)
  docs = {}
  if cfg.has_docs:
    docs = {
      "shift": plgpu.load(shift_smem, layout=layout.reduce(1)),
      "shift_min": smin_ref[b, tile],
    }

  def step(j, carry):
    acc, m_i, l_i = carry
    slot = lax.rem(j, jnp.int32(stages))
    blk = ids_smem[j]
    plgpu.barrier_wait(k_bar.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((TILE_ROWS, bs), jnp.float32))  # [64 rows, 64 keys]

    exact = cfg.mode == "exact"
    lo = lo_smem[j] if exact else None
    hi = hi_smem[j] if exact else None
    s = masked_scores(
      s,
      col_ids,
      tok,
      tok_base=0,
      t_base=tile * r,
      blk=blk,
      bs=bs,
      lo=lo,
      hi=hi,
      need=need_words(0, r),
      **docs,
    )
    p, m_new, l_i, acc = online_softmax(s, m_i, l_i, acc, scale2)
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
  lse_smem[...] = jnp.where(seen, (m_i * scale2 + jnp.log(l_div) * LOG2E) * LN2, -jnp.inf)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, rows])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
  plgpu.wait_smem_to_gmem(0)


def forward_128_kernel(
  q_ref,
  k_ref,
  v_ref,
  ids_ref,
  cnt_ref,
  lo_ref,
  hi_ref,
  shift_ref,
  smin_ref,
  o_ref,
  lse_ref,
  *,
  num_heads: int,
  g: int,
  cfg: KernelConfig,
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
  ``shift_ref [B, NT*128]`` / ``smin_ref [B, 2*NT]``: shifts per 64-row group, as in
  :func:`forward_64_kernel` (read only with ``cfg.has_docs``).
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
    shift_smem2,
    *o_smem2,
  ):
    o_smem2 = o_smem2[0] if o_smem2 else q_smem2
    wg = lax.axis_index("wg")
    pp = cfg.ping_pong

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
        plgpu.copy_gmem_to_smem(shift_ref.at[b, q_rows(wg)], shift_smem2.at[wg], q_bar.at[wg])

      layout = plgpu.Layout.WGMMA
      col_ids, tok = row_tokens(g, bs)
      scale2 = cfg.softmax_scale * LOG2E
      need0, need1 = need_words(0, r_wg), need_words(r_wg, r_wg)
      need = tuple(jnp.where(wg == 0, jnp.int32(a), jnp.int32(c)) for a, c in zip(need0, need1))
      m_i = plgpu.layout_cast(jnp.full((rows_wg,), -jnp.inf, jnp.float32), layout.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((rows_wg,), 0.0, jnp.float32), layout.reduce(1))
      acc = plgpu.layout_cast(jnp.full((rows_wg, dv), 0.0, jnp.float32), layout)
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(idx_bar)
      docs = {}
      if cfg.has_docs:
        docs = {
          "shift": plgpu.load(shift_smem2.at[wg], layout=layout.reduce(1)),
          "shift_min": smin_ref[b, tile * 2 + wg],
        }
      if pp:
        pl.when(wg == 1)(schedule_barrier)

      mask_kw = dict(
        col_ids=col_ids,
        tok=tok,
        tok_base=wg * r_wg,
        t_base=t_first,
        need=need,
        **docs,
      )

      def step(j, carry):
        slot = lax.rem(j, jnp.int32(stages))
        return ws_consumer_step(
          carry,
          slot=slot,
          blk=ids_smem[j],
          read_words=lambda: (lo_smem[j], hi_smem[j]),
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
      lse_smem[...] = jnp.where(seen, (m_i * scale2 + jnp.log(l_div) * LOG2E) * LN2, -jnp.inf)
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
      for src, dst in ((ids_ref, ids_smem), (lo_ref, lo_smem), (hi_ref, hi_smem)):
        plgpu.copy_gmem_to_smem(src.at[b, h, tile], dst, idx_bar)
      plgpu.barrier_wait(idx_bar)

      def produce(j, _):
        slot = lax.rem(j, jnp.int32(stages))
        pl.when(j >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
        keys = pl.ds(ids_smem[j] * bs, bs)
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


def call_kernel(qx, k, v, lists, cfg: KernelConfig, *, num_kv_heads: int, seq_len: int, docs=None):
  """Runs the kernel on prepared operands; returns ``(o [B, T, HQ, Dv], lse [B, T, HQ])``.

  ``k [B, Tk, H, Dk]``, ``v [B, Tk, H, Dv]`` with ``Dk``, ``Dv`` multiples of 64 (``Tk = T``, or
  with packed documents the padded layout's ``num_blocks * bs``). ``cfg`` is fitted to shared
  memory first (:func:`fit_config`). ``docs``: :func:`shift_tiles` output (required iff
  ``cfg.has_docs``)."""
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
      f"docs: expected {'shift_tiles(...)' if cfg.has_docs else 'None'} for has_docs={cfg.has_docs}"
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
    kernel = functools.partial(forward_64_kernel, num_heads=h, g=g, cfg=cfg, dtype=dtype)
    ot, lset = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(nt, b * h),
      grid_names=("tile", "bh"),
      compiler_params=params,
    )(*args)
    return (from_tiles(ot, seq_len, g), from_tiles(lset, seq_len, g))
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
    kernel = functools.partial(forward_128_kernel, num_heads=h, g=g, cfg=cfg, dtype=dtype)
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
  return from_tiles(ot, seq_len, g), from_tiles(lset, seq_len, g)
