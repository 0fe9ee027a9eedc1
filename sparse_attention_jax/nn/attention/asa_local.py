"""Sliding-window MLA layer of ASA (kind ``"asa_local"``); the latent projections are in
:mod:`sparse_attention_jax.nn.attention.latent`.

Accounting per layer (``config.latent``: ``d_c`` = ``kv_rank``, ``d_R`` = ``rope_dim``): the cache
holds the MLA latent ``[c ; k_rope]``, ``d_c + d_R`` elements per token (one latent head), of
which only the last ``w = model.window`` tokens are needed. Training runs the expanded form, a
query visiting ``min(w, T / 2)`` keys of ``Dk = nope_dim + d_R``, ``Dv = v_dim`` per query head.
"""

from __future__ import annotations

from flax import nnx

from sparse_attention_jax.nn.attention.common import check_inputs, default_positions
from sparse_attention_jax.nn.attention.latent import (
  LatentAttentionBase,
  latent_config,
  window_attention,
)
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.decode import dense_decode, fill_dense_cache, init_dense_cache
from sparse_attention_jax.nn.parallel import sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  register_attention_kind,
)


class MLALocalAttention(LatentAttentionBase):
  """Sliding-window MLA (kind ``"asa_local"``): query ``t`` sees keys ``t - w + 1 .. t`` of its
  document, ``w = config.window``; one latent head (``g = 1``).

  Trains in the expanded form (``H = HQ``, ``Dk = nope_dim + d_R``, ``Dv = v_dim``) through
  :func:`~sparse_attention_jax.ops.causal.causal_attention` with a window (cuDNN on GPU
  where it serves, else the blocked op); :meth:`absorbed` is the decode form.
  """

  kind = "asa_local"

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(config, 1, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    c = self.config
    check_inputs(x, positions, segment_ids, c.d_model)
    q, k, v = self.expanded_qkv(self.project(x, positions))
    scale = self.softmax_scale

    def op(**a):
      return window_attention(
        a["q"],
        a["k"],
        a["v"],
        window=c.window,
        segment_ids=a["segment_ids"],
        softmax_scale=scale,
        impl=c.attn_impl,
      )

    o = sharded_call(
      op,
      {"q": q, "k": k, "v": v, "segment_ids": segment_ids},
      {"q": "bthd", "k": "bthd", "v": "bthd", "segment_ids": "bt"},
      num_kv_heads=c.num_heads,
    )  # [B, T, HQ, dv]
    return self.o_proj(o)

  def absorbed(self, x, positions, segment_ids=None):
    """The same layer in the absorbed (decode) form: MQA over the latent ``[c ; k_rope]``."""
    return self.dense(x, positions, segment_ids, form="absorbed", window=self.config.window)

  # ------------------------------------------------------- decoding (see nn/decode.py)
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """A ring of ``min(window, capacity)`` latent keys ``[c ; k_rope]`` (no value buffer)."""
    lat = self.latent
    return init_dense_cache(
      batch,
      capacity,
      num_kv_heads=1,
      dk=lat.kv_rank + lat.rope_dim,
      dv=None,
      dtype=dtype or self.dtype,
      window=self.config.window,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)`` (the
    outputs of the training form, the cache of the latent)."""
    c = self.config
    check_inputs(x, default_positions(x), None, c.d_model)
    lat = self.project(x, default_positions(x))
    q, k, v = self.expanded_qkv(lat)
    o = window_attention(
      q, k, v, window=c.window, segment_ids=None, softmax_scale=self.softmax_scale
    )
    return self.o_proj(o), fill_dense_cache(cache, self.latent_keys(lat), None, lengths, ring=True)

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at ``pos [B]`` -> ``(y [B, 1, d_model], cache)``: MQA of the
    absorbed queries over the cached latents, then W_uv."""
    q, k, _ = self.absorbed_qkv(self.project(x, pos[:, None]))
    o_lat, cache = dense_decode(
      cache,
      q[:, 0],
      k[:, 0],
      None,
      pos,
      scale=self.softmax_scale,
      ring=True,
      window=self.config.window,
      dv=self.latent.kv_rank // self.groups,
    )
    return self.o_proj(self.up_values(o_lat[:, None])), cache


def _kv(config: ModelConfig) -> KVElements:
  lat = latent_config(config, "asa_local")
  return KVElements(
    float(lat.kv_rank + lat.rope_dim),
    config.window,
    f"MLA latent d_c+d_R; only the last w={config.window} tokens needed",
  )


def _flops(config: ModelConfig, seq_len: int) -> float:
  lat = latent_config(config, "asa_local")
  keys = min(config.window, seq_len / 2)
  return 6.0 * config.num_heads * keys * (lat.nope_dim + lat.rope_dim + lat.v_dim)


ASA_LOCAL = register_attention_kind(
  AttentionKind(
    name="asa_local",
    module=MLALocalAttention,
    decode=LAYER_METHODS,
    kv_elements=_kv,
    train_flops=_flops,
  )
)

__all__ = ["ASA_LOCAL", "MLALocalAttention"]
