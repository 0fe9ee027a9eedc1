"""Sizes of latent attention (MLA / GLA) for the ASA layer kinds: the ``model.latent:`` section.

Notation (docs/algorithms.md): ``d_c`` = ``kv_rank`` (the cached KV latent), ``d_cq`` = ``q_rank``
(the low-rank query), ``d_R`` = ``rope_dim`` (the decoupled RoPE key, shared by all heads),
``nope_dim`` (per-head key/query part without RoPE), ``v_dim`` (per-head value dim) and ``g`` =
``groups`` (GLA latent heads, each ``d_c / g`` wide; ``g = 1`` is MLA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attention_jax.nn._config_io import checked_mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentConfig:
  """Latent-attention sizes shared by the ``asa_local`` (MLA) and ``asa_global`` (GLA) layers.

  Attributes:
    kv_rank: d_c, width of the KV latent ``c_kv = W_dkv x`` (what the cache stores, with
      ``rope_dim``). Must be divisible by ``groups``.
    q_rank: d_cq, width of the low-rank query latent ``c_q = W_dq x``.
    rope_dim: d_R, width of the decoupled RoPE query/key part (even); the RoPE key is one vector
      per token shared by all heads.
    nope_dim: per-head width of the non-RoPE query/key part (``W_uk`` output per head).
    v_dim: per-head value width (``W_uv`` output per head).
    groups: g, GLA latent heads of the global layer (``num_heads % groups == 0``); the local MLA
      layer always uses one latent head.
  """

  kv_rank: int = 256
  q_rank: int = 512
  rope_dim: int = 32
  nope_dim: int = 64
  v_dim: int = 64
  groups: int = 2

  def __post_init__(self):
    for name in ("kv_rank", "q_rank", "rope_dim", "nope_dim", "v_dim", "groups"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.latent.{name}: expected a positive int, got {v!r}")
    if self.rope_dim % 2:
      raise ValueError(
        f"model.latent.rope_dim: expected an even int (RoPE rotates pairs), got {self.rope_dim}"
      )
    if self.kv_rank % self.groups:
      raise ValueError(
        f"model.latent.groups: expected a divisor of kv_rank={self.kv_rank}, got {self.groups}"
      )

  @property
  def group_rank(self) -> int:
    """Width ``d_c / g`` of one GLA latent head."""
    return self.kv_rank // self.groups

  @property
  def qk_dim(self) -> int:
    """Per-head query/key width of the training form, ``nope_dim + rope_dim``."""
    return self.nope_dim + self.rope_dim

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LatentConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    return cls(**checked_mapping("model.latent", d, cls))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


__all__ = ["LatentConfig"]
