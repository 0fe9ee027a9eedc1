"""NOSA layer (kind ``"nosa"``, docs/algorithms.md): InfLLM-V2-style selected attention whose
selection is split into a query-aware and a query-agnostic (eviction-head) part, with the eviction
score as an additive logit bias on every attended key.

Per layer (``H`` KV heads, ``Dv`` value dim)::

  q, k = RoPE(q_proj(x)), RoPE(k_proj(x));  v = v_proj(x)
  c    = A * softplus(concat_heads(v) @ W_delta)                  # [B, T, H], A init 0
  o    = nosa_attention(q, k, v, c, k = model.nsa.num_selected, k_q = model.nosa.query_selected)
  out  = o_proj(o)

One branch only (no gates, no compressed output, no separate window: the local window is the
forced local blocks of ``model.nsa``, e.g. ``NSAConfig.infllm_v2``). The eviction head reads the
values of all KV heads, so ``c`` is computed outside the per-head-shard attention call.

Decoding: the layer implements the decode protocol of :mod:`sparse_attention_jax.nn.decode`
(``init_cache`` / ``prefill`` / ``decode``) with the device-resident
:class:`~sparse_attention_jax.ops.nosa.decode.NOSACache` (a step reads the compressed keys and the
``k`` selected blocks); :mod:`sparse_attention_jax.offload` decodes with the K/V/c
blocks in host memory (:class:`~sparse_attention_jax.offload.OffloadedDecoder`).

Accounting per layer (``H`` KV heads, ``Dk``/``Dv``, ``model.nsa``: stride ``d``, ``k`` selected
blocks of ``l'`` tokens): resident cache ``H * (Dk + Dv + 1)`` (K, V and ``c``) plus the
compressed K and ``c`` amortized, ``H * (Dk + 1) / d``; offloaded (NOSI's layout), the host holds
``H * (Dk + Dv + 1)`` per token and the device the compressed K and ``c`` per token plus a fixed
pool of :func:`nosa_slots` block slots per sequence (``c`` counted in the cache dtype). Training
FLOPs: the InfLLM-V2 scores over ``T / (2 d)`` compressed keys (``q.k`` only) plus the ``k``
selected blocks (``min(k * l', T / 2)`` keys).
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
)
from sparse_attention_jax.nn.attention.nsa import nsa_branch_keys_dims
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.layers import as_dtype
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.nn.parallel import param, sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  LayerQK,
  OffloadElements,
  register_attention_kind,
)
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.ops.nosa import nosa_attention
from sparse_attention_jax.ops.nosa import selection as nosa_selection
from sparse_attention_jax.ops.nosa.decode import (
  fill_nosa_cache,
  init_nosa_cache,
  nosa_decode_step,
)


def check_nosa_config(config: ModelConfig) -> NOSAConfig:
  """The layer's :class:`NOSAConfig` after checking it against ``model.nsa``."""
  nosa = config.nosa or NOSAConfig()
  nsa = config.nsa
  if nsa.compression != "mean":
    raise ValueError(
      f"model.nsa.compression: expected 'mean' for 'nosa' layers (InfLLM-V2 "
      f"scoring over mean-pooled keys), got {nsa.compression!r}"
    )
  forced = nsa.num_init_blocks + nsa.num_local_blocks
  if not forced <= nosa.query_selected <= nsa.num_selected:
    raise ValueError(
      f"model.nosa.query_selected: expected k_q with num_init_blocks + "
      f"num_local_blocks = {forced} <= k_q <= model.nsa.num_selected = "
      f"{nsa.num_selected}, got {nosa.query_selected}"
    )
  return nosa


class NOSAAttention(nnx.Module):
  """NOSA attention layer (kind ``"nosa"``).

  * ``q_proj`` ``[B, T, d_model] -> [B, T, HQ, Dk]``; ``k_proj``/``v_proj`` ``-> [B, T, H,
    Dk|Dv]``; ``o_proj`` ``[B, T, HQ, Dv] -> [B, T, d_model]``.
  * Eviction head: ``w_delta [H, Dv, H]`` (the paper's ``Linear(H*Dv -> H)``, fan-in init) and
    ``a [H]`` (``A``, initialized to 0 so ``c = 0`` at init; then only ``a`` gets a gradient on
    the first step).
  * The op is called with the budgets clamped to the sequence (``nosa_selection.for_length``).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dt = as_dtype(config.dtype)
    c = config
    self.query_selected = check_nosa_config(c).query_selected
    self.q_proj = q_projection(c, dt, rngs)
    self.k_proj = kv_projection(c, c.head_dim, dt, rngs)
    self.v_proj = kv_projection(c, c.dv, dt, rngs)
    self.o_proj = o_projection(c, dt, rngs)
    h, dv = c.num_kv_heads, c.dv
    w = jax.random.normal(rngs.params(), (h, dv, h), jnp.float32) / jnp.sqrt(h * dv)
    self.w_delta = param(w, ("kv_heads", "head_dim", None))
    self.a = param(jnp.zeros((h,), jnp.float32), (None,))

  def qkvc(self, x, positions):
    """Rotated ``q [B, T, HQ, Dk]``, ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]`` and the eviction
    scores ``c [B, T, H]`` float32 of the tokens ``x [B, T, d_model]`` at ``positions``."""
    cfg = self.config
    q = apply_rope(self.q_proj(x), positions, cfg.rope_theta)
    k = apply_rope(self.k_proj(x), positions, cfg.rope_theta)
    v = self.v_proj(x)
    return q, k, v, nosa_selection.eviction_bias(v, self.w_delta[...], self.a[...])

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    cfg = self.config
    check_inputs(x, positions, segment_ids, cfg.d_model)
    q, k, v, c = self.qkvc(x, positions)
    op_config, kq = nosa_selection.for_length(cfg.nsa, self.query_selected, x.shape[1])

    def op(**a):
      return nosa_attention(
        a["q"],
        a["k"],
        a["v"],
        a["c"],
        config=op_config,
        num_query_selected=kq,
        segment_ids=a["segment_ids"],
        impl=cfg.attn_impl,
      )

    args = {"q": q, "k": k, "v": v, "c": c, "segment_ids": segment_ids}
    layouts = {"q": "bthd", "k": "bthd", "v": "bthd", "c": "bthd", "segment_ids": "bt"}
    o = sharded_call(op, args, layouts, num_kv_heads=cfg.num_kv_heads)  # [B, T, HQ, Dv]
    return self.o_proj(o)

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.ops.nosa.decode.NOSACache` of this layer."""
    c = self.config
    return init_nosa_cache(
      batch,
      capacity,
      config=c.nsa,
      num_kv_heads=c.num_kv_heads,
      dk=c.head_dim,
      dv=c.dv,
      dtype=dtype or self.dtype,
    )

  def prefill_outputs(self, x):
    """Prefill of right-padded prompts ``x [B, T, d_model]``: ``(y [B, T, d_model], k, v, c)``
    with the rotated keys ``[B, T, H, Dk]``, values and eviction scores to cache."""
    cfg = self.config
    check_inputs(x, default_positions(x), None, cfg.d_model)
    q, k, v, c = self.qkvc(x, default_positions(x))
    op_config, kq = nosa_selection.for_length(cfg.nsa, self.query_selected, x.shape[1])
    o = nosa_attention(q, k, v, c, config=op_config, num_query_selected=kq, impl=cfg.attn_impl)
    return self.o_proj(o), k, v, c

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    y, k, v, c = self.prefill_outputs(x)
    return y, fill_nosa_cache(cache, config=self.config.nsa, lengths=lengths, k=k, v=v, c=c)

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at positions ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    q, k, v, c = self.qkvc(x, pos[:, None])
    o, cache = nosa_decode_step(
      cache,
      q[:, 0],
      config=self.config.nsa,
      num_query_selected=self.query_selected,
      pos=pos,
      k=k[:, 0],
      v=v[:, 0],
      c=c[:, 0],
    )
    return self.o_proj(o[:, None]), cache


def _kv(config: ModelConfig) -> KVElements:
  c, d = config, config.nsa.cmp_stride
  h, dk, dv = c.num_kv_heads, c.head_dim, c.dv
  return KVElements(
    float(h * (dk + dv + 1) + h * (dk + 1) / d),
    None,
    f"K+V+c resident + compressed K and c 1/{d} (offloadable)",
  )


def nosa_slots(config: ModelConfig) -> int:
  """Device block slots per sequence of an offloaded NOSA layer, the current block included:
  ``k`` when the forced local blocks include the current block (it is always in the selection),
  else ``k + 1``."""
  return config.nsa.num_selected + (0 if config.nsa.num_local_blocks >= 1 else 1)


def _offload(config: ModelConfig) -> OffloadElements:
  """NOSI's layout: K, V and ``c`` of every token on the host; the compressed K and ``c`` per
  token plus a pool of :func:`nosa_slots` blocks of ``l'`` tokens on the device."""
  c = config
  h, dk, dv, nsa = c.num_kv_heads, c.head_dim, c.dv, c.nsa
  slots = nosa_slots(c)
  return OffloadElements(
    device_per_token=h * (dk + 1) / nsa.cmp_stride,
    device_fixed=float(slots * nsa.block_size * h * (dk + dv + 1)),
    fixed_tokens=slots * nsa.block_size,
    host_per_token=float(h * (dk + dv + 1)),
  )


def _flops(config: ModelConfig, seq_len: int) -> float:
  """InfLLM-V2 scoring over the compressed keys plus the ``k`` selected blocks."""
  c = config
  return 6.0 * c.num_heads * nsa_branch_keys_dims(c, seq_len, c.nsa.branches, c.head_dim, c.dv)


def _qk(layer: NOSAAttention, x, positions) -> LayerQK:
  q, k, _, c = layer.qkvc(x, positions)
  return LayerQK(q, k, c)


NOSA = register_attention_kind(
  AttentionKind(
    name="nosa",
    module=NOSAAttention,
    decode=LAYER_METHODS,
    kv_elements=_kv,
    train_flops=_flops,
    qk=_qk,
    offload_elements=_offload,
  )
)

__all__ = ["NOSA", "NOSAAttention", "check_nosa_config", "nosa_slots"]
