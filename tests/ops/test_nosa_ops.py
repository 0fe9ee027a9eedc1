"""NOSA ops: eviction head, biased selected attention vs the dense formula and its
gradients, query-agnostic scores, the selection vs brute force, causality, documents, the
decoding form and the locality bound."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv, segments

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import compress, dispatch
from sparse_attention_jax.ops.nosa import (
  biased_selected_attention,
  decode_selection,
  nosa_attention,
  nosa_scores,
)
from sparse_attention_jax.ops.nosa import selection as ns

CFG = NSAConfig.infllm_v2(
  cmp_window=8, cmp_stride=4, block_size=8, num_selected=5, num_init_blocks=1, num_local_blocks=1
)
KQ = 3
B, T, HQ, H, D = 2, 64, 4, 2, 8
# Jitted once per static setting: eager op-by-op dispatch of the reference is slow on CPU.
nosa = jax.jit(nosa_attention, static_argnames=("config", "num_query_selected", "return_aux"))
decode = jax.jit(decode_selection, static_argnames=("config", "seq_len", "num_query_selected"))


def rand_c(key, b=B, t=T, h=H):
  return 1.5 * jax.random.normal(key, (b, t, h))


def np_eviction(v, w, a):
  v = np.asarray(v, np.float64)
  b, t, h, dv = v.shape
  flat = v.reshape(b, t, h * dv)  # concat_heads(v_j)
  pre = flat @ np.asarray(w, np.float64).reshape(h * dv, h)  # Linear(H*Dv -> H)
  return np.asarray(a, np.float64) * np.logaddexp(0.0, pre)


def np_doc_bounds(seg, b, t):
  """``(ds, de)`` ``[B, T]``: row positions of the first token and one past the last token of
  each token's document (maximal runs of equal ids; one document per row without ids)."""
  seg = np.zeros((b, t)) if seg is None else np.asarray(seg)
  ds, de = np.zeros((b, t), int), np.full((b, t), t)
  for bb in range(b):
    for tt in range(t):
      a = tt
      while a > 0 and seg[bb, a - 1] == seg[bb, tt]:
        a -= 1
      e = tt + 1
      while e < t and seg[bb, e] == seg[bb, tt]:
        e += 1
      ds[bb, tt], de[bb, tt] = a, e
  return ds, de


def np_dense_biased(q, k, v, c, block_indices, bs, seg=None):
  """o_t = sum_{j in S_t} e^{s_tj + c_j} v_j / sum_{j in S_t} e^{s_tj + c_j} (float64 loop);
  ``S_t``: the keys ``ds <= j <= t`` of the query's document with ``(j - ds) // l'`` listed."""
  q, k, v, c = (np.asarray(x, np.float64) for x in (q, k, v, c))
  bi_ = np.asarray(block_indices)
  b, t, hq, dk = q.shape
  h = k.shape[2]
  ds, _ = np_doc_bounds(seg, b, t)
  o = np.zeros((b, t, hq, v.shape[-1]))
  for bb in range(b):
    for tt in range(t):
      for hh in range(hq):
        kh = hh // (hq // h)
        blocks = set(int(x) for x in bi_[bb, tt, kh] if x >= 0)
        a = ds[bb, tt]
        js = [j for j in range(a, tt + 1) if (j - a) // bs in blocks]
        if not js:
          continue
        s = k[bb, js, kh] @ q[bb, tt, hh] * dk**-0.5 + c[bb, js, kh]
        w = np.exp(s - s.max())
        o[bb, tt, hh] = (w / w.sum()) @ v[bb, js, kh]
  return o


def np_agnostic(c, cfg, seg=None):
  """s^a by brute force: compressed token i of the query's document averages its tokens
  [i*d, i*d + l); block j (document-relative) takes the max over the visible ones overlapping it."""
  c = np.asarray(c, np.float64)
  b, t, h = c.shape
  l, d, bs = cfg.cmp_window, cfg.cmp_stride, cfg.block_size
  nb = cfg.num_blocks(t)
  ds, de = np_doc_bounds(seg, b, t)
  out = np.full((b, t, h, nb), -np.inf)
  for bb in range(b):
    for tt in range(t):
      doc, u = c[bb, ds[bb, tt] : de[bb, tt]], tt - ds[bb, tt]
      for j in range(nb):
        ids = [
          i
          for i in range(cfg.num_cmp_tokens(len(doc)))
          if i * d < (j + 1) * bs and i * d + l > j * bs and i * d + l - 1 <= u
        ]
        if ids:
          out[bb, tt, :, j] = np.max([doc[i * d : i * d + l].mean(0) for i in ids], axis=0)
  return out


def np_select(sq, sa, cfg, kq, seg=None):
  """Brute-force NOSA selection; blocks counted from each query's document start."""
  sq = np.asarray(sq, np.float64)
  sa = np.asarray(sa, np.float64)
  b, t, h, nb = sq.shape
  bs, k = cfg.block_size, cfg.num_selected
  ds, _ = np_doc_bounds(seg, b, t)
  out = np.full((b, t, h, k), -1, np.int32)
  for bb in range(b):
    for tt in range(t):
      u = tt - ds[bb, tt]
      cand = [j for j in range(nb) if j * bs <= u]
      forced = [
        j for j in cand if j < cfg.num_init_blocks or u // bs - cfg.num_local_blocks < j <= u // bs
      ]
      for hh in range(h):
        rest = sorted((j for j in cand if j not in forced), key=lambda j: (-sq[bb, tt, hh, j], j))
        gq = forced + rest[: kq - len(forced)]
        rest = sorted((j for j in cand if j not in gq), key=lambda j: (-sa[bb, tt, hh, j], j))
        chosen = sorted(gq + rest[: k - len(gq)])
        out[bb, tt, hh, : len(chosen)] = chosen
  return out


def sets(row):
  return set(int(x) for x in np.asarray(row) if x >= 0)


def test_eviction_bias_is_a_softplus_of_a_linear_map_of_all_heads():
  kv, kw, ka = jax.random.split(jax.random.key(0), 3)
  v = jax.random.normal(kv, (B, 5, H, 3))
  w = jax.random.normal(kw, (H, 3, H))
  a = jax.random.normal(ka, (H,))
  np.testing.assert_allclose(ns.eviction_bias(v, w, a), np_eviction(v, w, a), rtol=1e-5, atol=1e-6)
  # Head h's bias depends on the values of every head (concat_heads).
  v2 = v.at[:, :, 1].add(1.0)
  assert (
    float(jnp.max(jnp.abs(ns.eviction_bias(v2, w, a)[..., 0] - ns.eviction_bias(v, w, a)[..., 0])))
    > 1e-3
  )
  with pytest.raises(ValueError, match=r"w_delta: expected shape \(H, Dv, H\)"):
    ns.eviction_bias(v, w[:, :2], a)
  with pytest.raises(ValueError, match="a: expected shape"):
    ns.eviction_bias(v, w, a[:1])


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("use_seg", [False, True])
def test_biased_attention_matches_the_dense_formula(use_seg, impl):
  q, k, v = rand_qkv(jax.random.key(1), B, T, HQ, H, D)
  c = rand_c(jax.random.key(2))
  seg = segments(B, T, [27]) if use_seg else None
  _, aux = nosa(q, k, v, c, config=CFG, num_query_selected=KQ, segment_ids=seg, return_aux=True)
  idx = aux.block_indices
  o = biased_selected_attention(
    q, k, v, c, idx, block_size=CFG.block_size, segment_ids=seg, impl=impl
  )
  want = np_dense_biased(q, k, v, c, idx, CFG.block_size, seg)
  np.testing.assert_allclose(o, want, atol=2e-5, rtol=1e-4)
  # The bias matters: without it the output differs.
  o0 = biased_selected_attention(
    q, k, v, 0 * c, idx, block_size=CFG.block_size, segment_ids=seg, impl=impl
  )
  assert float(jnp.max(jnp.abs(o - o0))) > 1e-2


def _dense_formula_jax(q, k, v, c, idx, bs):
  """The same formula written directly in JAX (explicit exp weights, no masked_attention)."""
  b, t, hq, dk = q.shape
  h = k.shape[2]
  g = hq // h
  nb = -(-t // bs)
  member = jnp.any(idx[..., None] == jnp.arange(nb), axis=-2)  # [B, T, H, NB]
  pos = jnp.arange(t)
  vis = member[..., pos // bs] & (pos[None, :] <= pos[:, None])[None, :, None, :]  # [B,T,H,S]
  s = jnp.einsum("bthgd,bshd->bthgs", q.reshape(b, t, h, g, dk), k) * dk**-0.5
  s = s + jnp.transpose(c, (0, 2, 1))[:, None, :, None, :]
  w = jnp.where(vis[:, :, :, None, :], jnp.exp(s), 0.0)
  o = jnp.einsum("bthgs,bshv->bthgv", w, v) / jnp.sum(w, -1)[..., None]
  return o.reshape(b, t, hq, -1)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_gradients_reach_w_delta_and_a_and_match_the_dense_formula(impl):
  q, k, v = rand_qkv(jax.random.key(3), B, T, HQ, H, D)
  kw, ka, kr = jax.random.split(jax.random.key(4), 3)
  w = 0.3 * jax.random.normal(kw, (H, D, H))
  a = jax.random.normal(ka, (H,))
  r = jax.random.normal(kr, (B, T, HQ, D))
  idx = nosa(
    q, k, v, ns.eviction_bias(v, w, a), config=CFG, num_query_selected=KQ, return_aux=True
  )[1].block_indices

  def loss(w, a, fn):
    return jnp.sum(fn(q, k, v, ns.eviction_bias(v, w, a), idx) * r)

  op = lambda *x: biased_selected_attention(*x, block_size=CFG.block_size, impl=impl)  # noqa: E731
  dense = lambda *x: _dense_formula_jax(*x, CFG.block_size)  # noqa: E731
  gw, ga = jax.grad(loss, (0, 1))(w, a, op)
  dw, da = jax.grad(loss, (0, 1))(w, a, dense)
  assert float(jnp.min(jnp.abs(ga))) > 1e-3 and float(jnp.max(jnp.abs(gw))) > 1e-3
  np.testing.assert_allclose(gw, dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ga, da, rtol=1e-4, atol=1e-5)
  # Central finite differences (float32, a coarse step) on A and one W_delta entry.
  eps = 1e-2
  for hh in range(H):
    e = jnp.zeros(H).at[hh].set(eps)
    fd = (loss(w, a + e, op) - loss(w, a - e, op)) / (2 * eps)
    assert float(fd) == pytest.approx(float(ga[hh]), rel=2e-2, abs=2e-2)
  e = jnp.zeros_like(w).at[1, 2, 0].set(eps)
  fd = (loss(w + e, a, op) - loss(w - e, a, op)) / (2 * eps)
  assert float(fd) == pytest.approx(float(gw[1, 2, 0]), rel=2e-2, abs=2e-2)
  # At A = 0 (the module's init) c = 0: A still gets a gradient, W_delta none yet.
  g0w, g0a = jax.grad(loss, (0, 1))(w, jnp.zeros(H), op)
  assert float(jnp.max(jnp.abs(g0a))) > 1e-3 and float(jnp.max(jnp.abs(g0w))) == 0.0


@pytest.mark.parametrize("use_seg", [False, True])
def test_agnostic_scores_pool_visible_compressed_bias(use_seg):
  c = rand_c(jax.random.key(5))
  seg = segments(B, T, [3, 27]) if use_seg else None  # documents of 3, 24 and 37 tokens
  got = ns.agnostic_block_scores(c, CFG, segment_ids=seg)
  want = np_agnostic(c, CFG, seg)
  assert np.isneginf(want).any() and np.isfinite(want).any()
  np.testing.assert_array_equal(np.isneginf(np.asarray(got)), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(np.asarray(got)[fin], want[fin], rtol=1e-5, atol=1e-6)
  if use_seg:
    return
  # Decoding form: scores of a few query positions equal the rows of the full computation.
  pos = jnp.array([7, 30, 63])
  np.testing.assert_array_equal(ns.agnostic_block_scores(c, CFG, query_positions=pos), got[:, pos])


def test_selection_matches_brute_force_and_contains_its_query_aware_part():
  kq_, ka = jax.random.split(jax.random.key(6))
  nb = CFG.num_blocks(T)
  sq = jax.random.uniform(kq_, (B, T, H, nb))
  sa = jnp.round(4 * jax.random.normal(ka, (B, T, H, nb))) / 4  # ties in s^a
  sa = sa.at[:, :, :, 3].set(-jnp.inf)
  got, gq = ns.nosa_select(sq, sa, CFG, num_query_selected=KQ, return_query_part=True)
  np.testing.assert_array_equal(got, np_select(sq, sa, CFG, KQ))
  got, gq = np.asarray(got), np.asarray(gq)
  bs = CFG.block_size
  for tt in range(T):
    ncand = tt // bs + 1
    for bb in range(B):
      for hh in range(H):
        row = got[bb, tt, hh]
        s = sets(row)
        assert sets(gq[bb, tt, hh]) <= s  # query-aware part
        assert len(s) == min(CFG.num_selected, ncand)
        assert max(s) <= tt // bs  # no future block
        assert {0, tt // bs} <= s  # forced init + local
        valid = row[row >= 0]
        assert list(valid) == sorted(valid) and (row[len(valid) :] == -1).all()
  # Decoding form: one query position at a time gives the same rows.
  pos = jnp.array([5, 40])
  np.testing.assert_array_equal(
    ns.nosa_select(sq[:, pos], sa[:, pos], CFG, num_query_selected=KQ, query_positions=pos),
    got[:, pos],
  )
  # Packed documents: candidates and forced blocks count from each query's document start.
  seg = segments(B, T, [3, 27])
  got = ns.nosa_select(sq, sa, CFG, num_query_selected=KQ, segment_ids=seg)
  np.testing.assert_array_equal(got, np_select(sq, sa, CFG, KQ, seg))


def test_selection_budget_errors():
  nb = CFG.num_blocks(T)
  s = jnp.zeros((1, T, 1, nb))
  for bad in (1, 6, 2.5):
    with pytest.raises(
      ValueError,
      match=r"num_query_selected: expected an int k_q with "
      r"num_init_blocks \+ num_local_blocks = 2 <= k_q <= "
      r"num_selected = 5",
    ):
      ns.nosa_select(s, s, CFG, num_query_selected=bad)
  with pytest.raises(ValueError, match="agnostic_scores: expected the shape"):
    ns.nosa_select(s, s[..., :-1], CFG, num_query_selected=KQ)
  with pytest.raises(ValueError, match="config.num_selected"):
    ns.nosa_select(
      s[:, :8, :, :1], s[:, :8, :, :1], CFG.replace(num_selected=3), num_query_selected=2
    )
  cfg, kq = ns.for_length(CFG, KQ, 16)
  assert (cfg.num_selected, kq) == (2, 2)
  q, k, v = rand_qkv(jax.random.key(0), 1, 16, 2, 1, 4)
  with pytest.raises(ValueError, match="config.compression"):
    nosa_attention(
      q, k, v, jnp.zeros((1, 16, 1)), config=CFG.replace(compression="mlp"), num_query_selected=KQ
    )


def test_nosa_attention_is_causal_and_isolates_documents():
  q, k, v = rand_qkv(jax.random.key(7), B, T, HQ, H, D)
  c = rand_c(jax.random.key(8))
  o = nosa(q, k, v, c, config=CFG, num_query_selected=KQ)
  cut = 37
  q2, k2, v2 = (
    x.at[:, cut:].set(jax.random.normal(jax.random.key(9), x[:, cut:].shape)) for x in (q, k, v)
  )
  c2 = c.at[:, cut:].add(3.0)
  o2 = nosa(q2, k2, v2, c2, config=CFG, num_query_selected=KQ)
  np.testing.assert_array_equal(o[:, :cut], o2[:, :cut])
  assert float(jnp.max(jnp.abs(o[:, cut:] - o2[:, cut:]))) > 1e-2
  # Documents: changing the first document leaves the second one's outputs unchanged.
  seg = segments(B, T, [cut])
  o = nosa(q, k, v, c, config=CFG, num_query_selected=KQ, segment_ids=seg)
  k3, v3 = k.at[:, :cut].multiply(-1.0), v.at[:, :cut].add(1.0)
  o3 = nosa(q, k3, v3, c.at[:, :cut].add(2.0), config=CFG, num_query_selected=KQ, segment_ids=seg)
  np.testing.assert_allclose(o[:, cut:], o3[:, cut:], atol=1e-6)


def test_locality_lower_bound_on_random_inputs():
  """Gamma(t) contains the k - k_q best non-forced candidates by s^a (U_t); on steps where t-1
  and t share the block and the visible compressed tokens, U_t = U_{t-1}, so
  |Gamma(t) ∩ Gamma(t-1)| >= min(k - k_q, non-forced candidates), i.e. gamma >= 1 - k_q/k."""
  cfg = NSAConfig.infllm_v2(
    cmp_window=8, cmp_stride=4, block_size=8, num_selected=8, num_init_blocks=1, num_local_blocks=2
  )
  kq, t = 4, 128
  q, k, v = rand_qkv(jax.random.key(10), 1, t, HQ, H, D)
  c = rand_c(jax.random.key(11), 1, t)
  s_q, s_a = jax.jit(nosa_scores, static_argnames="config")(q, k, c, config=cfg)
  gam = np.asarray(
    jax.jit(ns.nosa_select, static_argnames=("config", "num_query_selected"))(
      s_q, s_a, config=cfg, num_query_selected=kq
    )
  )
  sa = np.asarray(s_a, np.float64)
  bs, kk, d, l = cfg.block_size, cfg.num_selected, cfg.cmp_stride, cfg.cmp_window
  static_steps = checked = 0
  prev_u = {}
  for tt in range(t):
    cur = tt // bs
    forced = {0} | set(range(max(cur - 1, 0), cur + 1))
    for hh in range(H):
      rest = sorted(
        (j for j in range(cur + 1) if j not in forced),
        key=lambda j: (-np.nan_to_num(sa[0, tt, hh, j], neginf=-1e300), j),
      )
      u = set(rest[: kk - kq])
      assert u <= sets(gam[0, tt, hh])
      if tt >= 1:  # every step: at most k_q new blocks plus those that entered U ("+ newly
        new = sets(gam[0, tt, hh]) - sets(gam[0, tt - 1, hh])  # completed blocks")
        assert len(new) <= kq + len(u - prev_u[hh])
      prev_u[hh] = u
      same_block = tt >= 1 and (tt - 1) // bs == cur
      new_cmp = (tt - l + 1) >= 0 and (tt - l + 1) % d == 0
      if same_block and not new_cmp:
        static_steps += 1
        inter = sets(gam[0, tt, hh]) & sets(gam[0, tt - 1, hh])
        assert len(inter) >= min(kk - kq, len(rest))
        if cur + 1 >= kk:
          checked += 1
          assert len(inter) / len(sets(gam[0, tt, hh])) >= 1 - kq / kk
  assert static_steps > 100 and checked > 50
  # The query-aware part does move between such steps (the bound is not trivially 1).
  changes = sum(sets(gam[0, i, 0]) != sets(gam[0, i - 1, 0]) for i in range(1, t))
  assert changes > 10


def test_decode_selection_equals_rows_of_the_full_selection():
  q, k, v = rand_qkv(jax.random.key(12), B, T, HQ, H, D)
  c = rand_c(jax.random.key(13))
  _, aux = nosa(q, k, v, c, config=CFG, num_query_selected=KQ, return_aux=True)

  def caches(n):
    return compress(k[:, :n], CFG), ns.compressed_bias(c[:, :n], CFG)

  pos = jnp.array([0, 9, 31, 32, 63])
  got = decode(q[:, pos], *caches(T), CFG, seq_len=T, num_query_selected=KQ, query_positions=pos)
  np.testing.assert_array_equal(got, aux.block_indices[:, pos])
  # Caches of only the first 40 tokens (a decode step at t = 39) give the same row as well.
  cfg, kq = ns.for_length(CFG, KQ, 40)
  got = decode(
    q[:, 39:40],
    *caches(40),
    cfg,
    seq_len=40,
    num_query_selected=kq,
    query_positions=jnp.array([39]),
  )
  np.testing.assert_array_equal(got[:, 0], aux.block_indices[:, 39])


def test_bias_columns_in_bf16_keep_the_bias_and_its_gradient():
  """bf16 keys: the bias rides in two key columns (c_hi + c_lo): the output equals the dense
  formula on the same bf16-rounded q/k/v and exact c within bf16 rounding of the output, and dc
  (through W_delta and A) equals the reference's, not twice it (c_lo carries no gradient)."""
  q, k, v = rand_qkv(jax.random.key(7), B, T, HQ, H, D)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  kw, ka, kr = jax.random.split(jax.random.key(8), 3)
  w = 0.3 * jax.random.normal(kw, (H, D, H))
  a = 3.0 + jax.random.normal(ka, (H,))  # |c| of a few units: bf16 would round
  r = jax.random.normal(kr, (B, T, HQ, D))
  c = ns.eviction_bias(v, w, a)
  idx = nosa(q, k, v, c, config=CFG, num_query_selected=KQ, return_aux=True)[1].block_indices

  def loss(w, a, impl):
    o = biased_selected_attention(
      q, k, v, ns.eviction_bias(v, w, a), idx, block_size=CFG.block_size, impl=impl
    )
    return jnp.sum(o.astype(jnp.float32) * r)

  o = biased_selected_attention(q, k, v, c, idx, block_size=CFG.block_size)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _dense_formula_jax(*f32, c, idx, CFG.block_size)
  assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - want))) < 2e-2
  # One bias column in bf16 would be off by up to |c| * 2^-9 per logit; c_hi + c_lo is not.
  o_one = _dense_formula_jax(*f32, c.astype(jnp.bfloat16).astype(jnp.float32), idx, CFG.block_size)
  assert float(jnp.max(jnp.abs(want - o_one))) > 0.0
  g = jax.grad(loss, (0, 1))(w, a, "auto")
  g_ref = jax.grad(loss, (0, 1))(w, a, "reference")
  for x, y in zip(g, g_ref):
    assert float(jnp.max(jnp.abs(x - y))) <= 3e-2 * float(jnp.max(jnp.abs(y))), (x, y)


# ------------------------------------------------------------------------- packed documents
PACK_CFG = NSAConfig.infllm_v2(
  cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, num_init_blocks=1, num_local_blocks=1
)
PACK_KQ = 3
# Lengths off the l, d and l' grids, one document of 1 token and one shorter than a block; the
# 37-token one has more blocks than k (both top-k parts choose) and starts off the row's grid.
PACK_LENGTHS = (14, 1, 37, 5)
SELECTED_IMPLS = [i for i in dispatch.available_impls("selected_attention") if i != "pallas_gpu"]


@functools.partial(jax.jit, static_argnames=("config", "kq", "impl"))
def nosa_value_and_grad(q, k, v, c, seg, cot, *, config, kq, impl):
  """``(o, aux, (dq, dk, dv, dc))`` of ``sum(nosa_attention(...) * cot)``, one compiled call."""

  def loss(q, k, v, c):
    o, aux = nosa_attention(
      q, k, v, c, config=config, num_query_selected=kq, segment_ids=seg, return_aux=True, impl=impl
    )
    return jnp.sum(o * cot), (o, aux)

  (_, (o, aux)), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, c)
  return o, aux, grads


def index_sets(idx):
  """``[T][H]`` frozensets of the non-padding block ids of ``idx [1, T, H, n]``."""
  return [[frozenset(sets(row)) for row in tok] for tok in np.asarray(idx)[0]]


@pytest.mark.parametrize("impl", SELECTED_IMPLS)
def test_each_document_matches_itself_alone(impl):
  """Packing invariance: in a packed row, each document's output, gradients (q, k, v, c), scores
  and block-index sets (Gamma and its query-aware part) equal those of the document run alone
  (its budgets clamped to its blocks with ``nosa.selection.for_length``)."""
  t = sum(PACK_LENGTHS)
  q, k, v = rand_qkv(jax.random.key(20), 1, t, HQ, H, D)
  c = rand_c(jax.random.key(21), 1, t)
  cot = jax.random.normal(jax.random.key(22), q.shape)
  seg = jnp.asarray(np.repeat(np.arange(len(PACK_LENGTHS)), PACK_LENGTHS)[None], jnp.int32)
  o, aux, grads = nosa_value_and_grad(q, k, v, c, seg, cot, config=PACK_CFG, kq=PACK_KQ, impl=impl)
  gamma, gamma_q = index_sets(aux.block_indices), index_sets(aux.query_indices)
  ends = np.cumsum(PACK_LENGTHS)
  for a, b in zip(ends - np.asarray(PACK_LENGTHS), ends, strict=True):
    msg = f"document [{a}, {b})"
    cfg, kq = ns.for_length(PACK_CFG, PACK_KQ, int(b - a))
    o1, aux1, grads1 = nosa_value_and_grad(
      *(x[:, a:b] for x in (q, k, v, c)), None, cot[:, a:b], config=cfg, kq=kq, impl=impl
    )
    np.testing.assert_allclose(o[:, a:b], o1, atol=2e-5, rtol=2e-5, err_msg=msg)
    for name, g, g1 in zip(("dq", "dk", "dv", "dc"), grads, grads1, strict=True):
      np.testing.assert_allclose(g[:, a:b], g1, atol=5e-5, rtol=5e-5, err_msg=f"{name} {msg}")
    nb = cfg.num_blocks(int(b - a))
    for name in ("query_scores", "agnostic_scores"):
      got, want = getattr(aux, name)[:, a:b], getattr(aux1, name)
      np.testing.assert_allclose(got[..., :nb], want, atol=1e-6, rtol=1e-6, err_msg=f"{name} {msg}")
    assert gamma[a:b] == index_sets(aux1.block_indices), msg
    assert gamma_q[a:b] == index_sets(aux1.query_indices), msg
