"""Persistent variant of the 128-row selected-attention forward kernel (Hopper, Mosaic GPU).

The per-tile kernel (:func:`pallas_kernels.selected_attention_kernel_sm90.forward_128_kernel`)
launches one CTA per 128-row query tile; at the standard shape a tile walks only ~16 K/V blocks, so each
CTA's serial prologue (Q, list and first K/V loads) and epilogue (O/LSE store) are a large part of
its life, and with one 128-row CTA per SM (the compute warpgroups take 232 registers a thread)
nothing hides them. Here the grid is one CTA per SM (``num_ctas``) and each CTA walks the work
items ``w = sm, sm + num_ctas, ...`` (``w = bh * NT + tile``, so neighbouring CTAs share K/V in L2):

* the producer warpgroup loads item ``i``'s Q, list and membership words into buffer ``i % 2``
  (double buffered, released by the two compute warpgroups through the ``free`` barriers when
  they finish the item's K/V loop) and streams its K/V blocks through ONE ring whose slot
  counter runs on across items, so item ``i + 1``'s first blocks and Q arrive while the
  compute warpgroups still work on item ``i``;
* O and LSE are staged in their own SMEM buffer; the store of item ``i`` is only waited for
  (read side) before item ``i + 1`` writes its O, so it overlaps the next item's loop.

The math per item (masking, online softmax, ping-pong schedule) is that of ``forward_128_kernel``.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selected_attention_common import (
  LN2,
  LOG2E,
  TILE_ROWS,
  need_words,
  row_tokens,
  smem_transforms,
  ws_consumer_step,
)

DEFAULT_NUM_CTAS = 132
"""CTAs when the device does not say how many SMs it has (H100 SXM: 132; H200: 132)."""


def device_num_ctas() -> int:
  """SMs of the default device (one persistent CTA each), or :data:`DEFAULT_NUM_CTAS` when it is
  not a GPU (cross-lowering on a CPU machine)."""
  dev = jax.devices()[0]
  n = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
  return int(n) if n else DEFAULT_NUM_CTAS


def list_row(length: int) -> int:
  """Entries per SMEM row of a double-buffered tile list: ``length`` rounded up to 32 int32, so
  that buffer 1 starts 128-byte aligned (a TMA destination must; 8-entry rows misaligned it)."""
  return -(-length // 32) * 32


def _kernel(
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
  num_tiles: int,
  num_items: int,
  num_ctas: int,
  g: int,
  cfg,
  dtype,
):
  """One persistent CTA. Refs as in :func:`pallas_kernels.selected_attention_kernel_sm90.forward_128_kernel`
  (``num_tiles`` = NT 128-row tiles per (batch, KV head); ``num_items = B * H * NT``)."""
  sm = lax.axis_index("sm")
  rows_wg = TILE_ROWS
  r_wg = rows_wg // g
  bs = cfg.block_size
  stages = cfg.num_stages
  dk, dv = q_ref.shape[-1], v_ref.shape[-1]
  length = ids_ref.shape[-1]
  direct = cfg.q_layout == "direct"
  n_local = lax.div(jnp.int32(num_items + num_ctas - 1) - sm, jnp.int32(num_ctas))

  def item(i):
    """``(b, h, tile)`` of this CTA's ``i``-th work item."""
    w = sm + i * num_ctas
    bh = lax.div(w, jnp.int32(num_tiles))
    return (
      lax.div(bh, jnp.int32(num_heads)),
      lax.rem(bh, jnp.int32(num_heads)),
      lax.rem(w, jnp.int32(num_tiles)),
    )

  def q_rows(tile, w):
    return pl.ds(tile * (2 * rows_wg) + w * rows_wg, rows_wg)

  def body(
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    lse_smem,
    q_bar,
    k_bar,
    v_bar,
    consumed,
    sched,
    free,
    ids_smem,
    lo_smem,
    hi_smem,
    idx_bar,
    shift_smem,
  ):
    wg = lax.axis_index("wg")
    pp = cfg.ping_pong

    def schedule_barrier():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      layout = plgpu.Layout.WGMMA
      col_ids, tok = row_tokens(g, bs)
      scale2 = cfg.softmax_scale * LOG2E
      need0, need1 = need_words(0, r_wg), need_words(r_wg, r_wg)
      need = tuple(jnp.where(wg == 0, jnp.int32(a), jnp.int32(c)) for a, c in zip(need0, need1))

      def run_item(i, base):
        b, h, tile = item(i)
        buf = lax.rem(i, jnp.int32(2))
        count = cnt_ref[b, h, tile]
        t_first = tile * (2 * r_wg) + wg * r_wg  # first token of wg
        q_cur = q_smem.at[buf, wg]
        m_i = plgpu.layout_cast(jnp.full((rows_wg,), -jnp.inf, jnp.float32), layout.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((rows_wg,), 0.0, jnp.float32), layout.reduce(1))
        acc = plgpu.layout_cast(jnp.full((rows_wg, dv), 0.0, jnp.float32), layout)
        plgpu.barrier_wait(q_bar.at[buf])
        plgpu.barrier_wait(idx_bar.at[buf])
        docs = {}
        if cfg.has_docs:
          docs = {
            "shift": plgpu.load(shift_smem.at[buf, wg], layout=layout.reduce(1)),
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
          slot = lax.rem(base + j, jnp.int32(stages))
          return ws_consumer_step(
            carry,
            slot=slot,
            blk=ids_smem[buf, j],
            read_words=lambda: (lo_smem[buf, j], hi_smem[buf, j]),
            q_smem=q_cur,
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
        plgpu.barrier_arrive(free.at[buf])  # Q, list and docs of `buf` are read
        seen = l_i > 0.0
        l_div = jnp.where(seen, l_i, 1.0)
        acc = acc / lax.broadcast_in_dim(l_div, acc.shape, [0])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's O/LSE are out
        o_smem.at[wg][...] = acc.astype(dtype)
        lse_smem.at[wg][...] = jnp.where(
          seen, (m_i * scale2 + jnp.log(l_div) * LOG2E) * LN2, -jnp.inf
        )
        plgpu.commit_smem()
        if direct:
          for t in range(r_wg):
            plgpu.copy_smem_to_gmem(
              o_smem.at[wg, pl.ds(t * g, g)], o_ref.at[b, t_first + t, pl.ds(h * g, g)]
            )
            plgpu.copy_smem_to_gmem(
              lse_smem.at[wg, pl.ds(t * g, g)], lse_ref.at[b, t_first + t, pl.ds(h * g, g)]
            )
        else:
          plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, h, q_rows(tile, wg)])
          plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, q_rows(tile, wg)])
        return base + count

      lax.fori_loop(0, n_local, run_item, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def load_item(i, base):
        b, h, tile = item(i)
        buf = lax.rem(i, jnp.int32(2))
        pl.when(i >= 2)(lambda: plgpu.barrier_wait(free.at[buf]))  # item i - 2 is done
        for src, dst in ((ids_ref, ids_smem), (lo_ref, lo_smem), (hi_ref, hi_smem)):
          plgpu.copy_gmem_to_smem(
            src.at[b, h, tile], dst.at[buf, pl.ds(0, length)], idx_bar.at[buf]
          )
        for w in range(2):
          if direct:
            t_first = tile * (2 * r_wg) + w * r_wg
            for t in range(r_wg):
              plgpu.copy_gmem_to_smem(
                q_ref.at[b, t_first + t, pl.ds(h * g, g)],
                q_smem.at[buf, w, pl.ds(t * g, g)],
                q_bar.at[buf],
              )
          else:
            plgpu.copy_gmem_to_smem(
              q_ref.at[b, h, q_rows(tile, w)], q_smem.at[buf, w], q_bar.at[buf]
            )
          if cfg.has_docs:
            plgpu.copy_gmem_to_smem(
              shift_ref.at[b, q_rows(tile, w)], shift_smem.at[buf, w], q_bar.at[buf]
            )
        count = cnt_ref[b, h, tile]
        plgpu.barrier_wait(idx_bar.at[buf])

        def produce(j, _):
          n = base + j
          slot = lax.rem(n, jnp.int32(stages))
          pl.when(n >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
          keys = pl.ds(ids_smem[buf, j] * bs, bs)
          plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])
          return _

        lax.fori_loop(0, count, produce, None)
        return base + count

      lax.fori_loop(0, n_local, load_item, jnp.int32(0))

  transforms = smem_transforms(bs)
  row = list_row(length)
  q_arrivals = 2 * ((r_wg if direct else 1) + int(cfg.has_docs))
  pl.run_scoped(
    body,
    plgpu.SMEM((2, 2, rows_wg, dk), dtype, transforms=transforms),  # Q [buf, wg]
    plgpu.SMEM((stages, bs, dk), dtype, transforms=transforms),
    plgpu.SMEM((stages, bs, dv), dtype, transforms=transforms),
    plgpu.SMEM((2, rows_wg, dv), dtype, transforms=transforms),  # O [wg]
    plgpu.SMEM((2, rows_wg), jnp.float32),  # LSE [wg]
    plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=2),
    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    plgpu.Barrier(num_arrivals=2),
    plgpu.Barrier(num_arrivals=2, num_barriers=2),  # free [buf]
    plgpu.SMEM((2, row), jnp.int32),  # lists [buf]
    plgpu.SMEM((2, row), jnp.int32),
    plgpu.SMEM((2, row), jnp.int32),
    plgpu.Barrier(num_arrivals=3, num_barriers=2),
    plgpu.SMEM((2, 2, rows_wg), jnp.int32),  # docs [buf, wg]
    collective_axes="wg",
  )


def call(
  args,
  out_type,
  cfg,
  *,
  num_heads: int,
  num_tiles: int,
  batch: int,
  dtype,
  num_ctas: int | None = None,
):
  """Runs the persistent kernel on :func:`pallas_kernels.selected_attention_kernel_sm90.call_kernel`'s
  operands ``args`` (``cfg`` resolved, ring depth fitted with ``"fwd128p"``)."""
  num_items = batch * num_heads * num_tiles
  num_ctas = max(1, min(num_ctas or device_num_ctas(), num_items))
  kernel = functools.partial(
    _kernel,
    num_heads=num_heads,
    num_tiles=num_tiles,
    num_items=num_items,
    num_ctas=num_ctas,
    g=cfg.group_size,
    cfg=cfg,
    dtype=dtype,
  )
  return plgpu.kernel(
    kernel,
    out_type=out_type,
    grid=(num_ctas,),
    grid_names=("sm",),
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
