"""Head dims of the Hopper selected-attention kernels: padding to whole 64-column tiles and the
shared-memory budget of each kernel.

The kernels keep the q/k head dim ``Dk`` (Q and K tiles, ``S = Q Kᵀ``, dQ and dK) and the v head
dim ``Dv`` (V tile, the O accumulator, dO, ``dP = dO Vᵀ``, dV) apart; each must be a multiple of
64 (one 128-byte swizzled row of bf16/f16, the wgmma K step). Other dims are zero padded by the
wrapper (:func:`with_padded_head_dims`): zero columns of Q and K leave ``Q Kᵀ`` unchanged and zero
columns of V give zero columns of O that are sliced off; gradients flow back through the pad and
slice. The softmax scale stays the caller's (by default the *unpadded* ``Dk ** -0.5``).

Shared memory (:func:`smem_bytes`): Mosaic GPU places every scratch buffer at a 1024-byte
boundary and the limit is 227 KiB per CTA on H100/H200; the kernels lower their K/V (or Q/dO)
ring depth until they fit (:func:`fit_stages`).
"""

from __future__ import annotations

COLUMN_TILE = 64
"""Head dims are padded to a multiple of this (128-byte swizzle of 16-bit elements)."""

MAX_HEAD_DIM = 256
"""Largest padded ``Dk`` or ``Dv`` (the wgmma N limit for dQ / dK / O; SMEM at one stage)."""

MAX_DK_PLUS_DV = 384
"""Largest padded ``Dk + Dv``: the dK/dV kernel keeps both float32 accumulators ``[64, Dk]`` and
``[64, Dv]`` in the registers of one warpgroup, ``(Dk + Dv) / 2`` registers per thread (128 at
128/128, 160 at 192/128, 192 at 256/128) next to about 100 for the ``[64, 64]`` score tiles, out
of the 255 a thread can address; 256/256 would need 256 for the accumulators alone. Near the cap
ptxas may spill (slower, still correct): time it with ``benchmarks/selected_attention.py``."""

SMEM_LIMIT = 227 * 1024
"""Dynamic shared memory per CTA on sm90 (what Mosaic GPU checks at lowering)."""

_ALIGN = 1024  # Mosaic GPU's SMEM_ALIGNMENT: every scratch buffer starts here
_RESERVED = 2 * _ALIGN + 2048  # barriers (own allocation) + default reduction_scratch_bytes


def padded_head_dim(d: int) -> int:
  """``d`` rounded up to a multiple of :data:`COLUMN_TILE`."""
  return -(-d // COLUMN_TILE) * COLUMN_TILE


def head_dims_reason(dk: int, dv: int) -> str | None:
  """Why the kernels cannot serve head dims ``(Dk, Dv)``, or ``None`` (after padding)."""
  pk, pv = padded_head_dim(dk), padded_head_dim(dv)
  if dk < 1 or pk > MAX_HEAD_DIM:
    return (
      f"q/k head dim Dk={dk} (expected 1 <= Dk and Dk padded to a multiple of "
      f"{COLUMN_TILE} <= {MAX_HEAD_DIM}, got {pk})"
    )
  if dv < 1 or pv > MAX_HEAD_DIM:
    return (
      f"v head dim Dv={dv} (expected 1 <= Dv and Dv padded to a multiple of "
      f"{COLUMN_TILE} <= {MAX_HEAD_DIM}, got {pv})"
    )
  if pk + pv > MAX_DK_PLUS_DV:
    return (
      f"head dims Dk={dk}, Dv={dv} (expected padded Dk + Dv <= {MAX_DK_PLUS_DV}: the dK/dV "
      f"kernel holds both accumulators in registers; got {pk} + {pv})"
    )
  return None


def pad_head_dims(q, k, v):
  """Zero-pads ``q [..., Dk]``, ``k [..., Dk]`` and ``v [..., Dv]`` on the last axis to
  :func:`padded_head_dim`; returns them unchanged where already whole tiles."""
  import jax.numpy as jnp

  def pad(x):
    d = x.shape[-1]
    extra = padded_head_dim(d) - d
    return x if extra == 0 else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))

  return pad(q), pad(k), pad(v)


def with_padded_head_dims(fn, q, k, v, *args, **kwargs):
  """``fn(q', k', v', *args, **kwargs)`` on zero-padded head dims, outputs sliced back.

  ``fn`` returns ``o [B, T, HQ, Dv']`` or a tuple whose first element is ``o``; the result has
  ``o[..., :Dv]`` in its place. Cost when a dim is padded: an XLA pad copy of q/k (or v) and the
  kernels' ``Dk'/Dk`` (``Dv'/Dv``) more MMA work and Q/K (V/O/dO) traffic, e.g. 1.2x for
  Dk = 160 -> 192.
  """
  dv = v.shape[-1]
  out = fn(*pad_head_dims(q, k, v), *args, **kwargs)
  if isinstance(out, tuple):
    return (out[0][..., :dv],) + tuple(out[1:])
  return out[..., :dv]


def _buf(*shape_and_itemsize) -> int:
  *shape, itemsize = shape_and_itemsize
  n = itemsize
  for s in shape:
    n *= s
  return -(-n // _ALIGN) * _ALIGN


def smem_bytes(
  kernel: str,
  *,
  dk: int,
  dv: int,
  stages: int,
  length: int,
  block_size: int = 64,
  itemsize: int = 2,
  has_docs: bool = True,
) -> int:
  """Upper bound on the dynamic SMEM of one CTA of ``kernel`` (bytes).

  Args:
    kernel: ``"fwd64"`` (one warpgroup, 64 rows: Q ``[64, Dk]``, K/V rings, O reuses Q when
      ``Dk == Dv``, else V slot 0 when ``bs == 64``, else its own ``[64, Dv]``), ``"fwd128"`` (two compute warpgroups: Q ``[2, 64, Dk]``, K/V
      rings, O ``[2, 64, Dv]`` when ``Dk != Dv``), ``"fwd128p"`` (the persistent 128-row kernel:
      Q ``[2, 2, 64, Dk]``, lists and docs double buffered, O ``[2, 64, Dv]`` always), ``"dq"`` (Q ``[64, Dk]``, dO ``[64, Dv]``,
      K/V rings) or ``"dkv"`` (K ``[64, Dk]``, V ``[64, Dv]`` key tiles, Q/dO rings of 64-row
      tiles).
    dk, dv: padded head dims; stages: ring depth; length: the tile lists' length (the
      forward copies the tile's ids and membership words to SMEM, 3 int32 rows).
  """
  e = itemsize
  rows = 64
  docs = int(has_docs)
  kv_ring = _buf(stages, block_size, dk, e) + _buf(stages, block_size, dv, e)
  if kernel == "fwd64":
    o = 0 if dk == dv or block_size == rows else _buf(rows, dv, e)
    return (
      _buf(rows, dk, e)
      + kv_ring
      + o
      + _buf(rows, 4)
      + 3 * _buf(length, 4)
      + docs * _buf(rows, 4)
      + _RESERVED
    )
  if kernel == "fwd128":
    o = 0 if dk == dv else _buf(2, rows, dv, e)
    return (
      _buf(2, rows, dk, e)
      + kv_ring
      + o
      + _buf(2, rows, 4)
      + 3 * _buf(length, 4)
      + docs * _buf(2, rows, 4)
      + _RESERVED
    )
  if kernel == "fwd128p":  # persistent: Q, lists, docs double buffered
    return (
      _buf(2, 2, rows, dk, e)
      + kv_ring
      + _buf(2, rows, dv, e)
      + _buf(2, rows, 4)
      + 3 * _buf(2, -(-length // 32) * 32, 4)
      + _buf(2, 2, rows, 4)
      + _RESERVED
    )
  if kernel == "dq":
    return (
      _buf(rows, dk, e)
      + _buf(rows, dv, e)
      + 2 * _buf(rows, 4)
      + kv_ring
      + docs * _buf(rows, 4)
      + _RESERVED
    )
  if kernel == "dkv":  # 64-key tiles whatever the block size
    return (
      _buf(rows, dk, e)
      + _buf(rows, dv, e)
      + _buf(stages, rows, dk, e)
      + _buf(stages, rows, dv, e)
      + 2 * _buf(stages, rows, 4)
      + docs * _buf(stages, rows, 4)
      + _RESERVED
    )
  raise ValueError(f"kernel: expected 'fwd64', 'fwd128', 'fwd128p', 'dq' or 'dkv', got {kernel!r}")


def fit_stages(kernel: str, requested: int, **kw) -> int:
  """The largest ring depth ``<= requested`` whose :func:`smem_bytes` fits :data:`SMEM_LIMIT`.

  Raises:
    NotImplementedError: when even one stage does not fit (the message gives the bytes).
  """
  for stages in range(max(1, requested), 0, -1):
    if smem_bytes(kernel, stages=stages, **kw) <= SMEM_LIMIT:
      return stages
  need = smem_bytes(kernel, stages=1, **kw)
  raise NotImplementedError(
    f"pallas_gpu selected_attention: the {kernel} kernel needs {need} "
    f"bytes of shared memory at one stage ({kw}), more than the "
    f"{SMEM_LIMIT} of a CTA"
  )
