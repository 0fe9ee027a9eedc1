"""CPU smoke test of ``benchmarks/offload_load.py`` (tiny cache, 1 and 2 load workers)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def test_loads_are_measured_for_each_worker_count(tmp_path, capsys):
  mod = load_script("benchmarks/offload_load.py")
  argv = ["--batch", "2", "--context", "1024", "--slots", "7", "--workers", "1,2", "--steps", "2",
          "--warmup", "1", "--out", str(tmp_path)]
  assert mod.main(argv) == 0
  out = json.loads((tmp_path / "offload_load.json").read_text())
  assert [r["workers"] for r in out["rows"]] == [1, 2]
  for r in out["rows"]:
    # Fresh random selections of 7 of 15 candidate blocks: most of the 2 x 2 x 7 blocks load.
    assert 0 < r["blocks"] <= 28 and r["bytes"] == r["blocks"] * 64 * (128 * 2 + 4)
    assert r["ms_per_load"] > 0 and r["load_ms"] > 0 and r["gb_per_s"] > 0
  assert "GB/s" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    mod.main([*argv[:-2], "--workers", "0", "--out", str(tmp_path)])
  assert "--workers" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mod.main(["--context", "512", "--slots", "63", "--out", str(tmp_path)])
  assert "--context" in capsys.readouterr().err
