"""The Pallas TPU selected-attention kernels on CPU: TPU interpreter numerics and cross-lowering.

* Numerics: forward (O, LSE) and gradients (dQ, dK, dV) of
  :func:`pallas_kernels.selected_attention_tpu.selected_attention_tpu` against the float32
  plain-JAX reference (``selected_checks.reference``), run in the TPU interpreter with
  ``InterpretParams(detect_races=True, uninitialized_memory="nan")``: simulated HBM/VMEM/SMEM,
  DMAs and semaphores, a data race or a read of uninitialized memory fails the test. The default
  set is a representative subset (G = 1, 4, 16; float32 and bfloat16; T not a multiple of the
  tile or block; -1 padding, duplicates, future ids; packed documents; Dk != Dv). The full matrix
  (every G x dtype x documents, G = 3 whose tiles end in padding rows, and shared selection
  with documents) runs with ``SAJ_FULL_INTERPRET=1`` (about 100 s on one core).
* XLA-side structures (iteration lists, inverse map, tile layout) against NumPy.
* Cross-lowering of the forward, dQ and dK/dV kernels for an abstract TPU v5p at the standard shape
  (HQ=64, H=4, D=128, T=65536, n=16, l'=64): Mosaic MLIR is built (shapes, dtypes, block specs,
  unsupported ops surface); compiling it needs a TPU.
* The library entry (``impl="pallas_tpu"``) under ``force_tpu_interpret_mode``; the kernels
  inside ``jax.shard_map`` over batch and heads on 4 simulated devices (a subprocess); what
  they decline.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selected_checks as sc
from conftest import rand_qkv
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import selected_attention_tpu as st
from pallas_kernels import selected_attention_tpu_prep as prep
from sparse_attention_jax.ops.selected import selected_attention
from sparse_attention_jax.ops.selection import share_selection

FULL = os.environ.get("SAJ_FULL_INTERPRET") == "1"
CHECKED = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
F32_TOL = 2e-5


def _case(b, t, hq, h, dk, dv, n, bs, *, dtype, docs, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = rand_qkv(keys[0], b, t, hq, h, dk, dv, dtype)
  bi = sc.random_selection(keys[1], b, t, h, n, block_size=bs)
  seg = sc.random_segments(keys[2], b, t, 3) if docs else None
  do = jax.random.normal(keys[3], (b, t, hq, dv), jnp.float32).astype(dtype)
  return q, k, v, bi, seg, do


def _check_numerics(case, bs, *, config, shared_run=None, grads=True):
  q, k, v, bi, seg, do = case
  scale = q.shape[-1] ** -0.5
  kw = dict(block_size=bs, segment_ids=seg, config=config)
  ref_bi = bi if shared_run is None else share_selection(bi, shared_run, segment_ids=seg)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: sc.reference(q, k, v, ref_bi, block_size=bs, scale=scale, segment_ids=seg)

  def outputs(fn, *args):  # one jitted program: O and, with grads, the VJP of do
    if not grads:
      return fn(*args[:3]), None
    o, vjp = jax.vjp(fn, *args[:3])
    return o, vjp(args[3])

  kernel = lambda q, k, v: st.selected_attention_tpu(q, k, v, bi, **kw)
  o, got_grads = jax.jit(lambda *a: outputs(kernel, *a))(q, k, v, do)
  ro, want_grads = jax.jit(lambda *a: outputs(lambda *b: ref(*b)[0], *a))(
    f32(q), f32(k), f32(v), f32(do)
  )
  if q.dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=F32_TOL, rtol=F32_TOL)
  else:
    tol = sc.TOLERANCES[jnp.dtype(q.dtype)]
    assert sc.rel_err(o, ro) < tol.o_rel
    assert np.abs(np.asarray(o, np.float32) - np.asarray(ro)).max() < tol.o_max
  if not grads:
    return
  for name, got, want in zip("qkv", got_grads, want_grads):
    if q.dtype == jnp.float32:
      np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), atol=F32_TOL, rtol=F32_TOL, err_msg=f"d{name}"
      )
    else:
      tol = sc.TOLERANCES[jnp.dtype(q.dtype)]
      assert sc.rel_err(got, want) < tol.grad_rel, f"d{name}"
      scale_max = max(float(np.abs(np.asarray(want)).max()), 1e-30)
      err = np.abs(np.asarray(got, np.float32) - np.asarray(want)).max() / scale_max
      assert err < tol.grad_max, f"d{name}"


# (B, T, HQ, H, Dk, Dv, n, bs, dtype, documents): T is never a multiple of the tile's tokens
DEFAULT_CASES = {
  "g4_f32_dk_ne_dv": (1, 100, 8, 2, 32, 16, 3, 16, jnp.float32, False),
  "g16_bf16_packed": (1, 70, 16, 1, 32, 32, 4, 16, jnp.bfloat16, True),
  "g1_f32_batch2": (2, 150, 2, 2, 16, 32, 3, 32, jnp.float32, False),
}
# DMA ring depth and dK/dV tile-id refill size per case (small refills exercise the refill path)
DEFAULT_RINGS = {"g4_f32_dk_ne_dv": (3, 2), "g16_bf16_packed": (4, 128), "g1_f32_batch2": (2, 1)}
FULL_CASES = {
  f"g{g}_{jnp.dtype(dt).name}_{'packed' if docs else 'plain'}": (
    1,
    170,
    2 * g,
    2,
    32,
    16,
    4,
    16,
    dt,
    docs,
  )
  for g in (1, 4, 16)
  for dt in (jnp.float32, jnp.bfloat16)
  for docs in (False, True)
}
FULL_CASES["g3_float32_packed_padding_rows"] = (1, 90, 6, 2, 32, 16, 4, 16, jnp.float32, True)


@pytest.mark.parametrize("name", list(DEFAULT_CASES))
def test_forward_and_gradients_match_reference(name):
  b, t, hq, h, dk, dv, n, bs, dtype, docs = DEFAULT_CASES[name]
  case = _case(b, t, hq, h, dk, dv, n, bs, dtype=dtype, docs=docs)
  slots, chunk = DEFAULT_RINGS[name]
  config = st.TpuConfig(slots=slots, pair_chunk=chunk, interpret=CHECKED)
  _check_numerics(case, bs, config=config)


@pytest.mark.skipif(not FULL, reason="full interpreter matrix: SAJ_FULL_INTERPRET=1")
@pytest.mark.parametrize("name", list(FULL_CASES))
def test_full_matrix(name):
  b, t, hq, h, dk, dv, n, bs, dtype, docs = FULL_CASES[name]
  case = _case(b, t, hq, h, dk, dv, n, bs, dtype=dtype, docs=docs, seed=1)
  _check_numerics(case, bs, config=st.TpuConfig(interpret=CHECKED))


@pytest.mark.parametrize(
  "docs",
  [False, pytest.param(True, marks=pytest.mark.skipif(not FULL, reason="SAJ_FULL_INTERPRET=1"))],
)
def test_shared_selection_matches_reference_of_shared_picks(docs):
  g, bs = 4, 16
  case = _case(1, 90, 2 * g, 2, 32, 32, 3, bs, dtype=jnp.float32, docs=docs, seed=2)
  config = st.TpuConfig(shared=True, interpret=True if not FULL else CHECKED)
  _check_numerics(case, bs, config=config, shared_run=128 // g, grads=FULL)


def test_lse_matches_reference_and_empty_rows_are_zero():
  q, k, v, bi, _, _ = _case(1, 40, 4, 2, 16, 16, 2, 16, dtype=jnp.float32, docs=False)
  bi = bi.at[:, 5:9].set(-1)  # tokens that see nothing
  cfg = st.TpuConfig(interpret=True)
  o, lse = jax.jit(
    lambda *a: st.selected_attention_tpu(*a, block_size=16, return_lse=True, config=cfg)
  )(q, k, v, bi)
  ro, rlse = sc.reference(q, k, v, bi, block_size=16, scale=16**-0.5)
  finite = np.isfinite(np.asarray(rlse))
  assert not finite[:, 5:9].any()
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(rlse)[finite], atol=F32_TOL)
  np.testing.assert_array_equal(np.asarray(o)[:, 5:9], 0.0)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=F32_TOL)


# ------------------------------------------------------------------- XLA-side structures
def test_tile_lists_are_sorted_unions_of_visible_picks():
  b, t, h, n, bs, r = 2, 45, 3, 4, 8, 16
  bi = sc.random_selection(jax.random.PRNGKey(5), b, t, h, n, block_size=bs)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  nb = -(-t // bs)
  lists, ids, counts = map(np.asarray, prep.tile_lists(bi, pos, r=r, block_size=bs, num_blocks=nb))
  bi_np = np.asarray(bi)
  for bb in range(b):
    for hh in range(h):
      for tile in range(-(-t // r)):
        want = sorted(
          {
            int(x)
            for tok in range(tile * r, min(t, (tile + 1) * r))
            for x in bi_np[bb, tok, hh]
            if 0 <= x < nb and x * bs <= tok
          }
        )
        c = int(counts[bb, hh, tile])
        assert c == len(want) == int(lists[bb, hh, tile, 0, 0])
        got = ids[bb, hh, tile]
        assert list(got[:c]) == want
        assert (got[c:] == (want[-1] if want else 0)).all()  # padding repeats the last id
        np.testing.assert_array_equal(lists[bb, hh, tile, 0, 1:], got)


def test_inverse_pairs_list_every_tile_of_every_block_once():
  b, t, h, n, bs, r = 1, 64, 2, 3, 8, 8
  bi = sc.random_selection(jax.random.PRNGKey(6), b, t, h, n, block_size=bs)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  nb = t // bs
  _, ids, counts = prep.tile_lists(bi, pos, r=r, block_size=bs, num_blocks=nb)
  bounds, tiles = prep.inverse_pairs(ids, counts, num_blocks=nb, chunk=4)
  ids, counts, bounds, tiles = map(np.asarray, (ids, counts, bounds, tiles))
  for hh in range(h):
    for blk in range(nb):
      lo, hi = bounds[0, hh, blk, 0]
      want = [i for i in range(ids.shape[2]) if blk in ids[0, hh, i, : counts[0, hh, i]]]
      assert list(tiles[0, hh, lo:hi]) == want


def test_tile_layout_round_trips():
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 37, 12, 5))
  h, r, rows = 3, 128 // 4, 128
  xt = prep.to_tiles(x, h, r, rows)  # [B, H, NT*R, D]
  nt = -(-37 // r)
  back = prep.from_tiles_t(xt.reshape(2, h, nt, rows, 5).swapaxes(-1, -2), 37, 4)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


# ------------------------------------------------------------------------- cross-lowering
V5P = AbstractMesh(
  (1,),
  ("x",),
  abstract_device=AbstractDevice(device_kind="TPU v5p", num_cores=None, platform="tpu"),
)
KERNELS = ("selected_attention_tpu_fwd", "selected_attention_tpu_dq", "selected_attention_tpu_dkv")


def _lower_fwd_bwd(b, t, hq, h, d, n, bs, dtype, *, docs=False, dv=None):
  dv = d if dv is None else dv
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), -(-t // 4))[None, :t] if docs else None

  def loss(q, k, v, bi):
    o = st.selected_attention_tpu(q, k, v, bi, block_size=bs, segment_ids=seg)
    return jnp.sum(o.astype(jnp.float32))

  avals = (
    jax.ShapeDtypeStruct((b, t, hq, d), dtype),
    jax.ShapeDtypeStruct((b, t, h, d), dtype),
    jax.ShapeDtypeStruct((b, t, h, dv), dtype),
    jax.ShapeDtypeStruct((b, t, h, n), jnp.int32),
  )
  with jax.sharding.use_abstract_mesh(V5P):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*avals)
    return lowered.lower(lowering_platforms=("tpu",)).as_text()


def test_standard_shape_lowers_for_tpu_v5p():
  text = _lower_fwd_bwd(1, 65536, 64, 4, 128, 16, 64, jnp.bfloat16)
  assert text.count("tpu_custom_call") == 3
  for name in KERNELS:
    assert name in text


@pytest.mark.parametrize(
  "g,dtype,docs,dv",
  [(1, jnp.float32, False, 64), (4, jnp.bfloat16, True, 128), (16, jnp.float32, True, 96)],
)
def test_other_configurations_lower_for_tpu_v5p(g, dtype, docs, dv):
  text = _lower_fwd_bwd(1, 1000, 2 * g, 2, 128, 8, 64, dtype, docs=docs, dv=dv)
  for name in KERNELS:
    assert name in text


# ------------------------------------------------------------------------ library entry
def test_library_entry_matches_reference_in_interpret_mode():
  q, k, v, bi, seg, _ = _case(1, 48, 4, 1, 16, 16, 3, 16, dtype=jnp.float32, docs=True)
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    f = lambda *a: selected_attention(*a, block_size=16, segment_ids=seg, impl="pallas_tpu")
    o = jax.jit(f)(q, k, v, bi)
  ro, _ = sc.reference(q, k, v, bi, block_size=16, scale=16**-0.5, segment_ids=seg)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=F32_TOL)


def test_declines_with_reasons():
  q, k, v, bi, _, _ = _case(1, 32, 4, 1, 16, 16, 2, 16, dtype=jnp.float32, docs=False)
  with pytest.raises(NotImplementedError, match="pallas_tpu.*needs a TPU"):
    selected_attention(q, k, v, bi, block_size=16, impl="pallas_tpu")
  run = lambda *a, **kw: st.selected_attention_tpu(*a, **kw, config=st.TpuConfig(interpret=True))
  f16 = lambda x: x.astype(jnp.float16)
  with pytest.raises(NotImplementedError, match="dtype"):
    run(f16(q), f16(k), f16(v), bi, block_size=16)
  bf = lambda x: x.astype(jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="block_size=8"):
    run(bf(q), bf(k), bf(v), bi, block_size=8)
  wide = jnp.zeros((1, 32, 256, 16), jnp.float32)
  with pytest.raises(NotImplementedError, match="G=256"):
    run(wide, k, v, bi, block_size=16)
  with pytest.raises(ValueError, match="tile_rows"):
    st.TpuConfig(tile_rows=100)
  with pytest.raises(ValueError, match="slots"):
    st.TpuConfig(slots=1)


def test_kernels_sharded_over_batch_and_heads_on_four_devices():
  """4 simulated CPU devices need a fresh process (``tpu_shard_map_worker.py``)."""
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(os.path.dirname(here))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, here, os.path.dirname(here)]))
  out = subprocess.run(
    [sys.executable, os.path.join(here, "tpu_shard_map_worker.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
