"""Settings of the SSA layer kind (``"ssa"``): the ``model.ssa:`` section of a config YAML."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sparse_attention_jax.nn._config_io import checked_mapping

_BRANCHES = ("cmp", "slc", "win")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSAConfig:
  """Dual sparse/full training with bidirectional output alignment (docs/algorithms.md).

  Attributes:
    full_prob: probability p that a training step runs the residual stream through full
      attention (Bernoulli(p) per step, shared by all layers); 0.5 in SSA.
    align_weight: weight of the alignment loss, ``CE + align_weight * mean_layers(term1 +
      term2)``; 10 in SSA.
    inference_mode: ``"sparse"`` or ``"full"``: what an SSA layer computes outside training
      (overridable per model with :func:`sparse_attention_jax.nn.attention.ssa.set_inference`).
    branches: the NSA branches of the sparse path (``("slc",)`` = selection only, as SSA/MoBA);
      the rest of the sparse op's settings come from ``model.nsa``.
  """

  full_prob: float = 0.5
  align_weight: float = 10.0
  inference_mode: str = "sparse"
  branches: tuple[str, ...] = ("slc",)

  def __post_init__(self):
    def real(v):
      return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not real(self.full_prob) or not 0 <= self.full_prob <= 1:
      raise ValueError(f"model.ssa.full_prob: expected a number in [0, 1], got {self.full_prob!r}")
    if not real(self.align_weight) or self.align_weight < 0:
      raise ValueError(f"model.ssa.align_weight: expected a number >= 0, got {self.align_weight!r}")
    if self.inference_mode not in ("sparse", "full"):
      raise ValueError(
        f"model.ssa.inference_mode: expected 'sparse' or 'full', got {self.inference_mode!r}"
      )
    b = self.branches
    if (
      not isinstance(b, tuple)
      or not b
      or len(set(b)) != len(b)
      or not all(x in _BRANCHES for x in b)
    ):
      raise ValueError(
        f"model.ssa.branches: expected a non-empty tuple of distinct names from "
        f"{_BRANCHES}, got {b!r}"
      )

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> SSAConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    d = checked_mapping("model.ssa", d, cls)
    if "branches" in d:
      b = d["branches"]
      d["branches"] = (b,) if isinstance(b, str) else tuple(b)
    for name in ("full_prob", "align_weight"):
      if isinstance(d.get(name), str):
        try:
          d[name] = float(d[name])
        except ValueError:
          raise ValueError(f"model.ssa.{name}: expected a number, got {d[name]!r}") from None
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "branches": list(self.branches)}


__all__ = ["SSAConfig"]
