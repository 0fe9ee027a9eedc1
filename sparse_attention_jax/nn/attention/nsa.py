"""Native Sparse Attention layer (kind ``"nsa"``) and its learnable compressor phi.

Accounting per layer (``H`` KV heads, ``HQ`` query heads, ``Dk``/``Dv`` head dims, length ``T``,
``model.nsa``: compression stride ``d``, selected blocks ``n`` of ``l'`` tokens, window ``w``):

* KV cache, reported as the *resident* cache as the NSA paper does: ``pairs * H * (Dk + Dv)``
  (``pairs`` = 1 + the enabled ``slc``/``win`` branches with independent per-branch K/V, 1 when
  shared) plus the compressed K (and V if the ``cmp`` branch is output) amortized,
  ``H * (Dk + Dv) / d``. Full K/V must stay resident for selection (the window pair would need
  only ``w`` tokens and phi's raw input only the last ``l``).
* Training FLOPs per token ``6 * HQ * sum_branches keys_b * (Dk + Dv_b)`` with the keys a query
  visits on average: ``cmp`` ``T / (2 d)``, ``slc`` ``min(n * l', T / 2)``, ``win``
  ``min(w, T / 2)``; the selection needs the compressed scores, so without a ``cmp`` branch the
  ``q.k`` part of it is still counted (``Dv = 0``). :func:`nsa_branch_keys_dims` is shared by
  the NSA-style kinds. phi's weights are counted by the analysis from the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.attention.common import (
  check_inputs,
  default_positions,
  kv_projection,
  o_projection,
  q_projection,
  rope_qk,
)
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.layers import as_dtype, projection
from sparse_attention_jax.nn.parallel import param, sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  LayerQK,
  register_attention_kind,
)
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.ops import (
  CompressorParams,
  MLPCompressorParams,
  init_mlp_compressor,
  nsa_attention,
)
from sparse_attention_jax.ops.nsa_decode import fill_nsa_cache, init_nsa_cache, nsa_decode_step

# Logical axes of phi's parameters: the leading axis is the KV head (sharded like K/V).
_PHI_AXES = {
  "pos": ("kv_heads", "compressor", "head_dim"),
  "w1": ("kv_heads", "compressor", "head_dim", "compressor"),
  "b1": ("kv_heads", "compressor"),
  "w2": ("kv_heads", "compressor", "head_dim"),
  "b2": ("kv_heads", "head_dim"),
}


class MLPCompressor(nnx.Module):
  """The learnable compressor phi of one of K or V, as :class:`nnx.Param` s (float32).

  Shapes (``H`` KV heads, ``l`` compression window): ``pos [H, l, D]``, ``w1 [H, l, D, F]``,
  ``b1 [H, F]``, ``w2 [H, F, Dout]``, ``b2 [H, Dout]``; initialized by
  :func:`~sparse_attention_jax.ops.init_mlp_compressor`.
  """

  def __init__(
    self, *, num_kv_heads: int, window: int, in_dim: int, out_dim: int, hidden: int, rngs: nnx.Rngs
  ):
    p = init_mlp_compressor(
      rngs.params(),
      num_kv_heads=num_kv_heads,
      window=window,
      in_dim=in_dim,
      out_dim=out_dim,
      hidden=hidden,
      dtype=jnp.float32,
    )
    self.pos = param(p.pos, _PHI_AXES["pos"])
    self.w1 = param(p.w1, _PHI_AXES["w1"])
    self.b1 = param(p.b1, _PHI_AXES["b1"])
    self.w2 = param(p.w2, _PHI_AXES["w2"])
    self.b2 = param(p.b2, _PHI_AXES["b2"])

  def params(self) -> MLPCompressorParams:
    """The op's parameter tuple (float32: the compressor computes in float32)."""
    return MLPCompressorParams(
      pos=self.pos[...], w1=self.w1[...], b1=self.b1[...], w2=self.w2[...], b2=self.b2[...]
    )


class NSAAttention(nnx.Module):
  """Native Sparse Attention layer (kind ``"nsa"``) wrapping the op ``ops.nsa_attention``.

  * ``q_proj``: ``[B, T, d_model] -> [B, T, HQ, Dk]``.
  * K/V: with ``config.nsa_independent_kv`` one pair per branch, as in the paper: ``k_cmp/v_cmp``
    (compressed branch and the selection scores -- always present, since selection needs them),
    ``k_slc/v_slc`` if ``"slc"`` is enabled, ``k_win/v_win`` if ``"win"`` is enabled. Otherwise one
    shared pair ``k_cmp/v_cmp`` feeds every branch.
  * RoPE is applied to the queries and to all keys *before* the op, so the compressed keys are
    means (or phi-MLP outputs) of RoPE-rotated keys (as fla-org's NSA layer does; the paper does
    not say).
  * ``gate_proj``: ``d_model -> HQ * 3`` followed by a sigmoid and reshaped per head to
    ``[B, T, HQ, 3]`` in the order (cmp, slc, win) -- only when more than one branch is enabled
    (a single-branch config, e.g. InfLLM-V2, runs ungated).
  * ``phi_k``/``phi_v``: the learnable compressors when ``config.nsa.compression == "mlp"``
    (hidden width ``config.nsa_compressor_hidden`` or ``head_dim``).
  * ``o_proj``: ``[B, T, HQ, Dv] -> [B, T, d_model]``.

  The op is called with ``config.nsa.for_length(T)`` (``num_selected`` clamped to the
  blocks a length-``T`` sequence has) and ``impl=config.attn_impl``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dt = as_dtype(config.dtype)
    c, nsa = config, config.nsa
    self.q_proj = q_projection(c, dt, rngs)
    self.k_cmp = kv_projection(c, c.head_dim, dt, rngs)
    self.v_cmp = kv_projection(c, c.dv, dt, rngs)
    independent = c.nsa_independent_kv
    self.k_slc = (
      kv_projection(c, c.head_dim, dt, rngs) if (independent and "slc" in nsa.branches) else None
    )
    self.v_slc = (
      kv_projection(c, c.dv, dt, rngs) if (independent and "slc" in nsa.branches) else None
    )
    self.k_win = (
      kv_projection(c, c.head_dim, dt, rngs) if (independent and "win" in nsa.branches) else None
    )
    self.v_win = (
      kv_projection(c, c.dv, dt, rngs) if (independent and "win" in nsa.branches) else None
    )
    self.gate_proj = (
      projection(
        "btd,dhc->bthc",
        (c.d_model, c.num_heads, 3),
        in_axes=0,
        out_axes=(1, 2),
        dtype=dt,
        rngs=rngs,
        names=("embed", "q_heads", None),
      )
      if (len(nsa.branches) > 1)
      else None
    )
    if nsa.compression == "mlp":
      hidden = c.nsa_compressor_hidden or c.head_dim
      self.phi_k = MLPCompressor(
        num_kv_heads=c.num_kv_heads,
        window=nsa.cmp_window,
        in_dim=c.head_dim,
        out_dim=c.head_dim,
        hidden=hidden,
        rngs=rngs,
      )
      self.phi_v = MLPCompressor(
        num_kv_heads=c.num_kv_heads,
        window=nsa.cmp_window,
        in_dim=c.dv,
        out_dim=c.dv,
        hidden=hidden,
        rngs=rngs,
      )
    else:
      self.phi_k = self.phi_v = None
    self.o_proj = o_projection(c, dt, rngs)

  def op_inputs(self, x, positions) -> dict:
    """The op's arguments for ``x [B, T, d_model]`` at ``positions [B, T]``: rotated ``q``
    ``[B, T, HQ, Dk]``, ``k``, ``v``, ``k_slc`` ... ``v_win`` (``[B, T, H, D]`` or None),
    ``gates`` ``[B, T, HQ, 3]`` or None and ``compress_params`` (or None)."""
    c = self.config

    def rope(y):
      return apply_rope(y, positions, c.rope_theta)

    gates = None
    if self.gate_proj is not None:
      gates = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))  # [B, T, HQ, 3]
    compress_params = None
    if self.phi_k is not None:
      compress_params = CompressorParams(k=self.phi_k.params(), v=self.phi_v.params())
    return {
      "q": rope(self.q_proj(x)),
      "k": rope(self.k_cmp(x)),
      "v": self.v_cmp(x),
      "gates": gates,
      "compress_params": compress_params,
      "k_slc": None if self.k_slc is None else rope(self.k_slc(x)),
      "v_slc": None if self.v_slc is None else self.v_slc(x),
      "k_win": None if self.k_win is None else rope(self.k_win(x)),
      "v_win": None if self.v_win is None else self.v_win(x),
    }

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    c = self.config
    check_inputs(x, positions, segment_ids, c.d_model)
    op_config = c.nsa.for_length(x.shape[1])

    def op(**a):
      return nsa_attention(
        a["q"],
        a["k"],
        a["v"],
        a["gates"],
        config=op_config,
        segment_ids=a["segment_ids"],
        compress_params=a["compress_params"],
        k_slc=a["k_slc"],
        v_slc=a["v_slc"],
        k_win=a["k_win"],
        v_win=a["v_win"],
        impl=c.attn_impl,
      )

    args = {**self.op_inputs(x, positions), "segment_ids": segment_ids}
    layouts = {name: "bthd" for name in args}
    layouts.update(segment_ids="bt", compress_params="h")
    # Per shard (batch, heads) under a mesh; a plain call without one.
    o = sharded_call(op, args, layouts, num_kv_heads=c.num_kv_heads)  # [B, T, HQ, Dv]
    return self.o_proj(o)

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.ops.nsa_decode.NSACache` of this layer."""
    c = self.config
    return init_nsa_cache(
      batch,
      capacity,
      config=c.nsa,
      num_kv_heads=c.num_kv_heads,
      dk=c.head_dim,
      dv=c.dv,
      dtype=dtype or self.dtype,
      independent_slc=self.k_slc is not None,
      independent_win=self.k_win is not None,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    c = self.config
    check_inputs(x, default_positions(x), None, c.d_model)
    a = self.op_inputs(x, default_positions(x))
    o, aux = nsa_attention(
      a["q"],
      a["k"],
      a["v"],
      a["gates"],
      config=c.nsa.for_length(x.shape[1]),
      compress_params=a["compress_params"],
      k_slc=a["k_slc"],
      v_slc=a["v_slc"],
      k_win=a["k_win"],
      v_win=a["v_win"],
      impl=c.attn_impl,
      return_aux=True,
    )
    kw = {
      name: a[name] for name in ("k", "v", "k_slc", "v_slc", "k_win", "v_win", "compress_params")
    }
    cache = fill_nsa_cache(
      cache, config=c.nsa, lengths=lengths, block_indices=aux.block_indices, **kw
    )
    return self.o_proj(o), cache

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at positions ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    a = self.op_inputs(x, pos[:, None])
    one = {
      name: None if val is None or name == "compress_params" else val[:, 0]
      for name, val in a.items()
    }
    o, cache = nsa_decode_step(
      cache,
      one["q"],
      config=self.config.nsa,
      pos=pos,
      k=one["k"],
      v=one["v"],
      k_slc=one["k_slc"],
      v_slc=one["v_slc"],
      k_win=one["k_win"],
      v_win=one["v_win"],
      gates=one["gates"],
      compress_params=a["compress_params"],
    )
    return self.o_proj(o[:, None]), cache


def nsa_kv_elements(
  config: ModelConfig, *, branches: tuple[str, ...], pairs: int, dk: int, dv: int, heads: int
) -> KVElements:
  """Resident NSA-style cache: ``pairs`` K/V pairs plus the compressed K (and V when ``cmp`` is
  output) amortized over the stride ``d``."""
  d = config.nsa.cmp_stride
  cmp = heads * (dk + (dv if "cmp" in branches else 0)) / d
  return KVElements(
    float(pairs * heads * (dk + dv) + cmp),
    None,
    f"{pairs} K/V pair(s) resident + compressed 1/{d}",
  )


def nsa_branch_keys_dims(config: ModelConfig, seq_len: int, branches, dk: int, dv: int) -> float:
  """``sum_b keys_b * (Dk + Dv_b)`` of an NSA-style layer over ``branches`` (module docstring)."""
  nsa, half = config.nsa, seq_len / 2
  total = seq_len / (2 * nsa.cmp_stride) * (dk + (dv if "cmp" in branches else 0))
  if "slc" in branches:
    total += min(nsa.num_selected * nsa.block_size, half) * (dk + dv)
  if "win" in branches:
    total += min(nsa.window, half) * (dk + dv)
  return total


def _kv(config: ModelConfig) -> KVElements:
  c, branches = config, config.nsa.branches
  pairs = 1 + (sum(b in branches for b in ("slc", "win")) if c.nsa_independent_kv else 0)
  return nsa_kv_elements(
    c, branches=branches, pairs=pairs, dk=c.head_dim, dv=c.dv, heads=c.num_kv_heads
  )


def _flops(config: ModelConfig, seq_len: int) -> float:
  c = config
  return 6.0 * c.num_heads * nsa_branch_keys_dims(c, seq_len, c.nsa.branches, c.head_dim, c.dv)


def _qk(layer: NSAAttention, x, positions) -> LayerQK:
  """The queries and the selection keys (``k_slc`` when independent, else ``k_cmp``)."""
  keys = layer.k_slc if layer.k_slc is not None else layer.k_cmp
  return LayerQK(*rope_qk(layer, x, positions, keys))


NSA = register_attention_kind(
  AttentionKind(
    name="nsa",
    module=NSAAttention,
    decode=LAYER_METHODS,
    kv_elements=_kv,
    train_flops=_flops,
    qk=_qk,
  )
)

__all__ = [
  "NSA",
  "MLPCompressor",
  "NSAAttention",
  "nsa_branch_keys_dims",
  "nsa_kv_elements",
]
