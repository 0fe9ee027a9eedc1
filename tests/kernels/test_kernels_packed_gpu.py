"""Packed documents with document-relative block ids on a Hopper GPU (``pytest -m gpu``).

Forward O and LSE and the gradients dQ, dK, dV of
:func:`pallas_kernels.selected_attention_mgpu.selected_attention_mgpu` with ``segment_ids``
against the float32 reference of :mod:`packed_checks` (key ``s`` visible to query ``t`` iff
``ds(t) <= s <= t`` and ``(s - ds(t)) // bs`` is selected), over the forward kernels (64-row,
128-row per tile, persistent), the backward, rows of 4 and 16 random-length documents with tiny
ones (1 to 3 tokens), block sizes 32/64/128 and shared selection. Every kernel call runs twice
and must be bit-identical (a difference means a race). Skipped without a Hopper GPU; the same
index structures and masks are checked on CPU by ``test_kernels_packed.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import packed_checks as pc
import pytest
import selected_checks as sc

from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_mgpu as mg

pytestmark = pytest.mark.gpu


def _run_twice(f, *args):
  first = jax.block_until_ready(f(*args))
  second = jax.block_until_ready(f(*args))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), "race: runs differ"
  return first


def _inputs(seed, *, b, t, hq, h, d, n, bs, num_docs, tiny):
  rng = np.random.default_rng(seed)
  rnd = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, k, v, do = rnd(b, t, hq, d), rnd(b, t, h, d), rnd(b, t, h, d), rnd(b, t, hq, d)
  seg = pc.packed_segments(rng, b, t, num_docs, tiny=tiny)
  bi = pc.relative_selection(rng, seg, h, n, block_size=bs)
  return q, k, v, do, bi.at[:, 70:74].set(-1), seg


def _check(tuning, q, k, v, do, bi, seg):
  """Kernel forward (with LSE) and VJP against the float32 reference."""
  assert bool(mg.documents_fit(seg, tuning))
  bs = tuning.block_size
  scale = q.shape[-1] ** -0.5
  g = q.shape[2] // k.shape[2]
  run = common.tokens_per_tile(g) if tuning.mode == "shared" else None
  call = lambda q, k, v, **kw: mg.selected_attention_mgpu(
    q, k, v, bi, segment_ids=seg, tuning=tuning, **kw
  )

  def kernel(q, k, v, do):
    grads = jax.vjp(call, q, k, v)[1](do)
    return call(q, k, v, return_lse=True), grads

  (o, lse), grads = _run_twice(jax.jit(kernel), q, k, v, do)

  @jax.jit
  def reference(q, k, v, do):
    f32 = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: pc.reference(q, k, v, bi, seg, block_size=bs, scale=scale, shared_run=run)
    (o_r, lse_r), vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    return o_r, lse_r, vjp((f32(do), jnp.zeros_like(lse_r)))

  o_r, lse_r, grads_r = reference(q, k, v, do)
  tol = sc.TOLERANCES[jnp.dtype(q.dtype)]
  assert o.shape == q.shape[:3] + (v.shape[-1],) and o.dtype == q.dtype
  sc.assert_forward_close(o, lse, o_r, lse_r, tol)
  sc.assert_grads_close(grads, grads_r, tol)
  return o


KERNELS = {
  "fwd64": {"tile_rows": 64, "q_layout": "tiles", "persistent": False},
  "fwd128": {"tile_rows": 128, "persistent": False},
  "persistent": {"tile_rows": 128, "persistent": True, "num_ctas": 5},
  "persistent-default": {},
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("num_docs,tiny", [(4, 0), (16, 4)])
def test_packed_rows_match_the_reference(kernel, num_docs, tiny):
  """Forward and q/k/v gradients of every forward kernel (and the dQ, dK/dV kernels) on rows
  of random-length documents, some of 1 to 3 tokens."""
  knobs = dict(KERNELS[kernel], doc_blocks=num_docs)
  args = _inputs(
    len(kernel) * 31 + num_docs,
    b=2,
    t=1000,
    hq=32,
    h=2,
    d=128,
    n=8,
    bs=64,
    num_docs=num_docs,
    tiny=tiny,
  )
  _check(mg.TuningConfig(**knobs), *args)


@pytest.mark.parametrize(
  "knobs",
  [
    {"block_size": 32, "bwd_chunk": 3},
    {"block_size": 128},
    {"mode": "shared"},
    {"mode": "shared", "tile_rows": 128, "block_size": 32},
  ],
)
def test_packed_block_sizes_and_shared_selection(knobs):
  args = _inputs(
    sum(map(len, knobs)),
    b=1,
    t=777,
    hq=64,
    h=4,
    d=64,
    n=6,
    bs=knobs.get("block_size", 64),
    num_docs=16,
    tiny=5,
  )
  _check(mg.TuningConfig(**knobs, doc_blocks=16), *args)


def test_default_capacity_and_one_document_rows():
  """The default capacity (``2 NB`` blocks) with 4 documents, and a row that is one document
  gives the unpacked result."""
  q, k, v, do, bi, seg = _inputs(5, b=2, t=600, hq=32, h=2, d=128, n=8, bs=64, num_docs=4, tiny=1)
  _check(mg.TuningConfig(), q, k, v, do, bi, seg)
  one = jnp.zeros_like(seg)
  o_one = _check(mg.TuningConfig(), q, k, v, do, bi, one)
  o_plain = jax.jit(lambda q, k, v: mg.selected_attention_mgpu(q, k, v, bi))(q, k, v)
  np.testing.assert_allclose(
    np.asarray(o_one, np.float32), np.asarray(o_plain, np.float32), atol=1e-2
  )


def test_a_document_gives_the_same_result_wherever_it_sits():
  """Document-relative ids: the same document (tokens and selections) at row offset 0 and at
  offset 37 (after a filler document) gives the same outputs."""
  t, hq, h, d, n, bs, length = 400, 32, 2, 128, 6, 64, 300
  rng = np.random.default_rng(3)
  rnd = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, k, v = rnd(1, length, hq, d), rnd(1, length, h, d), rnd(1, length, h, d)
  seg_doc = jnp.zeros((1, length), jnp.int32)
  bi = pc.relative_selection(rng, seg_doc, h, n, block_size=bs)
  outs = []
  for off in (0, 37):
    pad = lambda x, off=off: jnp.pad(
      x, ((0, 0), (off, t - length - off)) + ((0, 0),) * (x.ndim - 2)
    )
    seg = jnp.asarray(
      np.r_[np.zeros(off), np.ones(length), 2 * np.ones(t - length - off)][None], jnp.int32
    )
    o = jax.jit(lambda q, k, v, bi, seg: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg))(
      pad(q),
      pad(k),
      pad(v),
      jnp.pad(bi, ((0, 0), (off, t - length - off), (0, 0), (0, 0)), constant_values=-1),
      seg,
    )
    outs.append(np.asarray(o[:, off : off + length], np.float32))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-2)


def test_standard_shape_forward_with_16_documents():
  """The standard NSA shape at T = 4096 (``HQ = 64, H = 4``, n = 16) with 16 documents."""
  q, k, v, _, bi, seg = _inputs(9, b=1, t=4096, hq=64, h=4, d=128, n=16, bs=64, num_docs=16, tiny=2)
  tuning = mg.TuningConfig()
  assert bool(mg.documents_fit(seg, tuning))
  f = jax.jit(
    lambda q, k, v: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, return_lse=True)
  )
  o, lse = _run_twice(f, q, k, v)
  o_r, lse_r = jax.jit(
    lambda q, k, v: pc.reference(q, k, v, bi, seg, block_size=64, scale=128**-0.5)
  )(q, k, v)
  sc.assert_forward_close(o, lse, o_r, lse_r, sc.TOLERANCES[q.dtype])
