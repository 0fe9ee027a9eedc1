"""SIGINT and SIGTERM: a clean stop with a checkpoint at a step boundary, a second Ctrl-C exits at
once, signals during start-up exit cleanly, and the TensorBoard writer never blocks exit."""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from train import scalars

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
ENV = {
  **os.environ,
  "PYTHONUNBUFFERED": "1",
  "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
JOB = [
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
  "train.steps=100000",
  "train.log_every=1",
  "train.eval_every=0",
  "train.eval_batches=0",
  "train.sample_bytes=0",
  "train.corpus_max_bytes=60000",
  "train.checkpoint_every=1000",
]


def _job(out) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "train", *JOB, f"train.output_dir={out}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_sigint_saves_at_a_step_boundary_and_exits_cleanly(tmp_path, capfd, monkeypatch):
  """Ctrl-C during step 3 (sent to this process, the job runs in it): step 3 finishes, is
  saved, and the job returns 0."""
  from train import loop
  from train.__main__ import main

  step = loop.Trainer.step

  def step_then_interrupt(self, batch):
    metrics = step(self, batch)
    if self.step_count == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return metrics

  monkeypatch.setattr(loop.Trainer, "step", step_then_interrupt)
  out = tmp_path / "run"
  assert main([*JOB, f"train.output_dir={out}"]) == 0
  captured = capfd.readouterr()  # The handler writes to file descriptor 2.
  assert "stopped by SIGINT after step 3" in captured.out, captured.out[-3000:]
  assert "SIGINT: finishing the current step" in captured.err
  assert sorted(os.listdir(out / "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGINT) is not None  # The previous handler is back.


def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path):
  """SIGKILL at any point (also during an asynchronous save): --resume continues from the newest
  complete checkpoint, at most one interval plus the save in flight back (a save cut short is
  never restored)."""
  out = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-m", "train", *JOB, "train.checkpoint_every=2", f"train.output_dir={out}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  for line in proc.stdout:
    if line.startswith("step     7 |"):
      proc.kill()
      break
  proc.communicate(timeout=60)
  from train import checkpoint, loop, sources
  from train.config import load_config

  cfg = load_config(TINY, [*JOB[3:], f"train.output_dir={out}"])
  model, opt = loop.build(cfg)
  it = sources.make_data(cfg).train
  with checkpoint.Checkpointer(out / "checkpoints") as ckpt:
    restored = ckpt.restore_latest(model, opt, it)
  assert restored is not None and restored.verified and not restored.skipped
  assert 7 - 2 * 2 <= restored.step <= 7, restored


def _catches(pid: int, signum: int) -> bool:
  """Whether process ``pid`` has a handler for ``signum`` (Linux ``/proc/PID/status``)."""
  with open(f"/proc/{pid}/status") as f:
    caught = next(int(x.split()[1], 16) for x in f if x.startswith("SigCgt:"))
  return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_signal_during_startup_exits_cleanly_and_touches_nothing(tmp_path):
  out = tmp_path / "run"
  proc = _job(out)
  deadline = time.monotonic() + 30
  while not _catches(proc.pid, signal.SIGTERM):  # The job's handlers are in: start-up began.
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)  # Importing JAX, loading data, building the model.
  text, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, text[-3000:]
  assert "stopped by SIGTERM during start-up" in text and "Traceback" not in text, text
  assert not (out / "checkpoints").exists()


_TWICE = textwrap.dedent(
  """
  import os, signal, time
  from train.interrupts import Interrupted, Interrupts
  with Interrupts() as sig:
    sig.startup()
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
    except Interrupted as e:
      print("startup", e.signame, flush=True)
    sig.training()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    print("flag", sig.stop.is_set(), sig.stop.signame, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
  """
)


def test_second_sigint_exits_at_once():
  t0 = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-c", _TWICE], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=30
  )
  assert proc.returncode == 130, proc.stdout + proc.stderr
  assert proc.stdout.split() == ["startup", "SIGTERM", "flag", "True", "SIGINT"], proc.stdout
  assert "second SIGINT" in proc.stderr and time.perf_counter() - t0 < 4.5


def test_tensorboard_writer_interrupted_anywhere_closes_at_once(tmp_path):
  """KeyboardInterrupt at random points of writing: close() returns at once and the file keeps
  every record written before (no thread, queue or lock to hang on)."""
  pytest.importorskip("tensorboardX")
  rng = random.Random(0)

  def interrupt(signum, frame):
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGALRM, interrupt)
  try:
    for trial in range(20):
      tb = scalars.ScalarLog(str(tmp_path / str(trial)))
      signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.02))
      try:
        for step in range(100000):
          tb.write({"step": step, "loss": 1.0 / (step + 1), "lr": 1e-3})
      except KeyboardInterrupt:
        pass
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
      t0 = time.perf_counter()
      tb.close()
      assert time.perf_counter() - t0 < 1.0
      (path,) = glob.glob(str(tmp_path / str(trial) / "events.out.tfevents.*"))
      assert os.path.getsize(path) > 0
  finally:
    signal.signal(signal.SIGALRM, previous)
