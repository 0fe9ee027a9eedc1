"""NSA compressed + selected attention over GLA latents (kind ``"asa_global"``); the latent
projections are in :mod:`sparse_attention_jax.nn.attention.latent`.

Accounting per layer (``config.latent``: ``d_c``, ``d_R``, ``g`` latent heads of width
``dl = d_c / g``; ``model.nsa``: stride ``d``): the cache holds the GLA latent ``d_c + d_R`` per
token plus the compressed latent amortized, ``(g * (dl + d_R) + d_c) / d`` (keys per latent head,
values if ``cmp`` is output). Training attends in the absorbed latent space: NSA's branch keys
(:func:`~sparse_attention_jax.nn.attention.nsa.nsa_branch_keys_dims`; the window branch is
dropped, as the layer drops it) with ``Dk = dl + d_R``, ``Dv = dl``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.attention.common import check_inputs, default_positions
from sparse_attention_jax.nn.attention.latent import (
  LatentAttentionBase,
  latent_config,
)
from sparse_attention_jax.nn.attention.nsa import (
  MLPCompressor,
  nsa_branch_keys_dims,
)
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.layers import projection
from sparse_attention_jax.nn.parallel import sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  register_attention_kind,
)
from sparse_attention_jax.ops import CompressorParams, nsa_attention
from sparse_attention_jax.ops.nsa_decode import fill_nsa_cache, init_nsa_cache, nsa_decode_step


class GLAGlobalAttention(LatentAttentionBase):
  """NSA compressed + selected attention over GLA latents (kind ``"asa_global"``).

  Runs :func:`~sparse_attention_jax.ops.nsa_attention` in latent space with ``H = g``: queries
  ``[B, T, HQ, dl + d_R]`` (W_uk absorbed), keys ``[c ; k_rope]`` ``[B, T, g, dl + d_R]``, values
  ``c`` ``[B, T, g, dl]``; the attended latent is up-projected per head by W_uv, then ``o_proj``.

  Extra attributes: ``gate_proj`` ``[d_model, HQ, 2]`` (sigmoid gates of cmp and slc; None when a
  single branch is enabled), ``phi_k``/``phi_v`` (phi over the latent keys/values of each latent
  head, when ``config.nsa.compression == "mlp"``).
  """

  kind = "asa_global"

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    lat = latent_config(config, self.kind)
    super().__init__(config, lat.groups, rngs=rngs)
    c, nsa = config, config.nsa
    branches = tuple(b for b in nsa.branches if b != "win")
    if not branches:
      raise ValueError(
        f"model.nsa.branches: expected 'cmp' and/or 'slc' for attention kind "
        f"'asa_global' (its window branch is dropped), got {nsa.branches}"
      )
    scale = nsa.softmax_scale if nsa.softmax_scale is not None else lat.qk_dim**-0.5
    self.nsa = nsa.replace(branches=branches, softmax_scale=scale)
    self.branches = branches
    self.gate_proj = (
      projection(
        "btd,dhc->bthc",
        (c.d_model, c.num_heads, len(branches)),
        in_axes=0,
        out_axes=(1, 2),
        dtype=self.dtype,
        rngs=rngs,
        names=("embed", "q_heads", None),
      )
      if len(branches) > 1
      else None
    )
    if nsa.compression == "mlp":
      hidden = c.nsa_compressor_hidden or c.head_dim
      dl, dk = lat.group_rank, lat.group_rank + lat.rope_dim
      self.phi_k = MLPCompressor(
        num_kv_heads=lat.groups,
        window=nsa.cmp_window,
        in_dim=dk,
        out_dim=dk,
        hidden=hidden,
        rngs=rngs,
      )
      self.phi_v = MLPCompressor(
        num_kv_heads=lat.groups,
        window=nsa.cmp_window,
        in_dim=dl,
        out_dim=dl,
        hidden=hidden,
        rngs=rngs,
      )
    else:
      self.phi_k = self.phi_v = None

  @property
  def softmax_scale(self) -> float:
    return self.nsa.softmax_scale

  def op_inputs(self, x, positions) -> dict:
    """The latent-space arguments of ``nsa_attention``: ``q``, ``k``, ``v`` (absorbed form),
    ``gates`` ``[B, T, HQ, 3]`` (order cmp, slc, win; win unused) or None, ``compress_params``."""
    q, k, v = self.absorbed_qkv(self.project(x, positions))
    gates = None
    if self.gate_proj is not None:
      g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))  # [B, T, HQ, 2]
      cols = {name: g[..., i] for i, name in enumerate(self.branches)}
      zero = jnp.zeros_like(g[..., 0])
      gates = jnp.stack([cols.get(name, zero) for name in ("cmp", "slc", "win")], axis=-1)
    compress_params = None
    if self.phi_k is not None:
      compress_params = CompressorParams(k=self.phi_k.params(), v=self.phi_v.params())
    return {"q": q, "k": k, "v": v, "gates": gates, "compress_params": compress_params}

  def __call__(self, x, positions, segment_ids=None, *, return_aux: bool = False):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]`` (and the op's :class:`~sparse_attention_jax.ops.NSAAux` if
    ``return_aux``; then no sharded call is made)."""
    c = self.config
    check_inputs(x, positions, segment_ids, c.d_model)
    args = {**self.op_inputs(x, positions), "segment_ids": segment_ids}
    op_config = self.nsa.for_length(x.shape[1])

    def op(**a):
      return nsa_attention(
        a["q"],
        a["k"],
        a["v"],
        a["gates"],
        config=op_config,
        segment_ids=a["segment_ids"],
        compress_params=a["compress_params"],
        impl=c.attn_impl,
        return_aux=return_aux,
      )

    if return_aux:
      o_lat, aux = op(**args)
      return self.o_proj(self.up_values(o_lat)), aux
    layouts = {
      "q": "bthd",
      "k": "bthd",
      "v": "bthd",
      "gates": "bthd",
      "segment_ids": "bt",
      "compress_params": "h",
    }
    o_lat = sharded_call(op, args, layouts, num_kv_heads=self.groups)  # [B, T, HQ, dl]
    return self.o_proj(self.up_values(o_lat))

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.ops.nsa_decode.NSACache` over the latent: linear
    ``[c ; k_rope]`` (values read from it) and the compressed latent keys/values."""
    lat = self.latent
    return init_nsa_cache(
      batch,
      capacity,
      config=self.nsa,
      num_kv_heads=self.groups,
      dk=lat.group_rank + lat.rope_dim,
      dv=lat.group_rank,
      dtype=dtype or self.dtype,
      values_in_keys=True,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    c = self.config
    check_inputs(x, default_positions(x), None, c.d_model)
    a = self.op_inputs(x, default_positions(x))
    o_lat, aux = nsa_attention(
      a["q"],
      a["k"],
      a["v"],
      a["gates"],
      config=self.nsa.for_length(x.shape[1]),
      compress_params=a["compress_params"],
      impl=c.attn_impl,
      return_aux=True,
    )
    cache = fill_nsa_cache(
      cache,
      config=self.nsa,
      lengths=lengths,
      k=a["k"],
      v=None,
      compress_params=a["compress_params"],
      block_indices=aux.block_indices,
    )
    return self.o_proj(self.up_values(o_lat)), cache

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    a = self.op_inputs(x, pos[:, None])
    gates = None if a["gates"] is None else a["gates"][:, 0]
    o_lat, cache = nsa_decode_step(
      cache,
      a["q"][:, 0],
      config=self.nsa,
      pos=pos,
      k=a["k"][:, 0],
      gates=gates,
      compress_params=a["compress_params"],
    )
    return self.o_proj(self.up_values(o_lat[:, None])), cache


def _kv(config: ModelConfig) -> KVElements:
  lat, nsa = latent_config(config, "asa_global"), config.nsa
  cmp_k = lat.groups * (lat.group_rank + lat.rope_dim)
  cmp_v = lat.kv_rank if "cmp" in nsa.branches else 0
  return KVElements(
    float(lat.kv_rank + lat.rope_dim + (cmp_k + cmp_v) / nsa.cmp_stride),
    None,
    f"GLA latent d_c+d_R (g={lat.groups}) + compressed 1/{nsa.cmp_stride}",
  )


def _flops(config: ModelConfig, seq_len: int) -> float:
  lat = latent_config(config, "asa_global")
  dl = lat.kv_rank // lat.groups
  branches = tuple(b for b in config.nsa.branches if b != "win")  # the layer drops it
  keys_dims = nsa_branch_keys_dims(config, seq_len, branches, dl + lat.rope_dim, dl)
  return 6.0 * config.num_heads * keys_dims


ASA_GLOBAL = register_attention_kind(
  AttentionKind(
    name="asa_global",
    module=GLAGlobalAttention,
    decode=LAYER_METHODS,
    kv_elements=_kv,
    train_flops=_flops,
  )
)

__all__ = ["ASA_GLOBAL", "GLAGlobalAttention"]
