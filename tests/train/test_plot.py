"""``python -m train.plot``: loss curves of runs to a PNG."""

from __future__ import annotations

import json

from train import plot


def _run(tmp_path, name, losses, evals):
  run = tmp_path / name
  run.mkdir()
  with open(run / "metrics.jsonl", "w") as f:
    for step, loss in losses:
      f.write(json.dumps({"step": step, "loss": loss, "lr": 1e-3}) + "\n")
    for step, loss in evals:
      f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
  return str(run)


def test_plot_writes_png_of_two_runs(tmp_path, capsys):
  a = _run(tmp_path, "a", [(10, 5.0), (20, 4.1), (30, 3.7)], [(20, 4.3), (30, 3.9)])
  b = _run(tmp_path, "b", [(10, 5.2), (20, 4.5)], [(20, 4.6)])
  assert plot.read_metrics(a) == ([(10, 5.0), (20, 4.1), (30, 3.7)], [(20, 4.3), (30, 3.9)])
  out = tmp_path / "figs" / "loss.png"
  assert plot.main([a, b, "--out", str(out)]) == 0
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  assert "wrote" in capsys.readouterr().out


def test_plot_missing_run_is_an_error(tmp_path, capsys):
  assert plot.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
  assert "metrics.jsonl" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()
