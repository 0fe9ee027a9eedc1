"""Attention layers of the decoder and the registry that maps a layer kind to its module.

Every kind is an :class:`nnx.Module` built as ``Cls(config: ModelConfig, *, rngs: nnx.Rngs)`` and
called as ``layer(x [B, T, d_model], positions [B, T] int32, segment_ids [B, T] int32 | None)``
returning ``[B, T, d_model]`` in the compute dtype. New kinds (ASA, SSA, NOSA, ...) plug in with
:func:`register_attention_kind` without touching the model.

Head layout: ``HQ = num_heads`` query heads of dim ``Dk = head_dim``; ``H = num_kv_heads`` KV
heads (GQA: query head ``h*G + g`` reads KV head ``h``, ``G = HQ // H``); values have dim
``Dv = config.dv``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.decode import (
  dense_decode,
  fill_dense_cache,
  init_dense_cache,
)
from sparse_attention_jax.nn.dense_attention import causal_attention
from sparse_attention_jax.nn.layers import as_dtype, projection
from sparse_attention_jax.nn.parallel import param, sharded_call
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.ops import (
  CompressorParams,
  MLPCompressorParams,
  init_mlp_compressor,
  nsa_attention,
)
from sparse_attention_jax.ops.nsa_decode import fill_nsa_cache, init_nsa_cache, nsa_decode_step

ATTENTION_KINDS: dict[str, type] = {}
"""Layer kind name (as used in ``ModelConfig.attention``) -> module class."""


def register_attention_kind(name: str, cls: type | None = None):
  """Registers ``cls`` as attention kind ``name``; usable as a decorator when ``cls`` is omitted.

  Re-registering a name with a different class is an error (to catch accidental collisions).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name: expected a non-empty str, got {name!r}")

  def register(c: type) -> type:
    if not isinstance(c, type):
      raise TypeError(f"cls: expected a class, got {c!r}")
    old = ATTENTION_KINDS.get(name)
    if old is not None and old is not c:
      raise ValueError(
        f"name: attention kind {name!r} is already registered to "
        f"{old.__module__}.{old.__qualname__}"
      )
    ATTENTION_KINDS[name] = c
    return c

  return register if cls is None else register(cls)


def get_attention_kind(name: str) -> type:
  """The module class of kind ``name``, or a ``ValueError`` listing the registered kinds."""
  try:
    return ATTENTION_KINDS[name]
  except KeyError:
    raise ValueError(
      f"attention kind: expected one of {sorted(ATTENTION_KINDS)}, got {name!r}"
    ) from None


def _check_inputs(x, positions, segment_ids, d_model: int):
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"x: expected [B, T, d_model={d_model}], got shape {x.shape}")
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions: expected shape [B, T] = {x.shape[:2]}, got {positions.shape}")
  if segment_ids is not None and segment_ids.shape != x.shape[:2]:
    raise ValueError(f"segment_ids: expected shape [B, T] = {x.shape[:2]}, got {segment_ids.shape}")


def _kv_projection(config: ModelConfig, head_dim: int, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, d_model] -> [B, T, H, head_dim]``."""
  return projection(
    "btd,dhk->bthk",
    (config.d_model, config.num_kv_heads, head_dim),
    in_axes=0,
    out_axes=(1, 2),
    dtype=dtype,
    rngs=rngs,
    names=("embed", "kv_heads", "head_dim"),
  )


def _q_projection(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, d_model] -> [B, T, HQ, head_dim]``."""
  c = config
  return projection(
    "btd,dhk->bthk",
    (c.d_model, c.num_heads, c.head_dim),
    in_axes=0,
    out_axes=(1, 2),
    dtype=dtype,
    rngs=rngs,
    names=("embed", "q_heads", "head_dim"),
  )


def _o_projection(config: ModelConfig, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
  """``[B, T, HQ, Dv] -> [B, T, d_model]``."""
  c = config
  return projection(
    "bthv,hvd->btd",
    (c.num_heads, c.dv, c.d_model),
    in_axes=(0, 1),
    out_axes=2,
    dtype=dtype,
    rngs=rngs,
    names=("q_heads", "head_dim", "embed"),
  )


class _DenseAttentionBase(nnx.Module):
  """q/k/v/o projections + RoPE shared by the dense kinds; subclasses pick the mask."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = as_dtype(config.dtype)
    c, dt = config, self.dtype
    self.q_proj = _q_projection(c, dt, rngs)
    self.k_proj = _kv_projection(c, c.head_dim, dt, rngs)
    self.v_proj = _kv_projection(c, c.dv, dt, rngs)
    self.o_proj = _o_projection(c, dt, rngs)

  # Keys a query sees (None = all earlier ones); set by the sliding-window kind.
  cache_window: int | None = None

  def _attend(self, q, k, v, segment_ids):
    raise NotImplementedError

  def qkv(self, x, positions):
    """Rotated ``q [B, T, HQ, Dk]``, ``k [B, T, H, Dk]`` and ``v [B, T, H, Dv]``."""
    c = self.config
    q = apply_rope(self.q_proj(x), positions, c.rope_theta)
    k = apply_rope(self.k_proj(x), positions, c.rope_theta)
    return q, k, self.v_proj(x)

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.nn.decode.DenseCache`: linear (full) or a ring of the
    window (swa)."""
    c = self.config
    return init_dense_cache(
      batch,
      capacity,
      num_kv_heads=c.num_kv_heads,
      dk=c.head_dim,
      dv=c.dv,
      dtype=dtype or self.dtype,
      window=self.cache_window,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    _check_inputs(x, _positions(x), None, self.config.d_model)
    q, k, v = self.qkv(x, _positions(x))
    y = self.o_proj(self._attend(q, k, v, None))
    return y, fill_dense_cache(cache, k, v, lengths, ring=self.cache_window is not None)

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at positions ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    q, k, v = self.qkv(x, pos[:, None])
    o, cache = dense_decode(
      cache,
      q[:, 0],
      k[:, 0],
      v[:, 0],
      pos,
      scale=q.shape[-1] ** -0.5,
      ring=self.cache_window is not None,
      window=self.cache_window,
    )
    return self.o_proj(o[:, None]), cache

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    c = self.config
    _check_inputs(x, positions, segment_ids, c.d_model)
    q, k, v = self.qkv(x, positions)  # [B, T, HQ, Dk], [B, T, H, Dk], [B, T, H, Dv]
    o = sharded_call(
      self._attend,
      {"q": q, "k": k, "v": v, "segment_ids": segment_ids},
      {"q": "bthd", "k": "bthd", "v": "bthd", "segment_ids": "bt"},
      num_kv_heads=c.num_kv_heads,
    )
    return self.o_proj(o)


def _positions(x):
  """``[B, T]`` int32 positions ``0 .. T-1`` of every row (decoding: one document per row)."""
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class FullAttention(_DenseAttentionBase):
  """Dense causal GQA attention with RoPE (kind ``"full"``).

  Runs :func:`~sparse_attention_jax.nn.dense_attention.causal_attention` with
  ``impl=config.attn_impl``: cuDNN flash attention on GPU (packed rows: with a ``[B, 1, T, T]``
  document mask while ``B * T * T <= 2**28``, one per step), else the blocked plain-JAX op
  (``O(T * C)`` memory); no ``[B, HQ, T, T]`` logits either way.
  """

  def _attend(self, q, k, v, segment_ids):
    return causal_attention(q, k, v, segment_ids=segment_ids, impl=self.config.attn_impl)


class SlidingWindowAttention(_DenseAttentionBase):
  """Causal sliding-window GQA attention with RoPE (kind ``"swa"``): query ``t`` sees keys
  ``t - window + 1 .. t`` (``config.window`` keys including itself) of its own document, through
  :func:`~sparse_attention_jax.nn.dense_attention.causal_attention` (as ``FullAttention``)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.cache_window = config.window

  def _attend(self, q, k, v, segment_ids):
    return causal_attention(
      q, k, v, segment_ids=segment_ids, window=self.config.window, impl=self.config.attn_impl
    )


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
    self.q_proj = _q_projection(c, dt, rngs)
    self.k_cmp = _kv_projection(c, c.head_dim, dt, rngs)
    self.v_cmp = _kv_projection(c, c.dv, dt, rngs)
    independent = c.nsa_independent_kv
    self.k_slc = (
      _kv_projection(c, c.head_dim, dt, rngs) if (independent and "slc" in nsa.branches) else None
    )
    self.v_slc = (
      _kv_projection(c, c.dv, dt, rngs) if (independent and "slc" in nsa.branches) else None
    )
    self.k_win = (
      _kv_projection(c, c.head_dim, dt, rngs) if (independent and "win" in nsa.branches) else None
    )
    self.v_win = (
      _kv_projection(c, c.dv, dt, rngs) if (independent and "win" in nsa.branches) else None
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
    self.o_proj = _o_projection(c, dt, rngs)

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
    _check_inputs(x, positions, segment_ids, c.d_model)
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
    _check_inputs(x, _positions(x), None, c.d_model)
    a = self.op_inputs(x, _positions(x))
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


register_attention_kind("full", FullAttention)
register_attention_kind("swa", SlidingWindowAttention)
register_attention_kind("nsa", NSAAttention)

__all__ = [
  "ATTENTION_KINDS",
  "FullAttention",
  "MLPCompressor",
  "NSAAttention",
  "SlidingWindowAttention",
  "get_attention_kind",
  "register_attention_kind",
]
