"""A Llama-like decoder LM whose attention kind is chosen per layer (see ``ModelConfig.attention``).

``tokens [B, T]`` -> embedding -> ``num_layers`` x pre-norm block -> RMSNorm -> logits ``[B, T, V]``
(float32), with the output projection either separate or tied to the embedding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.inputs import check_tokens
from sparse_attention_jax.nn.layers import Embed, RMSNorm, SwiGLU, as_dtype, projection
from sparse_attention_jax.nn.parallel import constrain_batch
from sparse_attention_jax.nn.registry import ATTENTION_KINDS, get_attention_kind

# ``model.remat`` -> checkpoint policy of each decoder block (None = save nothing: recompute all).
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _block(layer, x, positions, segment_ids):
  return layer(x, positions, segment_ids)


def _scan_runs(layers) -> list[tuple[int, int, object]]:
  """``(start, stop, graphdef)`` of every maximal run of >= 2 consecutive layers that share one
  graph structure (same kind and config) and hold only :class:`nnx.Param` state (layers with
  other variables, e.g. SSA's mode and alignment terms, are called one by one)."""
  runs, i = [], 0
  keys = []
  for layer in layers:
    graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
    keys.append(graphdef if not jax.tree.leaves(rest) else None)
  while i < len(layers):
    j = i + 1
    while keys[i] is not None and j < len(layers) and keys[j] == keys[i]:
      j += 1
    if j - i >= 2:
      runs.append((i, j, keys[i]))
    i = j
  return runs


def _scan_blocks(graphdef, layers, x, positions, segment_ids, policy, unroll=1):
  """``x`` through ``layers`` (one graph structure, Param state only) with one ``lax.scan`` over
  their parameters stacked on a new leading axis: the block is traced and compiled once instead
  of once per layer. The stacking copies the run's parameters once per call (and its transpose
  splits the gradients); the model's parameters and checkpoints keep their per-layer layout."""
  stacked = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[nnx.state(layer, nnx.Param) for layer in layers]
  )

  def body(x, params):
    return constrain_batch(_block(nnx.merge(graphdef, params), x, positions, segment_ids))

  if policy is not False:
    body = jax.checkpoint(body, policy=policy)
  x, _ = jax.lax.scan(
    lambda x, params: (body(x, params), None), x, stacked, unroll=min(unroll, len(layers))
  )
  return x


class DecoderBlock(nnx.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    c = config
    self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype)
    self.attn = get_attention_kind(kind)(c, rngs=rngs)
    self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype)
    self.mlp = SwiGLU(c.d_model, c.mlp_dim, dtype=c.dtype, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None):
    """``x [B, T, d_model]`` -> ``[B, T, d_model]`` in the compute dtype."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids).astype(x.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)


class DecoderLM(nnx.Module):
  """Decoder-only LM.

  Under a mesh with logical axis rules (see :mod:`sparse_attention_jax.nn.parallel`) the
  residual stream is constrained to be batch-sharded after the embedding and every block, and
  each block is rematerialized in the backward pass as ``config.remat`` says. With
  ``config.scan_layers``, every run of consecutive layers of one structure is applied by one
  ``lax.scan`` (see :func:`_scan_blocks`): same math, one traced block per run.

  Attributes:
    embed: token embedding ``[V, d_model]``.
    layers: ``nnx.List`` of :class:`DecoderBlock`, layer ``i`` of kind ``config.layer_kinds()[i]``.
    final_norm: RMSNorm before the output projection.
    lm_head: ``[d_model, V]`` output projection, or None when ``config.tie_embeddings``.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    kinds = config.layer_kinds()
    unknown = sorted({k for k in kinds if k not in ATTENTION_KINDS})
    if unknown:
      raise ValueError(
        f"model.attention: expected kinds from the registered "
        f"{sorted(ATTENTION_KINDS)}, got unknown {unknown}"
      )
    self.config = config
    c = config
    self.embed = Embed(c.vocab_size, c.d_model, dtype=c.dtype, rngs=rngs)
    self.layers = nnx.List([DecoderBlock(c, kind, rngs=rngs) for kind in kinds])
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype)
    self.lm_head = (
      None
      if c.tie_embeddings
      else projection(
        "btd,dv->btv",
        (c.d_model, c.vocab_size),
        in_axes=0,
        out_axes=1,
        dtype=as_dtype(c.dtype),
        rngs=rngs,
        preferred_element_type=jnp.float32,
        names=("embed", "vocab"),
      )
    )

  def __call__(self, tokens, positions=None, segment_ids=None):
    """Next-token logits.

    Args:
      tokens: ``[B, T]`` int32 token ids.
      positions: ``[B, T]`` int32 RoPE positions; default ``arange(T)`` for every row (packed
        documents should pass positions restarting at 0 per document).
      segment_ids: ``[B, T]`` int32 document ids of packed sequences (no attention across
        documents), or None.

    Returns:
      ``[B, T, V]`` float32 logits.

    Raises:
      ValueError: ``tokens`` is not a rank-2 integer array with ``B >= 1`` and ``T >= 1``, or,
        when it is concrete (called outside ``jit``), holds ids outside ``[0, vocab_size)``
        (those would give NaN logits or wrap around). Under ``jit`` the ids are not checked:
        use :func:`~sparse_attention_jax.nn.inputs.check_token_ids` with ``checkify``.
    """
    check_tokens(tokens, self.config.vocab_size)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = constrain_batch(self.embed(tokens))
    block = _block
    if self.config.remat != "none":
      block = nnx.remat(_block, policy=_REMAT_POLICIES[self.config.remat])
    layers = list(self.layers)
    runs = _scan_runs(layers) if self.config.scan_layers else []
    i = 0
    for start, stop, graphdef in [*runs, (len(layers), len(layers), None)]:
      for layer in layers[i:start]:
        x = constrain_batch(block(layer, x, positions, segment_ids))
      if stop > start:
        policy = False if self.config.remat == "none" else _REMAT_POLICIES[self.config.remat]
        x = _scan_blocks(
          graphdef, layers[start:stop], x, positions, segment_ids, policy, self.config.scan_unroll
        )
      i = stop
    x = self.final_norm(x)
    if self.lm_head is None:
      return self.embed.attend(x)
    return self.lm_head(x).astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  """Number of scalar elements in the model's :class:`nnx.Param` s (works on abstract models)."""
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def param_count(config: ModelConfig) -> int:
  """Parameter count of ``DecoderLM(config)`` without allocating its weights (shape evaluation)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  return count_params(abstract)


__all__ = ["DecoderBlock", "DecoderLM", "count_params", "param_count"]
