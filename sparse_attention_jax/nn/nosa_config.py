"""Settings of the NOSA layer kind (``"nosa"``): the ``model.nosa:`` section of a config YAML."""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attention_jax.nn._config_io import checked_mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class NOSAConfig:
  """NOSA's query-aware budget (docs/algorithms.md); the rest comes from ``model.nsa``.

  ``model.nsa`` supplies the InfLLM-V2 scoring (mean-pooled keys, l, d, l', max pooling), the
  forced init/local blocks and the total budget ``k = num_selected``.

  Attributes:
    query_selected: k_q, blocks chosen by the query-aware score, forced blocks included
      (``QK_SELECT``; 33 = 1 init + 17 local + 15 free in NOSA's release). The remaining
      ``k - k_q`` blocks come from the query-agnostic eviction scores. Must satisfy
      ``num_init_blocks + num_local_blocks <= k_q <= num_selected``.
  """

  query_selected: int = 33

  def __post_init__(self):
    v = self.query_selected
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"model.nosa.query_selected: expected a positive int, got {v!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> NOSAConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    return cls(**checked_mapping("model.nosa", d, cls))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


__all__ = ["NOSAConfig"]
