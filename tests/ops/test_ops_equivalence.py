"""Numerical equivalence of the plain-JAX ops with brute-force NumPy loops and with each other."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  np_block_importance,
  np_doc_starts,
  np_reference,
  np_select,
  rand_qkv,
  segments,
)

from sparse_attention_jax import (
  CompressorParams,
  NSAConfig,
  compress,
  compressed_attention,
  dense_causal_attention,
  init_mlp_compressor,
  nsa_attention,
  selected_attention,
  sliding_window_attention,
)

B, T, HQ, H, DK = 2, 64, 4, 2, 16
ATOL = 1e-5

# Scaled-down presets: l=8, d=4, l'=8 -> 8 blocks at T=64, n=4 of them (1 init + 2 local forced).
PAPER = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, window=16)
FLA = NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=4, window=16)
INFLLM = NSAConfig.infllm_v2(
  cmp_window=8, cmp_stride=4, block_size=8, local_window=16, num_selected=5
)


def _seg_of(segment_ids, b):
  return None if segment_ids is None else np.asarray(segment_ids)[b]


def np_dense_visible(segment_ids, window=None):
  def visible(b, t, h):
    del h
    lo = 0 if window is None else max(0, t - window + 1)
    seg = _seg_of(segment_ids, b)
    return [s for s in range(lo, t + 1) if seg is None or seg[s] == seg[t]]

  return visible


def np_selected_visible(block_indices, block_size, segment_ids=None):
  bi_np = np.asarray(block_indices)
  nb = -(-bi_np.shape[1] // block_size)

  def visible(b, t, h):
    """Keys ``ds..t`` of the query's document whose document-relative block is listed."""
    blocks = {int(j) for j in bi_np[b, t, h] if 0 <= j < nb}
    seg = _seg_of(segment_ids, b)
    ds = 0 if seg is None else int(np_doc_starts(seg)[t])
    return [s for s in range(ds, t + 1) if (s - ds) // block_size in blocks]

  return visible


def np_docs(segment_ids, b, t=T):
  """``[(start, end)]`` of the documents of row ``b`` (one document without ids)."""
  seg = _seg_of(segment_ids, b)
  if seg is None:
    return [(0, t)]
  cuts = [0] + [i for i in range(1, t) if seg[i] != seg[i - 1]] + [t]
  return list(zip(cuts[:-1], cuts[1:], strict=True))


def np_cmp_visible(cfg, segment_ids=None, seq_len=T):
  l, d = cfg.cmp_window, cfg.cmp_stride
  nc = cfg.num_cmp_tokens(seq_len)

  def visible(b, t, h):
    """Slots of the query's document's compressed tokens whose window is complete at ``t``: the
    documents' tokens are laid out one after the other (document-relative windows)."""
    del h
    if segment_ids is None:
      return [i for i in range(nc) if i * d + l - 1 <= t]
    slot = 0
    for a, e in np_docs(segment_ids, b, seq_len):
      n = (e - a - l) // d + 1 if e - a >= l else 0
      if a <= t < e:
        return [slot + i for i in range(n) if i * d + l - 1 <= t - a]
      slot += n
    raise AssertionError("unreachable")

  return visible


def np_packed_compress(x, cfg, segment_ids, compress_one):
  """Each document's compressed tokens (``compress_one`` of the document alone), one after the
  other in the row's ``NC`` slots; unused slots 0."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  b, t = x.shape[:2]
  out = None
  for bi in range(b):
    slot = 0
    for a, e in np_docs(segment_ids, bi, t):
      c = compress_one(x[bi : bi + 1, a:e])
      if out is None:
        out = np.zeros((b, cfg.num_cmp_tokens(t)) + c.shape[2:])
      out[bi, slot : slot + c.shape[1]] = c[0]
      slot += c.shape[1]
  return out


def np_mean_compress(x, l, d):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  nc = (x.shape[1] - l) // d + 1 if x.shape[1] >= l else 0
  if nc == 0:
    return np.zeros((x.shape[0], 0) + x.shape[2:])
  return np.stack([x[:, i * d : i * d + l].mean(axis=1) for i in range(nc)], axis=1)


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_mlp_compress(x, l, d, p):
  x = np.asarray(x, np.float64)
  pos, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in p)
  nc = (x.shape[1] - l) // d + 1 if x.shape[1] >= l else 0
  if nc == 0:
    return np.zeros((x.shape[0], 0, x.shape[2], w2.shape[-1]))
  out = []
  for i in range(nc):
    win = x[:, i * d : i * d + l] + pos.transpose(1, 0, 2)[None]  # [B, l, H, D]
    hid = np_gelu(np.einsum("blhd,hldf->bhf", win, w1) + b1)
    out.append(np.einsum("bhf,hfo->bho", hid, w2) + b2)
  return np.stack(out, axis=1)


def np_cmp_probs(q, kc, visible, scale):
  q = np.asarray(q, np.float64)
  b, t, hq, _ = q.shape
  g = hq // kc.shape[2]
  probs = np.zeros((b, t, hq, kc.shape[1]))
  for bi in range(b):
    for ti in range(t):
      for hh in range(hq):
        vis = visible(bi, ti, hh // g)
        if not vis:
          continue
        logits = kc[bi, vis, hh // g] @ q[bi, ti, hh] * scale
        w = np.exp(logits - logits.max())
        probs[bi, ti, hh, vis] = w / w.sum()
  return probs


def np_nsa(q, k, v, gates, cfg, segment_ids=None, params=None):
  """The whole NSA op in NumPy float64; returns ``(o, block_indices)``. With ``segment_ids``,
  every document of a row is the op on that document alone (the packed-document contract)."""
  if segment_ids is not None:
    b, t = q.shape[:2]
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    bi = np.full((b, t, k.shape[2], cfg.num_selected), -1, np.int32)
    for r in range(b):
      for a, e in np_docs(segment_ids, r, t):
        g = None if gates is None else gates[r : r + 1, a:e]
        part = (x[r : r + 1, a:e] for x in (q, k, v))
        o[r, a:e], bi[r, a:e] = (x[0] for x in np_nsa(*part, g, cfg, None, params))
    return o, bi
  scale = q.shape[-1] ** -0.5
  l, d = cfg.cmp_window, cfg.cmp_stride
  if params is None:
    kc, vc = np_mean_compress(k, l, d), np_mean_compress(v, l, d)
  else:
    kc, vc = np_mlp_compress(k, l, d, params.k), np_mlp_compress(v, l, d, params.v)
  cvis = np_cmp_visible(cfg, None, q.shape[1])
  o_cmp, _ = np_reference(q, kc, vc, cvis, scale)
  probs = np_cmp_probs(q, kc, cvis, scale)
  bi = np_select(np_block_importance(probs, cfg, k.shape[2]), cfg)
  outs = {
    "cmp": o_cmp,
    "slc": np_reference(q, k, v, np_selected_visible(bi, cfg.block_size))[0],
    "win": np_reference(q, k, v, np_dense_visible(None, cfg.window))[0],
  }
  total = 0.0
  for c, name in enumerate(("cmp", "slc", "win")):
    if name in cfg.branches:
      g = 1.0 if gates is None else np.asarray(gates, np.float64)[..., c, None]
      total = total + g * outs[name]
  return total, bi


def random_indices(key, b, t, h, n, nb):
  """Block ids in [-1, nb]: padding, out-of-range, duplicates and future blocks all occur."""
  return jax.random.randint(key, (b, t, h, n), -1, nb + 1, jnp.int32)


def mlp_params(key, h, l, dk, dv):
  kk, kv = jax.random.split(key)
  return CompressorParams(
    k=init_mlp_compressor(kk, num_kv_heads=h, window=l, in_dim=dk),
    v=init_mlp_compressor(kv, num_kv_heads=h, window=l, in_dim=dv),
  )


# ------------------------------------------------------------------ brute-force NumPy references
class ReferenceTest(chex.TestCase):
  """Every op against the per-query NumPy loop, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_matches_numpy(self):
    for dv, seg in ((DK, None), (8, segments(B, T, [21, 50]))):
      q, k, v = rand_qkv(jax.random.key(1), B, T, HQ, H, DK, dv)
      out = self.variant(functools.partial(dense_causal_attention, segment_ids=seg))(q, k, v)
      ref, _ = np_reference(q, k, v, np_dense_visible(seg))
      np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_window_matches_numpy(self):
    for w, dv, seg in ((1, DK, None), (10, 8, None), (16, DK, segments(B, T, [9, 37]))):
      q, k, v = rand_qkv(jax.random.key(2 + w), B, T, HQ, H, DK, dv)
      fn = functools.partial(sliding_window_attention, window=w, segment_ids=seg)
      out = self.variant(fn)(q, k, v)
      ref, _ = np_reference(q, k, v, np_dense_visible(seg, w))
      np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=ATOL)
      if w == 1:  # each query sees only itself: the output is its own value row
        np.testing.assert_allclose(
          np.asarray(out), np.repeat(np.asarray(v), HQ // H, axis=2), atol=ATOL
        )

  @chex.variants(with_jit=True, without_jit=True)
  def test_selected_matches_numpy(self):
    bs = 8
    nb = T // bs
    for dv, seg in ((DK, None), (8, segments(B, T, [13, 42]))):
      kq, ki = jax.random.split(jax.random.key(3 + dv))
      q, k, v = rand_qkv(kq, B, T, HQ, H, DK, dv)
      bi = random_indices(ki, B, T, H, 5, nb)
      fn = functools.partial(selected_attention, block_size=bs, segment_ids=seg)
      out = self.variant(fn)(q, k, v, bi)
      ref, _ = np_reference(q, k, v, np_selected_visible(bi, bs, seg))
      np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_compressed_matches_numpy(self):
    cases = (((8, 4), DK, None), ((8, 8), 8, None), ((8, 4), 8, segments(B, T, [19, 45])))
    for (l, d), dv, seg in cases:
      cfg = NSAConfig.fla(cmp_window=l, cmp_stride=d, block_size=8, num_selected=4)
      q, k, v = rand_qkv(jax.random.key(4 + l + d + dv), B, T, HQ, H, DK, dv)
      kc, vc = compress(k, cfg, segment_ids=seg), compress(v, cfg, segment_ids=seg)
      one = lambda x: np_mean_compress(x, l, d)  # noqa: B023
      np.testing.assert_allclose(np.asarray(kc), np_packed_compress(k, cfg, seg, one), atol=ATOL)
      np.testing.assert_allclose(np.asarray(vc), np_packed_compress(v, cfg, seg, one), atol=ATOL)
      fn = functools.partial(compressed_attention, config=cfg, segment_ids=seg)
      res = self.variant(fn)(q, kc, vc)
      vis = np_cmp_visible(cfg, seg)
      ref, ref_lse = np_reference(q, kc, vc, vis)
      np.testing.assert_allclose(np.asarray(res.out), ref, atol=ATOL, rtol=ATOL)
      np.testing.assert_allclose(np.asarray(res.lse), ref_lse, atol=ATOL, rtol=ATOL)
      ref_p = np_cmp_probs(q, np.asarray(kc, np.float64), vis, DK**-0.5)
      np.testing.assert_allclose(np.asarray(res.probs), ref_p, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nsa_matches_numpy(self):
    seg = segments(B, T, [27])
    for cfg, dv, s in ((FLA, DK, None), (PAPER, 8, seg), (INFLLM, 8, seg)):
      kq, kg, kp = jax.random.split(jax.random.key(5 + dv), 3)
      q, k, v = rand_qkv(kq, B, T, HQ, H, DK, dv)
      params = mlp_params(kp, H, cfg.cmp_window, DK, dv) if cfg.compression == "mlp" else None
      gates = None if cfg is INFLLM else jax.nn.sigmoid(jax.random.normal(kg, (B, T, HQ, 3)))
      fn = functools.partial(
        nsa_attention, config=cfg, segment_ids=s, compress_params=params, return_aux=True
      )
      out, aux = self.variant(fn)(q, k, v, gates)
      ref, ref_bi = np_nsa(q, k, v, gates, cfg, s, params)
      np.testing.assert_array_equal(np.asarray(aux.block_indices), ref_bi)
      np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=ATOL)


def test_mlp_compress_matches_numpy():
  q, k, v = rand_qkv(jax.random.key(6), B, T, HQ, H, DK, 8)
  del q
  params = mlp_params(jax.random.key(7), H, 8, DK, 8)
  # non-zero biases so every parameter matters
  params = params._replace(
    k=params.k._replace(
      b1=jax.random.normal(jax.random.key(8), params.k.b1.shape),
      b2=jax.random.normal(jax.random.key(9), params.k.b2.shape),
    )
  )
  cfg = PAPER
  for x, p in ((k, params.k), (v, params.v)):
    out = compress(x, cfg, p)
    assert out.shape == (B, cfg.num_cmp_tokens(T), H, x.shape[-1])
    np.testing.assert_allclose(np.asarray(out), np_mlp_compress(x, 8, 4, p), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ reductions to dense attention
@pytest.mark.parametrize("seg_cuts", [None, [11, 40]])
def test_all_blocks_selected_equals_dense(seg_cuts):
  seg = None if seg_cuts is None else segments(B, T, seg_cuts)
  q, k, v = rand_qkv(jax.random.key(10), B, T, HQ, H, DK, 8)
  dense = dense_causal_attention(q, k, v, segment_ids=seg)
  cfg = FLA.replace(num_selected=T // FLA.block_size, branches=("slc",))
  out, aux = nsa_attention(q, k, v, None, config=cfg, segment_ids=seg, return_aux=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=ATOL, rtol=ATOL)
  # explicit select_blocks on arbitrary importance: n = NB selects every candidate block
  from sparse_attention_jax import select_blocks

  imp = jax.random.uniform(jax.random.key(11), (B, T, H, T // cfg.block_size))
  bi = select_blocks(imp, cfg, segment_ids=seg)
  out2 = selected_attention(q, k, v, bi, block_size=cfg.block_size, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(dense), atol=ATOL, rtol=ATOL)
  if seg is None:
    np.testing.assert_array_equal(
      np.asarray(aux.block_indices)[:, -1, 0], np.broadcast_to(np.arange(T // 8), (B, T // 8))
    )


@pytest.mark.parametrize("w", [T, T + 7])
def test_full_window_equals_dense(w):
  seg = segments(B, T, [30])
  q, k, v = rand_qkv(jax.random.key(12), B, T, HQ, H, DK, 8)
  dense = dense_causal_attention(q, k, v, segment_ids=seg)
  out = sliding_window_attention(q, k, v, window=w, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=ATOL, rtol=ATOL)
  out2 = nsa_attention(q, k, v, config=FLA.replace(window=w, branches=("win",)), segment_ids=seg)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(dense), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("seg_cuts", [None, [5, 33]])
def test_unit_compression_equals_dense(seg_cuts):
  seg = None if seg_cuts is None else segments(B, T, seg_cuts)
  cfg = NSAConfig.fla(cmp_window=1, cmp_stride=1, block_size=8, num_selected=4)
  q, k, v = rand_qkv(jax.random.key(13), B, T, HQ, H, DK, 8)
  kc, vc = compress(k, cfg), compress(v, cfg)
  np.testing.assert_array_equal(np.asarray(kc), np.asarray(k))
  res = compressed_attention(q, kc, vc, cfg, segment_ids=seg)
  dense = dense_causal_attention(q, k, v, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(dense), atol=ATOL, rtol=ATOL)
  out = nsa_attention(q, k, v, config=cfg.replace(branches=("cmp",)), segment_ids=seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------------------- GQA
def _rep(x, g=HQ // H):
  return jnp.repeat(x, g, axis=2)


def test_gqa_equals_repeated_heads_per_branch():
  seg = segments(B, T, [22])
  q, k, v = rand_qkv(jax.random.key(14), B, T, HQ, H, DK, 8)
  kr, vr = _rep(k), _rep(v)
  pairs = [
    (
      dense_causal_attention(q, k, v, segment_ids=seg),
      dense_causal_attention(q, kr, vr, segment_ids=seg),
    ),
    (
      sliding_window_attention(q, k, v, window=9, segment_ids=seg),
      sliding_window_attention(q, kr, vr, window=9, segment_ids=seg),
    ),
  ]
  bi = random_indices(jax.random.key(15), B, T, H, 4, T // 8)
  pairs.append(
    (
      selected_attention(q, k, v, bi, block_size=8, segment_ids=seg),
      selected_attention(q, kr, vr, _rep(bi), block_size=8, segment_ids=seg),
    )
  )
  a = compressed_attention(q, compress(k, FLA), compress(v, FLA), FLA, segment_ids=seg)
  r = compressed_attention(q, compress(kr, FLA), compress(vr, FLA), FLA, segment_ids=seg)
  pairs += [(a.out, r.out), (a.lse, r.lse), (a.probs, r.probs)]
  for x, y in pairs:
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("cfg", [PAPER, FLA, INFLLM], ids=["paper", "fla", "infllm_v2"])
def test_gqa_equals_repeated_heads_nsa(cfg):
  seg = segments(B, T, [35])
  kq, kg, kp = jax.random.split(jax.random.key(16), 3)
  q, k, v = rand_qkv(kq, B, T, HQ, H, DK, 8)
  gates = jax.nn.sigmoid(jax.random.normal(kg, (B, T, HQ, 3)))
  params = rparams = None
  if cfg.compression == "mlp":
    params = mlp_params(kp, H, cfg.cmp_window, DK, 8)
    rparams = jax.tree.map(_rep0, params)
  out, aux = nsa_attention(
    q, k, v, gates, config=cfg, segment_ids=seg, compress_params=params, return_aux=True
  )
  # selection is shared by a KV group (eq. 10), so the repeated-head run gets it repeated
  outr, auxr = nsa_attention(
    q,
    _rep(k),
    _rep(v),
    gates,
    config=cfg,
    segment_ids=seg,
    compress_params=rparams,
    block_indices=_rep(aux.block_indices),
    return_aux=True,
  )
  np.testing.assert_allclose(np.asarray(out), np.asarray(outr), atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(aux.cmp_lse), np.asarray(auxr.cmp_lse), atol=ATOL)
  for name in aux.branch_outputs:
    np.testing.assert_allclose(
      np.asarray(aux.branch_outputs[name]),
      np.asarray(auxr.branch_outputs[name]),
      atol=ATOL,
      rtol=ATOL,
    )


def _rep0(x, g=HQ // H):
  return jnp.repeat(x, g, axis=0)  # compressor params are [H, ...]


# ------------------------------------------------------------------------------------- dtypes
def test_value_dim_differs_from_key_dim_every_branch():
  dv = 8
  q, k, v = rand_qkv(jax.random.key(18), B, T, HQ, H, DK, dv)
  params = mlp_params(jax.random.key(19), H, PAPER.cmp_window, DK, dv)
  bi = random_indices(jax.random.key(20), B, T, H, 4, T // 8)
  outs = [
    dense_causal_attention(q, k, v),
    sliding_window_attention(q, k, v, window=5),
    selected_attention(q, k, v, bi, block_size=8),
    compressed_attention(q, compress(k, FLA), compress(v, FLA), FLA).out,
    compressed_attention(q, compress(k, PAPER, params.k), compress(v, PAPER, params.v), PAPER).out,
  ]
  for cfg, p in ((PAPER, params), (FLA, None), (INFLLM, None)):
    o, aux = nsa_attention(q, k, v, config=cfg, compress_params=p, return_aux=True)
    outs.append(o)
    outs += list(aux.branch_outputs.values())
  for o in outs:
    assert o.shape == (B, T, HQ, dv)
    assert bool(jnp.all(jnp.isfinite(o)))


def test_init_mlp_compressor_respects_dtype():
  p = init_mlp_compressor(
    jax.random.key(27), num_kv_heads=H, window=8, in_dim=DK, dtype=jnp.bfloat16
  )
  assert {n: a.dtype for n, a in p._asdict().items()} == {n: jnp.bfloat16 for n in p._fields}


def _bf16_pairs(key, dv=8):
  q, k, v = rand_qkv(key, B, T, HQ, H, DK, dv, jnp.bfloat16)
  f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
  return (q, k, v), f32


@pytest.mark.parametrize("branch", ["dense", "win", "slc", "cmp_mean", "cmp_mlp"])
def test_bf16_branch_close_to_f32(branch):
  (q, k, v), (qf, kf, vf) = _bf16_pairs(jax.random.key(21))
  bi = random_indices(jax.random.key(22), B, T, H, 4, T // 8)
  params = mlp_params(jax.random.key(23), H, PAPER.cmp_window, DK, 8)
  seg = segments(B, T, [17])

  def run(q, k, v):
    if branch == "dense":
      return dense_causal_attention(q, k, v, segment_ids=seg)
    if branch == "win":
      return sliding_window_attention(q, k, v, window=12, segment_ids=seg)
    if branch == "slc":
      return selected_attention(q, k, v, bi, block_size=8, segment_ids=seg)
    if branch == "cmp_mean":
      return compressed_attention(q, compress(k, FLA), compress(v, FLA), FLA, segment_ids=seg).out
    return compressed_attention(
      q, compress(k, PAPER, params.k), compress(v, PAPER, params.v), PAPER, segment_ids=seg
    ).out

  out, ref = run(q, k, v), run(qf, kf, vf)
  assert out.dtype == jnp.bfloat16
  assert ref.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cfg", [PAPER, FLA, INFLLM], ids=["paper", "fla", "infllm_v2"])
def test_bf16_nsa_close_to_f32(cfg):
  (q, k, v), (qf, kf, vf) = _bf16_pairs(jax.random.key(24))
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(25), (B, T, HQ, 3)))
  params = mlp_params(jax.random.key(26), H, cfg.cmp_window, DK, 8)
  params = params if cfg.compression == "mlp" else None
  _, aux = nsa_attention(qf, kf, vf, gates, config=cfg, compress_params=params, return_aux=True)
  # the same selection for both (top-n may flip on near-ties under bf16 rounding)
  bi = aux.block_indices
  out = nsa_attention(
    q, k, v, gates.astype(jnp.bfloat16), config=cfg, compress_params=params, block_indices=bi
  )
  ref = nsa_attention(qf, kf, vf, gates, config=cfg, compress_params=params, block_indices=bi)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2, rtol=2e-2)
