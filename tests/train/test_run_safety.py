"""The training job never loses a user's work: validation before the output folder is touched,
refusal to overwrite a previous run, ``--resume`` / ``--overwrite``, periodic checkpoints, metrics
trimmed on resume, config changes on resume, one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from train import checkpoint, run_dir
from train.__main__ import _parse_args, main
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# One dense layer, short rows, few steps: the job (not the model) is under test.
COMMON = [
  "--config",
  TINY,
  "--no-progress",
  "model.d_model=32",
  "model.num_layers=1",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=16",
  "model.mlp_dim=64",
  "model.attention=[full]",
  "train.seq_len=32",
  "train.batch_size=2",
  "train.warmup_steps=1",
  "train.log_every=1",
  "train.eval_every=0",
  "train.eval_batches=1",
  "train.sample_bytes=0",
  "train.corpus_max_bytes=60000",
  "train.checkpoint_every=2",
  "train.tensorboard=false",
]


def _snapshot(out) -> dict[str, bytes]:
  """Every file under ``out`` with its content (to show nothing changed)."""
  snap = {}
  for dirpath, _, files in os.walk(out):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        snap[os.path.relpath(p, out)] = fh.read()
  return snap


def _steps(out) -> list[int]:
  events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  return [e["step"] for e in events if "loss" in e]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that change it)."""
  out = tmp_path_factory.mktemp("base") / "run"
  assert main([*COMMON, "train.steps=4", f"train.output_dir={out}"]) == 0
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
  return out


@pytest.fixture
def run(finished_run, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  return out


def _one_line_error(err: str, *needles: str) -> None:
  lines = [x for x in err.splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for n in needles:
    assert n in lines[0], (n, lines[0])


def test_help_documents_resume_and_overwrite(capsys):
  with pytest.raises(SystemExit) as e:
    _parse_args(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "--resume" in text and "--overwrite" in text and "previous run" in text
  assert "SIGINT" in text and "checkpoint_every_minutes" in text


@pytest.mark.parametrize(
  "overrides, needle",
  [
    (["model.attention=[nsa,fulll]"], "fulll"),  # A typo in an attention kind.
    (["data.source=text", "data.paths=[/no/such/dir/*.txt]"], "matches no file"),
    (["train.seq_len=99999999"], "train.seq_len"),  # Longer than the whole corpus.
  ],
)
def test_bad_run_leaves_the_previous_run_intact(run, capsys, overrides, needle):
  before = _snapshot(run)
  # Even with --overwrite: nothing is deleted before everything validated.
  assert main([*COMMON, *overrides, f"train.output_dir={run}", "--overwrite"]) == 2
  _one_line_error(capsys.readouterr().err, needle)
  assert _snapshot(run) == before


def test_fresh_run_refuses_a_previous_run_and_overwrite_replaces_it(run, capsys):
  before = _snapshot(run)
  assert main([*COMMON, "train.steps=2", f"train.output_dir={run}"]) == 2
  _one_line_error(capsys.readouterr().err, str(run), "--resume", "--overwrite")
  assert _snapshot(run) == before
  (run / "launcher.log").write_text("kept")  # Not a run file: never touched.
  assert main([*COMMON, "train.steps=2", f"train.output_dir={run}", "--overwrite"]) == 0
  assert "removed the previous run" in capsys.readouterr().out
  assert sorted(os.listdir(run / "checkpoints")) == ["2"] and _steps(run) == [1, 2]
  assert (run / "launcher.log").read_text() == "kept"


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
  out = tmp_path / "empty"
  assert main([*COMMON, "train.steps=2", f"train.output_dir={out}", "--resume"]) == 2
  _one_line_error(capsys.readouterr().err, "nothing to resume", str(out))
  assert not (out / "metrics.jsonl").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _parse_args(["--config", TINY, "--resume", "--overwrite"])
  assert e.value.code == 2


def test_every_shipped_config_checkpoints_by_steps_and_time():
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    tc = load_config(os.path.join(ROOT, "configs", name)).train
    assert 0 < tc.checkpoint_every <= max(tc.steps // 2, 1), name
    assert 0 < tc.checkpoint_every_minutes <= 30, name
  defaults = load_config(TINY, []).train.__class__()
  assert defaults.checkpoint_every > 0 and defaults.checkpoint_every_minutes > 0


def test_time_period_saves_without_a_step_period(tmp_path, monkeypatch):
  """``every_minutes``: a save once that much time passed since the last one."""
  cfg = load_config(TINY, COMMON[3:])
  from train import loop

  model, opt = loop.build(cfg)
  clock = [1000.0]
  monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
  with checkpoint.Checkpointer(tmp_path / "c", every=0, every_minutes=1.0) as ckpt:
    assert not ckpt.save(1, model, opt)
    clock[0] += 59.0
    assert not ckpt.save(2, model, opt)
    clock[0] += 2.0
    assert ckpt.save(3, model, opt)
    clock[0] += 30.0
    assert not ckpt.save(4, model, opt)
    ckpt.wait()
    assert ckpt.steps() == [3]


def test_resume_trims_metrics_and_warns_on_changed_config(run, capsys):
  shutil.rmtree(run / "checkpoints" / "4")  # "Lost" with the node: steps 3-4 run again.
  assert (
    main([*COMMON, "train.steps=5", "train.seed=1", f"train.output_dir={run}", "--resume"]) == 0
  )
  out = capsys.readouterr().out
  assert "(step 2 of 5)" in out and "dropped 3 event(s) after step 2" in out  # 2 losses, 1 eval
  assert "warning: the config differs" in out and "train.seed 0 -> 1" in out
  assert "train.steps" not in out.split("warning:")[1].splitlines()[0]
  assert _steps(run) == [1, 2, 3, 4, 5]
  # The resumed curve starts with the restored model's eval loss at step 2, recorded once.
  events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  at_resume = [e for e in events if e.get("resumed")]
  assert [e["step"] for e in at_resume] == [2] and at_resume[0]["eval_loss"] > 0


def test_resume_with_another_model_shape_is_a_one_line_error(run, capsys):
  before = _snapshot(run)
  assert (
    main([*COMMON, "train.steps=6", "model.d_model=48", f"train.output_dir={run}", "--resume"]) == 2
  )
  _one_line_error(capsys.readouterr().err, "model.d_model 32 -> 48", "--overwrite")
  assert _snapshot(run) == before


def test_trim_metrics_drops_later_and_broken_lines(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 2, "eval_loss": 1}\n{"st')
  assert run_dir.trim_metrics(p, 2) == 2
  assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]
  assert run_dir.trim_metrics(tmp_path / "none.jsonl", 2) == 0


def test_resume_eval_is_recorded_once_per_step(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "loss": 2}\n{"step": 2, "eval_loss": 1.5}\n')
  assert not run_dir.record_resume_eval(p, 2, 1.4)  # the saved run evaluated at step 2
  assert run_dir.record_resume_eval(p, 1, 1.9)
  assert json.loads(p.read_text().splitlines()[-1]) == {
    "step": 1,
    "eval_loss": 1.9,
    "resumed": True,
  }
  assert run_dir.record_resume_eval(tmp_path / "new.jsonl", 3, 1.0)
