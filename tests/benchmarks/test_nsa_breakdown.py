"""CPU smoke test of ``benchmarks/nsa_breakdown.py`` (tiny shapes, packed documents)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_stage_runs_and_is_recorded(tmp_path, capsys):
  mod = load_script("benchmarks/nsa_breakdown.py")
  assert mod.main(["--tiny", "--docs", "2", "--out", str(tmp_path)]) == 0
  out = json.loads((tmp_path / "nsa_breakdown.json").read_text())
  assert out["meta"]["docs"] == 2 and out["meta"]["T"] == 256
  stages = {r["stage"]: r for r in out["rows"]}
  assert list(stages) == [
    "compress",
    "compressed",
    "select",
    "selected",
    "window auto",
    "window blocked",
    "nsa",
    "dense (cuDNN on GPU)",
  ]
  assert all("error" not in r and r["fwd_ms"] > 0 for r in stages.values())
  assert "fb_ms" not in stages["select"]  # no gradient through the selection
  assert all(r["fb_ms"] > 0 for n, r in stages.items() if n != "select")
  assert "window blocked" in capsys.readouterr().out
  with pytest.raises(SystemExit):  # 3 documents do not divide T = 256
    mod.main(["--tiny", "--docs", "3", "--out", str(tmp_path)])
  assert "--docs" in capsys.readouterr().err
