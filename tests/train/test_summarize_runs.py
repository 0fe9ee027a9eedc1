"""scripts/summarize_runs.py on synthetic run folders: numbers, seed grouping and the table."""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import load_script

from sparse_attention_jax.nn.model import param_count
from train.config import load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
  return load_script("scripts/summarize_runs.py")


def _fake_run(folder, config, seed, evals, speeds):
  cfg = load_config(os.path.join(ROOT, "configs", config), [f"train.seed={seed}"])
  save_config(cfg, os.path.join(folder, "config.yaml"))
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for i, tps in enumerate(speeds):
      f.write(json.dumps({"step": 10 * (i + 1), "loss": 3.0 - 0.1 * i, "tokens_per_s": tps}) + "\n")
    f.write("\n")
    for step, loss in evals:
      f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
  return cfg


def test_summary_numbers_and_seed_groups(tmp_path, capsys):
  mod = _module()
  a, b = tmp_path / "asa_tiny_s0", tmp_path / "asa_tiny_s1"
  a.mkdir(), b.mkdir()
  cfg = _fake_run(a, "asa_tiny.yaml", 0, [(100, 2.5), (200, 2.2)], [10.0, 400.0, 100.0, 300.0])
  _fake_run(b, "asa_tiny.yaml", 1, [(100, 2.6), (200, 2.0)], [5.0, 50.0, 70.0])
  out = tmp_path / "summary.json"
  png = tmp_path / "groups.png"
  assert mod.main([str(a), str(b), "--out", str(out), "--tail", "2", "--plot", str(png)]) == 0
  assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
  data = json.loads(out.read_text())
  r0 = data["runs"][0]
  assert r0["attention"] == ["asa_local", "asa_global"] and r0["seed"] == 0
  assert r0["params"] == param_count(cfg.model)
  assert r0["final_eval_loss"] == pytest.approx(2.2)
  assert r0["final_eval_bits_per_byte"] == pytest.approx(2.2 / math.log(2))
  assert r0["median_tokens_per_s"] == pytest.approx(300.0)  # first log (compile) skipped
  assert r0["train_loss_tail"] == pytest.approx((2.8 + 2.7) / 2)
  assert r0["eval_losses"] == {"100": pytest.approx(2.5), "200": pytest.approx(2.2)}
  assert r0["train_losses"]["40"] == pytest.approx(2.7)
  g = data["groups"]["asa_tiny"]
  assert g["seeds"] == [0, 1]
  assert g["final_eval_loss_mean"] == pytest.approx(2.1)
  assert g["final_eval_loss_half_range"] == pytest.approx(0.1)
  table = capsys.readouterr().out
  assert "| asa_tiny_s1 | asa_local,asa_global |" in table and "2.1000 ± 0.1000" in table


def test_summary_errors_name_the_run(tmp_path):
  mod = _module()
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    mod.read_run(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
  with pytest.raises(ValueError, match="1 train and 0 eval"):
    mod.read_run(str(tmp_path))
