"""SSA (docs/algorithms.md): layers trained with both sparse and full attention and a
bidirectional per-layer alignment loss (kind ``"ssa"``).

Accounting per layer: the decode cache is the sparse path's NSA cache with one shared K/V pair
(:func:`~sparse_attention_jax.nn.attention.nsa.nsa_kv_elements` over ``model.ssa.branches``);
training FLOPs count both paths, ``full`` plus the NSA branches of ``model.ssa.branches``.

Per layer, ``g = sigmoid(gate_proj(x))[..., slc]`` gates both outputs (pre-``o_proj``,
``[B, T, HQ, Dv]``)::

  o_full   = g * dense_causal(q, k, v)
  o_sparse = g * nsa_attention(q, k, v, gates=None, branches=model.ssa.branches)
  term1    = SmoothL1(o_full, sg(o_sparse))       # pulls full attention toward the sparse one
  term2    = SmoothL1(sg(o_full), o_sparse)       # pulls the sparse output toward the full one

(SmoothL1 with beta = 1 and the mean over all elements, ``sg = jax.lax.stop_gradient``.) The
training loss is ``CE + align_weight * mean_layers(term1 + term2)``.

How the mode goes in and the terms come out (the call signature of the layer stays
``layer(x, positions, segment_ids)`` like every kind):

* ``layer.training`` (a static Python bool, False when built): in training both outputs are
  computed; outside training only the one of ``layer.inference_mode`` is (``"sparse"`` with
  ``layer.sparse_config``, or ``"full"``). :func:`set_training` sets it (the train step sets it
  on the model it merges inside ``jit``, so the trainer's stored graph stays in inference form).
* ``layer.mode`` (:class:`SSAMode`, an ``nnx.Variable`` holding a bool scalar): True = the
  residual stream uses ``o_full``, False = ``o_sparse``; set for all layers at once by
  :func:`set_training` (a traced Bernoulli(p) draw per step, see :func:`draw_mode`).
* ``layer.align`` (:class:`SSAAlign`, an ``nnx.Variable`` holding ``[2]`` float32 =
  ``(term1, term2)``): written by every training forward pass and read by
  :func:`alignment_terms`. Being pre-created variables (not ``sow``), both flow through
  ``nnx.remat`` and the sharded train step like any other state. They are part of the model's
  state (and so of checkpoints) but carry no meaning outside a training step.

Inference without retraining: :func:`set_inference` switches every SSA layer to full attention or
to the sparse path with another block size / number of selected blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn.attention.common import (
  check_inputs,
  default_positions,
  kv_projection,
  o_projection,
  q_projection,
)
from sparse_attention_jax.nn.attention.nsa import nsa_branch_keys_dims, nsa_kv_elements
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.layers import as_dtype, projection
from sparse_attention_jax.nn.parallel import sharded_call
from sparse_attention_jax.nn.registry import (
  LAYER_METHODS,
  AttentionKind,
  KVElements,
  LayerQK,
  register_attention_kind,
)
from sparse_attention_jax.nn.rope import apply_rope
from sparse_attention_jax.nn.ssa_config import SSAConfig
from sparse_attention_jax.ops import nsa_attention
from sparse_attention_jax.ops.causal import causal_attention
from sparse_attention_jax.ops.decode import attend_one, window_mask, write_linear
from sparse_attention_jax.ops.nsa_decode import fill_nsa_cache, init_nsa_cache, nsa_decode_step

# Key of the per-step mode draws: step s uses fold_in(key(_MODE_SEED), s), so a resumed run
# draws the same modes as an uninterrupted one.
_MODE_SEED = 0x55A


class SSAMode(nnx.Variable):
  """Bool scalar: True = the residual stream of a training step uses full attention."""


class SSAAlign(nnx.Variable):
  """``[2]`` float32: the layer's alignment terms ``(term1, term2)`` of the last training
  forward pass."""


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean SmoothL1 (Huber, beta = 1) of ``a - b`` in float32, as ``torch.nn.SmoothL1Loss()``."""
  d = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def alignment_loss_terms(o_full: jax.Array, o_sparse: jax.Array) -> jax.Array:
  """``[term1, term2]`` float32: ``SmoothL1(o_full, sg(o_sparse))`` and
  ``SmoothL1(sg(o_full), o_sparse)`` of two ``[B, T, HQ, Dv]`` outputs."""
  sg = jax.lax.stop_gradient
  return jnp.stack([smooth_l1(o_full, sg(o_sparse)), smooth_l1(sg(o_full), o_sparse)])


def _dense(q, k, v, segment_ids, impl: str = "auto"):
  """Dense causal GQA attention ``[B, T, HQ, Dk], [B, T, H, Dk], [B, T, H, Dv] -> [B, T, HQ,
  Dv]`` (as :class:`~sparse_attention_jax.nn.FullAttention`: cuDNN or the blocked op)."""
  return causal_attention(q, k, v, segment_ids=segment_ids, impl=impl)


def sparse_op_config(config: ModelConfig) -> NSAConfig:
  """The NSA op config of the sparse path: ``model.nsa`` with ``model.ssa.branches``."""
  ssa = config.ssa or SSAConfig()
  return config.nsa.replace(branches=ssa.branches)


class SSAAttention(nnx.Module):
  """SSA layer (kind ``"ssa"``): q/k/v/o projections, RoPE, the slc gate, both attention paths.

  * ``q_proj`` ``[B, T, d_model] -> [B, T, HQ, Dk]``; ``k_proj``/``v_proj`` ``-> [B, T, H,
    Dk|Dv]`` (one K/V pair shared by the full and the sparse path).
  * ``gate_proj`` ``d_model -> [HQ, 3]`` then sigmoid; only column 1 (slc) is used, as in SSA.
  * ``o_proj`` ``[B, T, HQ, Dv] -> [B, T, d_model]``.

  Static settings: ``training``, ``inference_mode`` and ``sparse_config`` (the op config; see
  the module docstring). The sparse path calls ``nsa_attention`` with ``gates=None`` (the sum of
  the configured branches) and ``sparse_config.for_length(T)``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dt = as_dtype(config.dtype)
    c = config
    ssa = c.ssa or SSAConfig()
    self.sparse_config = sparse_op_config(c)
    if self.sparse_config.compression != "mean":
      raise ValueError(
        f"model.nsa.compression: expected 'mean' for 'ssa' layers (the sparse "
        f"path has no learnable compressor), got "
        f"{self.sparse_config.compression!r}"
      )
    self.inference_mode = ssa.inference_mode
    self.training = False
    self.q_proj = q_projection(c, dt, rngs)
    self.k_proj = kv_projection(c, c.head_dim, dt, rngs)
    self.v_proj = kv_projection(c, c.dv, dt, rngs)
    self.gate_proj = projection(
      "btd,dhc->bthc",
      (c.d_model, c.num_heads, 3),
      in_axes=0,
      out_axes=(1, 2),
      dtype=dt,
      rngs=rngs,
      names=("embed", "q_heads", None),
    )
    self.o_proj = o_projection(c, dt, rngs)
    self.mode = SSAMode(jnp.asarray(ssa.inference_mode == "full"))
    self.align = SSAAlign(jnp.zeros((2,), jnp.float32))

  def qkv(self, x, positions):
    """Rotated ``q [B, T, HQ, Dk]``, ``k [B, T, H, Dk]`` and ``v [B, T, H, Dv]``."""
    c = self.config
    q = apply_rope(self.q_proj(x), positions, c.rope_theta)
    k = apply_rope(self.k_proj(x), positions, c.rope_theta)
    return q, k, self.v_proj(x)

  def outputs(self, x, positions, segment_ids=None, *, paths=("full", "sparse")):
    """The gated pre-projection outputs ``{path: [B, T, HQ, Dv]}`` of the requested paths."""
    c = self.config
    q, k, v = self.qkv(x, positions)
    g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))[..., 1:2]  # [B, T, HQ, 1]
    args = {"q": q, "k": k, "v": v, "segment_ids": segment_ids}
    layouts = {"q": "bthd", "k": "bthd", "v": "bthd", "segment_ids": "bt"}
    op_config = self.sparse_config.for_length(x.shape[1])

    def sparse(**a):
      return nsa_attention(
        a["q"],
        a["k"],
        a["v"],
        None,
        config=op_config,
        segment_ids=a["segment_ids"],
        impl=c.attn_impl,
      )

    fns = {"full": lambda **a: _dense(**a, impl=c.attn_impl), "sparse": sparse}
    out = {}
    for p in paths:
      o = sharded_call(fns[p], args, layouts, num_kv_heads=c.num_kv_heads)
      out[p] = (g * o.astype(jnp.float32)).astype(self.dtype)
    return out

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]``, ``positions [B, T]``, ``segment_ids [B, T] | None`` ->
    ``[B, T, d_model]``."""
    check_inputs(x, positions, segment_ids, self.config.d_model)
    if not self.training:
      o = self.outputs(x, positions, segment_ids, paths=(self.inference_mode,))
      return self.o_proj(o[self.inference_mode])
    o = self.outputs(x, positions, segment_ids)
    self.align[...] = alignment_loss_terms(o["full"], o["sparse"])
    return self.o_proj(jnp.where(self.mode[...], o["full"], o["sparse"]))

  # ------------------------------------------------------- decoding (see nn/decode.py)
  # Inference form only (``layer.inference_mode``); the compressed/selection state is kept up
  # to date by the sparse mode, the full mode only writes and reads the K/V buffers.
  def init_cache(self, batch: int, capacity: int, dtype=None):
    """:class:`~sparse_attention_jax.ops.nsa_decode.NSACache` of ``layer.sparse_config``."""
    c = self.config
    return init_nsa_cache(
      batch,
      capacity,
      config=self.sparse_config,
      num_kv_heads=c.num_kv_heads,
      dk=c.head_dim,
      dv=c.dv,
      dtype=dtype or self.dtype,
    )

  def prefill(self, x, lengths, cache):
    """``x [B, T, d_model]`` right-padded prompts of ``lengths [B]`` -> ``(y, cache)``."""
    c = self.config
    check_inputs(x, default_positions(x), None, c.d_model)
    q, k, v = self.qkv(x, default_positions(x))
    g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))[..., 1:2]  # [B, T, HQ, 1]
    if self.inference_mode == "full":
      o = _dense(q, k, v, None)
      sel = jnp.full(k.shape[:3] + (1,), -1, jnp.int32)
    else:
      o, aux = nsa_attention(
        q,
        k,
        v,
        None,
        config=self.sparse_config.for_length(x.shape[1]),
        impl=c.attn_impl,
        return_aux=True,
      )
      sel = aux.block_indices
    cache = fill_nsa_cache(
      cache, config=self.sparse_config, lengths=lengths, k=k, v=v, block_indices=sel
    )
    return self.o_proj((g * o.astype(jnp.float32)).astype(self.dtype)), cache

  def decode(self, x, pos, cache):
    """``x [B, 1, d_model]`` at ``pos [B]`` -> ``(y [B, 1, d_model], cache)``."""
    q, k, v = self.qkv(x, pos[:, None])
    g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))[:, 0, :, 1:2]  # [B, HQ, 1]
    if self.inference_mode == "full":
      cache = cache._replace(
        k=write_linear(cache.k, k[:, 0], pos), v=write_linear(cache.v, v[:, 0], pos)
      )
      slot_pos = jnp.arange(cache.k.shape[1], dtype=jnp.int32)[None, :]
      o = attend_one(
        q[:, 0], cache.k, cache.v, window_mask(slot_pos, pos, None), q.shape[-1] ** -0.5
      )
    else:
      o, cache = nsa_decode_step(
        cache, q[:, 0], config=self.sparse_config, pos=pos, k=k[:, 0], v=v[:, 0]
      )
    return self.o_proj((g * o.astype(jnp.float32)).astype(self.dtype)[:, None]), cache


def _kv(config: ModelConfig) -> KVElements:
  """The decode cache of the sparse path: one shared K/V pair plus its compressed keys (and
  values when ``cmp`` is output), counted as for ``nsa`` (the full mode reads the same K/V)."""
  c = config
  branches = (c.ssa or SSAConfig()).branches
  return nsa_kv_elements(
    c, branches=branches, pairs=1, dk=c.head_dim, dv=c.dv, heads=c.num_kv_heads
  )


def _flops(config: ModelConfig, seq_len: int) -> float:
  """Training computes both paths: ``full`` plus the NSA branches of ``model.ssa.branches``."""
  c = config
  branches = (c.ssa or SSAConfig()).branches
  keys_dims = seq_len / 2 * (c.head_dim + c.dv)
  keys_dims += nsa_branch_keys_dims(c, seq_len, branches, c.head_dim, c.dv)
  return 6.0 * c.num_heads * keys_dims


def _qk(layer: SSAAttention, x, positions) -> LayerQK:
  q, k, _ = layer.qkv(x, positions)
  return LayerQK(q, k)


SSA = register_attention_kind(
  AttentionKind(
    name="ssa",
    module=SSAAttention,
    decode=LAYER_METHODS,
    kv_elements=_kv,
    train_flops=_flops,
    qk=_qk,
  )
)


def ssa_layers(model: nnx.Module) -> list[SSAAttention]:
  """Every :class:`SSAAttention` inside ``model``, in graph order."""
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, SSAAttention)]


def draw_mode(step: jax.Array | int, full_prob: float) -> jax.Array:
  """The Bernoulli(``full_prob``) mode of training step ``step`` (bool scalar; True = full),
  deterministic in ``step``."""
  key = jax.random.fold_in(jax.random.key(_MODE_SEED), jnp.asarray(step, jnp.uint32))
  return jax.random.bernoulli(key, full_prob)


def set_training(model: nnx.Module, mode_full: jax.Array | bool | None) -> nnx.Module:
  """Puts every SSA layer of ``model`` in training form with one shared mode, or back in
  inference form when ``mode_full`` is None. Returns ``model``."""
  for layer in ssa_layers(model):
    layer.training = mode_full is not None
    if mode_full is not None:
      layer.mode[...] = jnp.asarray(mode_full, jnp.bool_)
  return model


def alignment_terms(model: nnx.Module) -> jax.Array | None:
  """``[2]`` float32: ``(term1, term2)`` averaged over the SSA layers (after a training forward
  pass), or None when ``model`` has no SSA layer."""
  layers = ssa_layers(model)
  if not layers:
    return None
  return jnp.mean(jnp.stack([layer.align[...] for layer in layers]), axis=0)


def set_inference(
  model: nnx.Module,
  mode: str | None = None,
  *,
  block_size: int | None = None,
  num_selected: int | None = None,
) -> nnx.Module:
  """Sets how every SSA layer of ``model`` attends outside training, without retraining.

  Args:
    model: a model with SSA layers (other layers are untouched).
    mode: ``"full"`` (dense causal) or ``"sparse"``; None keeps each layer's mode.
    block_size: selection block l' of the sparse path; None keeps it. When the model's config
      scores blocks with ``cmp_window == cmp_stride == block_size`` (block means, as SSA/MoBA),
      the compression window and stride follow the new block size.
    num_selected: selected blocks n per query (including the forced ones); None keeps it.

  Returns:
    ``model`` (its static settings changed: re-split it before ``jit``).
  """
  if mode is not None and mode not in ("full", "sparse"):
    raise ValueError(f"mode: expected 'full', 'sparse' or None, got {mode!r}")
  for name, v in (("block_size", block_size), ("num_selected", num_selected)):
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
      raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
  layers = ssa_layers(model)
  if not layers:
    raise ValueError(
      f"model: expected a model with 'ssa' layers, got none in {type(model).__name__}"
    )
  for layer in layers:
    base = sparse_op_config(layer.config)
    cfg = layer.sparse_config
    kw = {}
    if block_size is not None:
      kw["block_size"] = block_size
      if base.cmp_window == base.cmp_stride == base.block_size:
        kw.update(cmp_window=block_size, cmp_stride=block_size)
    if num_selected is not None:
      kw["num_selected"] = num_selected
    layer.sparse_config = cfg.replace(**kw) if kw else cfg
    if mode is not None:
      layer.inference_mode = mode
  return model


__all__ = [
  "SSA",
  "SSAAlign",
  "SSAAttention",
  "SSAMode",
  "alignment_loss_terms",
  "alignment_terms",
  "draw_mode",
  "set_inference",
  "set_training",
  "smooth_l1",
  "sparse_op_config",
  "ssa_layers",
]
