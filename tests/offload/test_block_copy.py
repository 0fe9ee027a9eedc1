"""The zero-copy block copy kernel (``pallas_kernels/block_copy.py``) in the Pallas interpreter:
exactly the first ``n`` listed blocks land in their slots (bit for bit, bf16 K/V and float32
``c``, from a ``pinned_host`` store), every other slot keeps its bytes, rows with an index out of
range are skipped, and power-of-two block shapes are required off the interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_copy import copy_blocks


def test_copies_exactly_the_listed_blocks_and_skips_bad_rows():
  rng = np.random.default_rng(3)
  b, h, nb, ns, bs, d = 2, 3, 9, 4, 4, 8
  store_kv = rng.standard_normal((b, h, nb, bs, d)).astype(jnp.bfloat16)
  store_c = rng.standard_normal((b, h, nb, bs)).astype(np.float32)
  slot_kv = rng.standard_normal((b, h, ns, bs, d)).astype(jnp.bfloat16)
  slot_c = rng.standard_normal((b, h, ns, bs)).astype(np.float32)
  rows = np.array(
    [
      [0, 0, 5, 1],
      [1, 2, 8, 3],
      [1, 0, 0, 0],
      [0, 1, 3, -1],  # slot -1: skipped
      [0, 2, 9, 2],
      [1, 1, 4, 2],
      [0, 0, 7, 0],
    ],
    np.int32,
  )  # block 9: skipped
  n = 6  # row 6 not copied
  kind = (
    "pinned_host"
    if "pinned_host" in {m.kind for m in jax.devices()[0].addressable_memories()}
    else "device"
  )
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind)
  out_kv, out_c = jax.jit(lambda *a: copy_blocks(*a, interpret=True))(
    jax.device_put(store_kv, host),
    jax.device_put(store_c, host),
    jnp.asarray(slot_kv),
    jnp.asarray(slot_c),
    jnp.asarray(rows),
    jnp.int32(n),
  )
  want_kv, want_c = slot_kv.copy(), slot_c.copy()
  for bi, hi, j, s in rows[:n]:
    if 0 <= s < ns and 0 <= j < nb:
      want_kv[bi, hi, s], want_c[bi, hi, s] = store_kv[bi, hi, j], store_c[bi, hi, j]
  assert not np.array_equal(want_kv, slot_kv)
  np.testing.assert_array_equal(np.asarray(out_kv).view(np.uint16), want_kv.view(np.uint16))
  np.testing.assert_array_equal(np.asarray(out_c), want_c)


def test_errors_name_the_values():
  kv, c = jnp.zeros((1, 1, 2, 4, 6), jnp.bfloat16), jnp.zeros((1, 1, 2, 4))
  rows = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(
    NotImplementedError,
    match=r"power-of-two block shapes, got \[l', D\] = "
    r"\[4, 6\]",
  ):
    copy_blocks(kv, c, kv, c, rows, jnp.int32(1))
  with pytest.raises(
    ValueError,
    match=r"slot_kv: expected the store's dtype bfloat16, got "
    r"float32",
  ):
    copy_blocks(kv, c, kv.astype(jnp.float32), c, rows, jnp.int32(1), interpret=True)


def test_kernel_lowers_for_cuda():
  """The kernel lowers through Pallas' Triton path for an abstract H200 at the ``nosa_1b`` block
  shape (64 tokens x Dk + Dv = 128, bf16), bounds guards included (compilation itself needs the
  GPU)."""
  from jax.sharding import AbstractDevice, AbstractMesh

  s = jax.ShapeDtypeStruct
  avals = (
    s((2, 2, 16, 64, 128), jnp.bfloat16),
    s((2, 2, 16, 64), jnp.float32),
    s((2, 2, 8, 64, 128), jnp.bfloat16),
    s((2, 2, 8, 64), jnp.float32),
    s((32, 4), jnp.int32),
    s((), jnp.int32),
  )
  dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
    text = jax.jit(copy_blocks).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text and "offload_copy_blocks" in text
