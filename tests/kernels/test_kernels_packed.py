"""Packed documents with document-relative block ids, on CPU: the document-aligned padded K/V
layout (:mod:`pallas_kernels.packed_layout`), the padded ids and shifted positions, the tile
lists and dK/dV work items on the padded grid, and an emulation of the masks the kernels apply
(from exactly the operands they receive) against the reference semantics
(:mod:`packed_checks`); plus the public wrapper end to end with a stand-in for the kernels, and
cross-lowering of every kernel with documents."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import packed_checks as pc
import pytest

from pallas_kernels import packed_layout as packed
from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_mgpu as mg
from pallas_kernels import selected_attention_vjp_common as vc
from pallas_kernels.selection_tiles import tile_iteration_lists


def _np_blocks_needed(seg, bs):
  ds = pc.doc_starts(seg)
  out = []
  for row, starts in zip(np.asarray(seg), ds):
    lens = np.diff(np.append(np.unique(starts), len(row)))
    out.append(int(np.sum(-(-lens // bs))))
  return out


@pytest.mark.parametrize("bs", [4, 8, 64])
@pytest.mark.parametrize("num_docs,tiny", [(1, 0), (4, 0), (16, 3), (30, 10)])
def test_padded_layout_places_every_document_at_aligned_blocks(bs, num_docs, tiny):
  rng = np.random.default_rng(bs * 100 + num_docs)
  b, t, h, d = 2, 150, 2, 3
  seg = pc.packed_segments(rng, b, t, num_docs, tiny=tiny)
  need = _np_blocks_needed(seg, bs)
  np.testing.assert_array_equal(packed.packed_blocks_needed(seg, bs), need)
  nb = -(-t // bs)
  assert max(need) <= nb + num_docs - 1
  nbp = max(need) + 1
  lay = packed.packed_layout(seg, block_size=bs, num_blocks=nbp)
  x = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  xp = np.asarray(packed.pad_keys(x, lay))
  assert xp.shape == (b, nbp * bs, h, d)
  ds = pc.doc_starts(seg)
  for bb in range(b):
    filled = np.zeros(nbp * bs, bool)
    blk = 0
    for start in np.unique(ds[bb]):
      length = int(np.sum(ds[bb] == start))
      np.testing.assert_array_equal(
        xp[bb, blk * bs : blk * bs + length], x[bb, start : start + length]
      )
      filled[blk * bs : blk * bs + length] = True
      toks = np.arange(start, start + length)
      np.testing.assert_array_equal(np.asarray(lay.block_start)[bb, toks], blk)
      np.testing.assert_array_equal(np.asarray(lay.shift)[bb, toks], blk * bs - start)
      blk += -(-length // bs)
    assert blk == need[bb]
    np.testing.assert_array_equal(xp[bb, ~filled], 0.0)  # padding keys are zeros
    assert np.all(np.asarray(lay.shift)[bb] >= 0)
  np.testing.assert_array_equal(lay.doc_start, ds)
  np.testing.assert_array_equal(lay.doc_start, common.document_starts(seg, b, t))
  # round trip and the gradient (a gather back, no scatter)
  pos = np.asarray(packed.padded_positions(lay))
  np.testing.assert_array_equal(np.take_along_axis(xp, pos[..., None, None], 1), x)
  cot = jnp.asarray(rng.standard_normal(xp.shape), jnp.float32)
  (dx,) = jax.vjp(lambda x: packed.pad_keys(x, lay), x)[1](cot)
  np.testing.assert_array_equal(dx, np.take_along_axis(np.asarray(cot), pos[..., None, None], 1))


def test_rows_past_the_capacity_are_dropped_not_read_out_of_bounds():
  seg = jnp.asarray(np.repeat(np.arange(10, dtype=np.int32), 3)[None])  # 10 docs of 3 tokens
  assert int(packed.packed_blocks_needed(seg, 4)[0]) == 10
  lay = packed.packed_layout(seg, block_size=4, num_blocks=8)  # 8 blocks: 2 docs do not fit
  x = jnp.arange(30, dtype=jnp.float32).reshape(1, 30, 1, 1) + 1
  xp = np.asarray(packed.pad_keys(x, lay))[0, :, 0, 0]
  np.testing.assert_array_equal(xp.reshape(8, 4)[:, :3].ravel(), np.arange(24) + 1)
  (dx,) = jax.vjp(lambda x: packed.pad_keys(x, lay), x)[1](jnp.ones((1, 32, 1, 1)))
  np.testing.assert_array_equal(np.asarray(dx).ravel(), [1] * 24 + [0] * 6)
  seg32 = jnp.asarray(np.repeat(np.arange(10, dtype=np.int32), 7)[None])  # 10 docs of 7 tokens
  tuning = mg.TuningConfig(block_size=32, doc_blocks=7)
  assert mg.packed_num_blocks(70, tuning) == 10
  assert bool(mg.documents_fit(seg32, tuning))
  fit = jax.jit(lambda s: mg.documents_fit(s, dataclasses.replace(tuning, doc_blocks=6)))
  assert not bool(fit(seg32))


def test_padded_block_indices_keep_only_blocks_a_query_can_see():
  seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)  # docs [0, 5), [5, 12); bs 4
  lay = packed.packed_layout(seg, block_size=4, num_blocks=5)
  np.testing.assert_array_equal(lay.block_start, [[0] * 5 + [2] * 7])
  bi = jnp.asarray(np.array([0, 1, -1, 2, -3])[None, None, None, :].repeat(12, 1), jnp.int32)
  got = np.asarray(packed.padded_block_indices(bi, lay, block_size=4))[0, :, 0]
  # t = 4: relative position 4 -> blocks 0, 1; t = 9: relative 4 -> padded 2, 3; t = 11: rel 6
  np.testing.assert_array_equal(got[3], [0, -1, -1, -1, -1])
  np.testing.assert_array_equal(got[4], [0, 1, -1, -1, -1])
  np.testing.assert_array_equal(got[5], [2, -1, -1, -1, -1])
  np.testing.assert_array_equal(got[11], [2, 3, -1, -1, -1])


def _np_lists(bi, pos, r, bs, nb, shared):
  """Brute force on the padded grid: ``{(b, h, tile): (sorted ids, {id: member tokens})}``."""
  b, t, h, _ = bi.shape
  out = {}
  for bb in range(b):
    for hh in range(h):
      for tile in range(-(-t // r)):
        toks = [x for x in range(tile * r, tile * r + r) if x < t]
        top = max(pos[bb, x] for x in toks)
        members = {}
        for x in toks:
          for j in bi[bb, tile * r if shared else x, hh]:
            if 0 <= j < nb and j * bs <= (top if shared else pos[bb, x]):
              members.setdefault(int(j), set()).add(x - tile * r)
        out[bb, hh, tile] = (sorted(members), members)
  return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("r,bs", [(4, 8), (8, 4), (5, 16)])
def test_tile_lists_on_the_padded_grid_match_brute_force(shared, r, bs):
  rng = np.random.default_rng(r * bs + shared)
  b, t, h, n = 2, 90, 2, 4
  seg = pc.packed_segments(rng, b, t, 7, tiny=2)
  nbp = -(-t // bs) + 7
  lay = packed.packed_layout(seg, block_size=bs, num_blocks=nbp)
  bi = packed.padded_block_indices(
    pc.relative_selection(rng, seg, h, n, block_size=bs), lay, block_size=bs
  )
  pos = packed.padded_positions(lay)
  got = tile_iteration_lists(
    bi, tokens_per_tile=r, block_size=bs, shared=shared, positions=pos, num_blocks=nbp
  )
  want = _np_lists(np.asarray(bi), np.asarray(pos), r, bs, nbp, shared)
  ids, counts = np.asarray(got.ids), np.asarray(got.counts)
  for (bb, hh, tile), (lst, members) in want.items():
    c = counts[bb, hh, tile]
    assert c == len(lst)
    np.testing.assert_array_equal(ids[bb, hh, tile, :c], lst)
    for j, x in enumerate(lst):
      bits = {
        i
        for i in range(r)
        if pc._member(got.member_lo[bb, hh, tile, j], got.member_hi[bb, hh, tile, j], i)
      }
      assert bits >= members[x] if shared else bits == members[x]
  with pytest.raises(ValueError, match="positions"):
    tile_iteration_lists(bi, tokens_per_tile=r, block_size=bs, positions=pos[:, 1:])
  with pytest.raises(ValueError, match="num_blocks"):
    tile_iteration_lists(bi, tokens_per_tile=r, block_size=bs, num_blocks=0)


def _operands(seed, *, t, g, h, n, bs, num_docs, tiny, mode="exact", doc_blocks=-1):
  """Random packed row and relative ids, and the kernels' XLA-side operands (``doc_blocks=-1``:
  ``num_docs - 1``, the smallest capacity every row of ``num_docs`` documents fits)."""
  doc_blocks = num_docs - 1 if doc_blocks == -1 else doc_blocks
  rng = np.random.default_rng(seed)
  seg = pc.packed_segments(rng, 1, t, num_docs, tiny=tiny)
  bi = pc.relative_selection(rng, seg, h, n, block_size=bs)
  tuning = mg.TuningConfig(mode=mode, block_size=bs, doc_blocks=doc_blocks)
  k = jnp.zeros((1, t, h, 8), jnp.float32)
  cfg = mg.kernel_config(tuning, softmax_scale=1.0, group_size=g, has_docs=True)
  kp, _, bip, shift, cfg = mg.packed_operands(k, k, bi, seg, cfg, tuning)
  assert bool(mg.documents_fit(seg, tuning))
  return seg, bi, kp, bip, shift, cfg, tuning


FWD_CASES = [
  # g, tile_rows, mode, bs, num_docs, tiny
  (16, 128, "exact", 64, 4, 0),
  (16, 128, "exact", 32, 16, 4),
  (4, 64, "exact", 128, 16, 4),
  (8, 128, "shared", 64, 5, 2),
  (16, 64, "shared", 32, 16, 6),
  (3, 64, "exact", 64, 9, 3),
]


@pytest.mark.parametrize("g,rows,mode,bs,num_docs,tiny", FWD_CASES)
def test_emulated_forward_and_dq_masks_equal_the_reference(g, rows, mode, bs, num_docs, tiny):
  """The forward kernels' mask (lists, membership, no-mask branch, padded positions), mapped
  back to row positions, is exactly the document-relative reference; so is the dQ kernel's
  (64-row tiles of the backward's lists)."""
  t, h, n = 300, 2, 5
  seg, bi, kp, bip, shift, cfg, _ = _operands(
    g + bs + num_docs, t=t, g=g, h=h, n=n, bs=bs, num_docs=num_docs, tiny=tiny, mode=mode
  )
  cfg = dataclasses.replace(cfg, tile_rows=rows)
  cfg = common.resolve_config(cfg, g)
  assert cfg.mode == "exact"  # shared lists are per-token lists with documents
  q = jnp.zeros((1, t, h * g, 8), jnp.float32)
  nbp = kp.shape[1] // bs
  pos = jnp.arange(t, dtype=jnp.int32)[None] + shift
  _, lists = common.prepare(q, bip, cfg, h, num_blocks=nbp, positions=pos)
  r64 = common.tokens_per_tile(g)
  groups = cfg.tile_rows // common.TILE_ROWS
  got = pc.forward_mask(
    lists, shift, t=t, tokens_per_group=r64, groups=groups, block_size=bs, num_keys=kp.shape[1]
  )
  lay = packed.packed_layout(seg, block_size=bs, num_blocks=nbp)
  run = r64 if mode == "shared" else None
  want_bi = bi
  if run is not None:  # runs aligned to each document's start
    pos_t = np.arange(t)
    start = np.asarray(common.document_starts(seg, 1, t))[0]
    want_bi = np.asarray(bi)[:, pos_t - (pos_t - start) % run]
  want = pc.reference_mask(want_bi, seg, block_size=bs)
  assert want.any(axis=-1).mean() > 0.5
  np.testing.assert_array_equal(pc.to_rows(got, lay.source, t), want)
  # the backward's 64-row lists (dQ kernel)
  k = jnp.zeros((1, kp.shape[1], h, 8), jnp.float32)
  ops = vc.prepare_backward(
    q, k, k, q, q[..., 0], q, bip, mode=cfg.mode, chunk=3, shift=shift, block_size=bs
  )
  dq = pc.forward_mask(
    ops.lists, shift, t=t, tokens_per_group=r64, groups=1, block_size=bs, num_keys=kp.shape[1]
  )
  np.testing.assert_array_equal(pc.to_rows(dq, lay.source, t), want)


@pytest.mark.parametrize(
  "g,bs,num_docs,tiny,chunk,doc_blocks",
  [
    (16, 64, 4, 0, 3, None),
    (4, 32, 16, 5, 2, -1),
    (8, 128, 16, 4, 1000, -1),
    (16, 64, 16, 6, 2, 20),
  ],
)
def test_emulated_dkv_mask_covers_each_visible_pair_once(g, bs, num_docs, tiny, chunk, doc_blocks):
  """The dK/dV kernel's work items (on ``NBp`` padded blocks) with its no-mask test on the
  tile's smallest shift: every visible (query, key) pair is covered by exactly one CTA and no
  invisible pair by any; work items, offsets and the reduction use ``NBp``."""
  t, h, n = 300, 2, 5
  seg, bi, kp, bip, shift, cfg, tuning = _operands(
    g * bs + num_docs,
    t=t,
    g=g,
    h=h,
    n=n,
    bs=bs,
    num_docs=num_docs,
    tiny=tiny,
    doc_blocks=doc_blocks,
  )
  nbp = mg.packed_num_blocks(t, tuning)
  assert kp.shape[1] == nbp * bs
  q = jnp.zeros((1, t, h * g, 8), jnp.float32)
  ops = vc.prepare_backward(
    q, kp, kp, q, q[..., 0], q, bip, mode="exact", chunk=chunk, shift=shift, block_size=bs
  )
  tail = max(0, vc.KEY_TILE - bs)
  assert ops.kp.shape[1] == nbp * bs + tail
  assert ops.work.item_block.shape[-1] == 2 * nbp
  r = common.tokens_per_tile(g)
  smin = np.asarray(ops.docs[1])
  np.testing.assert_array_equal(ops.docs[0].shape, (1, ops.lists.ids.shape[2] * 64))
  mask, cover = pc.dkv_mask(
    ops.work, shift, t=t, tokens_per_tile=r, block_size=bs, num_keys=nbp * bs, smin=smin
  )
  lay = packed.packed_layout(seg, block_size=bs, num_blocks=nbp)
  want = pc.reference_mask(bi, seg, block_size=bs)
  np.testing.assert_array_equal(pc.to_rows(mask, lay.source, t), want)
  assert cover.max() == 1  # no pair counted twice
  # the reduction of per-item partials back to the NBp blocks
  w = ops.work.item_block.shape[-1]
  part = jnp.asarray(np.random.default_rng(0).standard_normal((1, h, w * bs, 3)), jnp.float32)
  red = np.asarray(
    vc.reduce_items(part, ops.work.item_block, num_blocks=nbp, seq_len=nbp * bs, block_size=bs)
  )
  want_red = np.asarray(part[:, :, : nbp * bs]).copy()
  blocks = np.asarray(ops.work.item_block)
  for hh in range(h):
    for it in range(nbp, w):
      if blocks[0, hh, it] < nbp:
        sl = slice(blocks[0, hh, it] * bs, blocks[0, hh, it] * bs + bs)
        want_red[0, hh, sl] += np.asarray(part[0, hh, it * bs : it * bs + bs])
  np.testing.assert_allclose(red, want_red.transpose(0, 2, 1, 3), rtol=1e-6, atol=1e-6)


def _fake_kernel_forward(q, k, v, bi, shift, cfg):
  """Stands in for the kernels: attention over the padded keys under the mask the kernels
  apply (``bi`` padded ids, key ``p`` visible iff its block is selected and ``p <= t +
  shift``)."""
  tk = k.shape[1]
  p = jnp.arange(tk)
  sel = (bi[..., None] == (p // cfg.block_size)).any(axis=3)  # [B, T, H, Tk]
  pos = jnp.arange(q.shape[1])[None, :] + shift  # [B, T]
  mask = (sel & (p <= pos[..., None, None])).transpose(0, 2, 1, 3)
  return pc.attention(q, k, v, mask, cfg.softmax_scale)


@pytest.mark.parametrize(
  "mode,num_docs,tiny,dk,dv", [("exact", 4, 0, 64, 64), ("shared", 16, 5, 40, 24)]
)
def test_wrapper_end_to_end_with_a_stand_in_kernel(monkeypatch, mode, num_docs, tiny, dk, dv):
  """The public entry with the kernels replaced by attention under the kernels' padded mask:
  O, LSE and dQ, dK, dV (through the padded layout's gathers) equal the reference semantics."""
  monkeypatch.setattr(mg, "_forward", _fake_kernel_forward)
  monkeypatch.setattr(mg, "_attention", lambda *a: _fake_kernel_forward(*a)[0])
  b, t, h, g, n, bs = 2, 150, 2, 4, 4, 32
  rng = np.random.default_rng(num_docs)
  seg = jnp.concatenate([pc.packed_segments(rng, 1, t, num_docs, tiny=tiny)] * 2)
  seg = seg.at[1].set(pc.packed_segments(rng, 1, t, 3)[0])
  bi = pc.relative_selection(rng, seg, h, n, block_size=bs)
  q = jnp.asarray(rng.standard_normal((b, t, h * g, dk)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, t, h, dk)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((b, t, h * g, dv)), jnp.float32)
  tuning = mg.TuningConfig(mode=mode, block_size=bs, doc_blocks=num_docs)
  assert bool(mg.documents_fit(seg, tuning))
  scale = dk**-0.5
  run = common.tokens_per_tile(g) if mode == "shared" else None

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

  kern = lambda q, k, v: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)
  ref = lambda q, k, v: pc.reference(q, k, v, bi, seg, block_size=bs, scale=scale, shared_run=run)[
    0
  ]
  o_k, lse_k = mg.selected_attention_mgpu(
    q, k, v, bi, segment_ids=seg, tuning=tuning, return_lse=True
  )
  o_r, lse_r = pc.reference(q, k, v, bi, seg, block_size=bs, scale=scale, shared_run=run)
  np.testing.assert_allclose(o_k, o_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse_k, lse_r, rtol=1e-5, atol=1e-5)
  g_k = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
  g_r = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for name, a, r in zip(("dq", "dk", "dv"), g_k, g_r):  # bf16 gradients: 1-ulp flips at most
    assert a.dtype == r.dtype == jnp.bfloat16 and a.shape == r.shape, name
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    assert np.linalg.norm(a - r) <= 1e-3 * np.linalg.norm(r), name


def test_tuning_doc_blocks_and_capacity():
  assert mg.TuningConfig().doc_blocks is None
  assert mg.packed_num_blocks(8192) == 256  # NB + NB
  assert mg.packed_num_blocks(8192, mg.TuningConfig(doc_blocks=16)) == 144
  assert mg.packed_num_blocks(100, mg.TuningConfig(block_size=32, doc_blocks=0)) == 4
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="TuningConfig.doc_blocks: expected None or an int >= 0"):
      mg.TuningConfig(doc_blocks=bad)
  with pytest.raises(ValueError, match="segment_ids"):
    mg.selected_attention_mgpu(
      *[jnp.zeros((1, 64, 2, 64), jnp.bfloat16)] * 3,
      jnp.zeros((1, 64, 2, 2), jnp.int32),
      segment_ids=jnp.zeros((1, 63), jnp.int32),
    )
  with pytest.raises(ValueError, match="segment_ids"):
    packed.packed_blocks_needed(jnp.zeros((5,), jnp.int32), 64)
  with pytest.raises(ValueError, match="num_blocks"):
    packed.packed_layout(jnp.zeros((1, 5), jnp.int32), block_size=4, num_blocks=0)


def _lower(fn, t, h, g, d, n):
  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
    jax.ShapeDtypeStruct((1, t), jnp.int32),
  )
  return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "knobs,g",
  [
    ({"tile_rows": 64, "q_layout": "tiles"}, 16),
    ({"tile_rows": 64, "mode": "shared", "block_size": 32}, 4),
    ({"tile_rows": 128, "persistent": False, "block_size": 128}, 8),
    ({"tile_rows": 128, "persistent": True, "num_ctas": 5, "doc_blocks": 3}, 16),
    ({"tile_rows": 128, "persistent": True, "q_layout": "tiles", "mode": "shared"}, 2),
  ],
)
def test_every_kernel_lowers_with_documents(knobs, g):
  """Forward (64-row, 128-row per tile, persistent) and backward (dQ, dK/dV) kernels lower for
  CUDA with documents; K arrives in the padded layout of ``NB + doc_blocks`` blocks."""
  t, h, d, n = 300, 2, 64, 4
  tuning = mg.TuningConfig(**knobs)

  def attn(q, k, v, bi, seg):
    return mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)

  def loss(q, k, v, bi, seg):
    return jnp.sum(attn(q, k, v, bi, seg).astype(jnp.float32))

  fwd = _lower(attn, t, h, g, d, n)
  grad = _lower(jax.grad(loss, argnums=(0, 1, 2)), t, h, g, d, n)
  assert grad.count("mosaic_gpu") > fwd.count("mosaic_gpu") > 0
  nbp = mg.packed_num_blocks(t, tuning)
  assert f"tensor<1x{nbp * tuning.block_size}x2x64xbf16>" in fwd  # padded K / V
