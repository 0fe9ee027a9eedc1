"""CPU smoke test of ``benchmarks/compile_time.py`` (tiny config, both layer modes, executed)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_both_modes_compile_run_and_are_recorded(tmp_path, capsys):
  mod = load_script("benchmarks/compile_time.py")
  argv = [
    "--config",
    os.path.join(ROOT, "configs", "tiny.yaml"),
    "--seq-len",
    "64",
    "--dtype",
    "float32",
    "--execute",
    "--out",
    str(tmp_path),
  ]
  assert mod.main(argv) == 0
  out = json.loads((tmp_path / "compile_time.json").read_text())
  assert out["meta"]["seq_len"] == 64 and out["meta"]["kinds"] == ["nsa"]
  assert out["meta"]["remat"] == "none"
  unrolled, scanned = out["rows"]
  assert (unrolled["scan_layers"], scanned["scan_layers"]) == (False, True)
  for row in out["rows"]:
    assert row["compile_s"] > 0 and row["first_run_s"] > 0 and row["second_run_s"] > 0
  assert scanned["hlo_chars"] < unrolled["hlo_chars"]  # tiny.yaml: 2 NSA layers, 1 scan
  assert "unrolled" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    mod.main([*argv[:2], "--seq-len", "0"])
  assert "--seq-len" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mod.main([*argv[:2], "--modes", "scan,rolled"])
  assert "--modes" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mod.main([*argv[:2], "--modes", "scan0"])
  assert "--modes" in capsys.readouterr().err
  # One mode per process (a fair first-run time): its own file.
  assert (
    mod.main(
      [
        *argv[:4],
        "--dtype",
        "float32",
        "--modes",
        "scan2",
        "--remat",
        "dots",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  only = json.loads((tmp_path / "compile_time_scan2.json").read_text())
  assert only["meta"]["remat"] == "dots"
  assert [(r["mode"], r["scan_layers"], r["scan_unroll"]) for r in only["rows"]] == [
    ("scan2", True, 2)
  ]
