"""CPU smoke test of ``benchmarks/offload_update_cpu.py`` (small shape, 1 and 2 load workers,
fresh and staged transfers; the pinned_array store with the device plan)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def _rows(mod, argv, out):
  """Runs the benchmark (exit status 0) and returns its JSON rows by name."""
  assert mod.main(argv) == 0
  return {r["row"]: r for r in json.loads((out / "offload_update_cpu.json").read_text())["rows"]}


def test_update_rows_per_store_and_worker_count(tmp_path, capsys):
  mod = load_script("benchmarks/offload_update_cpu.py")
  argv = [
    "--batch",
    "2",
    "--blocks",
    "80",
    "--churn",
    "8",
    "--steps",
    "2",
    "--pool",
    "16",
    "--load-workers",
    "1,2",
    "--transfers",
    "fresh,staged",
    "--out",
    str(tmp_path),
  ]
  rows = _rows(mod, argv, tmp_path)
  assert list(rows) == [
    "bookkeeping loop",
    "bookkeeping vectorized",
    "update numpy, 1 worker",
    "update numpy, 2 workers",
    "update numpy staged, 1 worker",
    "update numpy staged, 2 workers",
    "update pinned_host, 1 worker",
  ]
  assert rows["update numpy staged, 2 workers"]["transfer"] == "staged"
  moved = {rows[name]["blocks_per_step"] for name in list(rows)[2:]}
  assert len(moved) == 1 and 0 < moved.pop() <= 32  # same selections; 2 x 2 rows swap <= 8
  for name in list(rows)[2:]:
    r = rows[name]
    assert r["ms"] > 0
    assert r["load_ms"] > 0 and r["gather_ms"] > 0 and r["put_ms"] > 0
  assert "load ms" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    mod.main([*argv[:-4], "--load-workers", "0", "--out", str(tmp_path)])
  assert "--load-workers" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mod.main([*argv[:-2], "--transfers", "fresh,pinned", "--out", str(tmp_path)])
  assert "--transfers: expected comma-separated names from ('fresh', 'staged')" in (
    capsys.readouterr().err
  )


def test_pinned_array_rows_with_the_device_plan(tmp_path, capsys):
  mod = load_script("benchmarks/offload_update_cpu.py")
  argv = [
    "--batch",
    "2",
    "--blocks",
    "80",
    "--churn",
    "8",
    "--steps",
    "1",
    "--pool",
    "16",
    "--stores",
    "pinned_array",
    "--plans",
    "device",
    "--out",
    str(tmp_path),
  ]
  rows = _rows(mod, argv, tmp_path)
  assert list(rows) == [
    "bookkeeping loop",
    "bookkeeping vectorized",
    "bookkeeping device",
    "update pinned_array plan device, 1 worker",
  ]
  device = rows["update pinned_array plan device, 1 worker"]
  assert device["plan"] == "device" and 0 < device["blocks_per_step"] <= 32
  assert device["gather_ms"] == 0 and device["put_ms"] > 0 and rows["bookkeeping device"]["ms"] > 0
  with pytest.raises(SystemExit):
    mod.main([*argv[:-6], "--plans", "host,device", "--out", str(tmp_path)])
  assert "--plans: expected 'host' only without pinned_array in --stores" in (
    capsys.readouterr().err
  )
