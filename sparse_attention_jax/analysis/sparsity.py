"""Attention-sparsity metrics from dense causal softmax probabilities (SSA's sparsity analysis).

For every layer the queries and keys are recomputed from the layer's own projections, as its
kind's registry entry (``AttentionKind.qk``) says (``full``, ``swa``, ``nsa``, ``ssa`` and
``nosa`` layers; an NSA layer uses its selection keys ``k_slc`` when it has independent ones,
else ``k_cmp``; kinds without plain q/k are skipped) and the *dense* causal attention
``P = softmax(q k^T * scale)`` is formed, whatever the layer computes itself, so the numbers say
how concentrated full attention would be:

* ``topk_mass[k]``: mass of the k largest probabilities of a query row (1 when the row has
  at most k keys), averaged over query rows and heads;
* ``block_mass[k]``: mass of the k heaviest key blocks of ``block_size`` tokens (blocks by key
  index from the row start);
* ``entropy``: ``-sum_j P log P`` in nats, averaged over rows;
* ``sink_mass``: mass on the first ``sink`` tokens of the query's document (by position),
  averaged over queries at position ``>= sink``.

Example::

  stats = model_attention_stats(model, tokens, ks=(1, 4, 16), block_size=16, sink=4)
  stats["layers"][0]["topk_mass"][4]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.nn.registry import ATTENTION_KINDS, get_attention_kind
from sparse_attention_jax.ops.documents import same_document


def attention_probs(
  q: jax.Array, k: jax.Array, segment_ids: jax.Array | None = None, scale: float | None = None
) -> jax.Array:
  """Dense causal softmax probabilities ``[B, HQ, T, T]`` float32.

  Args:
    q: ``[B, T, HQ, Dk]``.
    k: ``[B, T, H, Dk]`` (GQA: query head ``h*G + g`` reads KV head ``h``).
    segment_ids: ``[B, T]`` document ids (no attention across documents) or None.
    scale: softmax scale; default ``Dk ** -0.5``.
  """
  b, t, hq, dk = q.shape
  if k.ndim != 4 or k.shape[0] != b or k.shape[1] != t or k.shape[3] != dk or hq % k.shape[2]:
    raise ValueError(
      f"k: expected [B={b}, T={t}, H, Dk={dk}] with H dividing HQ={hq}, got {k.shape}"
    )
  g = hq // k.shape[2]
  scale = dk**-0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, t, k.shape[2], g, dk)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)).reshape(b, hq, t, t) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is not None:
    mask = mask & same_document(segment_ids)
  s = jnp.where(mask[:, None], s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1)


def sparsity_metrics(
  probs: jax.Array,
  *,
  ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
  block_size: int = 16,
  block_ks: Sequence[int] = (1, 2, 4, 8, 16),
  sink: int = 4,
  positions: jax.Array | None = None,
) -> dict:
  """Top-k, top-k-block, entropy and sink metrics of attention rows.

  Args:
    probs: ``[B, HQ, T, T]`` rows summing to 1 over the keys (0 where masked).
    ks: k values of ``topk_mass``.
    block_size: key block size of ``block_mass`` (blocks of ``block_size`` document positions,
      restarting at every document).
    block_ks: k values of ``block_mass``.
    sink: the first ``sink`` tokens of each document count as the sink.
    positions: ``[B, T]`` positions within the document (default ``arange(T)``).

  Returns:
    ``{"topk_mass": {k: float}, "block_mass": {k: float}, "entropy": float, "sink_mass":
    float}`` (``sink_mass`` is nan when no query sits at position ``>= sink``).
  """
  if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
    raise ValueError(f"probs: expected [B, HQ, T, T], got shape {probs.shape}")
  for name, v in (("block_size", block_size), ("sink", sink)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}: expected a positive int, got {v!r}")
  b, _, t, _ = probs.shape
  p = probs.astype(jnp.float32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  csum = jnp.cumsum(-jnp.sort(-p, axis=-1), axis=-1)  # [B, HQ, T, T]
  topk = {int(k): float(jnp.mean(csum[..., min(int(k), t) - 1])) for k in ks}
  nb = -(-t // block_size)
  # Key blocks follow each key's document position, so blocks restart at every document (the
  # selection's document-relative blocks); a row's mass lies in its own document only.
  key_block = positions // block_size  # [B, T]
  onehot = (key_block[:, :, None] == jnp.arange(nb)).astype(jnp.float32)  # [B, S, NB]
  blocks = jnp.einsum("bhts,bsj->bhtj", p, onehot, precision=jax.lax.Precision.HIGHEST)
  bsum = jnp.cumsum(-jnp.sort(-blocks, axis=-1), axis=-1)
  block = {int(k): float(jnp.mean(bsum[..., min(int(k), nb) - 1])) for k in block_ks}
  entropy = float(
    jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
  )
  is_sink = (positions < sink)[:, None, None, :]  # keys [B, 1, 1, T]
  sink_rows = jnp.sum(jnp.where(is_sink, p, 0.0), axis=-1)  # [B, HQ, T]
  queries = jnp.broadcast_to((positions >= sink)[:, None, :], sink_rows.shape)
  n = jnp.sum(queries)
  sink_mass = float(jnp.sum(jnp.where(queries, sink_rows, 0.0)) / n) if int(n) else float("nan")
  return {"topk_mass": topk, "block_mass": block, "entropy": entropy, "sink_mass": sink_mass}


def layer_qk(attn: nnx.Module, x: jax.Array, positions: jax.Array, kind: str | None = None):
  """``(q [B, T, HQ, Dk], k [B, T, H, Dk])`` of an attention layer on its input ``x``, or None
  for kinds without plain RoPE'd q/k (e.g. the latent ASA kinds).

  The q/k come from the kind's registry entry (``AttentionKind.qk``); ``kind`` names it, or the
  entry whose module is ``type(attn)`` is used.
  """
  r = layer_probe(attn, x, positions, kind)
  return None if r is None else (r.q, r.k)


def layer_probe(attn: nnx.Module, x: jax.Array, positions: jax.Array, kind: str | None = None):
  """The :class:`~sparse_attention_jax.nn.attention.LayerQK` (q, k and eviction scores ``c`` or
  None) the kind of ``attn`` exposes to the analysis, or None when it exposes none."""
  entry = get_attention_kind(kind) if kind is not None else _entry_of(attn)
  return None if entry.qk is None else entry.qk(attn, x, positions)


def _entry_of(attn: nnx.Module):
  for entry in ATTENTION_KINDS.values():
    if type(attn) is entry.module:
      return entry
  raise ValueError(
    f"attn: expected a layer of a registered attention kind {sorted(ATTENTION_KINDS)}, got "
    f"{type(attn).__qualname__}"
  )


def model_attention_stats(
  model: nnx.Module,
  tokens: jax.Array,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  **metric_kw,
) -> dict:
  """Per-layer :func:`sparsity_metrics` of a ``DecoderLM`` on ``tokens [B, T]``.

  The residual stream runs through the model as usual (each layer's own attention); at every
  layer the dense probabilities of its q/k are measured. ``metric_kw`` goes to
  :func:`sparsity_metrics`.

  Returns:
    ``{"layers": [{"layer": i, "kind": str, **metrics} | {"layer": i, "kind": str,
    "skipped": reason}]}``.
  """
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed(tokens)
  out = []
  for i, block in enumerate(model.layers):
    qk = layer_qk(block.attn, block.attn_norm(x), positions, block.kind)
    if qk is None:
      out.append({"layer": i, "kind": block.kind, "skipped": "no plain q/k projections"})
    else:
      probs = attention_probs(*qk, segment_ids=segment_ids)
      out.append(
        {
          "layer": i,
          "kind": block.kind,
          **sparsity_metrics(probs, positions=positions, **metric_kw),
        }
      )
    x = block(x, positions, segment_ids)
  return {"layers": out}


def mean_over_batches(per_batch: list[dict]) -> dict:
  """One :func:`model_attention_stats` result whose metrics are the means over ``per_batch``
  (results of the same model on several batches; skipped layers kept as they are)."""
  stats = copy.deepcopy(per_batch[0])
  for i, layer in enumerate(stats["layers"]):
    if "skipped" in layer:
      continue
    rows = [p["layers"][i] for p in per_batch]
    layer["entropy"] = float(np.mean([r["entropy"] for r in rows]))
    layer["sink_mass"] = float(np.mean([r["sink_mass"] for r in rows]))
    for key in ("topk_mass", "block_mass"):
      layer[key] = {k: float(np.mean([r[key][k] for r in rows])) for k in layer[key]}
  return stats


def mean_over_layers(stats: dict) -> dict:
  """Layer means of the scalar metrics of :func:`model_attention_stats` (skipped layers left
  out)."""
  layers = [s for s in stats["layers"] if "skipped" not in s]
  if not layers:
    return {}
  return {
    "entropy": float(np.mean([s["entropy"] for s in layers])),
    "sink_mass": float(np.mean([s["sink_mass"] for s in layers])),
    "topk_mass": {
      k: float(np.mean([s["topk_mass"][k] for s in layers])) for k in layers[0]["topk_mass"]
    },
    "block_mass": {
      k: float(np.mean([s["block_mass"][k] for s in layers])) for k in layers[0]["block_mass"]
    },
  }


__all__ = [
  "attention_probs",
  "layer_probe",
  "mean_over_batches",
  "layer_qk",
  "mean_over_layers",
  "model_attention_stats",
  "sparsity_metrics",
]
