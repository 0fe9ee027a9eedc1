"""Selected-block attention on Hopper (sm90) with Mosaic GPU kernels: the public entry.

:func:`selected_attention_mgpu` computes, for each query row, softmax attention over the keys of
the KV blocks its token selected (``block_indices``), causally and, with ``segment_ids``, inside
its own document with document-relative block ids (:mod:`pallas_kernels.packed_layout`). The
forward is one of the kernels of
:mod:`pallas_kernels.selected_attention_kernel_sm90` (per-tile, 64 or 128 query rows a CTA) or
:mod:`pallas_kernels.selected_attention_persistent_kernel_sm90` (one CTA per SM walking many
tiles); the backward (:mod:`pallas_kernels.selected_attention_vjp_kernel_sm90`) recomputes the
probabilities from the saved LSE with a dQ kernel over the same query tiles and a dK/dV kernel over
the inverse map (KV block -> query tiles), so the forward saves only ``O`` and ``LSE``.

Two selection modes:

* ``"exact"``: per-token selection; a tile iterates over the union of its tokens' lists and masks
  each row to its own token's blocks (masked rows still cost MMA work).
* ``"shared"``: shared selection; every token uses the list of the first token of its aligned run
  of ``r = 64 // G`` tokens (:func:`pallas_kernels.selected_attention_common.share_selection`).

How the kernels run is set by one frozen :class:`TuningConfig`; :func:`selected_attention_op` is
the entry the library's ``impl="pallas_gpu"`` backend calls.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import packed_layout as packed
from pallas_kernels import selected_attention_dims as dims
from pallas_kernels import selected_attention_vjp_kernel_sm90 as vjp_kernel
from pallas_kernels.selected_attention_common import (
  BLOCK_SIZE,
  BLOCK_SIZES,
  MODES,
  TILE_ROWS,
  KernelConfig,
  document_starts,
  prepare,
  resolve_config,
  share_selection,
  shift_tiles,
  tokens_per_tile,
  unsupported_reason,
)
from pallas_kernels.selected_attention_kernel_sm90 import call_kernel
from pallas_kernels.selected_attention_vjp_common import BwdConfig

TILE_ROW_CHOICES = (64, 128)
Q_LAYOUTS = ("tiles", "direct")


def _fail(field: str, expected: str, got) -> None:
  raise ValueError(f"TuningConfig.{field}: expected {expected}, got {got!r}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """How the selected-attention kernels run (hashable, validated on construction).

  Attributes:
    mode: ``"exact"`` (per-token selection) or ``"shared"`` (tokens of each aligned run of
      ``r = 64 // G`` share their first token's list).
    block_size: KV block size of ``block_indices``, 32, 64 or 128 (one K/V tile of the forward
      and dQ kernels; 32-key tiles use the 64-byte swizzle).
    num_stages: K/V SMEM ring depth, >= 1 (lowered to what fits in the 227 KiB of a CTA,
      :mod:`pallas_kernels.selected_attention_dims`).
    tile_rows: 64 (one warpgroup per CTA, prefetching its own K/V) or 128 (two compute
      warpgroups sharing one K/V stream fed by a producer warpgroup; falls back to 64 for
      ``G = 1``). ``None``: 128 for ``"exact"``, 64 for ``"shared"`` (a 128-row tile would
      iterate over the union of two shared lists).
    q_layout: ``"tiles"`` (Q/O through an XLA transpose) or ``"direct"`` (per-token TMA copies of
      Q/O, no transpose; only with 128-row tiles and ``G % 8 == 0``, else falls back to tiles).
    ping_pong: with 128-row tiles, alternate the two warpgroups' softmax and wgmma (FA3);
      dropped at one ring stage.
    persistent: with 128-row tiles, launch ``num_ctas`` CTAs that each walk many tiles, loading
      the next tile's Q and K/V while the current one computes; falls back to one CTA per tile
      where the double-buffered Q does not fit in shared memory. ``False``: one CTA per tile.
    num_ctas: persistent CTAs, >= 0 (0: one per SM of the device).
    bwd_direct: backward: per-token TMA copies of Q/dO/dQ instead of XLA transposes where ``G``
      allows (``G % 8 == 0``).
    bwd_chunk: backward: the smallest cap, >= 1, on the query tiles of one dK/dV work item.
  """

  mode: str = "exact"
  block_size: int = BLOCK_SIZE
  num_stages: int = 2
  tile_rows: int | None = None
  q_layout: str = "direct"
  ping_pong: bool = True
  persistent: bool = True
  num_ctas: int = 0
  bwd_direct: bool = True
  bwd_chunk: int = 256
  doc_blocks: int | None = None

  def __post_init__(self):
    if self.mode not in MODES:
      _fail("mode", f"one of {MODES}", self.mode)
    if self.block_size not in BLOCK_SIZES:
      _fail("block_size", f"one of {BLOCK_SIZES}", self.block_size)
    if not _is_int(self.num_stages) or self.num_stages < 1:
      _fail("num_stages", "a positive int", self.num_stages)
    if self.tile_rows is not None and self.tile_rows not in TILE_ROW_CHOICES:
      _fail("tile_rows", f"None or one of {TILE_ROW_CHOICES}", self.tile_rows)
    if self.q_layout not in Q_LAYOUTS:
      _fail("q_layout", f"one of {Q_LAYOUTS}", self.q_layout)
    for name in ("ping_pong", "persistent", "bwd_direct"):
      if not isinstance(getattr(self, name), bool):
        _fail(name, "a bool", getattr(self, name))
    if not _is_int(self.num_ctas) or self.num_ctas < 0:
      _fail("num_ctas", "an int >= 0 (0 = one per SM)", self.num_ctas)
    if not _is_int(self.bwd_chunk) or self.bwd_chunk < 1:
      _fail("bwd_chunk", "a positive int", self.bwd_chunk)
    if self.doc_blocks is not None and (not _is_int(self.doc_blocks) or self.doc_blocks < 0):
      _fail("doc_blocks", "None or an int >= 0", self.doc_blocks)


def packed_num_blocks(seq_len: int, tuning: TuningConfig = TuningConfig()) -> int:
  """Static blocks of the padded K/V layout for packed rows of ``seq_len`` tokens: ``NB +
  tuning.doc_blocks`` (``2 NB`` by default) with ``NB = cdiv(seq_len, tuning.block_size)``."""
  nb = -(-seq_len // tuning.block_size)
  return nb + (nb if tuning.doc_blocks is None else tuning.doc_blocks)


def documents_fit(segment_ids, tuning: TuningConfig = TuningConfig()):
  """Jittable bool scalar: every row of ``segment_ids [B, T]`` fits the static padded layout
  (:func:`pallas_kernels.packed_layout.packed_blocks_needed` ``<=`` :func:`packed_num_blocks`).
  Where it is ``False`` the kernels' results for the rows that do not fit are wrong (their last
  documents are dropped): take another path, e.g. ``lax.cond(documents_fit(...), kernels,
  fallback, ...)``."""
  need = packed.packed_blocks_needed(segment_ids, tuning.block_size)
  return jnp.all(need <= packed_num_blocks(segment_ids.shape[1], tuning))


def kernel_config(
  tuning: TuningConfig, *, softmax_scale: float, group_size: int, has_docs: bool
) -> KernelConfig:
  """The static per-call configuration: ``tuning`` plus the call's scale, ``G`` and documents,
  with the fallbacks of :func:`pallas_kernels.selected_attention_common.resolve_config`."""
  tile_rows = tuning.tile_rows
  if tile_rows is None:
    tile_rows = 2 * TILE_ROWS if tuning.mode == "exact" else TILE_ROWS
  cfg = KernelConfig(
    softmax_scale=softmax_scale,
    mode=tuning.mode,
    group_size=group_size,
    has_docs=has_docs,
    block_size=tuning.block_size,
    num_stages=tuning.num_stages,
    tile_rows=tile_rows,
    q_layout=tuning.q_layout,
    ping_pong=tuning.ping_pong,
    persistent=tuning.persistent,
    num_ctas=tuning.num_ctas,
    bwd_direct=tuning.bwd_direct,
    bwd_chunk=tuning.bwd_chunk,
  )
  return resolve_config(cfg, group_size)


def packed_operands(k, v, block_indices, segment_ids, cfg: KernelConfig, tuning: TuningConfig):
  """The XLA side of packed documents: ``(kp, vp, bi, shift, cfg)`` for the kernels.

  ``kp``/``vp`` ``[B, NBp*bs, H, D]``: K and V in the document-aligned padded layout of
  ``NBp =`` :func:`packed_num_blocks` blocks (differentiable gathers); ``bi [B, T, H, n]``: the
  document-relative ids as padded block ids; ``shift [B, T]`` int32: each query's padded
  position minus ``t``. ``"shared"`` mode becomes per-token lists (runs aligned to each
  document's start) with exact masking: ``cfg.mode`` is ``"exact"`` on return."""
  layout = packed.packed_layout(
    jnp.asarray(segment_ids),
    block_size=cfg.block_size,
    num_blocks=packed_num_blocks(k.shape[1], tuning),
  )
  if cfg.mode == "shared":  # runs aligned to each document's start
    doc_start = document_starts(segment_ids, *segment_ids.shape)
    block_indices = share_selection(block_indices, tokens_per_tile(cfg.group_size), doc_start)
    cfg = dataclasses.replace(cfg, mode="exact")
  bi = packed.padded_block_indices(block_indices, layout, block_size=cfg.block_size)
  kp, vp = packed.pad_keys(k, layout), packed.pad_keys(v, layout)
  return kp, vp, bi, layout.shift, cfg


def _forward(q, k, v, block_indices, shift, cfg: KernelConfig):
  """Kernel forward: ``(o [B, T, HQ, Dv], lse [B, T, HQ] float32 natural log)``.

  ``shift``: ``None``, or with packed documents ``[B, T]`` int32 (``k``/``v`` ``[B, NB*bs, H,
  .]`` and ``block_indices`` in the padded layout of :mod:`pallas_kernels.packed_layout`)."""
  h = k.shape[2]
  g = cfg.group_size
  if shift is None:
    qx, lists = prepare(q, block_indices, cfg, h)
    return call_kernel(qx, k, v, lists, cfg, num_kv_heads=h, seq_len=q.shape[1])
  positions = jnp.arange(q.shape[1], dtype=jnp.int32)[None, :] + shift
  nb = -(-k.shape[1] // cfg.block_size)
  qx, lists = prepare(q, block_indices, cfg, h, num_blocks=nb, positions=positions)
  docs = shift_tiles(
    shift, g, lists.ids.shape[2] * (cfg.tile_rows // TILE_ROWS) * tokens_per_tile(g)
  )
  return call_kernel(qx, k, v, lists, cfg, num_kv_heads=h, seq_len=q.shape[1], docs=docs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, block_indices, shift, cfg: KernelConfig):
  return _forward(q, k, v, block_indices, shift, cfg)[0]


def _attention_fwd(q, k, v, block_indices, shift, cfg: KernelConfig):
  o, lse = _forward(q, k, v, block_indices, shift, cfg)
  return o, (q, k, v, o, lse, block_indices, shift)


def _attention_bwd(cfg: KernelConfig, res, do):
  q, k, v, o, lse, block_indices, shift = res
  dq, dk, dv = vjp_kernel.backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    block_indices,
    shift=shift,
    softmax_scale=cfg.softmax_scale,
    mode=cfg.mode,
    cfg=BwdConfig(chunk=cfg.bwd_chunk, direct=cfg.bwd_direct),
    block_size=cfg.block_size,
  )
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def selected_attention_mgpu(
  q,
  k,
  v,
  block_indices,
  *,
  segment_ids=None,
  softmax_scale: float | None = None,
  return_lse: bool = False,
  tuning: TuningConfig = TuningConfig(),
):
  """Selected-block attention with the Mosaic GPU kernels (forward and backward).

  Args:
    q: ``[B, T, HQ, Dk]`` bfloat16/float16 queries; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``
      (``HQ = H * G``, self-attention). ``Dk`` and ``Dv`` are independent; each is zero padded to
      a multiple of 64 (at most 256, and padded ``Dk + Dv <= 384``;
      :mod:`pallas_kernels.selected_attention_dims`). Padding costs an XLA pad copy of q/k (v)
      and ``Dk'/Dk`` more Q Kᵀ work and Q/K traffic (``Dv'/Dv`` for P V, O, dO); O is sliced
      back to ``Dv``.
    block_indices: ``[B, T, H, n]`` int block ids of ``tuning.block_size`` keys (``-1``
      padding, duplicates count once). With ``segment_ids`` they are DOCUMENT-RELATIVE.
    segment_ids: optional ``[B, T]`` document ids (documents are maximal runs of equal ids).
      Query ``t`` whose document starts at row position ``ds(t)`` sees key ``s`` through KV
      head ``h`` iff ``ds(t) <= s <= t`` and ``(s - ds(t)) // block_size`` is in
      ``block_indices[b, t, h]`` (``-1`` and out-of-range entries match nothing); without ids
      ``ds = 0``. The kernels read K/V in a document-aligned padded layout of
      :func:`packed_num_blocks` blocks (:mod:`pallas_kernels.packed_layout`; an XLA gather of K
      and V, and a gather back for dK/dV). That static size is exceeded by rows with very many
      short documents: their results are then WRONG, so a caller that cannot rule this out
      checks :func:`documents_fit` (jittable) and takes another path where it is ``False``.
      In ``"shared"`` mode the runs of ``r = 64 // G`` tokens are aligned to each document's
      start: a token at document position ``u`` uses the list of its document's token
      ``u - u % r``.
    softmax_scale: defaults to ``Dk ** -0.5`` of the *unpadded* ``Dk``; must be > 0.
    return_lse: also return the ``[B, T, HQ]`` float32 natural-log LSE (no gradient through it).
    tuning: how the kernels run (:class:`TuningConfig`).

  Returns:
    ``o [B, T, HQ, Dv]`` in ``q.dtype`` (or ``(o, lse)``); rows that see no key get 0.

  Raises:
    NotImplementedError: for a call the kernels do not serve (the message says why).
  """
  if not isinstance(tuning, TuningConfig):
    raise TypeError(f"tuning: expected a TuningConfig, got {type(tuning).__name__}")
  reason = unsupported_reason(
    q,
    k,
    v,
    block_indices,
    block_size=tuning.block_size,
    mode=tuning.mode,
    num_blocks=None if segment_ids is None else packed_num_blocks(q.shape[1], tuning),
  )
  if reason is not None:
    raise NotImplementedError(f"pallas_gpu selected_attention: {reason}")
  scale = float(softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
  if not scale > 0:
    raise NotImplementedError(
      f"pallas_gpu selected_attention: softmax_scale={scale} (the kernel "
      "keeps the running max in raw score units, so it needs scale > 0)"
    )
  cfg = kernel_config(
    tuning,
    softmax_scale=scale,
    group_size=q.shape[2] // k.shape[2],
    has_docs=segment_ids is not None,
  )
  fn = _forward if return_lse else _attention
  if segment_ids is None:
    return dims.with_padded_head_dims(fn, q, k, v, block_indices, None, cfg)
  if jnp.shape(segment_ids) != q.shape[:2]:
    raise ValueError(
      f"segment_ids: expected shape {q.shape[:2]} ([B, T]), got {jnp.shape(segment_ids)}"
    )
  kp, vp, bi, shift, cfg = packed_operands(k, v, block_indices, segment_ids, cfg, tuning)
  return dims.with_padded_head_dims(fn, q, kp, vp, bi, shift, cfg)


def selected_attention_op(q, k, v, block_indices, *, block_size, segment_ids, softmax_scale):
  """The ``selected_attention`` op of backend ``pallas_gpu`` (exact per-token selection, default
  tuning): the library op's arguments; raises ``NotImplementedError(reason)`` for a call the
  kernels cannot serve (not a Hopper GPU, dtype, dims, block size, ...). With ``segment_ids``
  the ids are document-relative and rows must fit the default padded layout:
  ``documents_fit(segment_ids, TuningConfig(block_size=block_size))`` (jittable) says whether
  they do; where it is ``False`` the caller takes another path."""
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
      f"pallas_gpu selected_attention: needs a Hopper GPU, the default "
      f"backend is {jax.default_backend()!r}"
    )
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is not None and not str(cc).startswith("9"):
    raise NotImplementedError(
      f"pallas_gpu selected_attention: needs a Hopper GPU (sm90, wgmma), "
      f"got compute capability {cc}"
    )
  if block_size not in BLOCK_SIZES:
    raise NotImplementedError(
      f"pallas_gpu selected_attention: block_size={block_size} (expected one of {BLOCK_SIZES})"
    )
  return selected_attention_mgpu(
    q,
    k,
    v,
    block_indices,
    segment_ids=segment_ids,
    softmax_scale=softmax_scale,
    tuning=TuningConfig(block_size=block_size),
  )
