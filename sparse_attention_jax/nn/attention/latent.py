"""ASA (Alternating Sparse Attention, arXiv 2511.00819): local MLA layers and global GLA+NSA layers.

The shared latent projections of the two ASA layer kinds, each in its own module
(:mod:`~sparse_attention_jax.nn.attention.asa_local`,
:mod:`~sparse_attention_jax.nn.attention.asa_global`):

* ``"asa_local"`` (:class:`MLALocalAttention`): causal sliding-window attention (``config.window``
  keys incl. the query) with multi-head latent attention (MLA, DeepSeek-V2).
* ``"asa_global"`` (:class:`GLAGlobalAttention`): NSA's compressed + selected branches (no window
  branch) with grouped latent attention (GLA-2, Zadouri et al. 2025), run in latent space.

The layer pattern is the model's ``attention:`` list, e.g. ``[asa_local, asa_global]`` (strict
alternation, local first) or ``[asa_local, asa_local, asa_global]``; ``DecoderLM`` needs no change.

Latent attention (sizes from ``config.latent``, a
:class:`~sparse_attention_jax.nn.latent_config.LatentConfig`; ``HQ = config.num_heads`` query heads,
``g`` latent heads of width ``dl = d_c / g``, ``G = HQ / g`` query heads per latent head; query head
``i*G + j`` belongs to latent head ``i``, the GQA layout of the ops)::

  c_q    = RMSNorm(W_dq x)                        [B, T, d_cq]
  q_nope = W_uq c_q,  q_rope = RoPE(W_qr c_q)     [B, T, HQ, nope_dim], [B, T, HQ, d_R]
  c      = RMSNorm_i(W_dkv x)                     [B, T, g, dl]     (RMSNorm per latent head)
  k_rope = RoPE(W_kr x)                           [B, T, 1, d_R]    (shared by all heads)
  k_nope = W_uk c,  v = W_uv c                    per query head, from its latent head
  logit  = (q_nope . k_nope + q_rope . k_rope) / sqrt(nope_dim + d_R)

Two equal ways to compute it (tested):

* *expanded* (training) form: up-project K/V per query head and run the library op with
  ``H = HQ``, ``Dk = nope_dim + d_R``, ``Dv = v_dim``.
* *absorbed* form: fold ``W_uk`` into the query, ``q_lat = W_uk^T q_nope`` (per head, in its latent
  head's space), and attend over the shared latent ``[c ; k_rope]`` -- a GQA with ``H = g`` KV
  heads, ``Dk = dl + d_R``, ``Dv = dl`` (MQA for MLA's ``g = 1``) -- then apply ``W_uv`` per head to
  the attended latent. This is the decode form (what a cache of ``d_c + d_R`` per token serves);
  :meth:`MLALocalAttention.absorbed` exposes it, and both kinds decode in it
  (``init_cache``/``prefill``/``decode``, see :mod:`sparse_attention_jax.nn.decode`): the cache
  holds ``[c ; k_rope]`` per token and latent head (``dl + d_R`` values; the values are its first
  ``dl`` features), a ring of ``window`` slots for ``asa_local`` and a linear buffer plus NSA's
  compressed latents for ``asa_global``.

Choices (the ASA paper's body was not checked; see docs/algorithms.md):

* The local layer is MLA (``g = 1``, one latent head; ``latent.groups`` applies only to the global
  layer) and trains in the expanded form over ``H = HQ`` heads: cuDNN flash attention with a local
  window on GPU (packed rows: with a document mask while ``B * T * T <= 2**28``), else the blocked
  plain-JAX window op (``O(T * w)`` memory).
* The global layer always runs in the absorbed form: NSA's selection is per KV head, so each GLA
  latent head plays the role of a KV head (selection shared by its ``G`` query heads, NSA eq. 10),
  and compression (mean pooling or phi) acts on the latent keys ``[c ; k_rope]`` and values ``c``.
  Mean pooling commutes with the linear up-projection, so with mean pooling this equals NSA on
  explicitly up-projected keys/values given the same block selection; phi does not commute.
* The global layer keeps NSA's gates: a per-query-head sigmoid for each of the two used branches
  (cmp, slc), from ``gate_proj: d_model -> HQ * 2`` (the paper's description is unclear on gates).
  The window branch is dropped from ``config.nsa.branches`` whatever it says; ``selection_share``
  (ASA's r) and every other NSA field apply as configured. With ``softmax_scale`` unset the scale
  is ``(nope_dim + d_R) ** -0.5`` in both layers (the expanded form's, so both forms agree).
* One latent feeds both NSA branches (``nsa_independent_kv`` is ignored: independent per-branch
  latents would double the cache that GLA is meant to halve).
* phi's hidden width is ``config.nsa_compressor_hidden`` or ``config.head_dim``. ``head_dim``,
  ``num_kv_heads`` and ``v_head_dim`` are otherwise unused by the ASA kinds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.attention.common import check_inputs
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.latent_config import LatentConfig
from sparse_attention_jax.nn.layers import RMSNorm, as_dtype, projection
from sparse_attention_jax.nn.parallel import param
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.ops import masked_attention
from sparse_attention_jax.ops.causal import causal_attention
from sparse_attention_jax.ops.masked import causal_mask


class Latents(NamedTuple):
  """Projected inputs of one latent-attention layer (RoPE applied).

  Attributes:
    q_nope: ``[B, T, HQ, nope_dim]``.
    q_rope: ``[B, T, HQ, d_R]``.
    c: ``[B, T, g, dl]`` normalized KV latent (what the cache stores, with ``k_rope``).
    k_rope: ``[B, T, 1, d_R]`` decoupled RoPE key shared by all heads.
  """

  q_nope: jax.Array
  q_rope: jax.Array
  c: jax.Array
  k_rope: jax.Array


class GroupRMSNorm(nnx.Module):
  """RMSNorm of each latent head separately: ``x [..., g, dl]``, scale ``[g, dl]`` (init 1)."""

  def __init__(self, groups: int, dim: int, *, eps: float = 1e-6, dtype="float32"):
    self.eps = eps
    self.dtype = as_dtype(dtype)
    self.scale = param(jnp.ones((groups, dim), jnp.float32), ("kv_heads", "norm"))

  def __call__(self, x):
    """``x [..., g, dl]`` -> same shape in ``dtype`` (statistics in float32)."""
    if x.shape[-2:] != self.scale.shape:
      raise ValueError(
        f"x: expected trailing dims [g, dl] = {self.scale.shape}, got shape {x.shape}"
      )
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(self.dtype)


def latent_config(config: ModelConfig, kind: str) -> LatentConfig:
  if not isinstance(config.latent, LatentConfig):
    raise ValueError(
      f"model.latent: expected a LatentConfig (kv_rank, q_rank, rope_dim, "
      f"nope_dim, v_dim, groups) for attention kind {kind!r}, got "
      f"{config.latent!r}"
    )
  return config.latent


class LatentAttentionBase(nnx.Module):
  """Projections of MLA/GLA (see the module docstring) and the two forms of attention over them.

  Attributes (kernels float32, ``d = d_model``):
    q_down: ``[d, d_cq]``; q_norm: RMSNorm(d_cq); q_up_nope: ``[d_cq, HQ, nope_dim]``;
    q_up_rope: ``[d_cq, HQ, d_R]``; kv_down: ``[d, g, dl]``; kv_norm: per-latent-head RMSNorm;
    k_rope_proj: ``[d, d_R]``; k_up: ``[g, dl, G, nope_dim]`` (W_uk); v_up: ``[g, dl, G, v_dim]``
    (W_uv); o_proj: ``[HQ, v_dim, d]``.
  """

  kind = "latent"

  def __init__(self, config: ModelConfig, groups: int, *, rngs: nnx.Rngs):
    lat = latent_config(config, self.kind)
    hq = config.num_heads
    if not isinstance(groups, int) or groups < 1 or hq % groups or lat.kv_rank % groups:
      raise ValueError(
        f"model.latent.groups: expected a divisor of num_heads={hq} and of "
        f"kv_rank={lat.kv_rank} for attention kind {self.kind!r}, got {groups!r}"
      )
    self.config = config
    self.latent = lat
    self.groups = g = groups
    self.dtype = dt = as_dtype(config.dtype)
    d, dl, gq = config.d_model, lat.kv_rank // groups, hq // groups
    self.q_down = projection(
      "btd,dr->btr",
      (d, lat.q_rank),
      in_axes=0,
      out_axes=1,
      dtype=dt,
      rngs=rngs,
      names=("embed", None),
    )
    self.q_norm = RMSNorm(lat.q_rank, eps=config.norm_eps, dtype=config.dtype)
    self.q_up_nope = projection(
      "btr,rhn->bthn",
      (lat.q_rank, hq, lat.nope_dim),
      in_axes=0,
      out_axes=(1, 2),
      dtype=dt,
      rngs=rngs,
      names=(None, "q_heads", "head_dim"),
    )
    self.q_up_rope = projection(
      "btr,rhn->bthn",
      (lat.q_rank, hq, lat.rope_dim),
      in_axes=0,
      out_axes=(1, 2),
      dtype=dt,
      rngs=rngs,
      names=(None, "q_heads", "head_dim"),
    )
    self.kv_down = projection(
      "btd,dgc->btgc",
      (d, g, dl),
      in_axes=0,
      out_axes=(1, 2),
      dtype=dt,
      rngs=rngs,
      names=("embed", "kv_heads", "head_dim"),
    )
    self.kv_norm = GroupRMSNorm(g, dl, eps=config.norm_eps, dtype=config.dtype)
    self.k_rope_proj = projection(
      "btd,dr->btr",
      (d, lat.rope_dim),
      in_axes=0,
      out_axes=1,
      dtype=dt,
      rngs=rngs,
      names=("embed", "head_dim"),
    )
    self.k_up = projection(
      "btgc,gcjn->btgjn",
      (g, dl, gq, lat.nope_dim),
      in_axes=1,
      out_axes=(0, 2, 3),
      dtype=dt,
      rngs=rngs,
      names=("kv_heads", "head_dim", None, "head_dim"),
    )
    self.v_up = projection(
      "btgc,gcjv->btgjv",
      (g, dl, gq, lat.v_dim),
      in_axes=1,
      out_axes=(0, 2, 3),
      dtype=dt,
      rngs=rngs,
      names=("kv_heads", "head_dim", None, "head_dim"),
    )
    self.o_proj = projection(
      "bthv,hvd->btd",
      (hq, lat.v_dim, d),
      in_axes=(0, 1),
      out_axes=2,
      dtype=dt,
      rngs=rngs,
      names=("q_heads", "head_dim", "embed"),
    )

  @property
  def softmax_scale(self) -> float:
    """``(nope_dim + d_R) ** -0.5`` unless ``config.nsa.softmax_scale`` is set (global layer)."""
    return self.latent.qk_dim**-0.5

  # ------------------------------------------------------------------------------ projections
  def project(self, x, positions) -> Latents:
    """``x [B, T, d_model]``, ``positions [B, T]`` -> :class:`Latents`."""
    theta = self.config.rope_theta
    c_q = self.q_norm(self.q_down(x))  # [B, T, d_cq]
    q_nope = self.q_up_nope(c_q)  # [B, T, HQ, n]
    q_rope = apply_rope(self.q_up_rope(c_q), positions, theta)  # [B, T, HQ, R]
    c = self.kv_norm(self.kv_down(x))  # [B, T, g, dl]
    k_rope = apply_rope(self.k_rope_proj(x)[:, :, None, :], positions, theta)  # [B, T, 1, R]
    return Latents(q_nope, q_rope, c, k_rope)

  def expanded_qkv(self, lat: Latents):
    """Training form: ``q, k [B, T, HQ, nope_dim + d_R]``, ``v [B, T, HQ, v_dim]`` (``H = HQ``)."""
    b, t, hq, _ = lat.q_nope.shape
    k_nope = self.k_up(lat.c).reshape(b, t, hq, -1)  # [B, T, HQ, n]
    v = self.v_up(lat.c).reshape(b, t, hq, -1)  # [B, T, HQ, dv]
    k_rope = jnp.broadcast_to(lat.k_rope, (b, t, hq, lat.k_rope.shape[-1]))
    q = jnp.concatenate([lat.q_nope, lat.q_rope], axis=-1)
    k = jnp.concatenate([k_nope, k_rope], axis=-1)
    return q, k, v

  def absorbed_qkv(self, lat: Latents):
    """Absorbed form: ``q [B, T, HQ, dl + d_R]``, ``k [B, T, g, dl + d_R]``, ``v [B, T, g, dl]``.

    ``q_lat[i*G + j] = W_uk[i, :, j, :] q_nope[i*G + j]`` so that ``q_lat . c_i = q_nope . k_nope``.
    """
    b, t, hq, n = lat.q_nope.shape
    g = self.groups
    q_nope = lat.q_nope.reshape(b, t, g, hq // g, n)
    w_uk = self.k_up.kernel[...].astype(self.dtype)  # [g, dl, G, n]
    q_lat = jnp.einsum("btgjn,gcjn->btgjc", q_nope, w_uk).reshape(b, t, hq, -1)
    k_rope = jnp.broadcast_to(lat.k_rope, (b, t, g, lat.k_rope.shape[-1]))
    q = jnp.concatenate([q_lat, lat.q_rope], axis=-1)
    k = jnp.concatenate([lat.c, k_rope], axis=-1)
    return q, k, lat.c

  def latent_keys(self, lat: Latents):
    """The cached latent keys ``[c ; k_rope]`` ``[B, T, g, dl + d_R]`` (values = the first
    ``dl`` features)."""
    b, t, g, _ = lat.c.shape
    k_rope = jnp.broadcast_to(lat.k_rope, (b, t, g, lat.k_rope.shape[-1]))
    return jnp.concatenate([lat.c, k_rope], axis=-1)

  def up_values(self, o_lat):
    """Attended latent ``[B, T, HQ, dl]`` -> per-head values ``[B, T, HQ, v_dim]`` via W_uv."""
    b, t, hq, dl = o_lat.shape
    g = self.groups
    w_uv = self.v_up.kernel[...].astype(self.dtype)  # [g, dl, G, dv]
    o = jnp.einsum("btgjc,gcjv->btgjv", o_lat.reshape(b, t, g, hq // g, dl), w_uv)
    return o.reshape(b, t, hq, -1)

  # -------------------------------------------------------------------------- dense attention
  def dense(
    self, x, positions, segment_ids=None, *, form: str = "expanded", window: int | None = None
  ):
    """Causal (``window=None``) or sliding-window latent attention with the plain masked op.

    Args:
      x: ``[B, T, d_model]``; positions: ``[B, T]`` int; segment_ids: ``[B, T]`` int or None.
      form: ``"expanded"`` (per-head K/V, ``H = HQ``) or ``"absorbed"`` (latent space, ``H = g``).
      window: keys per query incl. itself, or None for full causal attention.

    Returns:
      ``[B, T, d_model]`` in the compute dtype; both forms are equal up to rounding.
    """
    check_inputs(x, positions, segment_ids, self.config.d_model)
    if form not in ("expanded", "absorbed"):
      raise ValueError(f"form: expected 'expanded' or 'absorbed', got {form!r}")
    lat = self.project(x, positions)
    t = x.shape[1]
    mask = causal_mask(t, segment_ids, window)
    if form == "expanded":
      q, k, v = self.expanded_qkv(lat)
      o = masked_attention(q, k, v, mask, self.softmax_scale)[0]  # [B, T, HQ, dv]
    else:
      q, k, v = self.absorbed_qkv(lat)
      o = self.up_values(masked_attention(q, k, v, mask, self.softmax_scale)[0])
    return self.o_proj(o)


def window_attention(
  q, k, v, *, window: int, segment_ids, softmax_scale: float, impl: str = "auto"
):
  """Sliding-window attention of the local layer, memory-lean: cuDNN flash attention on GPU
  (packed rows with a document mask up to a size limit), else the blocked plain-JAX op (see
  :func:`~sparse_attention_jax.ops.causal.causal_attention`).

  Args:
    q: ``[B, T, HQ, Dk]``; k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; segment_ids: ``[B, T]``
      or None; window: keys per query incl. itself; softmax_scale: the logit scale; impl: as
      ``causal_attention``.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype``, equal to ``ops.sliding_window_attention``.
  """
  return causal_attention(
    q, k, v, segment_ids=segment_ids, window=window, softmax_scale=softmax_scale, impl=impl
  )


__all__ = [
  "GroupRMSNorm",
  "LatentAttentionBase",
  "Latents",
  "latent_config",
  "window_attention",
]
