"""The block copy (:mod:`sparse_attention_jax.offload.block_copy`): the zero-copy kernel in the
Pallas interpreter copies exactly the first ``n`` listed blocks into their slots (bit for bit,
bf16 K/V and float32 ``c``, from a ``pinned_host`` store), every other slot keeps its bytes, rows
with an index out of range are skipped, and power-of-two block shapes are required off the
interpreter, where the XLA copy serves instead (same bytes); the kernel lowers for CUDA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention_jax.offload.block_copy import copy_blocks, copy_into_slots, kernel_serves


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


def test_xla_copy_equals_the_kernel_and_serves_other_block_shapes(monkeypatch):
  """The XLA copy (chunks of 3: several iterations) leaves the kernel's bytes; ``copy="kernel"``
  falls back to it where the compiled kernel cannot serve (``[l', D] = [4, 6]`` off the
  interpreter)."""
  from sparse_attention_jax.offload import block_copy

  rng = np.random.default_rng(4)
  b, h, nb, ns, bs, d = 2, 2, 7, 3, 4, 8
  store = jax.device_put(
    (
      rng.standard_normal((b, h, nb, bs, d)).astype(jnp.bfloat16),
      rng.standard_normal((b, h, nb, bs)).astype(np.float32),
    ),
    jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"),
  )
  slots = (jnp.zeros((b, h, ns, bs, d), jnp.bfloat16), jnp.zeros((b, h, ns, bs)))
  loads = np.zeros((b * h * ns + 3, 4), np.int32)
  loads[:7] = [
    [0, 0, 5, 1],
    [1, 1, 6, 2],
    [1, 0, 0, 0],
    [0, 1, 3, 0],
    [1, 1, 2, 1],
    [0, 0, 1, 2],
  ] + [[1, 0, 4, 2]]
  outs = [
    jax.jit(
      functools.partial(copy_into_slots, copy=copy, chunk=3, host=True),
    )(*store, *slots, jnp.asarray(loads), jnp.int32(n))
    for copy in ("kernel", "xla")
    for n in (7, 5)
  ]
  for a, x in zip(outs[:2], outs[2:]):
    for u, w in zip(a, x):
      np.testing.assert_array_equal(
        np.asarray(u.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
      )
  np.testing.assert_array_equal(np.asarray(outs[0][1][1, 0, 2]), np.asarray(store[1][1, 0, 4]))
  assert not np.asarray(outs[1][1][1, 0, 2]).any()  # row 6 not among the first 5
  odd = jnp.zeros((1, 1, 2, 4, 6), jnp.bfloat16), jnp.zeros((1, 1, 2, 4))
  assert kernel_serves(*odd, interpret=True) and not kernel_serves(*odd, interpret=False)
  monkeypatch.setattr(block_copy.jax, "default_backend", lambda: "gpu")  # compiled kernel
  out = copy_into_slots(
    *odd, *odd, jnp.array([[0, 0, 1, 0]] * 3), jnp.int32(1), copy="kernel", chunk=2, host=False
  )
  assert out[0].shape == odd[0].shape  # served by the XLA copy, no NotImplementedError
