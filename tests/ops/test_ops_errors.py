"""Input validation (errors name the bad argument) and ``impl=`` dispatch through the registry."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv, segments

from sparse_attention_jax import (
  CompressorParams,
  NSAConfig,
  block_importance,
  compress,
  compressed_attention,
  dense_causal_attention,
  init_mlp_compressor,
  nsa_attention,
  select_blocks,
  selected_attention,
  sliding_window_attention,
)
from sparse_attention_jax.ops import dispatch

B, T, HQ, H, DK, DV = 1, 32, 4, 2, 8, 4
CFG = NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8)
MLP = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=8)


def qkv(seed=0, **kw):
  return rand_qkv(
    jax.random.key(seed),
    kw.get("b", B),
    kw.get("t", T),
    kw.get("hq", HQ),
    kw.get("h", H),
    kw.get("dk", DK),
    kw.get("dv", DV),
    kw.get("dtype", jnp.float32),
  )


def bidx(h=H, n=3):
  return jnp.zeros((B, T, h, n), jnp.int32)


def mlp_params():
  return CompressorParams(
    k=init_mlp_compressor(jax.random.key(1), num_kv_heads=H, window=8, in_dim=DK),
    v=init_mlp_compressor(jax.random.key(2), num_kv_heads=H, window=8, in_dim=DV),
  )


OPS = {
  "dense": dense_causal_attention,
  "win": functools.partial(sliding_window_attention, window=4),
  "slc": lambda q, k, v, **kw: selected_attention(
    q, k, v, bidx(k.shape[2] if k.ndim == 4 else H), block_size=8, **kw
  ),
  "nsa": functools.partial(nsa_attention, config=CFG),
}


def raises(exc, name):
  """``pytest.raises`` whose message must start with (or name) the argument."""
  return pytest.raises(exc, match=rf"(^|\W){name}\W")


# ------------------------------------------------------------------------------- shapes & dtypes
@pytest.mark.parametrize("op", list(OPS))
def test_wrong_ranks(op):
  q, k, v = qkv()
  fn = OPS[op]
  with raises(ValueError, "q"):
    fn(q[0], k, v)
  with raises(ValueError, "k"):
    fn(q, k[..., None], v)
  with raises(ValueError, "v"):
    fn(q, k, v[0])


@pytest.mark.parametrize("op", list(OPS))
def test_heads_not_divisible(op):
  q, k, v = qkv(h=3, hq=4)
  with raises(ValueError, r"k\.shape\[2\]"):
    OPS[op](q, k, v)


@pytest.mark.parametrize("op", list(OPS))
def test_mismatched_head_dims(op):
  q, _, v = qkv()
  _, k, _ = qkv(dk=DK + 2)
  with raises(ValueError, "k"):
    OPS[op](q, k, v)
  q, k, v = qkv()
  with raises(ValueError, "v"):  # v with a different head count than k
    OPS[op](q, k, jnp.concatenate([v, v], axis=2))
  with raises(ValueError, "v"):  # v with a different length than k
    OPS[op](q, k, v[:, :-1])


@pytest.mark.parametrize("op", list(OPS))
def test_mismatched_and_non_float_dtypes(op):
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"k/v.*dtype|dtype.*k/v"):
    OPS[op](q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"k/v"):
    OPS[op](q, k, v.astype(jnp.bfloat16))
  with raises(ValueError, "q"):
    OPS[op](q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
  with raises(ValueError, "v"):
    OPS[op](q, k, v.astype(jnp.int32))


@pytest.mark.parametrize("op", list(OPS))
def test_bad_segment_ids(op):
  q, k, v = qkv()
  seg = segments(B, T, [10])
  with raises(ValueError, "segment_ids"):
    OPS[op](q, k, v, segment_ids=seg.astype(jnp.float32))
  with raises(ValueError, "segment_ids"):
    OPS[op](q, k, v, segment_ids=seg[:, :-1])
  with raises(ValueError, "segment_ids"):
    OPS[op](q, k, v, segment_ids=seg[0])


@pytest.mark.parametrize("op", list(OPS))
def test_empty_batch_or_length_rejected(op):
  """B = 0 or T = 0 fails at the entry check naming the axis, not deep inside a kernel."""
  q, k, v = qkv(b=0)
  with pytest.raises(ValueError, match=r"^q\.shape\[0\]: expected a batch size B >= 1, got 0$"):
    OPS[op](q, k, v)
  q, k, v = qkv(t=0)
  with pytest.raises(ValueError, match=r"^q\.shape\[1\]: expected a length T >= 1, got 0$"):
    OPS[op](q, k, v)


def test_empty_inputs_of_the_nsa_pieces_rejected():
  _, k, _ = qkv(b=0)
  with raises(ValueError, r"k\.shape\[0\]"):
    compress(k, CFG, name="k")
  with raises(ValueError, r"probs\.shape\[1\]"):
    block_importance(jnp.ones((B, 0, HQ, 0)), CFG, num_kv_heads=H)
  with raises(ValueError, r"importance\.shape\[0\]"):
    select_blocks(jnp.ones((0, T, H, T // 8)), CFG)
  q, _, _ = qkv(t=0)
  k_cmp = jnp.zeros((B, 0, H, DK))
  with raises(ValueError, r"q\.shape\[1\]"):
    compressed_attention(q, k_cmp, k_cmp, CFG)


def test_cross_attention_lengths_rejected():
  q, k, v = qkv()
  for op in OPS.values():
    with raises(ValueError, "k"):
      op(q[:, :-8], k, v)


def test_bad_gates():
  q, k, v = qkv()
  g = jnp.full((B, T, HQ, 3), 0.5)
  with raises(ValueError, "gates"):
    nsa_attention(q, k, v, g[..., :2], config=CFG)
  with raises(ValueError, "gates"):
    nsa_attention(q, k, v, g[:, :, :2], config=CFG)
  with raises(ValueError, "gates"):
    nsa_attention(q, k, v, g[0], config=CFG)
  with raises(ValueError, "gates"):
    nsa_attention(q, k, v, g.astype(jnp.int32), config=CFG)


def test_bad_block_indices():
  q, k, v = qkv()
  with raises(ValueError, "block_indices"):
    selected_attention(q, k, v, bidx().astype(jnp.float32), block_size=8)
  with raises(ValueError, "block_indices"):
    selected_attention(q, k, v, bidx(h=1), block_size=8)
  with raises(ValueError, "block_indices"):
    selected_attention(q, k, v, bidx()[0], block_size=8)
  with raises(ValueError, "block_indices"):
    nsa_attention(q, k, v, config=CFG, block_indices=bidx(h=HQ))
  with raises(ValueError, "block_size"):
    selected_attention(q, k, v, bidx(), block_size=0)
  with raises(ValueError, "window"):
    sliding_window_attention(q, k, v, window=0)


def test_bad_branch_kv():
  q, k, v = qkv()
  with raises(ValueError, "k_slc"):
    nsa_attention(q, k, v, config=CFG, k_slc=k[:, :, :1])
  with raises(ValueError, "v_win"):
    nsa_attention(q, k, v, config=CFG, v_win=jnp.concatenate([v, v], axis=-1))
  with raises(ValueError, "k_win"):
    nsa_attention(q, k, v, config=CFG, k_win=k.astype(jnp.bfloat16))


def test_compressed_attention_checks():
  q, k, v = qkv()
  kc, vc = compress(k, CFG), compress(v, CFG)
  with raises(ValueError, "k_cmp"):
    compressed_attention(q, kc[:, :-1], vc[:, :-1], CFG)
  with raises(ValueError, "v_cmp"):
    compressed_attention(q, kc, vc[..., None], CFG)
  with raises(ValueError, "k_cmp"):
    compressed_attention(q, kc.astype(jnp.bfloat16), vc, CFG)


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
  "kw,name",
  [
    (dict(cmp_window=12, cmp_stride=8, block_size=16), "cmp_stride"),  # d does not divide l
    (dict(cmp_window=32, cmp_stride=16, block_size=24), "cmp_stride"),  # d does not divide l'
    (dict(num_selected=2, num_init_blocks=1, num_local_blocks=2), "num_selected"),
    (dict(num_selected=0), "num_selected"),
    (dict(block_size=0), "block_size"),
    (dict(num_local_blocks=-1), "num_local_blocks"),
    (dict(window=0), "window"),
    (dict(compression="max"), "compression"),
    (dict(score_pooling="mean"), "score_pooling"),
    (dict(branches=("cmp", "xyz")), "branches"),
    (dict(branches=()), "branches"),
    (dict(branches=("slc", "slc")), "branches"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
  ],
)
def test_bad_config(kw, name):
  with raises(ValueError, name):
    NSAConfig.paper(**kw)


def test_config_must_be_nsaconfig():
  q, k, v = qkv()
  with raises(ValueError, "config"):
    nsa_attention(q, k, v, config={"block_size": 8})


@pytest.mark.parametrize("bad", [None, {"block_size": 8}, "fla"])
def test_every_config_taking_op_checks_the_type(bad):
  """``config=None`` (or a dict) names ``config`` instead of an AttributeError deep inside."""
  from sparse_attention_jax.ops import (
    agnostic_block_scores,
    cmp_visibility,
    fill_nsa_cache,
    init_nsa_cache,
    nosa_attention,
    nosa_scores,
    nosa_select,
  )
  from sparse_attention_jax.ops.nosa import fill_nosa_cache, init_nosa_cache, nosa_decode_step
  from sparse_attention_jax.ops.nsa_decode import nsa_decode_step

  q, k, v = qkv()
  k_cmp = compress(k, CFG, name="k")
  nb = T // 8
  probs = jnp.ones((B, T, HQ, CFG.num_cmp_tokens(T)))
  c = jnp.zeros((B, T, H))
  scores = jnp.zeros((B, T, H, nb))
  lengths = jnp.full((B,), T, jnp.int32)
  cache = init_nsa_cache(B, T, config=CFG, num_kv_heads=H, dk=DK, dv=DV, dtype=jnp.float32)
  calls = {
    "compress": lambda: compress(k, bad),
    "compressed_attention": lambda: compressed_attention(q, k_cmp, k_cmp, bad),
    "block_importance": lambda: block_importance(probs, bad, num_kv_heads=H),
    "select_blocks": lambda: select_blocks(scores, bad),
    "nsa_attention": lambda: nsa_attention(q, k, v, config=bad),
    "cmp_visibility": lambda: cmp_visibility(bad, T),
    "init_nsa_cache": lambda: init_nsa_cache(
      B, T, config=bad, num_kv_heads=H, dk=DK, dv=DV, dtype=jnp.float32
    ),
    "fill_nsa_cache": lambda: fill_nsa_cache(cache, config=bad, lengths=lengths, k=k, v=v),
    "nsa_decode_step": lambda: nsa_decode_step(
      cache, q[:, 0], config=bad, pos=lengths - 1, k=k[:, 0], v=v[:, 0]
    ),
    "agnostic_block_scores": lambda: agnostic_block_scores(c, bad),
    "nosa_scores": lambda: nosa_scores(q, k, c, bad),
    "nosa_select": lambda: nosa_select(scores, scores, bad, num_query_selected=2),
    "nosa_attention": lambda: nosa_attention(q, k, v, c, config=bad, num_query_selected=2),
    "init_nosa_cache": lambda: init_nosa_cache(
      B, T, config=bad, num_kv_heads=H, dk=DK, dv=DV, dtype=jnp.float32
    ),
    "fill_nosa_cache": lambda: fill_nosa_cache(None, config=bad, lengths=lengths, k=k, v=v, c=c),
    "nosa_decode_step": lambda: nosa_decode_step(
      None, q[:, 0], config=bad, num_query_selected=2, pos=lengths - 1, k=k, v=v, c=c
    ),
  }
  for name, call in calls.items():
    with pytest.raises(
      ValueError, match=rf"^config: expected an NSAConfig, got {type(bad).__name__}$"
    ):
      call()
      pytest.fail(f"{name} accepted config={bad!r}")


def test_num_selected_larger_than_blocks():
  q, k, v = qkv()
  with raises(ValueError, r"config\.num_selected"):
    nsa_attention(q, k, v, config=CFG.replace(num_selected=T // 8 + 1))
  imp = jnp.ones((B, T, H, T // 8))
  with raises(ValueError, r"config\.num_selected"):
    select_blocks(imp, CFG.replace(num_selected=T // 8 + 1))
  with raises(ValueError, "importance"):
    select_blocks(imp[..., :-1], CFG)


def test_compress_params_checks():
  q, k, v = qkv()
  with raises(ValueError, "compress_params"):
    nsa_attention(q, k, v, config=MLP)
  with raises(ValueError, "compress_params"):
    nsa_attention(q, k, v, config=MLP, compress_params=mlp_params().k)
  with raises(ValueError, "compress_params"):
    nsa_attention(q, k, v, config=MLP.replace(compression="mean"), compress_params=mlp_params())
  with raises(ValueError, "compress_params"):
    compress(k, MLP.replace(compression="mean"), mlp_params().k)
  with raises(ValueError, "compress_params"):
    compress(k, MLP, None)
  with raises(ValueError, "compress_params"):  # phi for a different head dim
    compress(k, MLP, mlp_params().v)
  with raises(ValueError, "x"):
    compress(k[0], CFG)


def test_block_importance_checks():
  probs = jnp.ones((B, T, HQ, CFG.num_cmp_tokens(T)))
  with raises(ValueError, "num_kv_heads"):
    block_importance(probs, CFG, num_kv_heads=3)
  with raises(ValueError, "probs"):
    block_importance(probs[..., :-1], CFG, num_kv_heads=H)
  with raises(ValueError, "probs"):
    block_importance(probs[0], CFG, num_kv_heads=H)


# ----------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("op", ["slc", "nsa"])
def test_unknown_and_unavailable_impl(op):
  q, k, v = qkv()
  fn = OPS[op]
  with raises(ValueError, "impl"):
    fn(q, k, v, impl="triton")
  for name in ("pallas_gpu", "pallas_tpu"):  # no kernel serves a CPU call
    if name == "pallas_gpu" and jax.default_backend() == "gpu":
      continue
    with pytest.raises(NotImplementedError, match=name):
      fn(q, k, v, impl=name)
  ref = fn(q, k, v, impl="reference")
  # "auto" falls back to the reference on CPU; NSA's window branch then runs the blocked op
  # instead of the dense masked reference, equal up to float32 rounding.
  np.testing.assert_allclose(
    np.asarray(fn(q, k, v, impl="auto")), np.asarray(ref), atol=1e-5, rtol=1e-5
  )


@pytest.fixture
def register():
  """Adds fake implementations to the dispatch table for the test and always removes them.

  ``add(name, ops, platforms=None)``: ``ops`` maps op name -> function; each entry goes first in
  its op's auto order (so the last one added is tried first).
  """
  added = []

  def add(name, ops, platforms=None):
    platforms = (jax.default_backend(),) if platforms is None else platforms
    dispatch.declare(name, "a fake backend of the tests")
    for op, fn in ops.items():
      dispatch.register(op, dispatch.Implementation(name, fn, platforms=platforms), position=0)
    added.append((name, tuple(ops)))

  yield add
  for name, ops in added:
    dispatch.undeclare(name)
    for op in ops:
      dispatch.unregister(op, name)
  assert not {name for name, _ in added} & set(dispatch.valid_impls())


def _unsupported(*args, **kwargs):
  raise NotImplementedError("fake backend: unsupported configuration")


def _marker(value):
  def fn(q, k, v, *args, **kwargs):
    return jnp.full(q.shape[:3] + (v.shape[3],), value, q.dtype)

  return fn


def test_backend_raising_not_implemented_falls_back_under_auto(register):
  register("fake_unsupported", {"selected_attention": _unsupported, "nsa_attention": _unsupported})
  assert "fake_unsupported" in dispatch.valid_impls()
  q, k, v = qkv(3)
  bi = jax.random.randint(jax.random.key(4), (B, T, H, 3), -1, T // 8, jnp.int32)
  ref = selected_attention(q, k, v, bi, block_size=8, impl="reference")
  out = selected_attention(q, k, v, bi, block_size=8, impl="auto")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  ref = nsa_attention(q, k, v, config=CFG, impl="reference")
  out = jax.jit(functools.partial(nsa_attention, config=CFG, impl="auto"))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
  with pytest.raises(NotImplementedError, match="unsupported"):
    selected_attention(q, k, v, bi, block_size=8, impl="fake_unsupported")
  with pytest.raises(NotImplementedError, match="unsupported"):
    nsa_attention(q, k, v, config=CFG, impl="fake_unsupported")


def test_working_backend_is_used(register):
  calls = []

  def slc(q, k, v, block_indices, **kwargs):
    calls.append(sorted(kwargs))
    return _marker(7.0)(q, k, v)

  register("fake_slc", {"selected_attention": slc})
  q, k, v = qkv(5)
  bi = bidx()
  out = selected_attention(q, k, v, bi, block_size=8, impl="auto")
  assert bool(jnp.all(out == 7.0))
  out = selected_attention(q, k, v, bi, block_size=8, impl="fake_slc")
  assert bool(jnp.all(out == 7.0))
  assert calls[0] == ["block_size", "segment_ids", "softmax_scale"]
  # the whole op under auto: the reference pipeline dispatches the selected branch to the backend
  o, aux = nsa_attention(q, k, v, config=CFG, impl="auto", return_aux=True)
  assert bool(jnp.all(aux.branch_outputs["slc"] == 7.0))
  ref, aux_ref = nsa_attention(q, k, v, config=CFG, impl="reference", return_aux=True)
  assert not bool(jnp.all(aux_ref.branch_outputs["slc"] == 7.0))
  np.testing.assert_allclose(
    np.asarray(aux.branch_outputs["win"]), np.asarray(aux_ref.branch_outputs["win"]), atol=1e-6
  )


def test_whole_op_backend_and_auto_order(register):
  register("fake_low", {"nsa_attention": _marker(1.0)})
  register("fake_high", {"nsa_attention": _unsupported})  # added last: tried first
  register(
    "fake_other_platform",
    {"nsa_attention": _marker(3.0)},
    platforms=("no_such_chip",),
  )  # first in the order, but made for another platform
  q, k, v = qkv(6)
  out = nsa_attention(q, k, v, config=CFG, impl="auto")
  assert bool(jnp.all(out == 1.0))  # high raised, low served, other skipped
  register("fake_high", {"nsa_attention": _marker(2.0)})  # replaced in place: still first
  assert bool(jnp.all(nsa_attention(q, k, v, config=CFG, impl="auto") == 2.0))
  assert bool(jnp.all(nsa_attention(q, k, v, config=CFG, impl="fake_low") == 1.0))
  # explicitly naming a backend registered for another platform still calls it (the user asked)
  assert bool(jnp.all(nsa_attention(q, k, v, config=CFG, impl="fake_other_platform") == 3.0))


def test_named_backend_without_the_op_raises(register):
  register("fake_empty", {})
  q, k, v = qkv(7)
  with pytest.raises(NotImplementedError, match="fake_empty"):
    selected_attention(q, k, v, bidx(), block_size=8, impl="fake_empty")
  # auto skips a backend that lacks the op
  ref = selected_attention(q, k, v, bidx(), block_size=8, impl="reference")
  np.testing.assert_array_equal(
    np.asarray(selected_attention(q, k, v, bidx(), block_size=8, impl="auto")), np.asarray(ref)
  )
  # nsa_attention with a named backend that lacks the whole op runs the reference pipeline and
  # hands the name to the branch ops: the empty backend cannot serve the selected branch -> loud.
  with pytest.raises(NotImplementedError, match="does not implement selected_attention"):
    nsa_attention(q, k, v, config=CFG, impl="fake_empty")


def test_named_partial_backend_serves_its_branch_of_the_whole_op(register):
  register("fake_slc_only", {"selected_attention": _marker(5.0)})
  q, k, v = qkv(8)
  o, aux = nsa_attention(q, k, v, config=CFG, impl="fake_slc_only", return_aux=True)
  assert bool(jnp.all(aux.branch_outputs["slc"] == 5.0))
  _, aux_ref = nsa_attention(q, k, v, config=CFG, impl="reference", return_aux=True)
  np.testing.assert_allclose(
    np.asarray(aux.branch_outputs["win"]), np.asarray(aux_ref.branch_outputs["win"]), atol=1e-6
  )
