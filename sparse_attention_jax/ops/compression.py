"""The compressed branch: keys/values pooled into block tokens (NSA eq. 7, mean pooling or the
learnable phi) and attention over them (NSA eq. 8).

Compressed token ``i`` summarizes tokens ``[i*d, i*d + l)`` (0-based) and exists for
``0 <= i <= (T - l) // d``; with ``d < l`` consecutive windows overlap. It is visible to query
``t`` iff its window is complete at ``t`` (``i*d + l - 1 <= t``).

Packed documents (``segment_ids``): the windows restart at every document, so compressed token
``i`` of a document covers its tokens ``[i*d, i*d + l)`` and a query sees the complete windows of
its own document only; the row's ``NC`` slots hold the documents' compressed tokens one after the
other (:func:`sparse_attention_jax.ops.documents.cmp_layout`).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.documents import cmp_layout, document_positions, document_starts
from sparse_attention_jax.ops.masked import recompute_masked_attention

_HI = jax.lax.Precision.HIGHEST


class MLPCompressorParams(NamedTuple):
  """Parameters of phi for one of K or V (per KV head, as in XunhaoLai's ``linear_compress``).

  Attributes:
    pos: ``[H, l, D]`` intra-block position encoding, added to the window's tokens.
    w1: ``[H, l, D, F]`` first layer over the flattened window; ``b1``: ``[H, F]``.
    w2: ``[H, F, Dout]`` second layer; ``b2``: ``[H, Dout]``.
  """

  pos: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array


class CompressorParams(NamedTuple):
  """phi for keys (``k``) and for values (``v``): the paper uses two MLPs of the same form."""

  k: MLPCompressorParams
  v: MLPCompressorParams


def init_mlp_compressor(
  key,
  *,
  num_kv_heads: int,
  window: int,
  in_dim: int,
  out_dim: int | None = None,
  hidden: int | None = None,
  dtype=jnp.float32,
) -> MLPCompressorParams:
  """Random phi parameters (LeCun-normal weights, zero biases, N(0, 0.02) position encoding)."""
  out_dim = in_dim if out_dim is None else out_dim
  hidden = in_dim if hidden is None else hidden
  k1, k2, k3 = jax.random.split(key, 3)
  fan1 = window * in_dim
  return MLPCompressorParams(
    pos=0.02 * jax.random.normal(k1, (num_kv_heads, window, in_dim), dtype),
    w1=(
      jax.random.normal(k2, (num_kv_heads, window, in_dim, hidden), jnp.float32) / np.sqrt(fan1)
    ).astype(dtype),
    b1=jnp.zeros((num_kv_heads, hidden), dtype),
    w2=(
      jax.random.normal(k3, (num_kv_heads, hidden, out_dim), jnp.float32) / np.sqrt(hidden)
    ).astype(dtype),
    b2=jnp.zeros((num_kv_heads, out_dim), dtype),
  )


def window_token_indices(config: NSAConfig, seq_len: int) -> np.ndarray:
  """``[NC, l]`` int32 token positions of each compressed token's window (static)."""
  nc = config.num_cmp_tokens(seq_len)
  return (
    np.arange(nc)[:, None] * config.cmp_stride + np.arange(config.cmp_window)[None, :]
  ).astype(np.int32)


def window_gather_index(config: NSAConfig, seq_len: int) -> jax.Array:
  """:func:`window_token_indices` built from iotas inside the traced program, for gathers: a
  NumPy index array would be embedded in the HLO as a literal (per layer and per use)."""
  nc = config.num_cmp_tokens(seq_len)
  return (
    jnp.arange(nc, dtype=jnp.int32)[:, None] * config.cmp_stride
    + jnp.arange(config.cmp_window, dtype=jnp.int32)[None, :]
  )


def _windows(x, config: NSAConfig, segment_ids):
  """``([B, NC, l, H, D] windows of x, [B, NC] bool used slot or None)``."""
  t = x.shape[1]
  if segment_ids is None:
    return x[:, window_gather_index(config, t)], None
  layout = cmp_layout(config, segment_ids, x.shape[0], t)
  rows = layout.slot_start[:, :, None] + jnp.arange(config.cmp_window, dtype=jnp.int32)
  rows = jnp.minimum(rows, t - 1)  # unused slots: masked below
  win = jax.vmap(lambda xb, rb: xb[rb])(x, rows)  # [B, NC, l, H, D]
  return win, layout.slot_doc >= 0


def _zero_unused(out, used):
  """``out [B, NC, H, D]`` with unused slots (``used [B, NC]`` False) set to 0."""
  return out if used is None else jnp.where(used[:, :, None, None], out, 0.0)


def compress(
  x,
  config: NSAConfig,
  params: MLPCompressorParams | None = None,
  *,
  segment_ids=None,
  name: str = "x",
):
  """Compresses ``x [B, T, H, D]`` into ``[B, NC, H, Dout]`` block tokens.

  Args:
    x: keys or values, ``[B, T, H, D]``.
    config: supplies ``cmp_window`` (l), ``cmp_stride`` (d) and ``compression``.
    params: phi's parameters when ``config.compression == "mlp"``; must be None for ``"mean"``.
    segment_ids: optional ``[B, T]`` document ids: windows restart at every document and the
      output holds the documents' compressed tokens one after the other (unused slots are 0;
      :func:`sparse_attention_jax.ops.documents.cmp_layout`).
    name: the argument name used in error messages.

  Returns:
    ``[B, NC, H, Dout]`` in ``x.dtype`` with ``NC = config.num_cmp_tokens(T)``; ``Dout = D`` for
    mean pooling. The MLP computes in float32.
  """
  _checks.check_config(config)
  _checks.check_rank(name, x, 4, "[B, T, H, D]")
  _checks.check_batch_len(name, x)
  b, t, h, d = x.shape
  _checks.check_segment_ids(segment_ids, b, t)
  idx = window_token_indices(config, t)
  if config.compression == "mean":
    if params is not None:
      _checks.fail("compress_params", "None for compression='mean'", type(params).__name__)
    if idx.shape[0] == 0:
      return jnp.zeros((b, 0, h, d), x.dtype)
    win, used = _windows(x, config, segment_ids)
    out = _zero_unused(jnp.mean(win.astype(jnp.float32), axis=2), used).astype(x.dtype)
    chex.assert_shape(out, (b, idx.shape[0], h, d))
    return out
  if not isinstance(params, MLPCompressorParams):
    _checks.fail(
      "compress_params", "MLPCompressorParams for compression='mlp'", type(params).__name__
    )
  l = config.cmp_window
  if params.pos.shape != (h, l, d) or params.w1.shape[:3] != (h, l, d):
    _checks.fail(
      "compress_params",
      f"pos {(h, l, d)} and w1 {(h, l, d, 'F')} for {name} of shape {x.shape} and cmp_window={l}",
      f"pos {params.pos.shape}, w1 {params.w1.shape}",
    )
  dout = params.w2.shape[-1]
  if idx.shape[0] == 0:
    return jnp.zeros((b, 0, h, dout), x.dtype)
  win, used = _windows(x, config, segment_ids)  # [B, NC, l, H, D]
  win = win.astype(jnp.float32) + params.pos.astype(jnp.float32).transpose(1, 0, 2)
  hid = jnp.einsum("bnlhd,hldf->bnhf", win, params.w1.astype(jnp.float32), precision=_HI)
  hid = jax.nn.gelu(hid + params.b1.astype(jnp.float32))
  out = jnp.einsum("bnhf,hfo->bnho", hid, params.w2.astype(jnp.float32), precision=_HI)
  out = _zero_unused(out + params.b2.astype(jnp.float32), used).astype(x.dtype)
  chex.assert_shape(out, (b, idx.shape[0], h, dout))
  return out


def cmp_visibility(config: NSAConfig, seq_len: int, segment_ids=None, batch: int = 1):
  """``[B|1, T, NC]`` bool: compressed slot ``k`` visible to query ``t``.

  Without ``segment_ids``: ``k*d + l - 1 <= t``. With them: slot ``k`` holds compressed token
  ``i`` of a document (:func:`~sparse_attention_jax.ops.documents.cmp_layout`), visible iff that is
  the query's document and ``i*d + l - 1 <= u`` (``u`` the query's document position).
  """
  _checks.check_config(config)
  nc = config.num_cmp_tokens(seq_len)
  # From iotas, not a NumPy [T, NC] table: a host-built table becomes a literal of T * NC bytes
  # in the HLO of every layer (4 MB per layer at T = 8192, d = 16), which bloats compiles.
  last = jnp.arange(nc, dtype=jnp.int32) * config.cmp_stride + config.cmp_window - 1
  t = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids is None or nc == 0:
    return (last[None, :] <= t[:, None])[None]  # [1, T, NC]
  layout = cmp_layout(config, segment_ids, batch, seq_len)
  start = document_starts(segment_ids, batch, seq_len)  # [B, T]
  u = document_positions(segment_ids, batch, seq_len)  # [B, T]
  last = layout.slot_index * config.cmp_stride + config.cmp_window - 1  # [B, NC]
  same = layout.slot_doc[:, None, :] == start[:, :, None]  # [B, T, NC]
  return same & (last[:, None, :] <= u[:, :, None])


class CompressedAttentionOutput(NamedTuple):
  """Attributes:
  out: ``[B, T, HQ, Dv]`` branch output (0 for queries that see no compressed token).
  lse: ``[B, T, HQ]`` float32 log-sum-exp of the scaled logits (``-inf`` when nothing is seen;
    no gradient).
  probs: ``[B, T, HQ, NC]`` float32 per-head softmax probabilities (what selection scores are
    built from; no gradient flows through selection).
  """

  out: jax.Array
  lse: jax.Array
  probs: jax.Array


def compressed_attention(
  q, k_cmp, v_cmp, config: NSAConfig, *, segment_ids=None
) -> CompressedAttentionOutput:
  """Attention of ``q [B, T, HQ, Dk]`` over ``k_cmp [B, NC, H, Dk]``, ``v_cmp [B, NC, H, Dv]``.

  Query ``t`` sees compressed token ``i`` iff ``i*d + l - 1 <= t``; with ``segment_ids [B, T]``,
  ``k_cmp``/``v_cmp`` are ``compress(..., segment_ids=segment_ids)`` (the documents' compressed
  tokens one after the other) and a query sees the complete windows of its own document
  (:func:`cmp_visibility`).

  Runs :func:`~sparse_attention_jax.ops.masked.recompute_masked_attention`: the backward pass
  recomputes the ``[B, T, HQ, NC]`` probabilities instead of keeping them.
  """
  _checks.check_config(config)
  b, t, nc, _, _, _ = _checks.check_qkv(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
  if nc != config.num_cmp_tokens(t):
    _checks.fail(
      "k_cmp",
      f"{config.num_cmp_tokens(t)} compressed tokens for T={t}, "
      f"l={config.cmp_window}, d={config.cmp_stride}",
      nc,
    )
  _checks.check_segment_ids(segment_ids, b, t)
  mask = cmp_visibility(config, t, segment_ids, b)[:, :, None, :]  # [B|1, T, 1, NC]
  o, lse, probs = recompute_masked_attention(q, k_cmp, v_cmp, mask, config.scale(q.shape[-1]))
  return CompressedAttentionOutput(o, lse, jax.lax.stop_gradient(probs))


__all__ = [
  "CompressedAttentionOutput",
  "CompressorParams",
  "MLPCompressorParams",
  "cmp_visibility",
  "compress",
  "compressed_attention",
  "init_mlp_compressor",
  "window_gather_index",
  "window_token_indices",
]
