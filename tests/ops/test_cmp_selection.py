"""Compressed attention fused with selection: the chunked path equals the composite reference.

Fresh random float32 inputs; for each preset (paper, fla-style, InfLLM-V2 max pooling), with and
without packed documents, chunks that do not divide ``T``: the ``"blocked"`` implementation's
output, log-sum-exp, block indices and gradients (q, k_cmp, v_cmp) equal the ``"reference"``
path (full probabilities, then ``block_importance`` and ``select_blocks``), and its compiled
program never holds the ``[B, T, HQ, NC]`` probabilities.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention_jax import NSAConfig, nsa_attention
from sparse_attention_jax.ops import cmp_selection as cs_mod
from sparse_attention_jax.ops.cmp_selection import compressed_selection
from sparse_attention_jax.ops.compression import compress

PRESETS = {
  "paper": NSAConfig.paper(
    cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, window=8, compression="mean"
  ),
  "fla": NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8),
  "infllm_v2": NSAConfig.infllm_v2(
    cmp_window=8, cmp_stride=4, block_size=8, num_selected=5, local_window=8
  ),
}
LENGTHS = (29, 1, 40, 13)  # 83 tokens, starts off every grid


def _inputs(key, cfg, *, b=2, t=83, hq=4, h=2, dk=8, dv=6, packed=False):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, t, hq, dk), jnp.float32)
  k = jax.random.normal(kk, (b, t, h, dk), jnp.float32)
  v = jax.random.normal(kv, (b, t, h, dv), jnp.float32)
  seg = None
  if packed:
    row = np.repeat(np.arange(1, len(LENGTHS) + 1), LENGTHS)[:t]
    seg = jnp.asarray(np.stack([row, row[::-1]]), jnp.int32)  # two different layouts
  return q, compress(k, cfg, segment_ids=seg), compress(v, cfg, segment_ids=seg), seg


def _grads(impl, q, kc, vc, cfg, seg, w, chunk=None):
  def loss(q, kc, vc):
    out = compressed_selection(q, kc, vc, cfg, segment_ids=seg, impl=impl, chunk=chunk).out
    return jnp.sum(out * w)

  return jax.grad(loss, argnums=(0, 1, 2))(q, kc, vc)


@pytest.mark.parametrize(
  "preset,packed",
  [("paper", False), ("fla", True), ("infllm_v2", True)],
  ids=["paper-rows", "fla-packed", "infllm_v2-packed"],
)
def test_blocked_equals_reference(preset, packed):
  cfg = PRESETS[preset]
  q, kc, vc, seg = _inputs(jax.random.key(len(preset) + 7 * packed), cfg, packed=packed)
  ref = compressed_selection(q, kc, vc, cfg, segment_ids=seg, impl="reference")
  got = compressed_selection(q, kc, vc, cfg, segment_ids=seg, impl="blocked", chunk=16)
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  np.testing.assert_array_equal(np.isfinite(got.lse), np.isfinite(ref.lse))
  fin = np.isfinite(ref.lse)
  np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(ref.lse)[fin], rtol=1e-6)
  np.testing.assert_array_equal(got.block_indices, ref.block_indices)
  assert np.any(np.asarray(ref.block_indices) >= 0)
  w = jax.random.normal(jax.random.key(3), ref.out.shape, jnp.float32)
  for g_ref, g_got in zip(
    _grads("reference", q, kc, vc, cfg, seg, w),
    _grads("blocked", q, kc, vc, cfg, seg, w, chunk=16),
    strict=True,
  ):
    assert float(jnp.max(jnp.abs(g_ref))) > 0
    np.testing.assert_allclose(g_got, g_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 200])
def test_any_chunk_and_group_size(chunk):
  cfg = PRESETS["paper"]
  q, kc, vc, _ = _inputs(jax.random.key(chunk), cfg, b=1, hq=4, h=4, dk=8, dv=8)  # G = 1
  ref = compressed_selection(q, kc, vc, cfg, impl="reference")
  got = compressed_selection(q, kc, vc, cfg, impl="blocked", chunk=chunk)
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  np.testing.assert_array_equal(got.block_indices, ref.block_indices)


def test_select_false_and_short_sequences():
  cfg = PRESETS["paper"]
  q, kc, vc, _ = _inputs(jax.random.key(5), cfg)
  got = compressed_selection(q, kc, vc, cfg, impl="blocked", select=False, chunk=32)
  ref = compressed_selection(q, kc, vc, cfg, impl="reference")
  assert got.block_indices is None
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  # T < l: no compressed token at all; every query sees nothing and keeps its forced blocks.
  q, kc, vc, _ = _inputs(jax.random.key(6), cfg.for_length(5), t=5)
  got = compressed_selection(q, kc, vc, cfg.for_length(5), impl="blocked")
  assert kc.shape[1] == 0
  np.testing.assert_array_equal(got.out, 0.0)
  np.testing.assert_array_equal(got.block_indices[..., 0], 0)


def test_bad_arguments_are_named():
  cfg = PRESETS["fla"]
  q, kc, vc, _ = _inputs(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="chunk"):
    compressed_selection(q, kc, vc, cfg, impl="blocked", chunk=0)
  with pytest.raises(ValueError, match="k_cmp"):
    compressed_selection(q, kc[:, :-1], vc[:, :-1], cfg)
  with pytest.raises(ValueError, match="num_selected"):
    compressed_selection(q, kc, vc, dataclasses.replace(cfg, num_selected=12))


def test_blocked_never_holds_the_probabilities():
  """XLA's temporary buffers of the chunked fwd+bwd stay far below one ``[B, T, HQ, NC]`` array
  (the composite path needs several)."""
  cfg = NSAConfig.fla(cmp_window=16, cmp_stride=16, block_size=16, num_selected=4)
  b, t, hq, h, d = 1, 4096, 8, 2, 16
  q = jnp.zeros((b, t, hq, d), jnp.float32)
  kc = jnp.zeros((b, cfg.num_cmp_tokens(t), h, d), jnp.float32)
  probs_bytes = b * t * hq * kc.shape[1] * 4  # 32 MiB

  def temp(impl):
    def loss(q, kc, vc):
      out = compressed_selection(q, kc, vc, cfg, impl=impl, chunk=128)
      return jnp.sum(out.out) + jnp.sum(out.block_indices)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.lower(q, kc, kc).compile().memory_analysis().temp_size_in_bytes

  assert temp("reference") > probs_bytes
  assert temp("blocked") < probs_bytes / 4


def test_auto_switches_to_blocked_above_the_budget(monkeypatch):
  cfg = PRESETS["paper"]
  key = jax.random.split(jax.random.key(9), 4)
  b, t, hq, h, d = 1, 83, 4, 2, 8
  q = jax.random.normal(key[0], (b, t, hq, d), jnp.float32)
  k = jax.random.normal(key[1], (b, t, h, d), jnp.float32)
  v = jax.random.normal(key[2], (b, t, h, d), jnp.float32)
  ref = nsa_attention(q, k, v, config=cfg, impl="reference", return_aux=True)
  calls = []
  monkeypatch.setattr(cs_mod, "PROBS_MAX_ELEMENTS", 0)
  orig = cs_mod.blocked_impl
  monkeypatch.setattr(cs_mod, "blocked_impl", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
  got = nsa_attention(q, k, v, config=cfg, impl="auto", return_aux=True)
  assert calls
  np.testing.assert_allclose(got[0], ref[0], atol=2e-6, rtol=1e-5)
  np.testing.assert_array_equal(got[1].block_indices, ref[1].block_indices)


@pytest.fixture
def cudnn_stand_in(monkeypatch):
  """On a CPU: ``auto`` tries the GPU entries and XLA's attention stands in for cuDNN, rejecting
  sequence lengths off the multiple of 64 the cuDNN path pads to (cuDNN refused odd lengths)."""
  from sparse_attention_jax.ops import cudnn, dispatch

  def stand_in(q, k, v, mask, *, scale, local_window_size):
    assert q.shape[1] % 64 == 0 and k.shape[1] % 64 == 0, "cuDNN refuses such lengths"
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=True, implementation="xla"
    )

  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  monkeypatch.setattr(cudnn, "usable", lambda *a: True)
  monkeypatch.setattr(cudnn, "_sdpa", stand_in)


@pytest.mark.usefixtures("cudnn_stand_in")
@pytest.mark.parametrize("preset", ["paper"])
def test_cudnn_path_equals_reference(preset):
  """The cuDNN path's head-folding (``d`` queries per compressed position become extra heads),
  run on a CPU with XLA's attention standing in for cuDNN; packed rows go to the blocked path
  unless every row is one document."""
  cfg = PRESETS[preset]
  for packed in (False, True):
    q, kc, vc, seg = _inputs(jax.random.key(21 + packed), cfg, packed=packed)
    for sid in (seg,) if packed else (None, jnp.full(q.shape[:2], 4, jnp.int32)):
      ref = compressed_selection(q, kc, vc, cfg, segment_ids=sid, impl="reference")
      got = compressed_selection(q, kc, vc, cfg, segment_ids=sid, impl="cudnn", chunk=32)
      np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
      np.testing.assert_array_equal(got.block_indices, ref.block_indices)
      if sid is None:
        w = jax.random.normal(jax.random.key(4), ref.out.shape, jnp.float32)
        for g_ref, g_got in zip(
          _grads("reference", q, kc, vc, cfg, sid, w),
          _grads("cudnn", q, kc, vc, cfg, sid, w, chunk=32),
          strict=True,
        ):
          np.testing.assert_allclose(g_got, g_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["paper", "fla"])
def test_gpu_paths_on_the_gpu(preset):
  """bf16 on a GPU: the pallas_gpu (Triton scores kernels), cuDNN and blocked paths against the
  float32 reference (outputs and gradients within bf16 tolerance; at least 97% of the block
  indices equal the reference's)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  cfg = PRESETS[preset]
  q, kc, vc, _ = _inputs(jax.random.key(31), cfg, b=2, t=700, hq=16, h=2, dk=64, dv=64)
  q, kc, vc = (x.astype(jnp.bfloat16) for x in (q, kc, vc))
  f32 = lambda x: x.astype(jnp.float32)
  ref = compressed_selection(f32(q), f32(kc), f32(vc), cfg, impl="reference")
  w = jax.random.normal(jax.random.key(4), ref.out.shape, jnp.float32)
  g_ref = _grads("reference", f32(q), f32(kc), f32(vc), cfg, None, w)
  for impl in ("pallas_gpu", "cudnn", "blocked"):
    got = compressed_selection(q, kc, vc, cfg, impl=impl)
    np.testing.assert_allclose(f32(got.out), ref.out, atol=2e-2, rtol=2e-2)
    same = np.mean(np.asarray(got.block_indices) == np.asarray(ref.block_indices))
    assert same > 0.97, (impl, same)
    for a, b in zip(_grads(impl, q, kc, vc, cfg, None, w), g_ref, strict=True):
      np.testing.assert_allclose(f32(a), b, atol=5e-2 * float(jnp.max(jnp.abs(b))), rtol=0)


@pytest.mark.usefixtures("cudnn_stand_in")
@pytest.mark.parametrize("preset", list(PRESETS))
def test_pallas_gpu_path_equals_reference(monkeypatch, preset):
  """The ``pallas_gpu`` entry (cuDNN output, Triton scores kernels, top-n in the kernel or in XLA)
  on a CPU: the kernels in the Pallas interpreter, XLA's attention standing in for cuDNN."""
  from pallas_kernels import cmp_scores_triton as kern

  orig = {f: getattr(kern, f) for f in ("compressed_lse", "compressed_scores", "compressed_select")}
  for name, fn in orig.items():
    monkeypatch.setattr(kern, name, lambda *a, fn=fn, **kw: fn(*a, interpret=True, **kw))
  cfg = PRESETS[preset]  # fla: l = d = l' (32 blocks per tile); else 16 blocks, tb * l'/d >= 16
  cfg = cfg if preset == "fla" else dataclasses.replace(cfg, block_size=16)
  q, kc, vc, _ = _inputs(jax.random.key(41), cfg, b=1, t=150, hq=8, h=2, dk=16, dv=8)
  # n = 4: the top-n inside the kernel; n = 5 (not a power of two): pooled scores, top-n in XLA
  for n in (4, 5):
    cfg_n = dataclasses.replace(cfg, num_selected=n)
    ref = compressed_selection(q, kc, vc, cfg_n, impl="reference")
    got = compressed_selection(q, kc, vc, cfg_n, impl="pallas_gpu")
    np.testing.assert_array_equal(got.block_indices, ref.block_indices)
    assert np.any(np.asarray(ref.block_indices) == -1)
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  if preset == "paper":  # packed rows: the documents on the kernels' block-aligned grid, and
    # past its capacity (41 documents, most of one token: the blocked path at run time)
    k = jax.random.normal(jax.random.key(42), (2, 150, 2, 16), jnp.float32)
    row = np.repeat(np.arange(1, 6), (29, 1, 40, 13, 67))
    tiny = np.concatenate([np.arange(40), np.full(110, 40)])
    seg = jnp.asarray(np.stack([row, row[::-1], row, tiny]), jnp.int32)
    cfg_n = dataclasses.replace(cfg, num_selected=4)
    qp = jnp.concatenate([q, q], axis=0)
    for sg in (seg[:2], seg[2:]):
      kc_p = compress(k, cfg_n, segment_ids=sg)
      ref_p = compressed_selection(qp, kc_p, kc_p, cfg_n, segment_ids=sg, impl="reference")
      got_p = compressed_selection(qp, kc_p, kc_p, cfg_n, segment_ids=sg, impl="pallas_gpu")
      np.testing.assert_array_equal(got_p.block_indices, ref_p.block_indices)
      np.testing.assert_allclose(got_p.out, ref_p.out, atol=2e-6, rtol=1e-5)
  cfg_n = dataclasses.replace(cfg, num_selected=4)
  lse_only = compressed_selection(q, kc, vc, cfg_n, impl="pallas_gpu", select=False)
  assert lse_only.block_indices is None
  fin = np.isfinite(ref.lse)
  for lse in (got.lse, lse_only.lse):
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref.lse)[fin], rtol=2e-6)
