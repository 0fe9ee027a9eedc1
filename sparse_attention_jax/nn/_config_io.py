"""Reading config dataclasses from plain data (YAML): the checks every ``from_dict`` shares."""

from __future__ import annotations

import dataclasses
from typing import Any


def checked_mapping(section: str, d: Any, cls: type) -> dict[str, Any]:
  """A copy of ``d`` after checking that it is a mapping whose keys are fields of dataclass ``cls``.

  Args:
    section: the config path used in error messages (``"model"``, ``"model.ssa"``, ``"train"``).
    d: the data read from YAML.
    cls: the dataclass the data is for.
  """
  if not isinstance(d, dict):
    raise ValueError(f"{section}: expected a mapping, got {type(d).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{section}: unknown keys {unknown}; known keys are {sorted(known)}")
  return dict(d)
