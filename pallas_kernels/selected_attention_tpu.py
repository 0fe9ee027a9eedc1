"""Selected-block attention on TPU with Pallas (Mosaic) kernels: the public entry.

:func:`selected_attention_tpu` computes, for each query row, softmax attention over the keys of
the KV blocks its own token selected (``block_indices``, exact per-token selection), causally
and, with ``segment_ids``, inside its own document with document-relative block ids
(:mod:`pallas_kernels.packed_layout`). The kernels
(:mod:`pallas_kernels.selected_attention_tpu_kernels`) run per query tile (``R`` rows: ``R // G``
tokens x the ``G`` query heads of one KV head) over the union of the tile's picks; the backward
recomputes the probabilities from the saved LSE with a dQ kernel over the same tiles and a dK/dV
kernel over the inverse map (KV block -> query tiles), so the forward saves only ``O`` and the
LSE. ``jax.custom_vjp`` ties them together. Design, VMEM budget and per-generation choices:
``docs/tpu.md``.

Without a TPU the kernels run in the TPU interpreter (``TpuConfig(interpret=...)``) and lower
for an abstract TPU device (tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import packed_layout as packed
from pallas_kernels import selected_attention_tpu_kernels as kern
from pallas_kernels import selected_attention_tpu_prep as prep

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
LANES = 128


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """How the TPU kernels run (hashable, validated on construction).

  Attributes:
    tile_rows: ``R``, query rows per tile, a multiple of 128 (the lanes): ``R // G`` tokens of
      one KV head. 128 fills the 128-wide MXU of v4/v5e/v5p; 256 suits the 256-wide MXU of v6e
      (more rows per fetched block, a longer union per tile).
    slots: DMA ring depth, >= 2: K/V blocks in flight in the forward and dQ kernels, query
      tiles in the dK/dV kernel (one block's compute is short next to a DMA's latency).
    pair_chunk: dK/dV kernel: query-tile ids read into SMEM per refill (>= 1).
    shared: ASA's shared selection: every token uses the picks of the first token of its aligned
      run of ``R // G`` tokens (aligned to each document's start with ``segment_ids``); changes
      the model, a training-time choice. ``False``: exact per-token selection.
    doc_blocks: packed documents: extra blocks of the padded K/V layout beyond ``cdiv(T, bs)``
      (None: ``cdiv(T, bs)``, room for as many documents as blocks).
    interpret: ``None`` (compile for a TPU) or a ``pallas_call`` ``interpret=`` value (``True``
      or ``jax.experimental.pallas.tpu.InterpretParams(...)``) to run on CPU.
  """

  tile_rows: int = 128
  slots: int = 4
  pair_chunk: int = 128
  shared: bool = False
  doc_blocks: int | None = None
  interpret: Any = None

  def __post_init__(self):
    if not _is_int(self.tile_rows) or self.tile_rows < LANES or self.tile_rows % LANES:
      _fail("tile_rows", f"a positive multiple of {LANES}", self.tile_rows)
    if not _is_int(self.slots) or self.slots < 2:
      _fail("slots", "an int >= 2", self.slots)
    if not _is_int(self.pair_chunk) or self.pair_chunk < 1:
      _fail("pair_chunk", "a positive int", self.pair_chunk)
    if not isinstance(self.shared, bool):
      _fail("shared", "a bool", self.shared)
    if self.doc_blocks is not None and (not _is_int(self.doc_blocks) or self.doc_blocks < 0):
      _fail("doc_blocks", "None or an int >= 0", self.doc_blocks)


def _fail(field: str, expected: str, got) -> None:
  raise ValueError(f"TpuConfig.{field}: expected {expected}, got {got!r}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def packed_num_blocks(seq_len: int, block_size: int, config: TpuConfig = TpuConfig()) -> int:
  """Blocks of the padded K/V layout for packed rows: ``NB + doc_blocks`` (``2 NB`` by default)."""
  nb = -(-seq_len // block_size)
  return nb + (nb if config.doc_blocks is None else config.doc_blocks)


def documents_fit(segment_ids, block_size: int, config: TpuConfig = TpuConfig()):
  """Jittable bool: every row of ``segment_ids [B, T]`` fits the static padded layout; where it
  is ``False`` the kernels drop the late documents of the rows that do not fit (take another
  path, e.g. with ``lax.cond``)."""
  need = packed.packed_blocks_needed(segment_ids, block_size)
  return jnp.all(need <= packed_num_blocks(segment_ids.shape[1], block_size, config))


def unsupported_reason(q, k, v, block_indices, *, block_size, config: TpuConfig = TpuConfig()):
  """Why the kernels cannot serve this call, or ``None`` (static checks)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or jnp.ndim(block_indices) != 4:
    return "q, k, v and block_indices must be rank 4"
  if jnp.dtype(q.dtype) not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (only bfloat16 and float32, all equal)"
  if k.shape[-1] != q.shape[-1]:
    return f"k head dim {k.shape[-1]} (expected Dk={q.shape[-1]}, the q head dim)"
  if k.shape[1] != q.shape[1] or v.shape[:3] != k.shape[:3]:
    return "k and v must have the query length and batch (self-attention) and equal heads"
  hq, h = q.shape[2], k.shape[2]
  if h < 1 or hq % h:
    return f"HQ={hq} is not a multiple of H={h}"
  if hq // h > config.tile_rows:
    return f"G={hq // h} query heads per KV head (at most tile_rows={config.tile_rows})"
  sub = 8 * 4 // jnp.dtype(q.dtype).itemsize  # sublane tile of the dtype
  if not isinstance(block_size, int) or block_size < sub or block_size % sub:
    return f"block_size={block_size} (expected a multiple of {sub} for {jnp.dtype(q.dtype)})"
  nb = packed_num_blocks(q.shape[1], block_size, config)  # the larger (packed) key grid
  nt = -(-q.shape[1] // (config.tile_rows // (hq // h)))
  if nb * nt >= 2**31:
    return f"{nb} key blocks x {nt} query tiles overflow the int32 keys of the inverse map"
  return prep.check_positions_exact(nb * block_size)


def _forward(q, k, v, block_indices, positions, params: kern.KernelParams):
  """``(o [B, T, HQ, Dv], lse [B, T, HQ] float32)``; ``k, v`` on the key grid (``[B, S, H, .]``),
  ``block_indices`` its ids, ``positions [B, T]`` the queries' key-grid positions."""
  b, t, hq, _ = q.shape
  h, bs = k.shape[2], params.block_size
  nb = -(-k.shape[1] // bs)
  r, _ = prep.tile_geometry(t, params.group, params.tile_rows)
  lists, _, _ = prep.tile_lists(block_indices, positions, r=r, block_size=bs, num_blocks=nb)
  meta = prep.tile_meta(
    block_indices, positions, group=params.group, r=r, tile_rows=params.tile_rows
  )
  qt = prep.to_tiles(q, h, r, params.tile_rows)
  kf, vf = prep.kv_heads_major(k, nb, bs), prep.kv_heads_major(v, nb, bs)
  ot, lse = kern.forward_call(lists, qt, meta, kf, vf, params)
  o = prep.from_tiles_t(ot, t, params.group)
  lse = prep.from_tiles_t(lse, t, params.group)[..., 0]
  return o, lse


def _backward(q, k, v, o, lse, do, block_indices, positions, params: kern.KernelParams):
  b, t, hq, _ = q.shape
  h, bs, s = k.shape[2], params.block_size, k.shape[1]
  nb = -(-s // bs)
  r, _ = prep.tile_geometry(t, params.group, params.tile_rows)
  lists, ids, counts = prep.tile_lists(block_indices, positions, r=r, block_size=bs, num_blocks=nb)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, T, HQ]
  meta = prep.tile_meta(
    block_indices,
    positions,
    group=params.group,
    r=r,
    tile_rows=params.tile_rows,
    lse=lse,
    delta=delta,
  )
  qt = prep.to_tiles(q, h, r, params.tile_rows)
  dot_ = prep.to_tiles(do.astype(q.dtype), h, r, params.tile_rows)
  kf, vf = prep.kv_heads_major(k, nb, bs), prep.kv_heads_major(v, nb, bs)
  dqt = kern.dq_call(lists, qt, dot_, meta, kf, vf, params)
  dq = prep.from_tiles_t(dqt, t, params.group)
  bounds, pair_tiles = prep.inverse_pairs(ids, counts, num_blocks=nb, chunk=params.pair_chunk)
  dkf, dvf = kern.dkv_call(bounds, pair_tiles, qt, dot_, meta, kf, vf, params)
  dk = dkf.transpose(0, 2, 1, 3)[:, :s]
  dv = dvf.transpose(0, 2, 1, 3)[:, :s]
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, block_indices, positions, params):
  return _forward(q, k, v, block_indices, positions, params)[0]


def _attention_fwd(q, k, v, block_indices, positions, params):
  o, lse = _forward(q, k, v, block_indices, positions, params)
  return o, (q, k, v, o, lse, block_indices, positions)


def _attention_bwd(params, res, do):
  q, k, v, o, lse, block_indices, positions = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, block_indices, positions, params)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def selected_attention_tpu(
  q,
  k,
  v,
  block_indices,
  *,
  block_size: int,
  segment_ids=None,
  softmax_scale: float | None = None,
  return_lse: bool = False,
  config: TpuConfig = TpuConfig(),
):
  """Selected-block attention with the Pallas TPU kernels (forward and backward).

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (bfloat16 or float32, all
      equal; ``HQ = H * G``, ``G <= tile_rows``; ``Dk`` and ``Dv`` independent).
    block_indices: ``[B, T, H, n]`` int block ids of ``block_size`` keys (``-1`` padding,
      duplicates count once, out-of-range and future ids match nothing). With ``segment_ids``
      they are DOCUMENT-RELATIVE.
    block_size: keys per block, a multiple of 16 (bfloat16) or 8 (float32).
    segment_ids: optional ``[B, T]`` document ids (maximal runs of equal ids). K/V are read in
      the document-aligned padded layout of :func:`packed_num_blocks` blocks
      (:mod:`pallas_kernels.packed_layout`); rows needing more blocks are served WRONGLY: check
      :func:`documents_fit` (jittable) where that can happen.
    softmax_scale: defaults to ``Dk ** -0.5``.
    return_lse: also return the ``[B, T, HQ]`` float32 natural-log LSE (no gradient through it).
    config: :class:`TpuConfig`.

  Returns:
    ``o [B, T, HQ, Dv]`` in ``q.dtype`` (or ``(o, lse)``); rows that see no key get 0.

  Raises:
    NotImplementedError: for a call the kernels do not serve (the message says why).
  """
  if not isinstance(config, TpuConfig):
    raise TypeError(f"config: expected a TpuConfig, got {type(config).__name__}")
  reason = unsupported_reason(q, k, v, block_indices, block_size=block_size, config=config)
  if reason is not None:
    raise NotImplementedError(f"pallas_tpu selected_attention: {reason}")
  b, t, hq, dk = q.shape
  g = hq // k.shape[2]
  scale = float(softmax_scale if softmax_scale is not None else dk**-0.5)
  params = kern.KernelParams(
    softmax_scale=scale,
    group=g,
    block_size=block_size,
    tile_rows=config.tile_rows,
    pair_chunk=config.pair_chunk,
    slots=config.slots,
    interpret=config.interpret,
  )
  bi = jnp.asarray(block_indices, jnp.int32)
  r = config.tile_rows // g
  if segment_ids is None:
    if config.shared:
      bi = prep.shared_picks(bi, r)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kp, vp = k, v
  else:
    if jnp.shape(segment_ids) != (b, t):
      raise ValueError(
        f"segment_ids: expected shape {(b, t)} ([B, T]), got {jnp.shape(segment_ids)}"
      )
    layout = packed.packed_layout(
      jnp.asarray(segment_ids),
      block_size=block_size,
      num_blocks=packed_num_blocks(t, block_size, config),
    )
    if config.shared:
      bi = prep.shared_picks(bi, r, layout.doc_start)
    bi = packed.padded_block_indices(bi, layout, block_size=block_size)
    positions = packed.padded_positions(layout)
    kp, vp = packed.pad_keys(k, layout), packed.pad_keys(v, layout)
  if return_lse:
    return _forward(q, kp, vp, bi, positions, params)
  return _attention(q, kp, vp, bi, positions, params)


def interpret_forced() -> bool:
  """Whether ``pltpu.force_tpu_interpret_mode(...)`` is active (every TPU ``pallas_call`` then
  runs in the TPU interpreter, e.g. library tests on CPU)."""
  try:
    from jax._src import config as jax_config

    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
  except (ImportError, AttributeError):  # pragma: no cover - other jax versions
    return False


def selected_attention_op(
  q, k, v, block_indices, *, block_size, segment_ids, softmax_scale, interpret=None
):
  """The ``selected_attention`` op of backend ``pallas_tpu`` (exact per-token selection, default
  config): raises ``NotImplementedError(reason)`` for a call the kernels cannot serve (no TPU
  and no forced TPU interpret mode, dtype, group size, block size). With ``segment_ids``, rows must fit the default padded layout
  (:func:`documents_fit`); the library's entry checks that and falls back."""
  if interpret is None and jax.default_backend() != "tpu" and not interpret_forced():
    raise NotImplementedError(
      f"pallas_tpu selected_attention: needs a TPU, the default backend is "
      f"{jax.default_backend()!r}"
    )
  return selected_attention_tpu(
    q,
    k,
    v,
    block_indices,
    block_size=block_size,
    segment_ids=segment_ids,
    softmax_scale=softmax_scale,
    config=TpuConfig(interpret=interpret),
  )


__all__ = [
  "TpuConfig",
  "documents_fit",
  "interpret_forced",
  "packed_num_blocks",
  "selected_attention_op",
  "selected_attention_tpu",
  "unsupported_reason",
]
