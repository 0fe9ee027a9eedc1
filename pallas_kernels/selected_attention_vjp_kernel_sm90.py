"""Selected-block attention backward on Hopper: dQ and dK/dV Mosaic GPU kernels.

Math (FlashAttention-2 backward restricted to the selection): with ``P = exp(scale * Q Kᵀ - LSE)``
over the keys a row may see, ``δ = rowsum(dO ∘ O)`` and ``dS = P ∘ (dO Vᵀ - δ)``:
``dQ = scale * dS K``, ``dK = scale * dSᵀ Q``, ``dV = Pᵀ dO``. Probabilities are recomputed from
the forward's log-sum-exp, so the forward saves only ``O`` and ``LSE``.

Both kernels use 64-row query tiles (``r = 64 // G`` tokens x the ``G`` heads of one KV group, the
layout of :func:`pallas_kernels.selected_attention_common.to_tiles`) and one warpgroup per CTA.

* **dQ** (:func:`_dq_kernel`): grid over (query tile, batch x KV head), the forward's loop: per
  block of the tile's iteration list, K and V stream through a TMA ring, ``S = Q Kᵀ`` and
  ``dP = dO Vᵀ`` run on the tensor cores, ``dQ += dS K`` accumulates in registers.
* **dK/dV** (:func:`_dkv_kernel`): no atomics. The inverse map (KV block -> the query tiles whose
  list holds it, with each pair's membership bits; :func:`pallas_kernels.selection_tiles.
  inverse_work_items`) is cut into work items of a bounded number of tiles, so that a block every
  tile selects (the forced initial block) does not serialize the grid. A CTA owns one item: K and
  V of its block stay in SMEM, the item's query tiles (Q, dO, LSE, δ) stream through a TMA ring,
  ``Sᵀ = K Qᵀ``, ``dV += Pᵀ dO``, ``dPᵀ = V dOᵀ``, ``dK += dSᵀ Q``, and the item writes its partial
  ``dK, dV`` once. XLA adds the partials of each block (one or a few per block) in float32.

Masking matches the forward exactly: a query row sees key ``c`` of block ``k`` iff its token
selected ``k`` (membership bit) and ``k * bs + c <= t``; with packed documents K/V are in the
document-aligned padded layout (:mod:`pallas_kernels.packed_layout`) and ``t`` is the row's
padded position ``t + shift(t)``. Rows whose token saw no key at all carry ``LSE = -inf`` and get
``P = 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import selected_attention_dims as dims
from pallas_kernels.selected_attention_common import (
  BLOCK_SIZE,
  LOG2E,
  TILE_ROWS,
  from_tiles,
  masked_scores,
  need_words,
  row_tokens,
  smem_transforms,
)
from pallas_kernels.selected_attention_vjp_common import (
  KEY_TILE,
  BwdConfig,
  BwdOperands,
  no_docs,
  prepare_backward,
  reduce_items,
  use_direct,
)

ROWS = TILE_ROWS
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _copy_rows(pairs, b, h, tile, barrier, *, direct: bool, g: int):
  """Copies one 64-row query tile of each ``(src, dst)`` pair to SMEM on ``barrier``.

  ``direct``: ``src`` is ``[B, Tp, HQ, D]`` and each of the tile's ``r = 64 // G`` tokens is one
  copy of its ``G`` heads (needs ``G % 8 == 0`` and ``G | 64``); else ``src`` is in 64-row tiles
  ``[B, H, NT*64, ...]``. ``direct`` costs ``r`` arrivals per pair on ``barrier``, tiles one.
  (LSE and δ always come in tiles: one 256-byte copy into a 256-byte aligned SMEM row.)
  """
  if direct:
    r = ROWS // g
    for i in range(r):
      for src, dst in pairs:
        plgpu.copy_gmem_to_smem(
          src.at[b, tile * r + i, pl.ds(h * g, g)], dst.at[pl.ds(i * g, g)], barrier
        )
  else:
    for src, dst in pairs:
      plgpu.copy_gmem_to_smem(src.at[b, h, pl.ds(tile * ROWS, ROWS)], dst, barrier)


def _dq_kernel(
  q_ref,
  do_ref,
  lse_ref,
  dl_ref,
  k_ref,
  v_ref,
  ids_ref,
  cnt_ref,
  lo_ref,
  hi_ref,
  shift_ref,
  smin_ref,
  dq_ref,
  q_smem,
  do_smem,
  lse_smem,
  dl_smem,
  k_smem,
  v_smem,
  q_bar,
  k_bar,
  v_bar,
  shift_smem,
  *,
  num_heads: int,
  g: int,
  scale2: float,
  stages: int,
  dtype,
  direct: bool,
  has_docs: bool,
  bs: int,
):
  """One CTA: query tile ``tile`` of ``bh`` (refs: :func:`backward`); K/V tiles are one block
  of ``bs`` keys.

  SMEM: ``q_smem [64, Dk]`` (reused for dQ), ``do_smem [64, Dv]``, ``k_smem [S, bs, Dk]``,
  ``v_smem [S, bs, Dv]``; ``S = Q Kᵀ`` contracts ``Dk``, ``dP = dO Vᵀ`` contracts ``Dv``.
  """
  tile = lax.axis_index("tile")
  bh = lax.axis_index("bh")
  b = lax.div(bh, jnp.int32(num_heads))
  h = lax.rem(bh, jnp.int32(num_heads))
  r = ROWS // g
  count = cnt_ref[b, h, tile]
  _copy_rows(((q_ref, q_smem), (do_ref, do_smem)), b, h, tile, q_bar, direct=direct, g=g)
  _copy_rows(((lse_ref, lse_smem), (dl_ref, dl_smem)), b, h, tile, q_bar, direct=False, g=g)
  if has_docs:
    plgpu.copy_gmem_to_smem(shift_ref.at[b, pl.ds(tile * ROWS, ROWS)], shift_smem, q_bar)

  def fetch(j, slot):
    keys = pl.ds(ids_ref[b, h, tile, j] * bs, bs)
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])

  for s in range(stages):
    pl.when(s < count)(functools.partial(fetch, jnp.int32(s), s))

  layout = plgpu.Layout.WGMMA
  col_ids, tok = row_tokens(g, bs)
  dk = q_smem.shape[-1]
  plgpu.barrier_wait(q_bar)
  lse2 = plgpu.load(lse_smem, layout=layout.reduce(1))  # [64] log2 units
  delta = plgpu.load(dl_smem, layout=layout.reduce(1))
  docs = {}
  if has_docs:
    docs = {
      "shift": plgpu.load(shift_smem, layout=layout.reduce(1)),
      "shift_min": smin_ref[b, tile],
    }
  dq = plgpu.layout_cast(jnp.full((ROWS, dk), 0.0, jnp.float32), layout)

  def step(j, dq):
    slot = lax.rem(j, jnp.int32(stages))
    blk = ids_ref[b, h, tile, j]
    plgpu.barrier_wait(k_bar.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((ROWS, bs), jnp.float32))
    s = masked_scores(
      s,
      col_ids,
      tok,
      tok_base=0,
      t_base=tile * r,
      blk=blk,
      bs=bs,
      lo=lo_ref[b, h, tile, j],
      hi=hi_ref[b, h, tile, j],
      need=need_words(0, r),
      **docs,
    )
    p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
    plgpu.barrier_wait(v_bar.at[slot])

    def dov(acc_ref):
      plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    dp = pl.run_scoped(dov, plgpu.ACC((ROWS, bs), jnp.float32))
    ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))

    def dsk(acc_ref):
      plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

    dq = pl.run_state(dsk)(plgpu.ACC.init(dq))
    nxt = j + stages
    pl.when(nxt < count)(lambda: fetch(nxt, slot))
    return dq

  dq = lax.fori_loop(0, count, step, dq)
  q_smem[...] = dq.astype(dtype)  # unscaled: the caller multiplies by scale
  plgpu.commit_smem()
  if direct:
    for i in range(r):
      plgpu.copy_smem_to_gmem(
        q_smem.at[pl.ds(i * g, g)], dq_ref.at[b, tile * r + i, pl.ds(h * g, g)]
      )
  else:
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, h, pl.ds(tile * ROWS, ROWS)])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(
  q_ref,
  do_ref,
  lse_ref,
  dl_ref,
  k_ref,
  v_ref,
  tiles_ref,
  plo_ref,
  phi_ref,
  iblk_ref,
  istart_ref,
  icnt_ref,
  shift_ref,
  smin_ref,
  dk_ref,
  dv_ref,
  k_smem,
  v_smem,
  q_smem,
  do_smem,
  lse_smem,
  dl_smem,
  kv_bar,
  q_bar,
  shift_smem,
  *,
  num_heads: int,
  num_blocks: int,
  g: int,
  scale2: float,
  stages: int,
  dtype,
  direct: bool,
  has_docs: bool,
  bs: int,
):
  """One CTA: key tile ``half`` of work item ``item`` of ``bh`` (a KV block and a run of its
  query tiles).

  The key tile is ``KEY_TILE = 64`` keys (the wgmma M of ``Sᵀ = K Qᵀ``): a 128-key block is two
  CTAs (``half`` 0/1, same query tiles); a 32-key block reads the 64 keys from its start and
  masks the last 32 (half the MMA work is wasted). SMEM: ``k_smem [64, Dk]`` (reused for dK),
  ``v_smem [64, Dv]`` (reused for dV), rings ``q_smem [S, 64, Dk]`` and ``do_smem [S, 64, Dv]``;
  accumulators ``dk [64, Dk]``, ``dv [64, Dv]`` float32 in registers.
  """
  item = lax.axis_index("item")
  half = lax.axis_index("half")
  bh = lax.axis_index("bh")
  b = lax.div(bh, jnp.int32(num_heads))
  h = lax.rem(bh, jnp.int32(num_heads))
  r = ROWS // g
  kt = KEY_TILE
  blk = jnp.minimum(iblk_ref[b, h, item], num_blocks - 1)  # unused items: count 0
  start = istart_ref[b, h, item]
  count = icnt_ref[b, h, item]
  key0 = blk * bs + half * kt  # first key of tile
  keys = pl.ds(key0, kt)
  plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem, kv_bar)
  plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem, kv_bar)

  def fetch(j, slot):
    tile = tiles_ref[b, h, start + j]
    _copy_rows(
      ((q_ref, q_smem.at[slot]), (do_ref, do_smem.at[slot])),
      b,
      h,
      tile,
      q_bar.at[slot],
      direct=direct,
      g=g,
    )
    _copy_rows(
      ((lse_ref, lse_smem.at[slot]), (dl_ref, dl_smem.at[slot])),
      b,
      h,
      tile,
      q_bar.at[slot],
      direct=False,
      g=g,
    )
    if has_docs:
      plgpu.copy_gmem_to_smem(
        shift_ref.at[b, pl.ds(tile * ROWS, ROWS)], shift_smem.at[slot], q_bar.at[slot]
      )

  for s in range(stages):
    pl.when(s < count)(functools.partial(fetch, jnp.int32(s), s))

  layout = plgpu.Layout.WGMMA
  key_ids = plgpu.broadcasted_iota(jnp.int32, (kt, ROWS), 0, layout=layout)  # [64 keys, 64 rows]
  row_tok = lax.div(
    plgpu.broadcasted_iota(jnp.int32, (kt, ROWS), 1, layout=layout), jnp.int32(g)
  )  # token of each column
  need_lo, need_hi = need_words(0, r)
  dk = plgpu.layout_cast(jnp.full((kt, k_smem.shape[-1]), 0.0, jnp.float32), layout)
  dv = plgpu.layout_cast(jnp.full((kt, v_smem.shape[-1]), 0.0, jnp.float32), layout)
  plgpu.barrier_wait(kv_bar)

  def masked(st, t_base, lo, hi, shift):
    word = jnp.where(row_tok < 32, lo, hi)
    bit = jnp.where(row_tok < 32, row_tok, row_tok - 32)
    member = (lax.shift_right_logical(word, bit) & 1) == 1
    if shift is None:
      visible = member & (key_ids + key0 <= row_tok + t_base)
    else:  # packed documents: the column's padded position
      pos = row_tok + t_base + lax.broadcast_in_dim(shift, st.shape, [1])
      visible = member & (key_ids + key0 <= pos)
    if bs < kt:  # keys past the block belong to the next one
      visible = visible & (key_ids < bs)
    return jnp.where(visible, st, -jnp.inf)

  def step(j, carry):
    dk, dv = carry
    slot = lax.rem(j, jnp.int32(stages))
    pos = start + j
    tile = tiles_ref[b, h, pos]
    lo, hi = plo_ref[b, h, pos], phi_ref[b, h, pos]
    plgpu.barrier_wait(q_bar.at[slot])

    def kq(acc_ref):
      plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    st = pl.run_scoped(kq, plgpu.ACC((kt, ROWS), jnp.float32))  # [keys, rows]
    t_base = tile * r
    shift = plgpu.load(shift_smem.at[slot], layout=layout.reduce(0)) if has_docs else None
    if bs >= kt:  # no mask on pairs every row fully sees
      if has_docs:
        last = t_base + smin_ref[b, tile]  # smallest padded position of the tile's rows
      else:
        last = t_base
      full = (key0 + (kt - 1) <= last) & ((lo & need_lo) == need_lo) & ((hi & need_hi) == need_hi)
      st = lax.cond(full, lambda x: x, lambda x: masked(x, t_base, lo, hi, shift), st)
    else:
      st = masked(st, t_base, lo, hi, shift)
    lse2 = plgpu.load(lse_smem.at[slot], layout=layout.reduce(0))  # [64 rows]
    pt = jnp.exp2(st * scale2 - lax.broadcast_in_dim(lse2, st.shape, [1]))

    def pdo_vdo(refs):
      dv_ref, dpt_ref = refs
      plgpu.wgmma(dv_ref, pt.astype(dtype), do_smem.at[slot])  # dV += Pᵀ dO
      plgpu.wgmma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))  # dPᵀ = V dOᵀ

    zeros = plgpu.layout_cast(jnp.full((kt, ROWS), 0.0, jnp.float32), layout)
    dv, dpt = pl.run_state(pdo_vdo)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
    delta = plgpu.load(dl_smem.at[slot], layout=layout.reduce(0))
    dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))

    def dsq(acc_ref):
      plgpu.wgmma(acc_ref, dst.astype(dtype), q_smem.at[slot])  # dK += dSᵀ Q

    dk = pl.run_state(dsq)(plgpu.ACC.init(dk))
    nxt = j + stages
    pl.when(nxt < count)(lambda: fetch(nxt, slot))
    return dk, dv

  dk, dv = lax.fori_loop(0, count, step, (dk, dv))
  k_smem[...] = dk.astype(dtype)  # unscaled: the caller multiplies by scale
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  n_out = min(bs, kt)
  out_rows = pl.ds(item * bs + half * kt, n_out)
  k_out, v_out = (
    (k_smem, v_smem) if n_out == kt else (k_smem.at[pl.ds(0, n_out)], v_smem.at[pl.ds(0, n_out)])
  )
  plgpu.copy_smem_to_gmem(k_out, dk_ref.at[b, h, out_rows])
  plgpu.copy_smem_to_gmem(v_out, dv_ref.at[b, h, out_rows])
  plgpu.wait_smem_to_gmem(0)


def backward(
  q,
  k,
  v,
  o,
  lse,
  do,
  block_indices,
  *,
  softmax_scale: float,
  mode: str,
  shift=None,
  cfg: BwdConfig | None = None,
  block_size: int = BLOCK_SIZE,
):
  """Gradients of selected-block attention from the forward's ``o`` and ``lse``.

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (bf16/f16, as the
      forward; ``Dk``, ``Dv`` multiples of 64, see :mod:`pallas_kernels.selected_attention_dims`).
    o: ``[B, T, HQ, Dv]`` forward output; lse: ``[B, T, HQ]`` float32 natural-log LSE
      (``-inf`` where a row saw no key); do: ``[B, T, HQ, Dv]`` output cotangent.
    block_indices: ``[B, T, H, n]`` the forward's selection.
    softmax_scale: the forward's scale (> 0).
    shift: optional ``[B, T]`` int32 padded-position shift of each query (packed documents;
      ``k``/``v`` and ``block_indices`` are then in the padded layout of
      :mod:`pallas_kernels.packed_layout`: ``k [B, NB*bs, H, Dk]``, and ``dk``/``dv`` come back
      in that layout).
    mode: ``"exact"`` or ``"shared"`` (tokens of each aligned run of ``64 // G`` use their
      first token's list, as in the forward's 64-row tiles).
    cfg: the kernels' static parameters (default :class:`BwdConfig` ``()``).
    block_size: KV block size (32, 64 or 128).

  Returns:
    ``(dq, dk, dv)`` in the input dtype.
  """
  cfg = BwdConfig() if cfg is None else cfg
  t, hq = q.shape[1], q.shape[2]
  direct = cfg.direct and use_direct(hq // k.shape[2])
  ops = prepare_backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    block_indices,
    mode=mode,
    chunk=cfg.chunk,
    direct=direct,
    shift=shift,
    block_size=block_size,
  )
  dq = dq_call(
    ops,
    softmax_scale=softmax_scale,
    seq_len=t,
    num_q_heads=hq,
    cfg=cfg,
    direct=direct,
    block_size=block_size,
  )
  dk, dv = dkv_call(
    ops,
    softmax_scale=softmax_scale,
    seq_len=t,
    num_q_heads=hq,
    cfg=cfg,
    direct=direct,
    block_size=block_size,
  )
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def dq_call(
  ops: BwdOperands,
  *,
  softmax_scale: float,
  seq_len: int,
  num_q_heads: int,
  cfg: BwdConfig,
  direct: bool,
  block_size: int = BLOCK_SIZE,
):
  """The dQ kernel on prepared operands: ``[B, T, HQ, Dk]`` float32."""
  b, _, h, dk = ops.kp.shape
  dv = ops.vp.shape[-1]
  g = num_q_heads // h
  t = seq_len
  bs = block_size
  transforms = smem_transforms(bs)
  qx, dox, lsex, dlx, kp, vp, lists, _, docs = ops
  has_docs = docs is not None
  docs = docs if has_docs else no_docs(b)
  dtype = qx.dtype
  nt, length = lists.ids.shape[2:]
  scale2 = float(softmax_scale) * LOG2E
  params = plgpu.CompilerParams(approx_math=True)
  stages_dq = dims.fit_stages(
    "dq",
    max(1, min(cfg.num_stages, length)),
    dk=dk,
    dv=dv,
    length=length,
    block_size=bs,
    itemsize=jnp.dtype(dtype).itemsize,
    has_docs=has_docs,
  )
  arrivals = 2 * (ROWS // g) + 2 if direct else 4
  dq_kernel = functools.partial(
    _dq_kernel,
    num_heads=h,
    g=g,
    scale2=scale2,
    stages=stages_dq,
    dtype=dtype,
    direct=direct,
    has_docs=has_docs,
    bs=bs,
  )
  dqx = plgpu.kernel(
    dq_kernel,
    out_type=jax.ShapeDtypeStruct(qx.shape, dtype),
    scratch_types=[
      plgpu.SMEM((ROWS, dk), dtype, transforms=transforms),
      plgpu.SMEM((ROWS, dv), dtype, transforms=transforms),
      plgpu.SMEM((ROWS,), jnp.float32),
      plgpu.SMEM((ROWS,), jnp.float32),
      plgpu.SMEM((stages_dq, bs, dk), dtype, transforms=transforms),
      plgpu.SMEM((stages_dq, bs, dv), dtype, transforms=transforms),
      plgpu.Barrier(num_arrivals=arrivals + int(has_docs)),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages_dq),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages_dq),
      plgpu.SMEM((ROWS,), jnp.int32),
    ],
    grid=(nt, b * h),
    grid_names=("tile", "bh"),
    compiler_params=params,
  )(qx, dox, lsex, dlx, kp, vp, lists.ids, lists.counts, lists.member_lo, lists.member_hi, *docs)
  dq = dqx[:, :t] if direct else from_tiles(dqx, t, g)
  return dq.astype(jnp.float32) * softmax_scale


def dkv_call(
  ops: BwdOperands,
  *,
  softmax_scale: float,
  seq_len: int,
  num_q_heads: int,
  cfg: BwdConfig,
  direct: bool,
  block_size: int = BLOCK_SIZE,
):
  """The dK/dV kernel on prepared operands, partials reduced: ``[B, Tk, H, Dk]`` and
  ``[B, Tk, H, Dv]`` float32 (``Tk = T``, or with packed documents the padded layout's
  ``NB * bs``)."""
  b, _, h, dk = ops.kp.shape
  dv = ops.vp.shape[-1]
  g = num_q_heads // h
  t = seq_len
  bs = block_size
  kt = KEY_TILE
  halves = max(1, bs // kt)  # key tiles (CTAs) per block
  nb = (ops.kp.shape[1] - max(0, kt - bs)) // bs  # cdiv(T, bs), or the padded layout's NB
  qx, dox, lsex, dlx, kp, vp, _, work, docs = ops
  has_docs = docs is not None
  key_len = nb * bs if has_docs else t
  docs = docs if has_docs else no_docs(b)
  dtype = qx.dtype
  scale2 = float(softmax_scale) * LOG2E
  params = plgpu.CompilerParams(approx_math=True)
  arrivals = 2 * (ROWS // g) + 2 if direct else 4
  w = work.item_block.shape[-1]
  stages_kv = dims.fit_stages(
    "dkv",
    max(1, min(cfg.num_stages, cfg.chunk)),
    dk=dk,
    dv=dv,
    length=0,
    block_size=bs,
    itemsize=jnp.dtype(dtype).itemsize,
    has_docs=has_docs,
  )
  dkv_kernel = functools.partial(
    _dkv_kernel,
    num_heads=h,
    num_blocks=nb,
    g=g,
    scale2=scale2,
    stages=stages_kv,
    dtype=dtype,
    direct=direct,
    has_docs=has_docs,
    bs=bs,
  )
  dk_part, dv_part = plgpu.kernel(
    dkv_kernel,
    out_type=(
      jax.ShapeDtypeStruct((b, h, w * bs, dk), dtype),
      jax.ShapeDtypeStruct((b, h, w * bs, dv), dtype),
    ),
    scratch_types=[
      plgpu.SMEM((kt, dk), dtype, transforms=_TRANSFORMS),
      plgpu.SMEM((kt, dv), dtype, transforms=_TRANSFORMS),
      plgpu.SMEM((stages_kv, ROWS, dk), dtype, transforms=_TRANSFORMS),
      plgpu.SMEM((stages_kv, ROWS, dv), dtype, transforms=_TRANSFORMS),
      plgpu.SMEM((stages_kv, ROWS), jnp.float32),
      plgpu.SMEM((stages_kv, ROWS), jnp.float32),
      plgpu.Barrier(num_arrivals=2),
      plgpu.Barrier(num_arrivals=arrivals + int(has_docs), num_barriers=stages_kv),
      plgpu.SMEM((stages_kv, ROWS), jnp.int32),
    ],
    grid=(w, halves, b * h),
    grid_names=("item", "half", "bh"),
    compiler_params=params,
  )(
    qx,
    dox,
    lsex,
    dlx,
    kp,
    vp,
    work.tiles,
    work.member_lo,
    work.member_hi,
    work.item_block,
    work.item_start,
    work.item_count,
    *docs,
  )

  dk = (
    reduce_items(dk_part, work.item_block, num_blocks=nb, seq_len=key_len, block_size=bs)
    * softmax_scale
  )
  dv = reduce_items(dv_part, work.item_block, num_blocks=nb, seq_len=key_len, block_size=bs)
  return dk, dv
