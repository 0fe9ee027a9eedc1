"""Block scoring (NSA eq. 9-10, InfLLM-V2 max pooling) and top-n selection with forced blocks."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_block_importance, np_select, rand_qkv, segments

from sparse_attention_jax import NSAConfig, block_importance, nsa_attention, select_blocks
from sparse_attention_jax.ops.selection import candidate_and_forced, overlap_table


def cfg_of(l, d, bs, n=4, init=1, local=2, pooling="sum"):
  return NSAConfig(
    cmp_window=l,
    cmp_stride=d,
    block_size=bs,
    num_selected=n,
    num_init_blocks=init,
    num_local_blocks=local,
    score_pooling=pooling,
    compression="mean",
    window=16,
  )


# ---------------------------------------------------------------------------------- overlap table
def test_overlap_table_paper_defaults_hand_computed():
  cfg = cfg_of(32, 16, 64)
  t = 512
  nc = cfg.num_cmp_tokens(t)
  assert nc == 31
  idx, weight = overlap_table(cfg, t)
  assert idx.shape == weight.shape == (8, 5)
  for j in range(8):
    want_idx = np.arange(4 * j - 1, 4 * j + 4)
    want_w = np.array([1, 2, 2, 2, 1], np.float32)
    valid = (want_idx >= 0) & (want_idx < nc)
    np.testing.assert_array_equal(weight[j], np.where(valid, want_w, 0))
    np.testing.assert_array_equal(idx[j][valid], want_idx[valid])
    assert np.all((idx[j] >= 0) & (idx[j] < nc))  # clipped into range
  # block 0 misses token -1; the last block misses token 31 (its window would end past T)
  np.testing.assert_array_equal(weight[0], [0, 2, 2, 2, 1])
  np.testing.assert_array_equal(weight[7], [1, 2, 2, 2, 0])
  # every compressed token's l/d chunks are all counted once across blocks
  totals = np.zeros(nc)
  np.add.at(totals, idx.ravel(), weight.ravel())
  np.testing.assert_array_equal(totals, np.full(nc, 32 // 16))


@pytest.mark.parametrize("t", [64, 70])
def test_overlap_table_identity_when_l_equals_d_equals_block(t):
  cfg = cfg_of(16, 16, 16)
  idx, weight = overlap_table(cfg, t)
  nb, nc = cfg.num_blocks(t), cfg.num_cmp_tokens(t)
  assert idx.shape == (nb, 1)
  np.testing.assert_array_equal(idx[:nc, 0], np.arange(nc))
  np.testing.assert_array_equal(weight[:, 0], (np.arange(nb) < nc).astype(np.float32))


# -------------------------------------------------------------------------------- block importance
SHAPES = [
  (32, 16, 64, 256),
  (8, 4, 16, 64),
  (16, 4, 8, 64),
  (8, 8, 8, 60),
  (8, 8, 32, 64),
  (16, 8, 8, 64),
  (4, 4, 16, 62),
]


@pytest.mark.parametrize("l,d,bs,t", SHAPES)
@pytest.mark.parametrize("pooling", ["sum", "max"])
def test_block_importance_matches_hand_written_eq9(l, d, bs, t, pooling):
  cfg = cfg_of(l, d, bs, pooling=pooling)
  b, hq, h = 2, 4, 2
  probs = jax.random.uniform(jax.random.key(l * 100 + bs), (b, t, hq, cfg.num_cmp_tokens(t)))
  out = block_importance(probs, cfg, num_kv_heads=h)
  assert out.shape == (b, t, h, cfg.num_blocks(t)) and out.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(out), np_block_importance(probs, cfg, h), rtol=1e-6, atol=1e-6
  )


def test_block_importance_literal_eq9_would_be_off_by_one():
  """A single compressed token's mass lands in the blocks its window overlaps (0-based form)."""
  cfg = cfg_of(32, 16, 64)
  t = 256
  nc = cfg.num_cmp_tokens(t)
  for i in range(nc):
    probs = jnp.zeros((1, t, 1, nc)).at[..., i].set(1.0)
    out = np.asarray(block_importance(probs, cfg, num_kv_heads=1))[0, 0, 0]
    lo, hi = i * 16, i * 16 + 32  # window tokens [lo, hi)
    want = np.array([max(0, min(hi, (j + 1) * 64) - max(lo, j * 64)) // 16 for j in range(4)])
    np.testing.assert_array_equal(out, want, err_msg=f"compressed token {i}")


def test_block_importance_gqa_sums_group_heads_before_pooling():
  cfg_sum, cfg_max = cfg_of(8, 4, 16), cfg_of(8, 4, 16, pooling="max")
  b, t, hq, h = 1, 64, 6, 2
  g = hq // h
  probs = jax.random.uniform(jax.random.key(3), (b, t, hq, cfg_sum.num_cmp_tokens(t)))
  summed = probs.reshape(b, t, h, g, -1).sum(axis=3)  # eq. 10
  for cfg in (cfg_sum, cfg_max):
    out = block_importance(probs, cfg, num_kv_heads=h)
    np.testing.assert_allclose(
      np.asarray(out), np.asarray(block_importance(summed, cfg, num_kv_heads=h)), rtol=1e-6
    )
  # for max pooling the order matters: it is max of the head sum, not the sum of per-head maxima
  per_head = block_importance(probs, cfg_max, num_kv_heads=hq).reshape(b, t, h, g, -1).sum(3)
  assert not np.allclose(
    np.asarray(per_head), np.asarray(block_importance(probs, cfg_max, num_kv_heads=h))
  )


def test_block_importance_has_no_gradient():
  cfg = cfg_of(8, 4, 16)
  probs = jax.random.uniform(jax.random.key(4), (1, 32, 2, cfg.num_cmp_tokens(32)))
  g = jax.grad(lambda p: block_importance(p, cfg, num_kv_heads=1).sum())(probs)
  assert bool(jnp.all(g == 0))


# ------------------------------------------------------------------------------------ top-n
def tie_heavy_importance(key, shape):
  """Small integers: many exact ties, so the lower-index tie-break is exercised."""
  return jax.random.randint(key, shape, 0, 4).astype(jnp.float32)


SELECT_CASES = [
  dict(bs=8, n=4, init=1, local=2),
  dict(bs=8, n=3, init=0, local=1),
  dict(bs=8, n=5, init=2, local=0),
  dict(bs=16, n=4, init=1, local=1),
  dict(bs=8, n=8, init=1, local=2),
  dict(bs=8, n=6, init=0, local=0),
]


class SelectTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_select_blocks_matches_numpy_topn(self):
    b, t, h = 2, 64, 2
    for case_i, c in enumerate(SELECT_CASES):
      cfg = cfg_of(8, 4, c["bs"], n=c["n"], init=c["init"], local=c["local"])
      nb = cfg.num_blocks(t)
      for seg in (None, segments(b, t, [13, 29, 50])):
        for kind in ("ties", "uniform"):
          key = jax.random.key(case_i * 10 + (seg is None) * 2 + (kind == "ties"))
          imp = (
            tie_heavy_importance(key, (b, t, h, nb))
            if kind == "ties"
            else jax.random.uniform(key, (b, t, h, nb))
          )
          out = self.variant(functools.partial(select_blocks, config=cfg, segment_ids=seg))(imp)
          assert out.shape == (b, t, h, c["n"]) and out.dtype == jnp.int32
          np.testing.assert_array_equal(
            np.asarray(out), np_select(imp, cfg, seg), err_msg=f"{c} seg={seg is not None} {kind}"
          )


@pytest.mark.parametrize("with_seg", [False, True])
def test_select_blocks_structure(with_seg):
  b, t, h = 2, 96, 2
  cfg = cfg_of(8, 4, 8, n=5, init=1, local=2)
  nb = cfg.num_blocks(t)
  seg = segments(b, t, [21, 58]) if with_seg else None
  # adversarial importance: future blocks and blocks before the document score highest
  imp = jnp.broadcast_to(jnp.arange(nb, 0, -1, dtype=jnp.float32), (b, t, h, nb))
  imp = imp + jax.random.uniform(jax.random.key(5), (b, t, h, nb))
  imp = imp.at[..., -1].set(1e9)
  out = np.asarray(select_blocks(imp, cfg, segment_ids=seg))
  starts = np.zeros(t, np.int64)
  if with_seg:
    starts[21:], starts[58:] = 21, 58
  for ti in range(t):
    u = ti - starts[ti]  # document position: indices are document-relative
    cur = u // 8
    for row in out[:, ti].reshape(-1, cfg.num_selected):
      valid = row[row >= 0]
      assert np.all(row[len(valid) :] == -1), (ti, row)  # padding at the end
      assert np.all(np.diff(valid) > 0), (ti, row)  # ascending, no dups
      assert np.all(valid * 8 <= u), (ti, row)  # no future block, none before the doc
      assert 0 in valid, (ti, row)  # init = doc's first
      for j in (cur, cur - 1):  # local blocks
        if j >= 0:
          assert j in valid, (ti, row)
      n_cand = cur + 1
      assert len(valid) == min(cfg.num_selected, n_cand), (ti, row)


def _check_forced_kept(imp, cfg):
  out = np.asarray(select_blocks(imp, cfg))[0, :, 0]
  for ti in range(imp.shape[1]):
    cur = ti // 8
    if cur >= 2:
      np.testing.assert_array_equal(out[ti], [0, cur - 1, cur], err_msg=f"t={ti}")


def test_forced_blocks_beat_any_finite_score():
  cfg = cfg_of(8, 4, 8, n=3, init=1, local=2)
  big = float(jnp.finfo(jnp.float32).max)
  imp = jnp.zeros((1, 64, 1, 8)).at[..., 3].set(big).at[..., 4].set(1e30)
  _check_forced_kept(imp, cfg)


def test_forced_blocks_beat_an_infinite_score():
  """Forced blocks are selected "whenever they are candidates" (selection.py docstring), even if
  a caller-supplied importance holds +inf for some other block."""
  cfg = cfg_of(8, 4, 8, n=3, init=1, local=2)
  imp = jnp.zeros((1, 64, 1, 8)).at[..., 3].set(jnp.inf)
  _check_forced_kept(imp, cfg)


def test_num_selected_larger_than_blocks_raises():
  cfg = cfg_of(8, 4, 16, n=5)
  imp = jnp.ones((1, 64, 1, 4))
  with pytest.raises(ValueError, match="num_selected"):
    select_blocks(imp, cfg)


def test_candidate_and_forced_with_segments():
  cfg = cfg_of(8, 4, 8, n=4, init=1, local=2)
  seg = segments(1, 40, [13])
  cand, forced = (np.asarray(x)[0] for x in candidate_and_forced(cfg, 40, seg, 1))
  # query 20 is token 7 of the doc starting at 13: only its block 0 (rows 13..20) is a candidate
  np.testing.assert_array_equal(np.nonzero(cand[20])[0], [0])
  np.testing.assert_array_equal(np.nonzero(forced[20])[0], [0])
  # query 39 is token 26: blocks 0..3 of its document; init = 0, local = 2, 3
  np.testing.assert_array_equal(np.nonzero(cand[39])[0], [0, 1, 2, 3])
  np.testing.assert_array_equal(np.nonzero(forced[39])[0], [0, 2, 3])
  assert not cand[39, 4]
  # query 12 (first document, token 12): blocks 0 and 1 of the row, as without segments
  np.testing.assert_array_equal(np.nonzero(forced[12])[0], [0, 1])


# ------------------------------------------------------------------------------------ presets
def test_preset_values():
  p = NSAConfig.paper()
  assert (
    p.cmp_window,
    p.cmp_stride,
    p.compression,
    p.block_size,
    p.num_selected,
    p.num_init_blocks,
    p.num_local_blocks,
    p.score_pooling,
    p.window,
    p.branches,
  ) == (32, 16, "mlp", 64, 16, 1, 2, "sum", 512, ("cmp", "slc", "win"))
  f = NSAConfig.fla()
  assert (
    f.cmp_window,
    f.cmp_stride,
    f.block_size,
    f.compression,
    f.num_init_blocks,
    f.num_local_blocks,
  ) == (64, 64, 64, "mean", 1, 2)
  i = NSAConfig.infllm_v2()
  assert (
    i.cmp_window,
    i.cmp_stride,
    i.compression,
    i.block_size,
    i.num_selected,
    i.num_init_blocks,
    i.num_local_blocks,
    i.score_pooling,
    i.branches,
  ) == (32, 16, "mean", 64, 64, 1, 1024 // 64 + 1, "max", ("slc",))
  assert NSAConfig.infllm_v2(block_size=16, local_window=32).num_local_blocks == 3


def test_infllm_v2_forces_the_local_window_blocks():
  cfg = NSAConfig.infllm_v2(
    cmp_window=8, cmp_stride=4, block_size=8, local_window=24, num_selected=6
  )
  assert cfg.num_local_blocks == 24 // 8 + 1
  b, t, h = 1, 96, 1
  nb = cfg.num_blocks(t)
  # scores favour the oldest non-init blocks, so only the forcing keeps the local window
  imp = jnp.broadcast_to(jnp.arange(nb, 0, -1, dtype=jnp.float32), (b, t, h, nb))
  out = np.asarray(select_blocks(imp, cfg))[0, :, 0]
  for ti in range(t):
    cur = ti // 8
    local = [j for j in range(cur - 3, cur + 1) if j >= 0]
    assert set(local) | {0} <= set(out[ti].tolist()), (ti, out[ti])
  # and through the op: the max-pooled scores come from the compressed probabilities
  q, k, v = rand_qkv(jax.random.key(6), 1, t, 2, 1, 16, 8)
  _, aux = nsa_attention(q, k, v, config=cfg, return_aux=True)
  bi = np.asarray(aux.block_indices)[0, :, 0]
  for ti in range(t):
    cur = ti // 8
    assert {j for j in range(cur - 3, cur + 1) if j >= 0} | {0} <= set(bi[ti].tolist())


# --------------------------------------------------------------------------------- for_length
@pytest.mark.parametrize("preset", ["paper", "fla", "infllm_v2"])
def test_for_length_config_is_usable_for_short_sequences(preset):
  """``for_length`` promises a config that serves any length (only adding -1 padding)."""
  cfg = {
    "paper": NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=16, window=16),
    "fla": NSAConfig.fla(cmp_window=16, cmp_stride=16, block_size=16, window=16),
    "infllm_v2": NSAConfig.infllm_v2(cmp_window=8, cmp_stride=4, block_size=16, local_window=64),
  }[preset]
  t = 32  # 2 blocks, fewer than the forced ones for paper
  q, k, v = rand_qkv(jax.random.key(7), 1, t, 2, 1, 16, 8)
  from sparse_attention_jax import CompressorParams, init_mlp_compressor

  params = None
  if cfg.compression == "mlp":
    params = CompressorParams(
      k=init_mlp_compressor(jax.random.key(8), num_kv_heads=1, window=8, in_dim=16),
      v=init_mlp_compressor(jax.random.key(9), num_kv_heads=1, window=8, in_dim=8),
    )
  short = cfg.for_length(t)
  _, aux = nsa_attention(q, k, v, config=short, compress_params=params, return_aux=True)
  bi = np.asarray(aux.block_indices)[0, :, 0]
  for ti in range(t):  # n >= NB: every causal block is selected
    np.testing.assert_array_equal(sorted(j for j in bi[ti] if j >= 0), range(ti // 16 + 1))


@pytest.mark.parametrize("n", [1, 5, 16])
def test_iterative_top_n_equals_lax_top_k(monkeypatch, n):
  """The argmax rounds give lax.top_k's blocks: ties (integer scores) to the lower index, forced
  blocks first, -1 where fewer blocks are candidates, infinite and NaN scores clamped alike."""
  from sparse_attention_jax.ops import selection

  rng = np.random.default_rng(n)
  shape = (2, 9, 3, 20)
  score = rng.integers(0, 4, shape).astype(np.float32)
  score[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
  candidate = rng.random(shape) < 0.7
  candidate[1, 2] = False  # rows without any candidate
  candidate[1, 3, :, : n // 2] = True
  candidate[1, 3, :, n // 2 :] = False  # fewer candidates than n
  forced = candidate & (rng.random(shape) < 0.2)
  args = (jnp.asarray(score), jnp.asarray(candidate), jnp.asarray(forced), n)
  got = selection.top_n_blocks(*args)
  monkeypatch.setattr(selection, "ITERATIVE_TOP_N", 0)
  want = selection.top_n_blocks(*args)
  np.testing.assert_array_equal(got, want)
  assert np.any(np.asarray(got) == -1) and np.any(np.asarray(got) >= 0)
