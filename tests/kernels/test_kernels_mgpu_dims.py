"""Independent q/k and v head dims (``Dk != Dv``) of the Hopper selected-attention kernels on CPU:
cross-lowering for CUDA of the forward and backward kernels, the shared-memory model against what
Mosaic GPU allocates, and the wrapper's head-dim padding checked numerically with the reference
in place of the kernels (the kernels themselves run only on the GPU:
``tests/kernels/test_kernels_mgpu_gpu.py``)."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import packed_checks as pc
import pytest

from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_dims as dims
from pallas_kernels import selected_attention_mgpu as mg
from pallas_kernels import selected_attention_vjp_common as vc
from pallas_kernels import selected_attention_vjp_kernel_sm90 as bw
from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.selected import selected_mask

BS = 64


def _avals(t, h, g, dk, dv, n=4, dtype=jnp.bfloat16):
  return (
    jax.ShapeDtypeStruct((1, t, h * g, dk), dtype),
    jax.ShapeDtypeStruct((1, t, h, dk), dtype),
    jax.ShapeDtypeStruct((1, t, h, dv), dtype),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
  )


def _lower(fn, *avals):
  return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dk,dv", [(192, 128), (160, 128)])
@pytest.mark.parametrize(
  "g,rows,bwd_direct",
  [(16, 128, True), (16, 128, False), (16, 64, True), (4, 64, False), (4, 128, False)],
)
def test_forward_and_backward_lower_for_cuda(dk, dv, g, rows, bwd_direct):
  t, h = 200, 2
  tuning = mg.TuningConfig(
    tile_rows=rows, q_layout="direct", persistent=False, bwd_direct=bwd_direct, bwd_chunk=2
  )
  attn = lambda q, k, v, bi: mg.selected_attention_mgpu(
    q, k, v, bi, softmax_scale=dk**-0.5, tuning=tuning
  )
  fwd_text = _lower(attn, *_avals(t, h, g, dk, dv))
  loss = lambda q, k, v, bi: jnp.sum(attn(q, k, v, bi).astype(jnp.float32))
  text = _lower(jax.grad(loss, argnums=(0, 1, 2)), *_avals(t, h, g, dk, dv))
  assert text.count("mosaic_gpu") > fwd_text.count("mosaic_gpu") > 0  # + dQ, dK/dV kernels
  pk = dims.padded_head_dim(dk)
  assert f"x{pk}xbf16" in text and f"x{dv}xbf16" in text  # padded Q/K, V


@pytest.mark.parametrize("mode,rows", [("shared", 64), ("exact", 128)])
def test_public_wrapper_lowers_gla_global_dims(mode, rows):
  """The ASA GLA global layer's shape: Dk = 128 + 32 = 160, Dv = 128, G = 16, with segments."""
  t = 300
  seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 100)[None]

  def loss(q, k, v, bi):
    tuning = mg.TuningConfig(mode=mode, tile_rows=rows)
    o = mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)
    assert o.shape == (1, t, 32, 128)
    return jnp.sum(o.astype(jnp.float32))

  assert "mosaic_gpu" in _lower(jax.grad(loss, argnums=(0, 1, 2)), *_avals(t, 2, 16, 160, 128))


def _mosaic_smem_bytes(fn, *avals) -> int:
  """Dynamic SMEM Mosaic GPU allocates for the single kernel of ``fn`` (read from the error it
  raises under an artificial 1-byte limit)."""
  from jax.experimental.mosaic.gpu import core as mgpu_core

  limit = getattr(mgpu_core, "artificial_shared_memory_limit", None)
  if limit is None:
    pytest.skip("this jax has no mosaic artificial_shared_memory_limit")
  with limit(1), pytest.raises(ValueError, match="exceeds available shared memory") as err:
    _lower(fn, *avals)
  return int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1))


@pytest.mark.parametrize(
  "dk,dv,stages,bs",
  [
    (192, 128, 2, 64),
    (128, 128, 2, 64),
    (256, 128, 1, 64),
    (64, 192, 3, 64),
    (192, 128, 2, 32),
    (128, 128, 2, 128),
  ],
)
def test_smem_model_bounds_what_mosaic_allocates(dk, dv, stages, bs):
  t, h, g = 200, 2, 16  # every list holds all NB blocks
  length = -(-math.ceil(t / bs) // 4) * 4  # blocks per list, rounded up to 4
  avals = _avals(t, h, g, dk, dv)
  for kernel, rows, persistent in (
    ("fwd64", 64, False),
    ("fwd128", 128, False),
    ("fwd128p", 128, True),
  ):
    f = lambda q, k, v, bi, rows=rows, persistent=persistent: mg.selected_attention_mgpu(
      q,
      k,
      v,
      bi,
      return_lse=True,
      tuning=mg.TuningConfig(
        tile_rows=rows, block_size=bs, num_stages=stages, persistent=persistent
      ),
    )
    kw = {"dk": dk, "dv": dv, "length": length, "has_docs": False, "block_size": bs}
    used = dims.fit_stages(kernel, stages, **kw)
    assert used == stages or persistent  # all of these fit (persistent: 1 less at 128)
    got = _mosaic_smem_bytes(f, *avals)
    want = dims.smem_bytes(kernel, stages=used, **kw)
    assert got <= want <= got + 8192, (kernel, got, want)

  cfg = vc.BwdConfig(num_stages=stages)

  def operands(q, k, v, bi):
    o = jnp.zeros(q.shape[:3] + (dv,), q.dtype)
    lse = jnp.zeros(q.shape[:3], jnp.float32)
    return vc.prepare_backward(
      q, k, v, o, lse, o, bi, mode="exact", chunk=cfg.chunk, direct=True, block_size=bs
    )

  kw = {
    "softmax_scale": 0.1,
    "seq_len": t,
    "num_q_heads": h * g,
    "cfg": cfg,
    "direct": True,
    "block_size": bs,
  }
  for kernel, call in (("dq", bw.dq_call), ("dkv", bw.dkv_call)):
    got = _mosaic_smem_bytes(lambda *a, call=call: call(operands(*a), **kw), *avals)
    want = dims.smem_bytes(
      kernel, dk=dk, dv=dv, stages=stages, length=length, has_docs=False, block_size=bs
    )
    assert got <= want <= got + 8192, (kernel, got, want)


def test_fit_stages_lowers_the_ring_until_it_fits_and_refuses_beyond():
  kw = {"dk": 256, "dv": 128, "length": 4, "has_docs": False}
  assert dims.smem_bytes("fwd128", stages=2, **kw) <= dims.SMEM_LIMIT
  assert dims.smem_bytes("fwd128", stages=3, **kw) > dims.SMEM_LIMIT
  assert dims.fit_stages("fwd128", 4, **kw) == 2
  assert dims.fit_stages("fwd64", 4, **kw) == 3
  assert dims.fit_stages("fwd128p", 4, **kw) == 1  # Q double buffered: 128 KiB at Dk 256
  with pytest.raises(NotImplementedError, match="shared memory"):
    dims.fit_stages("fwd128", 2, dk=256, dv=256, length=40000, has_docs=False)
  # the forward lowers at the fitted depth even when asked for more
  tuning = mg.TuningConfig(tile_rows=128, num_stages=4)
  f = lambda q, k, v, bi: mg.selected_attention_mgpu(q, k, v, bi, tuning=tuning)
  assert "mosaic_gpu" in _lower(f, *_avals(200, 2, 16, 256, 128))


@pytest.mark.parametrize("dk,dv", [(160, 128), (192, 128), (64, 64), (128, 192), (96, 40)])
def test_head_dims_reason(dk, dv):
  assert dims.head_dims_reason(dk, dv) is None
  assert dims.padded_head_dim(dk) % 64 == 0 and 0 <= dims.padded_head_dim(dk) - dk < 64


@pytest.mark.parametrize(
  "dk,dv,word",
  [(320, 128, "Dk=320"), (128, 257, "Dv=257"), (256, 256, "Dk \\+ Dv"), (0, 64, "Dk=0")],
)
def test_head_dims_refused_with_reason(dk, dv, word):
  assert re.search(word, dims.head_dims_reason(dk, dv))


@pytest.mark.parametrize("dk,dv,g,segments", [(160, 96, 4, False), (72, 128, 16, True)])
def test_wrapper_pads_head_dims_exactly(monkeypatch, dk, dv, g, segments):
  """The public wrapper with the reference in place of the kernel: the kernel entry sees dims
  padded to multiples of 64 and the scale of the unpadded Dk; O, LSE and all gradients equal the
  reference on the unpadded inputs."""
  b, t, h, n = 1, 150, 2, 3
  seen = []

  def fake_forward(q, k, v, bi, shift, cfg):
    seen.append((q.shape[-1], k.shape[-1], v.shape[-1], cfg.softmax_scale))
    if shift is None:
      mask = selected_mask(bi, block_size=BS, seq_len=t)
    else:  # packed documents: the kernels' mask on the padded keys
      p = jnp.arange(k.shape[1])
      sel = (bi[..., None] == p // BS).any(axis=3)  # [B, T, H, Tk]
      pos = jnp.arange(t)[None, :] + shift
      mask = sel & (p <= pos[..., None, None])  # [B, T, H, Tk]
    return masked_attention(q, k, v, mask, cfg.softmax_scale)

  monkeypatch.setattr(mg, "_forward", fake_forward)
  monkeypatch.setattr(mg, "_attention", lambda *a: fake_forward(*a)[0])
  rng = np.random.default_rng(dk + dv)  # numpy draws: no XLA compile per shape
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  q, k, v = normal(b, t, h * g, dk), normal(b, t, h, dk), normal(b, t, h, dv)
  w = jnp.asarray(rng.standard_normal((b, t, h * g, dv)), jnp.float32)
  cur = np.arange(t)[None, :, None, None] // BS
  bi = np.minimum(np.floor(rng.uniform(size=(b, t, h, n)) * (cur + 1)), cur).astype(np.int32)
  bi[..., 0] = cur[..., 0]
  bi = jnp.asarray(bi)
  seg = jnp.asarray(np.repeat(np.arange(2, dtype=np.int32), 75)[None]) if segments else None

  def loss_kernel(q, k, v):
    o = mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg)
    return jnp.sum(o.astype(jnp.float32) * w), o

  if seg is None:
    mask = selected_mask(bi, block_size=BS, seq_len=t)
  else:  # document-relative ids
    mask = jnp.asarray(pc.reference_mask(bi, seg, block_size=BS)).transpose(0, 2, 1, 3)

  def loss_ref(q, k, v):
    o = masked_attention(q, k, v, mask, dk**-0.5)[0]
    return jnp.sum(o.astype(jnp.float32) * w), o

  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (_, o_k), g_k = grad(loss_kernel)(q, k, v)
  (_, o_r), g_r = grad(loss_ref)(q, k, v)
  pk, pv = dims.padded_head_dim(dk), dims.padded_head_dim(dv)
  assert seen and all(s == (pk, pk, pv, dk**-0.5) for s in seen)

  def close(a, r, name):  # bf16 outputs: 1-ulp flips at most
    assert a.shape == r.shape and a.dtype == r.dtype, name
    a, r = f32(a), f32(r)
    assert np.linalg.norm(a - r) <= 1e-3 * np.linalg.norm(r), name

  close(o_k, o_r, "o")
  for name, a, r in zip(("dq", "dk", "dv"), g_k, g_r):
    close(a, r, name)
  o_l, lse_l = jax.jit(
    lambda q, k, v: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, return_lse=True)
  )(q, k, v)
  o_rl, lse_rl = jax.jit(lambda q, k, v: masked_attention(q, k, v, mask, dk**-0.5))(q, k, v)
  close(o_l, o_rl, "o with lse")
  np.testing.assert_allclose(lse_l, lse_rl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize(
  "g,rows,mode,bwd_direct,dk,dv",
  [
    (16, 128, "exact", True, 128, 128),
    (16, 64, "shared", False, 192, 128),
    (4, 128, "exact", False, 64, 64),
    (3, 64, "exact", False, 160, 128),
  ],
)
def test_block_sizes_lower_for_cuda_forward_and_backward(bs, g, rows, mode, bwd_direct, dk, dv):
  t, h, n = 300, 2, 4
  seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 100)[None] if g == 3 else None

  def attn(q, k, v, bi):
    tuning = mg.TuningConfig(block_size=bs, mode=mode, tile_rows=rows, bwd_direct=bwd_direct)
    return mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)

  loss = lambda q, k, v, bi: jnp.sum(attn(q, k, v, bi).astype(jnp.float32))
  fwd_text = _lower(attn, *_avals(t, h, g, dk, dv, n))
  text = _lower(jax.grad(loss, argnums=(0, 1, 2)), *_avals(t, h, g, dk, dv, n))
  assert text.count("mosaic_gpu") > fwd_text.count("mosaic_gpu") > 0
  nb = -(-t // bs) if seg is None else mg.packed_num_blocks(t, mg.TuningConfig(block_size=bs))
  assert f"tensor<1x{nb * bs}x2x{dims.padded_head_dim(dk)}xbf16>" in fwd_text  # K in blocks


def test_block_size_changes_the_kernels():
  avals = _avals(300, 2, 16, 128, 128)
  texts = {
    bs: _lower(
      lambda q, k, v, bi, bs=bs: mg.selected_attention_mgpu(
        q, k, v, bi, tuning=mg.TuningConfig(block_size=bs)
      ),
      *avals,
    )
    for bs in (32, 64, 128)
  }
  assert len(set(texts.values())) == 3


def test_fit_config_drops_ping_pong_at_one_stage_and_keeps_persistent_rings_deep():
  """One K/V slot + ping-pong deadlocks the 128-row kernel (the GPU hang of Dk 192 / Dv 128 /
  block 128): fit_config turns ping-pong off there; a persistent ring is not capped by the list
  length (it runs on across tiles); persistent is dropped where one stage does not fit."""
  base = common.KernelConfig(
    softmax_scale=0.1, mode="exact", group_size=16, tile_rows=128, num_stages=2
  )
  kw = {"length": 8, "itemsize": 2}
  one = common.fit_config(dataclasses.replace(base, block_size=128), dk=192, dv=128, **kw)
  assert (one.num_stages, one.ping_pong) == (1, False)
  two = common.fit_config(base, dk=128, dv=128, **kw)
  assert (two.num_stages, two.ping_pong) == (2, True)
  short = dict(kw, length=1)
  assert common.fit_config(base, dk=128, dv=128, **short).num_stages == 1  # per-tile: <= list
  per = dataclasses.replace(base, persistent=True, num_stages=3)
  assert common.fit_config(per, dk=128, dv=128, **short).num_stages == 3
  assert not common.fit_config(
    dataclasses.replace(per, block_size=128), dk=256, dv=128, **kw
  ).persistent
