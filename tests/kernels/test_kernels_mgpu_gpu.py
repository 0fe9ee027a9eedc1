"""Numerics of the Mosaic GPU selected-attention kernels on a Hopper GPU (``pytest -m gpu``).

Forward O and LSE and the gradients dQ, dK, dV of
:func:`pallas_kernels.selected_attention_mgpu.selected_attention_mgpu` against the float32
plain-JAX reference (:mod:`selected_checks`) on fresh random inputs, over the forward kernels
(64-row, 128-row per-tile, persistent with few CTAs so that every CTA walks several tiles),
selection modes, group sizes, head dims (``Dk != Dv``, padded dims), block sizes, packed
documents (document-relative ids, against :mod:`packed_checks`; more in
``test_kernels_packed_gpu.py``), the backward's layouts and work-item splits, both 16-bit dtypes, ``jax.vmap``,
``jax.shard_map`` and the library's dispatch. Every kernel call runs twice and must give
bit-identical results (a difference means a race). Skipped without a Hopper GPU
(``tests/conftest.py``); on CPU the same kernels are cross-lowered by
``test_kernels_mgpu_lowering.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import packed_checks as pc
import pytest
import selected_checks as sc

from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_mgpu as mg
from sparse_attention_jax.ops.selected import selected_attention

pytestmark = pytest.mark.gpu


@pytest.fixture
def run_twice():
  """``run(f, *args)``: ``f(*args)`` twice; the two results must be bit-identical (no race)."""

  def run(f, *args):
    first = jax.block_until_ready(f(*args))
    second = jax.block_until_ready(f(*args))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
      assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), "race: runs differ"
    return first

  return run


@dataclasses.dataclass(frozen=True)
class Problem:
  """Shapes of one check: ``q [B, T, HQ, Dk]``, ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``n``
  selected blocks a token, ``dtype`` of q/k/v, and packed documents or not."""

  b: int
  t: int
  hq: int
  h: int
  dk: int
  dv: int
  n: int
  dtype: str = "bfloat16"
  docs: bool = False

  def inputs(self, seed: int, block_size: int):
    """Fresh ``q, k, v, do, block_indices, segment_ids`` (a few rows select nothing)."""
    kq, kk, kv, ki, kd, ks = jax.random.split(jax.random.key(seed), 6)
    dt = jnp.dtype(self.dtype)
    rnd = lambda key, *shape: jax.random.normal(key, shape, jnp.float32).astype(dt)
    q = rnd(kq, self.b, self.t, self.hq, self.dk)
    k = rnd(kk, self.b, self.t, self.h, self.dk)
    v = rnd(kv, self.b, self.t, self.h, self.dv)
    do = rnd(kd, self.b, self.t, self.hq, self.dv)
    seg = None
    if self.docs:  # document-relative ids (packed_checks)
      seg = sc.random_segments(ks, self.b, self.t)
      rng = np.random.default_rng(int(jax.random.randint(ki, (), 0, 2**30)))
      bi = pc.relative_selection(rng, seg, self.h, self.n, block_size=block_size)
    else:
      bi = sc.random_selection(ki, self.b, self.t, self.h, self.n, block_size=block_size)
    bi = bi.at[:, 70:74].set(-1)  # rows that see no key
    return q, k, v, do, bi, seg


G16 = Problem(1, 301, 32, 2, 128, 128, 16)
CASES = {
  # forward kernel variants (default tuning: exact -> 128-row persistent, direct layout)
  "g16-exact-default": (G16, {}),
  "g16-shared-default": (G16, {"mode": "shared"}),
  "g16-exact-fwd64-tiles": (G16, {"tile_rows": 64, "q_layout": "tiles"}),
  "g16-exact-fwd128-pertile-nopp": (G16, {"persistent": False, "ping_pong": False}),
  "g16-f16-b2-exact-pertile": (
    Problem(2, 1000, 32, 2, 64, 64, 8, "float16"),
    {"persistent": False, "bwd_chunk": 3},
  ),
  "g16-exact-persistent5-tiles": (G16, {"q_layout": "tiles", "num_ctas": 5}),
  "g8-f16-exact-persistent3-bwdtiles": (
    Problem(1, 517, 16, 2, 128, 128, 6, "float16"),
    {"num_ctas": 3, "bwd_direct": False},
  ),
  "g4-shared-docs": (Problem(1, 333, 8, 2, 128, 128, 5, docs=True), {"mode": "shared"}),
  "g3-exact-docs-persistent": (Problem(1, 250, 6, 2, 128, 128, 4, docs=True), {"num_ctas": 4}),
  "g1-exact": (Problem(1, 250, 2, 2, 64, 64, 4), {}),
  # head dims and block sizes
  "g16-dk192-dv128-block128-docs": (
    Problem(1, 301, 32, 2, 192, 128, 8, docs=True),
    {"block_size": 128},
  ),
  "g4-dk160-dv128-shared-block32": (
    Problem(1, 250, 8, 2, 160, 128, 4),
    {"mode": "shared", "block_size": 32},
  ),
  "g16-dk160-dv128-block32-stages3": (
    Problem(1, 517, 32, 2, 160, 128, 8, "float16"),
    {"block_size": 32, "num_stages": 3, "bwd_chunk": 3},
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_the_reference(case, run_twice):
  prob, knobs = CASES[case]
  if prob.docs:  # random_segments: at most 6 documents, so NB + 5 padded blocks always fit
    knobs = {"doc_blocks": 5, **knobs}
  tuning = mg.TuningConfig(**knobs)
  bs = tuning.block_size
  q, k, v, do, bi, seg = prob.inputs(seed=sorted(CASES).index(case), block_size=bs)
  assert seg is None or bool(mg.documents_fit(seg, tuning))
  scale = prob.dk**-0.5
  call = lambda q, k, v, bi, seg, **kw: mg.selected_attention_mgpu(
    q, k, v, bi, segment_ids=seg, tuning=tuning, **kw
  )

  def kernel(q, k, v, do, bi, seg):  # one executable: forward with LSE, and the VJP
    grads = jax.vjp(lambda *x: call(*x, bi, seg), q, k, v)[1](do)
    return call(q, k, v, bi, seg, return_lse=True), grads

  (o, lse), grads = run_twice(jax.jit(kernel), q, k, v, do, bi, seg)
  shared_run = common.tokens_per_tile(prob.hq // prob.h) if tuning.mode == "shared" else None

  @jax.jit
  def reference(q, k, v, do, bi, seg):
    if seg is None:
      ref = lambda q, k, v: sc.reference(
        q, k, v, bi, block_size=bs, scale=scale, shared_run=shared_run
      )
    else:  # document-relative block ids
      ref = lambda q, k, v: pc.reference(
        q, k, v, bi, seg, block_size=bs, scale=scale, shared_run=shared_run
      )
    f32 = lambda x: x.astype(jnp.float32)
    (o_ref, lse_ref), vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    return o_ref, lse_ref, vjp((f32(do), jnp.zeros_like(lse_ref)))

  o_ref, lse_ref, grads_ref = reference(q, k, v, do, bi, seg)
  tol = sc.TOLERANCES[jnp.dtype(prob.dtype)]
  assert o.dtype == q.dtype and o.shape == (prob.b, prob.t, prob.hq, prob.dv)
  sc.assert_forward_close(o, lse, o_ref, lse_ref, tol)
  assert all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
  sc.assert_grads_close(grads, grads_ref, tol)


def test_standard_shape_forward(run_twice):
  """The standard NSA shape at T = 4096 (``HQ = 64, H = 4``, n = 16), default tuning."""
  prob = Problem(1, 4096, 64, 4, 128, 128, 16)
  q, k, v, _, bi, _ = prob.inputs(seed=7, block_size=64)
  o, lse = run_twice(
    jax.jit(lambda q, k, v, bi: mg.selected_attention_mgpu(q, k, v, bi, return_lse=True)),
    q,
    k,
    v,
    bi,
  )
  o_ref, lse_ref = jax.jit(
    lambda q, k, v, bi: sc.reference(q, k, v, bi, block_size=64, scale=128**-0.5)
  )(q, k, v, bi)
  sc.assert_forward_close(o, lse, o_ref, lse_ref, sc.TOLERANCES[q.dtype])


def test_transforms_vmap_and_shard_map():
  """The library op with ``impl="pallas_gpu"`` under ``jax.vmap`` and inside ``jax.shard_map``
  over all local GPUs (batch; KV heads when their number divides H)."""
  op = lambda q, k, v, bi: selected_attention(q, k, v, bi, block_size=64, impl="pallas_gpu")
  rows = sc.transform_errors(op, block_size=64)
  assert [name.split()[0] for name, _ in rows][:2] == ["vmap", "shard_map"]
  for name, errs in rows:
    assert all(e < 2e-2 for e in errs.values()), (name, errs)


@pytest.mark.parametrize("dk,dv,bs", [(64, 64, 64), (160, 128, 128), (64, 64, 32)])
def test_library_dispatch_uses_the_kernel(dk, dv, bs):
  """``impl="auto"`` picks the kernel on a Hopper GPU, and ``jax.grad`` through
  ``impl="pallas_gpu"`` (the kernels' backward) matches the reference's."""
  prob = Problem(1, 200, 32, 2, dk, dv, 4)
  q, k, v, do, bi, _ = prob.inputs(seed=100 + dk + bs, block_size=bs)
  auto = selected_attention(q, k, v, bi, block_size=bs, impl="auto")
  tuning = mg.TuningConfig(block_size=bs)
  np.testing.assert_array_equal(auto, mg.selected_attention_mgpu(q, k, v, bi, tuning=tuning))
  w = do.astype(jnp.float32)
  loss = lambda impl: (
    lambda q, k, v: jnp.sum(
      selected_attention(q, k, v, bi, block_size=bs, impl=impl).astype(jnp.float32) * w
    )
  )
  gk = jax.jit(jax.grad(loss("pallas_gpu"), argnums=(0, 1, 2)))(q, k, v)
  gr = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, k, v)
  for a, r in zip(gk, gr):
    assert sc.rel_err(a, r) < 2e-2
