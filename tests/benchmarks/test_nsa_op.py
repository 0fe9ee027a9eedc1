"""CPU smoke run of the whole-op benchmark: every row measured, JSON and plot written."""

from __future__ import annotations

import json

from conftest import load_script


def test_tiny_run_writes_json_and_plot(tmp_path):
  out, png = tmp_path / "op.json", tmp_path / "op.png"
  result = load_script("benchmarks/nsa_op.py").main(
    [
      "--tiny",
      "--configs",
      "paper",
      "--cmp-impls",
      "blocked,reference",
      "--scores",
      "--out",
      str(out),
      "--plot",
      str(png),
    ]
  )
  rows = result["rows"]
  assert [r["stage"] for r in rows if r["config"] == "paper"] == [
    "nsa",
    "cmp+select blocked",
    "cmp+select reference",
    "top-n top_n_blocks",
    "top-n lax.top_k",
  ]
  for r in rows:
    assert "error" not in r, r
    assert r["fwd_ms"] > 0
    if not r["stage"].startswith("top-n"):
      assert r["fb_ms"] > 0 and r["fb_temp_gib"] >= 0
  assert json.loads(out.read_text())["rows"] == rows
  assert png.stat().st_size > 0
