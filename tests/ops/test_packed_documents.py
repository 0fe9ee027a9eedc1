"""Packed documents: each document's result is independent of where it sits in the row.

Property (float32, fresh random inputs): for every document of a packed row (lengths that are not
multiples of ``l``, ``d`` or ``l'``, including documents shorter than one block and of length 1),
the packed op's outputs, gradients (q, k, v, gates, compressor parameters) and block-index sets
equal those of the document run alone, for every implementation of the selected branch this
machine has and for the paper, fla-style and InfLLM-V2 presets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv

from sparse_attention_jax import CompressorParams, NSAConfig, init_mlp_compressor, nsa_attention
from sparse_attention_jax.ops import dispatch
from sparse_attention_jax.ops.causal import sliding_window_attention
from sparse_attention_jax.ops.compression import compress, compressed_attention
from sparse_attention_jax.ops.documents import (
  cmp_layout,
  cu_seqlens_from_segment_ids,
  document_positions,
  document_starts,
  segment_ids_from_cu_seqlens,
)
from sparse_attention_jax.ops.selected import (
  gathered_selected_attention,
  pallas_gpu_impl,
  selected_attention,
)
from sparse_attention_jax.ops.selection import block_importance, select_blocks

HQ, H, DK, DV = 4, 2, 8, 4
PRESETS = {
  "paper": NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=8),
  "fla": NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8),
  "infllm_v2": NSAConfig.infllm_v2(
    cmp_window=8, cmp_stride=4, block_size=8, num_selected=4, local_window=8
  ),
}
# Documents of 1 and 6 tokens (shorter than a block), every length and start off every grid.
LENGTHS = (13, 1, 27, 6)
SELECTED_IMPLS = [i for i in dispatch.available_impls("selected_attention") if i != "pallas_gpu"]


def seg_row(lengths):
  """``[1, T]`` ids 1, 2, ... for consecutive documents of the given lengths."""
  return jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)


def bounds(lengths):
  ends = np.cumsum(lengths)
  return list(zip(ends - np.asarray(lengths), ends, strict=True))


def mlp_params(seed):
  kk, kv = jax.random.split(jax.random.key(seed))
  p = CompressorParams(
    k=init_mlp_compressor(kk, num_kv_heads=H, window=8, in_dim=DK, hidden=8),
    v=init_mlp_compressor(kv, num_kv_heads=H, window=8, in_dim=DV, hidden=8),
  )
  noise = jax.random.key(seed + 1)
  return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(noise, x.shape, x.dtype), p)


def inputs(t, seed):
  q, k, v = rand_qkv(jax.random.key(seed), 1, t, HQ, H, DK, DV)
  gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(seed + 7), (1, t, HQ, 3)))
  cot = jax.random.normal(jax.random.key(seed + 9), (1, t, HQ, DV))
  return q, k, v, gates, cot


def run(cfg, impl, q, k, v, gates, params, seg):
  """``(out, block_indices)`` of the whole op (block indices from the aux output)."""
  t = q.shape[1]
  cfg = cfg if cfg.num_selected <= cfg.num_blocks(t) else cfg.for_length(t)
  gates = gates if cfg.branches != ("slc",) else None
  return nsa_attention(
    q, k, v, gates, config=cfg, segment_ids=seg, compress_params=params, impl=impl, return_aux=True
  )


def index_sets(idx):
  """``[T, H]`` list of frozensets of the non-padding block ids."""
  idx = np.asarray(idx)[0]
  return [
    [frozenset(int(x) for x in idx[t, h] if x >= 0) for h in range(idx.shape[1])]
    for t in range(idx.shape[0])
  ]


def outputs_and_grads(cfg, impl, q, k, v, gates, params, seg, cots):
  """``(out, block_indices, grads)``: one forward and, per cotangent of ``cots [D, 1, T, HQ, Dv]``,
  the gradients of ``sum(out * cot)`` w.r.t. q, k, v, gates and the compressor parameters."""

  def f(q, k, v, gates, params):
    out, aux = run(cfg, impl, q, k, v, gates, params, seg)
    return out, aux.block_indices

  out, vjp, idx = jax.vjp(f, q, k, v, gates, params, has_aux=True)
  return out, idx, jax.vmap(vjp)(cots)


@pytest.mark.parametrize("impl", SELECTED_IMPLS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_document_matches_itself_alone(preset, impl):
  """Outputs, block-index sets and gradients of every document equal the document run alone: the
  cotangent covers one document, so its gradients must be the alone run's, every other row must
  get none, and the compressor's parameter gradients must be the alone run's."""
  cfg = PRESETS[preset]
  t = sum(LENGTHS)
  q, k, v, gates, cot = inputs(t, 3)
  params = mlp_params(5) if cfg.compression == "mlp" else None
  docs = bounds(LENGTHS)
  cots = jnp.stack([jnp.zeros_like(cot).at[:, a:b].set(cot[:, a:b]) for a, b in docs])
  fn = jax.jit(functools.partial(outputs_and_grads, cfg, impl))
  out, idx, grads = fn(q, k, v, gates, params, seg_row(LENGTHS), cots)
  packed_sets = index_sets(idx)
  for d, (a, b) in enumerate(docs):
    msg = f"doc [{a},{b})"
    part = [x[:, a:b] for x in (q, k, v, gates)]
    alone, alone_idx, alone_grads = fn(*part, params, None, cot[None, :, a:b])
    np.testing.assert_allclose(out[:, a:b], alone, atol=2e-5, rtol=2e-5, err_msg=msg)
    assert packed_sets[a:b] == index_sets(alone_idx), msg
    for name, gp, ga in zip("qkvg", grads[:4], alone_grads[:4], strict=True):
      np.testing.assert_allclose(
        gp[d, :, a:b], ga[0], atol=5e-5, rtol=5e-5, err_msg=f"d{name} {msg}"
      )
      rest = jnp.concatenate([gp[d, :, :a], gp[d, :, b:]], axis=1)
      np.testing.assert_array_equal(rest, 0.0, err_msg=f"d{name} outside {msg}")
    if params is not None:
      for gp, ga in zip(jax.tree.leaves(grads[4]), jax.tree.leaves(alone_grads[4]), strict=True):
        np.testing.assert_allclose(gp[d], ga[0], atol=5e-5, rtol=5e-5, err_msg=msg)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_branch_ops_are_packing_invariant(preset):
  """compress, compressed attention, importance and top-n, one document at a time."""
  cfg = PRESETS[preset]
  lengths = LENGTHS
  t = sum(lengths)
  q, k, v, _, _ = inputs(t, 17)
  seg = seg_row(lengths)
  params = mlp_params(19).k if cfg.compression == "mlp" else None
  k_cmp = compress(k, cfg, params, segment_ids=seg)
  v_cmp = compress(v, cfg, None if params is None else mlp_params(19).v, segment_ids=seg)
  cmp = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg)
  imp = block_importance(cmp.probs, cfg, num_kv_heads=H, segment_ids=seg)
  layout = cmp_layout(cfg, seg, 1, t)
  for a, b in bounds(lengths):
    alone_k = compress(k[:, a:b], cfg, params)
    n = alone_k.shape[1]
    off = int(layout.offset[0, a])
    np.testing.assert_allclose(k_cmp[:, off : off + n], alone_k, atol=1e-6, rtol=1e-6)
    alone_v = compress(v[:, a:b], cfg, None if params is None else mlp_params(19).v)
    alone = compressed_attention(q[:, a:b], alone_k, alone_v, cfg)
    np.testing.assert_allclose(cmp.out[:, a:b], alone.out, atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(cmp.probs[:, a:b, :, off : off + n], alone.probs, atol=1e-6)
    rest = jnp.concatenate([cmp.probs[:, a:b, :, :off], cmp.probs[:, a:b, :, off + n :]], axis=-1)
    np.testing.assert_array_equal(rest, 0.0)
    alone_imp = block_importance(alone.probs, cfg, num_kv_heads=H)
    nb = alone_imp.shape[-1]
    np.testing.assert_allclose(imp[:, a:b, :, :nb], alone_imp, atol=1e-6)
    np.testing.assert_array_equal(imp[:, a:b, :, nb:], 0.0)
  # Unused slots past the last document hold zeros.
  used = int(layout.offset[0, -1] + layout.count[0, -1])
  np.testing.assert_array_equal(k_cmp[:, used:], 0.0)


def test_selection_is_document_relative():
  """Forced initial and local blocks count from the document's start; indices are relative."""
  cfg = NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8)
  lengths = (11, 30)
  seg = seg_row(lengths)
  t = sum(lengths)
  imp = jax.random.uniform(jax.random.key(1), (1, t, 1, cfg.num_blocks(t)))
  idx = np.asarray(select_blocks(imp, cfg, segment_ids=seg))[0, :, 0]
  u = np.asarray(document_positions(seg, 1, t))[0]
  for tt in range(t):
    chosen = set(idx[tt][idx[tt] >= 0].tolist())
    cur = u[tt] // 8
    assert {0, cur, max(cur - 1, 0)} <= chosen, (tt, chosen)
    assert max(chosen) == cur  # nothing past the query's own document block


@pytest.mark.parametrize("impl", SELECTED_IMPLS)
def test_selected_blocks_start_at_the_document(impl):
  """Block 0 of a document that starts at row 5 holds rows 5..12 (l' = 8), not the row grid's."""
  lengths = (5, 19)
  t = sum(lengths)
  q, k, v, _, _ = inputs(t, 23)
  seg = seg_row(lengths)
  idx = jnp.zeros((1, t, H, 1), jnp.int32)  # every query selects its document's block 0
  out = selected_attention(q, k, v, idx, block_size=8, segment_ids=seg, impl=impl)
  for a, b in bounds(lengths):
    alone = selected_attention(
      q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], block_size=8, impl="reference"
    )
    np.testing.assert_allclose(out[:, a:b], alone, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("impl", dispatch.available_impls("causal_attention"))
def test_window_branch_is_packing_invariant(impl):
  lengths = LENGTHS
  t = sum(lengths)
  q, k, v, _, _ = inputs(t, 29)
  seg = seg_row(lengths)
  fn = functools.partial(sliding_window_attention, window=6, impl=impl)
  out = fn(q, k, v, segment_ids=seg)
  for a, b in bounds(lengths):
    np.testing.assert_allclose(out[:, a:b], fn(q[:, a:b], k[:, a:b], v[:, a:b]), atol=2e-6)


def test_no_segment_ids_means_one_document():
  cfg = PRESETS["paper"]
  t = 40
  q, k, v, gates, _ = inputs(t, 31)
  params = mlp_params(37)
  one = jnp.ones((1, t), jnp.int32)
  fn = jax.jit(functools.partial(run, cfg, "reference"))
  a, aux_a = fn(q, k, v, gates, params, None)
  b, aux_b = fn(q, k, v, gates, params, one)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(aux_a.block_indices, aux_b.block_indices)


# ------------------------------------------------------------------------- cu_seqlens helpers
def test_cu_seqlens_round_trip():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 7], [3, 3, 3, 3, 4, 4]], jnp.int32)
  cu, num = cu_seqlens_from_segment_ids(seg)
  np.testing.assert_array_equal(cu, [0, 2, 5, 6, 10, 12])
  assert int(num) == 5
  back = segment_ids_from_cu_seqlens(cu, 12).reshape(2, 6)
  np.testing.assert_array_equal(document_starts(back, 2, 6), document_starts(seg, 2, 6))
  padded, num = jax.jit(functools.partial(cu_seqlens_from_segment_ids, max_documents=7))(seg)
  np.testing.assert_array_equal(padded, [0, 2, 5, 6, 10, 12, 12, 12])
  assert int(num) == 5
  ids = segment_ids_from_cu_seqlens(padded, 12)
  np.testing.assert_array_equal(ids, [1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5, 5])


def test_cu_seqlens_errors_name_the_argument():
  seg = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  with pytest.raises(ValueError, match="max_documents: expected at least the 4 documents, got 2"):
    cu_seqlens_from_segment_ids(seg, max_documents=2)
  with pytest.raises(ValueError, match="segment_ids: expected a \\[B, T\\] array"):
    cu_seqlens_from_segment_ids(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="cu_seqlens: expected an integer dtype"):
    segment_ids_from_cu_seqlens(jnp.zeros((3,), jnp.float32), 4)
  with pytest.raises(ValueError, match="total_len: expected a positive int"):
    segment_ids_from_cu_seqlens(jnp.asarray([0, 4]), 0)


def test_kernel_entry_takes_the_gathered_path_when_documents_do_not_fit(monkeypatch):
  """The ``pallas_gpu`` entry runs the kernels (here a stand-in) on rows whose documents fit
  their static padded layout, and the gathered op on rows with too many short documents."""
  from pallas_kernels import selected_attention_mgpu as mgpu

  def stand_in(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
    return jnp.full(q.shape[:3] + (v.shape[-1],), 7.0, q.dtype)

  monkeypatch.setattr(mgpu, "selected_attention_op", stand_in)
  t = 64  # block 32: 2 blocks, room for 4 in the padded layout
  q, k, v, _, _ = inputs(t, 41)
  idx = jax.random.randint(jax.random.key(43), (1, t, H, 2), -1, 2, jnp.int32)
  entry = jax.jit(functools.partial(pallas_gpu_impl, block_size=32, softmax_scale=0.3))
  few = seg_row((20, 44))
  np.testing.assert_array_equal(entry(q, k, v, idx, segment_ids=few), 7.0)
  many = seg_row((3,) * 20 + (4,))  # 21 documents need 21 blocks
  want = gathered_selected_attention(
    q, k, v, idx, block_size=32, segment_ids=many, softmax_scale=0.3
  )
  np.testing.assert_allclose(entry(q, k, v, idx, segment_ids=many), want, atol=1e-6)


@pytest.mark.gpu
def test_kernels_through_the_op_match_each_document_alone():
  """``impl="pallas_gpu"`` (bf16) on a packed row of 4 documents off the block grid: each
  document's output and q/k/v gradients equal the document run alone through the kernels."""
  lengths, hq, h, d, bs = (200, 1, 333, 290), 16, 2, 64, 64
  t = sum(lengths)
  q, k, v = rand_qkv(jax.random.key(47), 1, t, hq, h, d, d, jnp.bfloat16)
  cot = jax.random.normal(jax.random.key(53), (1, t, hq, d), jnp.bfloat16)
  seg = seg_row(lengths)
  u = document_positions(seg, 1, t)[0]
  # Document-relative picks: block 0, the query's own block and one random earlier block.
  rnd = jax.random.randint(jax.random.key(59), (1, t, h, 1), 0, 1 << 20) % (
    u[None, :, None, None] // bs + 1
  )
  idx = jnp.concatenate(
    [jnp.zeros_like(rnd), jnp.broadcast_to((u // bs)[None, :, None, None], rnd.shape), rnd], -1
  )

  def f(q, k, v, idx, seg, cot):
    fn = lambda q, k, v: selected_attention(
      q, k, v, idx, block_size=bs, segment_ids=seg, impl="pallas_gpu"
    )
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(cot)

  f = jax.jit(f)
  out, grads = f(q, k, v, idx.astype(jnp.int32), seg, cot)
  for a, b in bounds(lengths):
    alone, alone_grads = f(
      q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b].astype(jnp.int32), None, cot[:, a:b]
    )
    np.testing.assert_allclose(np.float32(out[:, a:b]), np.float32(alone), atol=2e-2, rtol=2e-2)
    for gp, ga in zip(grads, alone_grads, strict=True):
      np.testing.assert_allclose(np.float32(gp[:, a:b]), np.float32(ga), atol=5e-2, rtol=5e-2)
