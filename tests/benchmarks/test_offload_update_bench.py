"""CPU smoke test of ``benchmarks/offload_update_cpu.py`` (small shape, both block copies: the
same selections move the same blocks; bad arguments are refused)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def test_step_rows_per_copy(tmp_path, capsys):
  mod = load_script("benchmarks/offload_update_cpu.py")
  argv = ["--batch", "2", "--blocks", "80", "--churn", "8", "--steps", "2", "--pool", "16"]
  argv += ["--chunk", "16", "--copies", "kernel,xla", "--out", str(tmp_path)]
  assert mod.main(argv) == 0
  data = json.loads((tmp_path / "offload_update_cpu.json").read_text())
  rows = {r["row"]: r for r in data["rows"]}
  assert list(rows) == ["plan", "step kernel", "step xla"]
  assert rows["plan"]["ms"] > 0 and data["meta"]["chunk"] == 16
  moved = {rows[name]["blocks_per_step"] for name in ("step kernel", "step xla")}
  assert len(moved) == 1 and 0 < moved.pop() <= 32  # same selections; 2 x 2 rows swap <= 8
  assert all(rows[name]["ms"] > 0 for name in rows)
  assert "blocks/step" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    mod.main([*argv[:-4], "--copies", "kernel,dma", "--out", str(tmp_path)])
  assert "--copies: expected comma-separated names from ('kernel', 'xla')" in (
    capsys.readouterr().err
  )
  with pytest.raises(SystemExit):
    mod.main(["--batch", "0", "--out", str(tmp_path)])
  assert "--batch: expected a positive int, got 0" in capsys.readouterr().err
