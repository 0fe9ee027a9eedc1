"""``benchmarks/decode.py --tiny --kinds nosa,nosa_offload`` on CPU (no grain): both rows decode,
the offloaded row (the default kernel copy, interpreted) reports its transfers and keeps less on
the device than the resident NOSA state, whose bytes are checked; ``--offload-copy xla
--offload-chunk 8`` runs; flags of retired modes are refused."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import load_script


def test_decode_benchmark_nosa_kinds_smoke(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "grain", None)
  bench = load_script("benchmarks/decode.py", "bench_decode_nosa")
  common = ["--tiny", "--batch", "2", "--context", "37", "--steps", "2", "--warmup", "1"]
  rc = bench.main(
    [*common, "--kinds", "nosa,nosa_offload", "--report-fit", "--host-pool", "3"]
    + ["--out", str(tmp_path)]
  )
  assert rc == 0
  rows = {r["kind"]: r for r in json.loads((tmp_path / "decode.json").read_text())["rows"]}
  assert set(rows) == {"nosa", "nosa_offload"}
  assert all(r["lengths_ok"] and r["tokens_per_s"] > 0 for r in rows.values())
  off = rows["nosa_offload"]
  assert off["host_memory_kind"] == "pinned_host" and off["slots"] == 4 and off["copy"] == "kernel"
  assert 0 <= off["hit_rate"] <= 1 and off["blocks_per_step"] >= 0  # steady state may hit all
  assert off["bytes_per_step"] == off["blocks_per_step"] * 8 * ((16 + 16) * 4 + 4)
  assert set(off["host_ms_per_step"]) == {"wait", "dispatch"}
  # Resident NOSA state of the tiny model (capacity 40, H=2, Dk=Dv=16, l=8, d=4, l'=8), 2 layers:
  # K, V (4 B) and c (f32) linear + rings of l keys and c + 9 compressed keys + 5 block scores.
  per_row = (40 * 2 * (16 + 16 + 1) + 8 * 2 * (16 + 1) + 9 * 2 * 16 + 2 * 5) * 4
  assert rows["nosa"]["resident_cache_bytes"] == 2 * 2 * per_row + 2 * 4 + 4
  assert off["resident_cache_bytes"] == rows["nosa"]["resident_cache_bytes"]
  assert off["state_bytes"] < rows["nosa"]["state_bytes"]
  rc = bench.main(
    [*common, "--kinds", "nosa_offload", "--offload-copy", "xla", "--offload-chunk", "8"]
    + ["--out", str(tmp_path)]
  )
  assert rc == 0
  row = json.loads((tmp_path / "decode.json").read_text())["rows"][0]
  assert row["chunk"] == 8 and row["copy"] == "xla" and row["lengths_ok"]
  for flag in ("--offload-store", "--offload-plan", "--offload-transfer"):
    with pytest.raises(SystemExit):
      bench.main(["--tiny", "--kinds", "nosa_offload", flag, "x", "--out", str(tmp_path)])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.main(["--tiny", "--kinds", "nosa_offload", "--offload-chunk", "0"])
  assert "--offload-chunk: expected a positive int, got 0" in capsys.readouterr().err
