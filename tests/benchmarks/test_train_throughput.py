"""Smoke test of ``benchmarks/train_throughput.py`` on CPU with the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_runs_tiny_on_cpu(tmp_path):
  env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  script = os.path.join(ROOT, "benchmarks", "train_throughput.py")
  argv = [
    script,
    "--config",
    "configs/tiny.yaml",
    "--seq-len",
    "256",
    "--steps",
    "2",
    "--rows-per-device",
    "2",
  ]
  # The GPU machine has no grain, tensorboardX or tqdm: the benchmark must not import them.
  code = (
    "import runpy, sys; sys.modules.update(grain=None, tensorboardX=None, tqdm=None); "
    f"sys.argv = {argv!r}; runpy.run_path({script!r}, run_name='__main__')"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=str(tmp_path),
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(tmp_path / "train_throughput.json") as f:
    rows = json.load(f)["results"]
  assert len(rows) == 1
  r = rows[0]
  assert r["config"] == "configs/tiny.yaml" and r["seq_len"] == 256 and r["global_batch"] == 2
  assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
  assert abs(r["tokens_per_s"] - 2 * 256 / (r["step_ms"] / 1e3)) < 1e-6 * r["tokens_per_s"]
  assert r["mfu"] is None  # CPU: no peak in the table.
  assert 0 < r["loss"] < 10
  assert "tiny.yaml" in proc.stdout and "MFU" in proc.stdout
