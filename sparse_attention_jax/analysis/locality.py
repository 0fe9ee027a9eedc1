"""Per-layer selection locality of NSA, InfLLM-V2-style and NOSA selection on the same inputs.

For every layer whose kind exposes plain RoPE'd q/k to the analysis (``AttentionKind.qk``:
``full``, ``swa``, ``nsa``, ``ssa``, ``nosa``) the layer's own q/k on the model's residual
stream are scored three ways, all with the block size, compression (mean-pooled keys), forced
blocks and total budget ``k`` of ``model.nsa``:

* ``nsa``: NSA eq. 9 overlap-weighted sum pooling, exact top-k;
* ``infllm_v2``: max pooling (InfLLM-V2), exact top-k;
* ``nosa``: max pooling, top-``k_q`` query-aware ∪ the best remaining blocks by the
  query-agnostic eviction scores. Layers whose kind exposes eviction scores (``nosa``) use
  theirs; the others use ``c = 0`` (flagged ``"eviction": "none"``: the agnostic part then is
  the lowest-index blocks).

Steps ``t`` whose query starts a new document are left out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.analysis.sparsity import layer_probe
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops.locality import selection_locality
from sparse_attention_jax.ops.nosa import nosa_scores
from sparse_attention_jax.ops.nosa import selection as nosa_selection
from sparse_attention_jax.ops.selection import select_blocks

METHODS = ("nsa", "infllm_v2", "nosa")


def selection_budgets(
  config, num_selected: int | None = None, num_query_selected: int | None = None
) -> tuple[NSAConfig, int]:
  """``(NSAConfig, k_q)`` of the comparison: ``model.nsa`` with mean compression and
  ``num_selected`` (k) if given; ``k_q`` from the argument, ``model.nosa`` or half of the
  non-forced budget."""
  nsa = config.nsa.replace(compression="mean")
  if num_selected is not None:
    nsa = nsa.replace(num_selected=num_selected)
  forced = nsa.num_init_blocks + nsa.num_local_blocks
  if num_query_selected is None:
    num_query_selected = (
      config.nosa.query_selected
      if config.nosa is not None
      else forced + (nsa.num_selected - forced) // 2
    )
  nosa_selection.check_budget(nsa, num_query_selected)
  return nsa, num_query_selected


@functools.partial(jax.jit, static_argnums=(3, 4))
def layer_selections(q, k, c, nsa: NSAConfig, kq: int, segment_ids=None) -> dict:
  """``{method: [B, T, H, k] block ids}`` of one layer's ``q [B,T,HQ,Dk]``, ``k [B,T,H,Dk]`` and
  eviction scores ``c [B, T, H]``."""
  t = q.shape[1]
  cfg, kq = nosa_selection.for_length(nsa, kq, t)
  out = {}
  for method, pooling in (("nsa", "sum"), ("infllm_v2", "max")):
    m_cfg = cfg.replace(score_pooling=pooling)
    s_q, _ = nosa_scores(q, k, c, m_cfg, segment_ids=segment_ids)
    out[method] = select_blocks(s_q, m_cfg, segment_ids=segment_ids)
  s_q, s_a = nosa_scores(q, k, c, cfg.replace(score_pooling="max"), segment_ids=segment_ids)
  out["nosa"] = nosa_selection.nosa_select(
    s_q, s_a, cfg.replace(score_pooling="max"), num_query_selected=kq, segment_ids=segment_ids
  )
  return out


def _summary(block_indices, keep) -> dict:
  gamma, new = selection_locality(block_indices)
  keep = jnp.broadcast_to(keep[:, :, None], gamma.shape)
  g = np.asarray(gamma)[np.asarray(keep)]
  n = np.asarray(new)[np.asarray(keep)]
  return {
    "mean": float(g.mean()),
    "min": float(g.min()),
    "p10": float(np.quantile(g, 0.1)),
    "new_blocks_per_step": float(n.mean()),
  }


def model_selection_locality(
  model: nnx.Module,
  tokens,
  positions=None,
  segment_ids=None,
  *,
  num_selected: int | None = None,
  num_query_selected: int | None = None,
) -> dict:
  """Locality ``gamma`` of the three selections at every layer of a ``DecoderLM``.

  Args:
    model: the model; its residual stream runs as usual (each layer's own attention).
    tokens: ``[B, T]`` int32; positions, segment_ids: ``[B, T]`` or None.
    num_selected, num_query_selected: override k and k_q (see :func:`selection_budgets`).

  Returns:
    ``{"k", "k_q", "bound_static_steps", "layers": [{"layer", "kind", "eviction", method:
    {"mean", "min", "p10", "new_blocks_per_step"}, ...} | {"layer", "kind", "skipped"}]}``;
    ``bound_static_steps = 1 - k_q / k`` is NOSA's derived lower bound of ``gamma`` on steps that
    stay in a block and see no new compressed token.
  """
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  nsa, kq = selection_budgets(model.config, num_selected, num_query_selected)
  keep = (
    jnp.ones((b, t - 1), bool)
    if segment_ids is None
    else (segment_ids[:, 1:] == segment_ids[:, :-1])
  )
  x = model.embed(tokens)
  layers = []
  for i, block in enumerate(model.layers):
    probe = layer_probe(block.attn, block.attn_norm(x), positions, block.kind)
    if probe is None:
      layers.append({"layer": i, "kind": block.kind, "skipped": "no plain q/k projections"})
      x = block(x, positions, segment_ids)
      continue
    q, k, c = probe
    source = "layer"
    if c is None:
      c, source = jnp.zeros(k.shape[:3], jnp.float32), "none"
    sel = layer_selections(q, k, c, nsa, kq, segment_ids)
    layers.append(
      {
        "layer": i,
        "kind": block.kind,
        "eviction": source,
        **{m: _summary(sel[m], keep) for m in METHODS},
      }
    )
    x = block(x, positions, segment_ids)
  return {
    "k": nsa.num_selected,
    "k_q": kq,
    "bound_static_steps": 1 - kq / nsa.num_selected,
    "layers": layers,
  }


def mean_over_batches(runs: list[dict]) -> dict:
  """One :func:`model_selection_locality` result whose numbers are the means over ``runs``
  (the same model on several batches; ``min`` is the minimum; skipped layers kept)."""
  out = dict(runs[0])
  layers = []
  for i, layer in enumerate(runs[0]["layers"]):
    if "skipped" in layer:
      layers.append(layer)
      continue
    row = dict(layer)
    for m in METHODS:
      vals = [r["layers"][i][m] for r in runs]
      row[m] = {
        key: min(v[key] for v in vals) if key == "min" else sum(v[key] for v in vals) / len(vals)
        for key in vals[0]
      }
    layers.append(row)
  out["layers"] = layers
  return out


__all__ = [
  "METHODS",
  "layer_selections",
  "mean_over_batches",
  "model_selection_locality",
  "selection_budgets",
]
