"""Numerical checks of the selected-attention kernels against the float32 plain-JAX reference.

Shared by the GPU tests (``test_kernels_mgpu_gpu.py``, which pass the kernel op) and the CPU
tests of the same plumbing (``test_kernels_mgpu_transforms.py``, which pass the reference in its
place). Every check draws fresh random inputs (never zeros) and compares with
:func:`sparse_attention_jax.ops.masked.masked_attention` under
:func:`sparse_attention_jax.ops.selected.selected_mask` on float32 copies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.selected import selected_attention, selected_mask
from sparse_attention_jax.ops.selection import share_selection


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Bounds on the errors of a 16-bit kernel against the float32 reference.

  Attributes:
    o_rel: relative L2 error of O.
    o_max: max absolute error of O.
    lse: max absolute error of the LSE where the reference is finite.
    grad_rel: relative L2 error of each of dQ, dK, dV.
    grad_max: max absolute error of each gradient over its max ``|reference|``.
  """

  o_rel: float = 1e-2
  o_max: float = 6e-2
  lse: float = 2e-2
  grad_rel: float = 2e-2
  grad_max: float = 5e-2


TOLERANCES = {jnp.dtype(jnp.bfloat16): Tolerance(), jnp.dtype(jnp.float16): Tolerance()}
"""Per input dtype."""


def random_selection(key, b, t, h, n, *, block_size, forced=True, pad_frac=0.15):
  """``[B, T, H, n]`` ids: current block forced in slot 0, random earlier blocks, -1 padding,
  some duplicates and some future / out-of-range ids (all must be ignored or masked)."""
  k1, k2, k3 = jax.random.split(key, 3)
  cur = (jnp.arange(t, dtype=jnp.int32) // block_size)[None, :, None, None]
  u = jax.random.uniform(k1, (b, t, h, n))
  ids = jnp.floor(u * (cur + 1)).astype(jnp.int32)  # in [0, cur]
  ids = jnp.where(jax.random.uniform(k2, ids.shape) < pad_frac, -1, ids)
  ids = jnp.where(jax.random.uniform(k3, ids.shape) < 0.03, cur + 1, ids)  # future block
  if forced:
    ids = ids.at[..., 0].set(cur[..., 0])
  return ids.at[..., -1].set(ids[..., 1])  # a duplicate


def random_segments(key, b, t, num_cuts=5):
  """``[B, T]`` int32 packed-document ids with boundaries at random positions (inside blocks
  and tiles)."""
  cuts = jax.random.randint(key, (b, num_cuts), 1, t)
  return jnp.cumsum(jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], cuts].set(1), axis=1)


def reference(q, k, v, bi, *, block_size, scale, segment_ids=None, shared_run=None):
  """float32 ``(o, lse)`` of the plain-JAX reference (``shared_run``: tokens per shared run)."""
  if shared_run is not None:
    bi = share_selection(bi, shared_run)
  mask = selected_mask(bi, block_size=block_size, seq_len=q.shape[1], segment_ids=segment_ids)
  f32 = lambda x: x.astype(jnp.float32)
  return masked_attention(f32(q), f32(k), f32(v), mask, scale)


def rel_err(a, r) -> float:
  a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
  return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def assert_forward_close(o, lse, o_ref, lse_ref, tol: Tolerance):
  """O within ``tol`` (and finite), LSE close where the reference is finite and ``-inf`` where
  a row sees no key."""
  o, o_ref = np.asarray(o, np.float32), np.asarray(o_ref, np.float32)
  assert np.isfinite(o).all(), "O has non-finite values"
  assert rel_err(o, o_ref) < tol.o_rel, f"O: relative error {rel_err(o, o_ref):.2e}"
  assert np.abs(o - o_ref).max() < tol.o_max, f"O: max error {np.abs(o - o_ref).max():.2e}"
  if lse is None:
    return
  lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
  fin = np.isfinite(lse_ref)
  assert np.all(np.isneginf(lse[~fin])), "LSE: rows that see no key must be -inf"
  if fin.any():
    err = np.abs(lse[fin] - lse_ref[fin]).max()
    assert err < tol.lse, f"LSE: max error {err:.2e}"


def assert_grads_close(grads, grads_ref, tol: Tolerance):
  """Each of dQ, dK, dV finite and within ``tol`` of the reference."""
  for name, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    assert np.isfinite(a).all(), f"{name} has non-finite values"
    rel = rel_err(a, r)
    mx = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30))
    assert rel < tol.grad_rel and mx < tol.grad_max, f"{name}: rel={rel:.2e} max/|ref|={mx:.2e}"


def fwd_and_grads(fn, q, k, v, bi, w):
  """``(o, (dq, dk, dv))`` of ``sum(fn(q, k, v, bi) * w)``."""

  def loss(q, k, v):
    o = fn(q, k, v, bi)
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, g


def reference_op(block_size):
  """The library's plain-JAX ``selected_attention`` as ``f(q, k, v, bi)``."""
  return lambda q, k, v, bi: selected_attention(
    q, k, v, bi, block_size=block_size, impl="reference"
  )


def transform_inputs(seed, lead, t, hq, h, d, n, *, block_size):
  """bf16 ``q, k, v``, ids and a float32 cotangent ``w`` with leading axes ``lead``."""
  ks = jax.random.split(jax.random.key(seed), 5)
  rnd = lambda key, shape: jax.random.normal(key, (*lead, *shape), jnp.float32)
  q = rnd(ks[0], (t, hq, d)).astype(jnp.bfloat16)
  k = rnd(ks[1], (t, h, d)).astype(jnp.bfloat16)
  v = rnd(ks[2], (t, h, d)).astype(jnp.bfloat16)
  flat = int(np.prod(lead))
  bi = random_selection(ks[3], flat, t, h, n, block_size=block_size).reshape(*lead, t, h, n)
  w = rnd(ks[4], (t, hq, d))
  return q, k, v, bi, w


def transform_errors(op, *, block_size, t=333, hq=32, h=2, d=128, n=6):
  """``op`` (``f(q, k, v, bi)`` on bf16) under ``jax.vmap`` over 3 problems and inside
  ``jax.shard_map`` over the batch (``data`` = all local devices) and, when their number divides
  the KV heads, over the KV heads; forward and ``jax.grad``, each against the reference on float32
  copies without the transform. Returns ``[(case, {"o", "dq", "dk", "dv": relative error})]``."""
  f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
  ref = reference_op(block_size)
  out = []

  def errors(got, want):
    (o, g), (o_r, g_r) = got, want
    for x in (o, *g):
      assert bool(jnp.all(jnp.isfinite(x))), "non-finite output"
    return {
      "o": rel_err(o, o_r),
      **{nm: rel_err(a, b) for nm, a, b in zip(("dq", "dk", "dv"), g, g_r)},
    }

  q, k, v, bi, w = transform_inputs(1, (3, 1), t, hq, h, d, n, block_size=block_size)
  got = jax.jit(jax.vmap(lambda q, k, v, bi, w: fwd_and_grads(op, q, k, v, bi, w)))(q, k, v, bi, w)
  want = jax.jit(jax.vmap(lambda q, k, v, bi, w: fwd_and_grads(ref, *f32((q, k, v)), bi, w)))(
    q, k, v, bi, w
  )
  out.append(("vmap", errors(got, want)))

  nd = len(jax.devices())
  meshes = [((nd, 1), "data")] + ([((1, nd), "kv")] if h % nd == 0 else [])
  for shape, label in meshes:
    mesh = jax.make_mesh(shape, ("data", "kv"))
    spec = P("data", None, "kv", None)
    shard = NamedSharding(mesh, spec)
    q, k, v, bi, w = transform_inputs(
      2 + shape[0], (2 * shape[0],), t, hq, h, d, n, block_size=block_size
    )
    mapped = jax.shard_map(op, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    args = [jax.device_put(x, shard) for x in (q, k, v, bi, w)]
    got = jax.jit(lambda q, k, v, bi, w, f=mapped: fwd_and_grads(f, q, k, v, bi, w))(*args)
    want = jax.jit(lambda q, k, v, bi, w: fwd_and_grads(ref, *f32((q, k, v)), bi, w))(
      q, k, v, bi, w
    )
    out.append((f"shard_map {label}={max(shape)}", errors(got, want)))
  return out
