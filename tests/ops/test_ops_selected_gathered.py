"""The memory-lean gathered selected attention (the kernel-less fallback for long sequences)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv

from sparse_attention_jax.ops import selected as sel
from sparse_attention_jax.ops.selected import default_chunk, gathered_selected_attention

TOL = {"atol": 2e-5, "rtol": 2e-5}


def _case(key, b, t, hq, h, dk, dv, bs, n, *, cuts=None):
  q, k, v = rand_qkv(key, b, t, hq, h, dk, dv)
  nb = -(-t // bs)
  kk = jax.random.split(key, 3)
  idx = jax.random.randint(kk[0], (b, t, h, n), -1, nb + 1)  # -1 and out-of-range entries
  idx = idx.at[..., 1].set(idx[..., 0])  # duplicates count once
  seg = None
  if cuts is not None:  # row 0: 0 .. 1 .. 0 (an id that comes back is new)
    ids = np.zeros((b, t), np.int32)
    ids[0, cuts[0] :] = 1
    ids[0, cuts[1] :] = 0
    ids[-1, cuts[0] // 2 :] = 7
    seg = jnp.asarray(ids)
  ct = jax.random.normal(kk[1], (b, t, hq, dv))
  return q, k, v, idx, seg, ct


def _value_and_grads(fn, q, k, v, idx, seg, ct, bs, **kw):
  def loss(q, k, v):
    o = fn(q, k, v, idx, block_size=bs, segment_ids=seg, softmax_scale=0.37, **kw)
    return jnp.sum(o.astype(jnp.float32) * ct), o

  (_, o), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return o, g


@pytest.mark.parametrize(
  "t,hq,h,dk,dv,bs,n,chunk,cuts",
  [
    (45, 6, 2, 8, 5, 8, 4, 7, (10, 30)),  # GQA 3, Dk != Dv, T % chunk != 0, documents
    (64, 4, 1, 8, 8, 16, 3, 64, None),  # MQA, one chunk, no documents
    (37, 2, 2, 4, 6, 4, 6, 5, (3, 20)),  # G = 1, many small blocks
    (50, 8, 2, 16, 16, 32, 2, None, (25, 40)),  # default chunk, block > chunk part
  ],
)
def test_equals_the_dense_reference_forward_and_gradients(t, hq, h, dk, dv, bs, n, chunk, cuts):
  q, k, v, idx, seg, ct = _case(jax.random.key(t + n), 2, t, hq, h, dk, dv, bs, n, cuts=cuts)
  o_ref, g_ref = _value_and_grads(sel.reference_impl, q, k, v, idx, seg, ct, bs)
  o, g = _value_and_grads(gathered_selected_attention, q, k, v, idx, seg, ct, bs, chunk=chunk)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), **TOL)
  for x, y in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
  assert float(jnp.max(jnp.abs(o))) > 0.1  # not a trivially zero output


def test_auto_gathers_above_the_dense_limit(monkeypatch):
  """``selected_attention(impl="auto")`` without a kernel: dense below the limit, gathered above
  (same result); ``impl="reference"`` always dense."""
  q, k, v, idx, seg, ct = _case(jax.random.key(5), 1, 40, 4, 2, 8, 8, 8, 3, cuts=(9, 22))
  calls = []
  real = sel.gathered_selected_attention
  monkeypatch.setattr(
    sel, "gathered_selected_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
  )
  run = lambda impl: sel.selected_attention(q, k, v, idx, block_size=8, segment_ids=seg, impl=impl)
  want = run("reference")
  run("auto")
  assert not calls  # 1 * 40 * 4 * 40 logits: dense
  monkeypatch.setattr(sel, "DENSE_MAX_ELEMENTS", 0)
  np.testing.assert_allclose(np.asarray(run("auto")), np.asarray(want), **TOL)
  assert calls
  calls.clear()
  run("reference")
  assert not calls


def test_causality_and_document_isolation_by_perturbation():
  """Changing future keys/values, or those of another document, leaves every output unchanged."""
  t, bs = 48, 8
  q, k, v, _, _, _ = _case(jax.random.key(9), 1, t, 4, 2, 8, 8, bs, 3)
  nb = t // bs
  idx = jnp.broadcast_to(jnp.arange(nb)[None, None, None, :], (1, t, 2, nb))  # every block
  seg = jnp.asarray(np.repeat(np.array([0, 1], np.int32), t // 2)[None])
  fn = functools.partial(
    gathered_selected_attention, block_size=bs, segment_ids=seg, softmax_scale=0.35, chunk=10
  )
  base = fn(q, k, v, idx)
  cut = 30  # queries < 30 must not see keys >= 30
  noise = jax.random.normal(jax.random.key(10), k[:, cut:].shape)
  out = fn(q, k.at[:, cut:].add(noise), v.at[:, cut:].add(noise), idx)
  np.testing.assert_allclose(np.asarray(out[:, :cut]), np.asarray(base[:, :cut]), **TOL)
  assert float(jnp.max(jnp.abs(out[:, cut:] - base[:, cut:]))) > 1e-3
  # The second document (tokens 24..47) never sees the first one's keys.
  out = fn(q, k.at[:, :24].add(5.0), v.at[:, :24].add(5.0), idx)
  np.testing.assert_allclose(np.asarray(out[:, 24:]), np.asarray(base[:, 24:]), **TOL)


def test_bf16_stays_close_to_float32():
  q, k, v, idx, seg, ct = _case(jax.random.key(11), 2, 40, 4, 2, 16, 16, 8, 4, cuts=(12, 30))
  o32, g32 = _value_and_grads(gathered_selected_attention, q, k, v, idx, seg, ct, 8, chunk=16)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  o16, g16 = _value_and_grads(gathered_selected_attention, *bf, idx, seg, ct, 8, chunk=16)
  assert o16.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g16)
  rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
  assert rel(o16, o32) < 2e-2
  assert all(rel(a, b) < 3e-2 for a, b in zip(g16, g32))


def test_memory_is_linear_in_the_sequence_length():
  """The gathered fwd+bwd's XLA temporaries grow linearly in T: a fixed working set of chunk
  buffers (``default_chunk`` sizes a chunk to 2^23 gathered elements) plus O(T) per-token arrays,
  never the ``[B, T, HQ, T]`` dense logits (512 MiB per copy at T = 4096, HQ = 8; 8 GiB at 16k)."""
  hq, h, d, bs, n = 8, 2, 32, 64, 4

  def temp_bytes(t):
    avals = (
      jax.ShapeDtypeStruct((1, t, hq, d), jnp.float32),
      jax.ShapeDtypeStruct((1, t, h, d), jnp.float32),
      jax.ShapeDtypeStruct((1, t, h, d), jnp.float32),
      jax.ShapeDtypeStruct((1, t, h, n), jnp.int32),
    )

    def loss(q, k, v, idx):
      return jnp.sum(gathered_selected_attention(q, k, v, idx, block_size=bs, softmax_scale=0.2))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*avals).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  temps = {t: temp_bytes(t) for t in (4096, 8192, 16384)}
  dense = {t: t * t * hq * 4 for t in temps}
  assert temps[16384] < dense[16384] / 16, temps[16384] / 2**20
  # Doubling T adds at most ~2x what the previous doubling added (quadratic growth would add 4x),
  # and each doubling adds far less than a dense copy of the logits would.
  step1, step2 = temps[8192] - temps[4096], temps[16384] - temps[8192]
  assert step2 <= 2.5 * max(step1, 1), (step1 / 2**20, step2 / 2**20)
  assert step2 < (dense[16384] - dense[8192]) / 64, step2 / 2**20
  t = 4096
  assert default_chunk(t, hq, h, n, bs, d, d) == 2**23 // (n * bs * (hq + h * 2 * d))
  assert default_chunk(100, 64, 4, 16, 64, 128, 128) == 8  # floor of 8 tokens
