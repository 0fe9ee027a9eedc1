"""Model training FLOPs per token.

Training FLOPs per token of a :class:`ModelConfig` at sequence length ``T``::

  flops_per_token = 6 * N_matmul  +  6 * P_phi / d  +  sum over layers of attn(kind)

* ``N_matmul``: parameters used in a matmul once per token: every >= 2-D parameter except the
  embedding table (a lookup) and the NSA compressors phi; with tied embeddings the table is the
  output head and counts once. 6 = 2 (multiply-add) x 3 (forward + backward).
* ``P_phi``: weights (``w1``, ``w2``) of the learnable compressors phi_k, phi_v: applied once per
  compressed token (every ``d = cmp_stride`` tokens), hence ``/ d``.
* ``attn(kind)``: the layer kind's registry entry (``AttentionKind.train_flops``, defined next to
  the layer in :mod:`sparse_attention_jax.nn.attention`, whose module docstrings give the
  formulas). The built-in kinds count ``6 * HQ * sum_branches keys_b * (Dk + Dv_b)``: per query
  head, a visited key costs ``2 * Dk`` (q.k) + ``2 * Dv`` (p.v) forward, x 3 for training, with
  the average keys a query visits (causal, queries spread uniformly over ``0..T-1``): ``full``
  ``T / 2``; ``swa`` / ``asa_local`` ``min(w, T / 2)``; NSA's ``cmp`` ``T / (2 d)``, ``slc``
  ``min(n * l', T / 2)``, ``win`` ``min(w, T / 2)``.

Element-wise work (norms, softmax, RoPE, gates) is not counted, as in the usual 6N convention.

Example::

  cfg = load_model_config("configs/nsa_340m.yaml")
  f = flops_per_token(cfg, 8192)                     # FLOPs per trained token
"""

from __future__ import annotations

import jax
from flax import nnx

from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.model import DecoderLM
from sparse_attention_jax.nn.registry import get_attention_kind

_COMPRESSOR_WEIGHTS = frozenset({"w1", "w2"})


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_split(config: ModelConfig) -> tuple[int, int]:
  """``(N_matmul, P_phi)`` of ``DecoderLM(config)`` from its abstract parameters (no memory)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  n_matmul, p_phi = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
    names = _names(path)
    size = 1
    for s in leaf.shape:
      size *= s
    if any(n.startswith("phi_") for n in names):
      p_phi += size if _COMPRESSOR_WEIGHTS & set(names) else 0  # Not `pos`, `b1`, `b2`.
      continue
    if "embed" in names and not config.tie_embeddings:
      continue  # A lookup, not a matmul (the untied head is `lm_head`).
    if len(leaf.shape) >= 2:
      n_matmul += size
  return n_matmul, p_phi


def attention_flops_per_token(config: ModelConfig, kind: str, seq_len: int) -> float:
  """Training FLOPs per token of one attention layer of ``kind`` (the ``attn`` term above).

  Raises:
    ValueError: naming the kind and the registered kinds when ``kind`` is unknown, or naming the
      kind when it registers no ``train_flops``.
  """
  return get_attention_kind(kind).flops(config, seq_len)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model training FLOPs per token (forward + backward) at ``seq_len``; see the module doc."""
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
  n_matmul, p_phi = param_split(config)
  total = 6.0 * n_matmul + 6.0 * p_phi / config.nsa.cmp_stride
  for kind in config.layer_kinds():
    total += attention_flops_per_token(config, kind, seq_len)
  return total


__all__ = ["attention_flops_per_token", "flops_per_token", "param_split"]
