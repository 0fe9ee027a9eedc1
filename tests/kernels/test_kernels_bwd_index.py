"""The backward kernels' XLA-side plumbing on CPU: work items of the inverse map, and a numpy
emulation of the dQ and dK/dV kernel loops on exactly the operands the kernels receive, checked
against ``jax.grad`` of the float32 reference. (The Mosaic GPU kernels themselves cannot run on
CPU: GPU interpret mode has no ``wgmma``; they are cross-lowered in
``test_kernels_mgpu_lowering.py`` and checked numerically on the GPU by
``test_kernels_mgpu_gpu.py``.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import packed_checks as pc
import pytest

from pallas_kernels import packed_layout as packed
from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_mgpu as mg
from pallas_kernels import selected_attention_vjp_common as vc
from pallas_kernels.selection_tiles import inverse_work_items, tile_iteration_lists
from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.selected import selected_mask
from sparse_attention_jax.ops.selection import share_selection

BS = 64


def _selection(key, b, t, h, n, bs=BS):
  """Random ids in ``[0, current block]`` with -1 padding, duplicates and a future block."""
  k1, k2, k3 = jax.random.split(key, 3)
  cur = (jnp.arange(t, dtype=jnp.int32) // bs)[None, :, None, None]
  ids = jnp.floor(jax.random.uniform(k1, (b, t, h, n)) * (cur + 1)).astype(jnp.int32)
  ids = jnp.where(jax.random.uniform(k2, ids.shape) < 0.15, -1, ids)
  ids = jnp.where(jax.random.uniform(k3, ids.shape) < 0.03, cur + 1, ids)
  ids = ids.at[..., 0].set(0)  # every tile: block 0
  return ids.at[..., -1].set(ids[..., 1])


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_work_items_cover_every_pair_once(chunk):
  b, t, h, n, r = 2, 600, 2, 5, 4
  bi = _selection(jax.random.key(chunk), b, t, h, n)
  lists = tile_iteration_lists(bi, tokens_per_tile=r, block_size=BS, max_len=12)
  nb = -(-t // BS)
  work = inverse_work_items(lists, nb, chunk=chunk)
  nt = lists.ids.shape[2]
  assert work.item_block.shape == (b, h, 2 * nb)
  assert np.array_equal(
    np.asarray(work.item_block)[..., :nb], np.broadcast_to(np.arange(nb), (b, h, nb))
  )
  ids, counts = np.asarray(lists.ids), np.asarray(lists.counts)
  lo, hi = np.asarray(lists.member_lo), np.asarray(lists.member_hi)
  wb, ws, wc = (np.asarray(x) for x in (work.item_block, work.item_start, work.item_count))
  wt, wlo, whi = (np.asarray(x) for x in (work.tiles, work.member_lo, work.member_hi))
  for bb in range(b):
    for hh in range(h):
      want = sorted(
        (ids[bb, hh, ti, j], ti, lo[bb, hh, ti, j], hi[bb, hh, ti, j])
        for ti in range(nt)
        for j in range(counts[bb, hh, ti])
      )
      got, seen_blocks = [], set()
      cap = max(chunk, -(-len(want) // nb))  # item size bound
      for w in range(wb.shape[-1]):
        blk, start, cnt = wb[bb, hh, w], ws[bb, hh, w], wc[bb, hh, w]
        assert 0 <= cnt <= cap
        if blk == nb:
          assert cnt == 0
          continue
        seen_blocks.add(blk)
        tiles = wt[bb, hh, start : start + cnt]
        assert np.all(np.diff(tiles) > 0)  # ascending, distinct
        got += [
          (blk, ti, wlo[bb, hh, p], whi[bb, hh, p])
          for p, ti in zip(range(start, start + cnt), tiles)
        ]
      assert sorted(got) == want
      assert seen_blocks == set(range(nb))  # one item at least
      zero_pairs = sum(1 for p in want if p[0] == 0)
      zero_items = sum(1 for w in range(2 * nb) if wb[bb, hh, w] == 0 and wc[bb, hh, w] > 0)
      assert zero_items == -(-zero_pairs // cap)  # block 0 is split


def _normal(seed):
  """Fresh float32 normal draws from numpy (no XLA compile per shape)."""
  rng = np.random.default_rng(seed)
  return lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _emulate(ops: vc.BwdOperands, *, g, scale, t, nb, bs=BS, key_len=None):
  """The two kernels' loops in numpy on the kernels' own operands: dQ per (tile, listed block)
  over the block's ``bs`` keys; dK/dV per (work item, 64-key tile) as the kernel's CTAs do
  (two tiles per 128-key block; one 64-key window with the keys past the block masked for a
  32-key block), reading K/V rows as the kernel does (so missing padding fails here). With
  packed documents (``ops.docs``) keys are in the padded layout, a row sees ``key <= t +
  shift`` and dK/dV come back as ``key_len`` padded rows."""
  qx, dox, lsex, dlx, kp, vp = (np.asarray(x, np.float64) for x in ops[:6])
  ids, counts, lo, hi = (np.asarray(x) for x in ops.lists)
  work = [np.asarray(x) for x in ops.work]
  b, h = qx.shape[:2]
  dk, dv = kp.shape[-1], vp.shape[-1]
  r = 64 // g
  kt = vc.KEY_TILE
  scale2 = scale * np.log2(np.e)
  tok = np.arange(64) // g
  shift = None if ops.docs is None else np.asarray(ops.docs[0])  # [B, NT*64]

  def mask(bb, blk, key0, nkeys, tile, lo_w, hi_w):  # [64 rows, nkeys keys]
    word = np.where(tok < 32, lo_w, hi_w).astype(np.int64) & 0xFFFFFFFF
    member = (word >> np.where(tok < 32, tok, tok - 32)) & 1
    t_abs = tile * r + tok
    if shift is not None:
      t_abs = t_abs + shift[bb, tile * 64 : (tile + 1) * 64]
    key = key0 + np.arange(nkeys)[None, :]
    return member[:, None].astype(bool) & (key <= t_abs[:, None]) & (key < (blk + 1) * bs)

  def probs(bb, hh, blk, key0, nkeys, tile, lo_w, hi_w):
    rows = slice(tile * 64, tile * 64 + 64)
    k = kp[bb, key0 : key0 + nkeys, hh]
    v = vp[bb, key0 : key0 + nkeys, hh]
    s = np.where(mask(bb, blk, key0, nkeys, tile, lo_w, hi_w), qx[bb, hh, rows] @ k.T, -np.inf)
    p = np.exp2(s * scale2 - lsex[bb, hh, rows, None])
    dp = dox[bb, hh, rows] @ v.T
    return p, p * (dp - dlx[bb, hh, rows, None]), rows, k

  dqx = np.zeros_like(qx)
  for bb in range(b):
    for hh in range(h):
      for tile in range(ids.shape[2]):
        for j in range(counts[bb, hh, tile]):
          blk = ids[bb, hh, tile, j]
          _, ds, rows, k = probs(
            bb, hh, blk, blk * bs, bs, tile, lo[bb, hh, tile, j], hi[bb, hh, tile, j]
          )
          dqx[bb, hh, rows] += ds @ k
  tiles, wlo, whi, wblk, wstart, wcnt = work
  w = wblk.shape[-1]
  dk_part = np.zeros((b, h, w * bs, dk))
  dv_part = np.zeros((b, h, w * bs, dv))
  n_out = min(bs, kt)
  for bb in range(b):
    for hh in range(h):
      for it in range(w):
        blk = min(wblk[bb, hh, it], nb - 1)
        for half in range(max(1, bs // kt)):
          key0 = blk * bs + half * kt
          out = slice(it * bs + half * kt, it * bs + half * kt + n_out)
          for p in range(wstart[bb, hh, it], wstart[bb, hh, it] + wcnt[bb, hh, it]):
            pr, ds, rows, _ = probs(
              bb, hh, blk, key0, kt, tiles[bb, hh, p], wlo[bb, hh, p], whi[bb, hh, p]
            )
            dv_part[bb, hh, out] += (pr.T @ dox[bb, hh, rows])[:n_out]
            dk_part[bb, hh, out] += (ds.T @ qx[bb, hh, rows])[:n_out]
  dq = common.from_tiles(jnp.asarray(dqx, jnp.float32), t, g) * scale
  seq = t if key_len is None else key_len
  reduce = functools.partial(vc.reduce_items, num_blocks=nb, seq_len=seq, block_size=bs)
  dk = reduce(jnp.asarray(dk_part, jnp.float32), ops.work.item_block) * scale
  dv = reduce(jnp.asarray(dv_part, jnp.float32), ops.work.item_block)
  return dq, dk, dv


def _packed_emulation(q, k, v, do, seg, *, g, mode, chunk, bs, n, seed):
  """Packed rows: random document-relative ids, the kernels' padded operands
  (``mg.packed_operands``) and the emulated backward, against ``jax.vjp`` of the
  document-relative reference (:mod:`packed_checks`); dK/dV mapped back to row positions.
  Returns ``(got, want)`` triples of ``(dq, dk, dv)``."""
  t, h = q.shape[1], k.shape[2]
  bi = pc.relative_selection(np.random.default_rng(seed), seg, h, n, block_size=bs)
  bi = bi.at[:, 64:80].set(-1)  # tokens that see nothing
  run = common.tokens_per_tile(g) if mode == "shared" else None
  scale = q.shape[-1] ** -0.5
  attn = lambda q, k, v: pc.reference(q, k, v, bi, seg, block_size=bs, scale=scale, shared_run=run)
  (o, lse), vjp = jax.vjp(attn, q, k, v)
  want = vjp((do, jnp.zeros_like(lse)))
  assert bool(jnp.any(jnp.isneginf(lse)))
  tuning = mg.TuningConfig(mode=mode, block_size=bs)
  assert bool(mg.documents_fit(seg, tuning))
  cfg = mg.kernel_config(tuning, softmax_scale=scale, group_size=g, has_docs=True)
  kp, vp, bip, shift, cfg = mg.packed_operands(k, v, bi, seg, cfg, tuning)
  ops = vc.prepare_backward(
    q, kp, vp, o, lse, do, bip, mode=cfg.mode, chunk=chunk, shift=shift, block_size=bs
  )
  nbp = kp.shape[1] // bs
  dq, dkp, dvp = _emulate(ops, g=g, scale=scale, t=t, nb=nbp, bs=bs, key_len=nbp * bs)
  pos = np.asarray(
    packed.padded_positions(packed.packed_layout(seg, block_size=bs, num_blocks=nbp))
  )
  back = lambda x: np.take_along_axis(np.asarray(x), pos[..., None, None], axis=1)
  return (dq, back(dkp), back(dvp)), want


@pytest.mark.parametrize(
  "g,mode,chunk,docs",
  [
    (4, "exact", 3, False),
    (16, "shared", 2, False),
    (3, "exact", 50, False),
    (4, "exact", 3, True),
    (16, "shared", 4, True),
  ],
)
def test_emulated_kernels_match_reference_grads(g, mode, chunk, docs):
  b, t, h, d, n = 1, 333, 2, 16, 4
  kq, kk, kv, ki, kw = jax.random.split(jax.random.key(g), 5)
  q = jax.random.normal(kq, (b, t, h * g, d), jnp.float32)
  k = jax.random.normal(kk, (b, t, h, d), jnp.float32)
  v = jax.random.normal(kv, (b, t, h, d), jnp.float32)
  do = jax.random.normal(kw, (b, t, h * g, d), jnp.float32)
  if docs:  # documents start mid-block and mid-tile; one of length 1
    seg = jnp.cumsum(jnp.zeros((b, t), jnp.int32).at[:, [37, 90, 91, 200]].set(1), axis=1) * 3
    got, want = _packed_emulation(q, k, v, do, seg, g=g, mode=mode, chunk=chunk, bs=BS, n=n, seed=g)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=name)
    return
  bi = _selection(ki, b, t, h, n).at[:, 64:80].set(-1)  # tokens that see nothing
  bi_ref = share_selection(bi, common.tokens_per_tile(g)) if mode == "shared" else bi
  scale = d**-0.5
  mask = selected_mask(bi_ref, block_size=BS, seq_len=t)
  attn = lambda q, k, v: masked_attention(q, k, v, mask, scale)
  (o, lse), vjp = jax.vjp(attn, q, k, v)
  want = vjp((do, jnp.zeros_like(lse)))
  assert bool(jnp.any(jnp.isneginf(lse)))
  ops = vc.prepare_backward(q, k, v, o, lse, do, bi, mode=mode, chunk=chunk)
  got = _emulate(ops, g=g, scale=scale, t=t, nb=-(-t // BS))
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("g,dk,dv,mode", [(4, 40, 24, "exact"), (16, 24, 40, "shared")])
def test_emulated_kernels_with_padded_head_dims_match_reference_grads(g, dk, dv, mode):
  """Dk != Dv and the wrapper's zero padding (to multiples of 16 here, of 64 in the kernels):
  the kernels' loops on padded operands, sliced, give the unpadded reference's gradients."""
  b, t, h, n = 1, 200, 1, 4
  normal = _normal(100 + g)
  q, k, v, do = (
    normal(b, t, h * g, dk),
    normal(b, t, h, dk),
    normal(b, t, h, dv),
    normal(b, t, h * g, dv),
  )
  bi = _selection(jax.random.key(g), b, t, h, n)
  bi_ref = share_selection(bi, common.tokens_per_tile(g)) if mode == "shared" else bi
  scale = dk**-0.5  # the unpadded Dk
  mask = selected_mask(bi_ref, block_size=BS, seq_len=t)
  attn = lambda q, k, v: masked_attention(q, k, v, mask, scale)
  (o, lse), vjp = jax.vjp(attn, q, k, v)
  want = vjp((do, jnp.zeros_like(lse)))
  pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, -(-x.shape[-1] // 16) * 16 - x.shape[-1]),))
  qp, kp, vp = (pad(x) for x in (q, k, v))
  assert qp.shape[-1] > dk and vp.shape[-1] > dv
  (o_p, lse_p), _ = jax.vjp(attn, qp, kp, vp)
  np.testing.assert_allclose(np.asarray(o_p[..., :dv]), np.asarray(o), rtol=1e-5, atol=1e-5)
  ops = vc.prepare_backward(qp, kp, vp, o_p, lse_p, pad(do), bi, mode=mode, chunk=3)
  dq, dk_, dv_ = _emulate(ops, g=g, scale=scale, t=t, nb=-(-t // BS))
  assert dq.shape[-1] == qp.shape[-1] and dk_.shape[-1] == kp.shape[-1]
  assert dv_.shape[-1] == vp.shape[-1]
  for name, a in (("dq pad", dq[..., dk:]), ("dk pad", dk_[..., dk:]), ("dv pad", dv_[..., dv:])):
    np.testing.assert_allclose(np.asarray(a), 0.0, atol=1e-6, err_msg=name)
  got = (dq[..., :dk], dk_[..., :dk], dv_[..., :dv])
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=name)


def test_shift_tiles_rows_and_group_min():
  shift = jnp.asarray([[0, 0, 0, 61, 61, 7, 7, 7, 9, 9]], jnp.int32)
  rows, gmin = common.shift_tiles(shift, 16, 12)  # r = 4 tokens per group
  rows, gmin = np.asarray(rows), np.asarray(gmin)
  assert rows.shape == (1, 3 * 64) and gmin.tolist() == [[0, 7, 0]]  # padded tokens count 0
  np.testing.assert_array_equal(rows[0, 16 * 3 : 16 * 4], 61)  # token 3, all 16 heads
  np.testing.assert_array_equal(rows[0, 64 + 16 : 64 + 32], 7)  # token 5
  np.testing.assert_array_equal(rows[0, 128 : 128 + 32], 9)  # tokens 8, 9
  np.testing.assert_array_equal(rows[0, 128 + 32 : 128 + 64], 0)  # padded tokens 10, 11


@pytest.mark.parametrize(
  "bs,g,mode,docs", [(32, 4, "exact", True), (128, 8, "shared", True), (32, 16, "shared", False)]
)
def test_emulated_kernels_match_reference_grads_block_sizes(bs, g, mode, docs):
  """Block sizes 32 and 128: lists, work items, the dK/dV key tiles and the reduction."""
  b, t, h, d, n = 1, 300, 1, 16, 4
  normal = _normal(bs + g)
  q, k, v, do = (
    normal(b, t, h * g, d),
    normal(b, t, h, d),
    normal(b, t, h, d + 8),
    normal(b, t, h * g, d + 8),
  )
  if docs:
    seg = jnp.cumsum(jnp.zeros((b, t), jnp.int32).at[:, [37, 150, 201]].set(1), axis=1)
    got, want = _packed_emulation(
      q, k, v, do, seg, g=g, mode=mode, chunk=3, bs=bs, n=n, seed=bs + g
    )
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=name)
    return
  bi = _selection(jax.random.key(bs + g), b, t, h, n, bs)
  bi_ref = share_selection(bi, common.tokens_per_tile(g)) if mode == "shared" else bi
  scale = d**-0.5
  mask = selected_mask(bi_ref, block_size=bs, seq_len=t)
  attn = lambda q, k, v: masked_attention(q, k, v, mask, scale)
  (o, lse), vjp = jax.vjp(attn, q, k, v)
  want = vjp((do, jnp.zeros_like(lse)))
  ops = vc.prepare_backward(q, k, v, o, lse, do, bi, mode=mode, chunk=3, block_size=bs)
  got = _emulate(ops, g=g, scale=scale, t=t, nb=-(-t // bs), bs=bs)
  for name, a, w in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=name)
