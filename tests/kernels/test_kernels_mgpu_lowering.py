"""Cross-lowering of the Mosaic GPU selected-attention kernel for CUDA on a CPU-only machine.

Lowering builds the Mosaic GPU module (shapes, layouts, dtypes, unsupported ops surface here);
compiling and running it needs a Hopper GPU (``test_kernels_mgpu_gpu.py``). Numerics on CPU:
the kernel's ``O += P V`` uses ``pl.run_state(...)(plgpu.ACC.init(acc))`` with ``wgmma``, which
GPU interpret mode cannot run ("MLIR translation rule for primitive 'wgmma' not found for
platform cpu"), so there is no interpret-mode numeric test here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import mgpu_modules
import numpy as np
import pytest

from pallas_kernels import selected_attention_common as common
from pallas_kernels import selected_attention_dims as dims
from pallas_kernels import selected_attention_mgpu as mg


def _lower(dtype, d, g, mode, *, t=200, h=2, n=4, **kw):
  seg = None
  if kw.pop("with_segments", False):
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), -(-t // 4))[None, :t]
  tuning = mg.TuningConfig(mode=mode, **kw)
  f = lambda q, k, v, bi: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)
  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
  )
  return jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def _has_mosaic_call(text):
  return "mosaic_gpu" in text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 3, 16])
@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_one_warpgroup_kernel_lowers_for_cuda(dtype, d, g, mode):
  assert _has_mosaic_call(_lower(dtype, d, g, mode, tile_rows=64, q_layout="tiles"))


@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_default_config_lowers_for_cuda(mode):
  assert _has_mosaic_call(_lower(jnp.bfloat16, 128, 16, mode, t=4096, n=16))


@pytest.mark.parametrize("layout", ["tiles", "direct"])
@pytest.mark.parametrize(
  "g,d,dtype", [(16, 128, jnp.bfloat16), (8, 64, jnp.float16), (2, 128, jnp.bfloat16)]
)
@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_two_warpgroup_kernel_lowers_for_cuda(layout, g, d, dtype, mode):
  text = _lower(dtype, d, g, mode, tile_rows=128, q_layout=layout, t=300)
  assert _has_mosaic_call(text)


@pytest.mark.parametrize("layout", ["tiles", "direct"])
@pytest.mark.parametrize(
  "g,d,dtype,mode,segments",
  [
    (16, 128, jnp.bfloat16, "exact", False),
    (8, 64, jnp.float16, "shared", False),
    (4, 128, jnp.bfloat16, "exact", True),
  ],
)
def test_persistent_kernel_lowers_for_cuda(layout, g, d, dtype, mode, segments):
  kw = {"tile_rows": 128, "q_layout": layout, "with_segments": segments}
  per_tile = _lower(dtype, d, g, mode, t=300, persistent=False, **kw)
  text = _lower(dtype, d, g, mode, t=300, persistent=True, num_ctas=5, **kw)
  assert _has_mosaic_call(text) and text != per_tile
  assert _has_mosaic_call(_lower_grad(dtype, d, g, mode, t=300, persistent=True, **kw))


def _kernel_config(g, **kw):
  return common.KernelConfig(softmax_scale=1.0, mode="exact", group_size=g, **kw)


def test_persistent_falls_back_where_it_cannot_serve():
  cfg = _kernel_config(16, tile_rows=128, persistent=True)
  assert common.resolve_config(cfg, 16).persistent
  assert not common.resolve_config(cfg, 1).persistent  # 64-row tiles only
  assert not common.resolve_config(dataclasses.replace(cfg, tile_rows=64), 16).persistent
  with pytest.raises(ValueError, match="num_ctas"):
    mg.TuningConfig(num_ctas=-1)
  # Q double buffered does not fit next to one 128-key K/V stage at Dk 256: per-tile kernel
  kw = {"dk": 256, "dv": 128, "length": 4, "has_docs": False, "block_size": 128}
  assert dims.smem_bytes("fwd128p", stages=1, **kw) > dims.SMEM_LIMIT
  assert dims.smem_bytes("fwd128", stages=1, **kw) <= dims.SMEM_LIMIT
  avals = (
    jax.ShapeDtypeStruct((1, 256, 32, 256), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 256, 2, 2), jnp.int32),
  )
  texts = [
    jax.jit(
      lambda q, k, v, bi, p=p: mg.selected_attention_mgpu(
        q, k, v, bi, tuning=mg.TuningConfig(tile_rows=128, block_size=128, persistent=p)
      )
    )
    .trace(*avals)
    .lower(lowering_platforms=("cuda",))
    .as_text()
    for p in (True, False)
  ]
  assert _has_mosaic_call(texts[0]) and texts[0] == texts[1]


def test_config_fallbacks():
  cfg = _kernel_config(16, tile_rows=128, q_layout="direct")
  assert common.resolve_config(cfg, 16) == cfg
  assert common.resolve_config(cfg, 4).q_layout == "tiles"  # G % 8 != 0
  one = common.resolve_config(cfg, 1)  # 128 tokens > 64 bits
  assert (one.tile_rows, one.q_layout) == (64, "tiles")
  with pytest.raises(ValueError, match="tile_rows"):
    mg.TuningConfig(tile_rows=96)


@pytest.mark.parametrize(
  "field,value,expected",
  [
    ("mode", "bogus", "one of"),
    ("block_size", 48, "one of"),
    ("num_stages", 0, "a positive int"),
    ("num_stages", 2.0, "a positive int"),
    ("tile_rows", 96, "None or one of"),
    ("q_layout", "rows", "one of"),
    ("ping_pong", 1, "a bool"),
    ("persistent", None, "a bool"),
    ("bwd_direct", "yes", "a bool"),
    ("num_ctas", -1, "an int >= 0"),
    ("bwd_chunk", 0, "a positive int"),
  ],
)
def test_tuning_config_names_field_expected_and_received(field, value, expected):
  with pytest.raises(ValueError, match=f"TuningConfig.{field}: expected {expected}.*got {value!r}"):
    mg.TuningConfig(**{field: value})


def test_tuning_config_is_frozen_hashable_and_resolved_per_call():
  tuning = mg.TuningConfig(mode="shared")
  assert hash(tuning) == hash(mg.TuningConfig(mode="shared"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    tuning.num_stages = 3  # type: ignore[misc]
  cfg = mg.kernel_config(tuning, softmax_scale=0.5, group_size=16, has_docs=True)
  assert (cfg.tile_rows, cfg.softmax_scale, cfg.group_size, cfg.has_docs) == (64, 0.5, 16, True)
  assert (
    mg.kernel_config(mg.TuningConfig(), softmax_scale=1.0, group_size=16, has_docs=False).tile_rows
    == 128
  )
  with pytest.raises(TypeError, match="tuning"):
    mg.selected_attention_mgpu(*[jnp.zeros((1, 64, 2, 64), jnp.bfloat16)] * 3, None, tuning={})


@pytest.mark.parametrize("g,t,rows", [(16, 301, 64), (3, 250, 64), (1, 250, 64), (8, 517, 64)])
def test_tile_layout_round_trip(g, t, rows):
  x = jax.random.normal(jax.random.key(0), (2, t, 2 * g, 8))
  r = 64 // g
  xt = common.to_tiles(x, r, 2)
  np.testing.assert_array_equal(common.from_tiles(xt, t, g), x)
  # row i*G + gg of tile `tile` holds token tile*r + i, head h*G + gg
  i, gg, tile, h = 1, g - 1, 2, 1
  np.testing.assert_array_equal(xt[1, h, tile * 64 + i * g + gg], x[1, tile * r + i, h * g + gg])


def test_unsupported_configs_raise_not_implemented_with_reason():
  q = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)
  k = v = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  bi = jnp.zeros((1, 64, 2, 2), jnp.int32)
  cases = [
    ({"q": q.astype(jnp.float32), "k": k.astype(jnp.float32), "v": v.astype(jnp.float32)}, "dtype"),
    (
      {
        "q": jnp.zeros((1, 64, 4, 320), jnp.bfloat16),
        "k": jnp.zeros((1, 64, 2, 320), jnp.bfloat16),
      },
      "Dk=320",
    ),  # pads to 320 > 256
    ({"v": jnp.zeros((1, 64, 2, 257), jnp.bfloat16)}, "Dv=257"),
    (
      {
        "q": jnp.zeros((1, 64, 4, 256), jnp.bfloat16),
        "k": jnp.zeros((1, 64, 2, 256), jnp.bfloat16),
        "v": jnp.zeros((1, 64, 2, 200), jnp.bfloat16),
      },
      "Dk \\+ Dv <= 384",
    ),  # 256 + 256
    ({"k": jnp.zeros((1, 64, 2, 128), jnp.bfloat16)}, "k head dim 128"),
    ({"softmax_scale": -1.0}, "softmax_scale"),
  ]
  for over, word in cases:
    args = {"q": q, "k": k, "v": v, "block_indices": bi}
    args.update(over)
    with pytest.raises(NotImplementedError, match=word):
      mg.selected_attention_mgpu(**args)
  # block size and mode: refused by TuningConfig (ValueError) and, for the library op, reported
  # by unsupported_reason (the op raises NotImplementedError with it)
  for over, word in (({"block_size": 48}, "block_size"), ({"mode": "bogus"}, "mode")):
    kw = {"block_size": 64, **over}
    assert word in common.unsupported_reason(q, k, v, bi, **kw)


def test_backend_is_registered_lazily_and_declines_on_cpu():
  from sparse_attention_jax.ops import dispatch
  from sparse_attention_jax.ops.selected import selected_attention

  assert dispatch.implements("selected_attention", "pallas_gpu")
  q = jax.random.normal(jax.random.key(1), (1, 128, 32, 64), jnp.bfloat16)
  k = v = jax.random.normal(jax.random.key(2), (1, 128, 2, 64), jnp.bfloat16)
  bi = jnp.zeros((1, 128, 2, 2), jnp.int32)
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
      selected_attention(q, k, v, bi, block_size=64, impl="pallas_gpu")
    ref = selected_attention(q, k, v, bi, block_size=64, impl="reference")
    np.testing.assert_array_equal(selected_attention(q, k, v, bi, block_size=64), ref)


def _lower_grad(dtype, d, g, mode, *, t=200, h=2, n=4, **kw):
  seg = None
  if kw.pop("with_segments", False):
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), -(-t // 4))[None, :t]
  tuning = mg.TuningConfig(mode=mode, **kw)

  def loss(q, k, v, bi):
    o = mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, tuning=tuning)
    return jnp.sum(o.astype(jnp.float32))

  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, d), dtype),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
  )
  f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return f.trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "g,d,dtype,mode",
  [
    (16, 128, jnp.bfloat16, "exact"),
    (16, 128, jnp.bfloat16, "shared"),
    (4, 64, jnp.float16, "exact"),
    (3, 128, jnp.bfloat16, "shared"),
    (1, 64, jnp.bfloat16, "exact"),
  ],
)
def test_backward_kernels_lower_for_cuda(g, d, dtype, mode):
  text = _lower_grad(dtype, d, g, mode)
  assert text.count("mosaic_gpu") > _lower(dtype, d, g, mode).count("mosaic_gpu")  # + dQ, dK/dV
  case = mgpu_modules.Case(
    "grad", mode=mode, g=g, dk=d, dv=d, tile_rows=128 if mode == "exact" else 64, t=200
  )
  kernels = mgpu_modules.module_texts(case, grad=True)[:-1]
  assert len(kernels) == 3  # forward, dQ and dK/dV, no XLA reference backward


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("g,t", [(16, 256), (8, 300), (32, 130)])
def test_backward_layouts_lower_for_cuda(direct, g, t):
  tuning = mg.TuningConfig(
    tile_rows=64, q_layout="tiles", persistent=False, bwd_direct=direct, bwd_chunk=2
  )

  def loss(q, k, v, bi):
    o = mg.selected_attention_mgpu(q, k, v, bi, softmax_scale=0.125, tuning=tuning)
    return jnp.sum(o.astype(jnp.float32))

  h, d, n = 2, 64, 4
  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
  )
  text = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    .trace(*avals)
    .lower(lowering_platforms=("cuda",))
    .as_text()
  )
  assert _has_mosaic_call(text)


@pytest.mark.parametrize(
  "rows,layout,g", [(64, "tiles", 16), (128, "direct", 16), (128, "tiles", 4), (64, "tiles", 3)]
)
def test_segment_ids_lower_for_cuda_forward_and_backward(rows, layout, g):
  kw = {"tile_rows": rows, "q_layout": layout, "with_segments": True}
  plain = _lower(jnp.bfloat16, 64, g, "exact", tile_rows=rows, q_layout=layout)
  text = _lower(jnp.bfloat16, 64, g, "exact", **kw)
  assert _has_mosaic_call(text) and text != plain
  assert _has_mosaic_call(_lower_grad(jnp.bfloat16, 64, g, "exact", **kw))


@pytest.mark.parametrize("d", [64, 128])
def test_nosa_bias_columns_lower_for_cuda(d):
  """NOSA's biased selected attention runs the kernels on keys with 2 extra bias columns
  (``ops.nosa.biased_selected_attention``): Dk = D + 2 (zero padded to a multiple of 64), Dv = D;
  forward and gradient (dK's extra columns carry dc) lower for CUDA."""
  t, h, g, n = 256, 2, 16, 4

  def loss(q, k, v, bi):
    o = mg.selected_attention_mgpu(q, k, v, bi, softmax_scale=d**-0.5)
    return jnp.sum(o.astype(jnp.float32))

  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d + 2), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d + 2), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
  )
  assert common.unsupported_reason(*avals, block_size=64) is None
  text = (
    jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    .trace(*avals)
    .lower(lowering_platforms=("cuda",))
    .as_text()
  )
  assert text.count("mosaic_gpu") >= 3


def test_persistent_is_the_default_with_and_without_documents(monkeypatch):
  """The persistent forward is the default, packed documents included; ``persistent=False``
  keeps the per-tile forward."""
  seen = []
  real = mg.call_kernel
  monkeypatch.setattr(
    mg, "call_kernel", lambda *a, **kw: seen.append(a[4].persistent) or real(*a, **kw)
  )
  t, h, g, d = 256, 2, 16, 64
  avals = (
    jax.ShapeDtypeStruct((1, t, h * g, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),
    jax.ShapeDtypeStruct((1, t, h, 4), jnp.int32),
  )
  seg = jnp.repeat(jnp.arange(2, dtype=jnp.int32), t // 2)[None]
  for kw in (
    {},
    {"segment_ids": seg},
    {"segment_ids": seg, "tuning": mg.TuningConfig(persistent=True)},
    {"tuning": mg.TuningConfig(persistent=False)},
  ):
    jax.jit(lambda q, k, v, bi, kw=kw: mg.selected_attention_mgpu(q, k, v, bi, **kw)).trace(
      *avals
    ).lower(lowering_platforms=("cuda",))
  assert seen == [True, True, True, False]
