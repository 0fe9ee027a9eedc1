"""Multi-device training check: one command, every phase a ``python -m train`` subprocess.

Phases (each in its own process, with the devices chosen by ``CUDA_VISIBLE_DEVICES`` on GPUs or
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on CPU):

1. ``baseline``: one device (no mesh), ``--steps`` steps of ``--global-batch`` rows.
2. ``mesh_<spec>``: each mesh of ``--meshes`` (e.g. ``"data=2;fsdp=2"``; axes of one mesh are
   comma-separated: ``"data=2,tensor=2"``), the same steps and global batch (so the same batches in
   the same order), Orbax checkpoints every ``--checkpoint-every`` steps.
3. ``restore_*``: the newest checkpoint of the first mesh run that has steps after it is copied
   into a fresh run directory and resumed (``python -m train --resume``, same ``train.steps``) on
   one device and on another mesh (``--restore-mesh``, default the next mesh of ``--meshes``); the
   resumed losses must equal the uninterrupted mesh curve at the same steps (same data order: the
   Grain iterator position is in the checkpoint) within ``--restore-tol``.
4. ``summary.json`` + a printed table: per phase devices, mesh, step time, tokens/s total and per
   device, MFU, peak memory, final loss, the loss check against the 1-device curve (two parts:
   raw |dL| over the first ``--early-steps`` steps within ``--early-tol``, while the runs still
   compute the same trajectory, and ``--smooth``-step moving averages within ``--loss-tol``,
   since bf16 runs that differ only in reduction order drift apart after a few dozen steps), the
   same statistics between every two mesh runs (``mesh_spread``: the noise floor), restore
   checks, scaling efficiency = (tokens/s per device on N devices) / (tokens/s on 1 device);
   ``loss_curves.png`` (matplotlib Agg; skipped with a notice when matplotlib is missing);
   ``summary.md``, the table and command as markdown for ``benchmarks/RESULTS.md``.
   ``--resummarize DIR`` recomputes all of it from a finished run directory (no runs).

Phases train without evaluation (``train.eval_batches=0``: no eval program to compile).
``--baseline-from DIR`` reuses the finished baseline of an earlier run directory (same config,
steps, global batch and sequence length, checked) so that a later run executes only
meshes, e.g. one NSA mesh per call; ``--restore single|mesh|none`` limits the restore phases
(default both). An ``--out`` that already holds a run (``summary.json``) is refused unless
``--overwrite`` is given: a second command into it would run and replace its phases.
``--budget-s`` bounds the whole run: a phase is not launched when its estimated time (startup and
compile overhead + steps x step time, from the phases already run) would pass the budget, and a
running phase gets SIGTERM at the budget (the job saves and exits). ``summary.json`` is rewritten
after every phase, so a cut run still leaves what it measured. NVLink multicast stays off:
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1`` are set
in every phase's environment; the caller's ``XLA_FLAGS`` reach every phase and are recorded (e.g.
``XLA_FLAGS=--xla_gpu_deterministic_ops=true``, XLA's deterministic GPU ops, not yet tried on the
GPU: without such a setting two runs of the NSA model on one mesh differ from step 3, see
``benchmarks/RESULTS.md``). Phases share a persistent compilation cache (``<out>/jax_cache``,
``--no-compile-cache`` to disable, ``--compile-cache DIR`` to keep it elsewhere, e.g. in an ignored
folder of the repository that a GPU machine keeps between runs), so a restore on a mesh reuses that mesh run's executable (a
restore on one device compiles again: restored arrays carry a single-device sharding that the
freshly built baseline's do not, so the step's HLO differs).

GPU command (2 GPUs). ``python -m train`` needs grain and tqdm (the script checks for them
before any phase); on a GPU machine without a package index, install them from wheels first::

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && \\
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 && \\
  python3 benchmarks/multi_device_run.py --config configs/full_340m.yaml --steps 200 \\
    --seq-len 8192 --global-batch 2 --meshes "data=2;fsdp=2" --checkpoint-every 50 \\
    --budget-s 560 --out $OUT/multi_full_340m

and the NSA model with ``--config configs/nsa_340m.yaml --out $OUT/multi_nsa_340m``. Measured
cost (two H200s, `benchmarks/RESULTS.md`): the full twin steps in ~0.30 s (1 GPU, 2 packed
rows on cuDNN with a document mask) and ~0.17 s (2 GPUs), compiles in ~30-40 s, so 200 steps of
the baseline, three meshes and the restore on 1 GPU took 490 s; the NSA model's first step
compiles for 209-231 s per new layout (63 s with a persistent-cache hit) and steps in 0.38 s (1 GPU,
2 rows) / 0.24 s (fsdp=2): ``--steps 100 --checkpoint-every 25`` fits one phase in 10 minutes
(keep ``--compile-cache`` in an ignored folder so a later run reuses the executables; the budget
logic skips and records what does not fit). With ``model.scan_layers=true`` (an override after
the flags) its first step takes 47 s (1 GPU) / 58-89 s (2-GPU meshes) and a step 0.50 s /
0.31-0.34 s: 200 steps of the baseline and one mesh fit in 10 minutes, two meshes and a
restore in the next 10.

CPU smoke run (2 simulated devices, seconds per phase)::

  python3 benchmarks/multi_device_run.py --config configs/tiny.yaml --platform cpu --steps 6 \\
    --seq-len 64 --global-batch 4 --meshes "data=2;fsdp=2" --checkpoint-every 3 --out /tmp/multi
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ("data", "fsdp", "tensor")
NO_MULTICAST = {
  "NCCL_NVLS_ENABLE": "0",
  "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
  "NVSHMEM_DISABLE_NVLS": "1",
}
# How much of a failed phase's log goes into the summary.
_TAIL_CHARS = 3000


def parse_meshes(text: str) -> list[dict[str, int]]:
  """``"data=2;fsdp=2;data=1,tensor=2"`` -> ``[{data: 2, fsdp: 1, tensor: 1}, ...]``.

  Missing axes are 1; every size must be a positive int (the device count of a phase is the
  product).

  Raises:
    ValueError: malformed text, unknown axes or sizes < 1 (the message names ``--meshes``).
  """
  meshes = []
  for item in filter(None, (s.strip() for s in text.split(";"))):
    mesh = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in item.split(","))):
      name, sep, value = part.partition("=")
      name = name.strip()
      if not sep or name not in AXES or not re.fullmatch(r"\s*\d+\s*", value) or int(value) < 1:
        raise ValueError(
          f"--meshes: expected ';'-separated meshes of axis=size pairs with axes "
          f"in {list(AXES)} and sizes >= 1 (e.g. 'data=2;fsdp=2;data=1,tensor=2'), "
          f"got {text!r} (bad part {part!r})"
        )
      mesh[name] = int(value)
    meshes.append(mesh)
  if not meshes:
    raise ValueError(f"--meshes: expected at least one mesh like 'data=2', got {text!r}")
  return meshes


def mesh_name(mesh: dict[str, int] | None) -> str:
  """``{data: 2, fsdp: 1, tensor: 1}`` -> ``"data2"``; ``None`` (1 device) -> ``"1dev"``."""
  if mesh is None:
    return "1dev"
  parts = [f"{a}{n}" for a, n in mesh.items() if n > 1]
  return "_".join(parts) or "data1"


def mesh_devices(mesh: dict[str, int] | None) -> int:
  return 1 if mesh is None else math.prod(mesh.values())


def read_curve(run_dir: str) -> tuple[dict[int, float], list[dict]]:
  """``({step: loss}, train events)`` from ``run_dir/metrics.jsonl`` (empty when missing)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}, []
  events = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        e = json.loads(line)
        if "loss" in e and "step" in e:
          events.append(e)
  return {int(e["step"]): float(e["loss"]) for e in events}, events


def moving_average(values: list[float], window: int) -> list[float]:
  """Trailing mean over up to ``window`` values (the first entries average what exists)."""
  out, acc = [], 0.0
  for i, v in enumerate(values):
    acc += v
    if i >= window:
      acc -= values[i - window]
    out.append(acc / min(i + 1, window))
  return out


def curve_diff(curve: dict[int, float], ref: dict[int, float], smooth: int, early: int = 0) -> dict:
  """Max |curve - ref| over the common steps: raw, of ``smooth``-step trailing means, and raw
  over the first ``early`` common steps (``None`` when ``early`` is 0)."""
  common = sorted(set(curve) & set(ref))
  if not common:
    return {
      "common_steps": 0,
      "max_abs_diff": None,
      "max_abs_diff_smoothed": None,
      "max_abs_diff_early": None,
    }
  a = [curve[s] for s in common]
  b = [ref[s] for s in common]
  diffs = [abs(x - y) for x, y in zip(a, b)]
  sm = max(abs(x - y) for x, y in zip(moving_average(a, smooth), moving_average(b, smooth)))
  return {
    "common_steps": len(common),
    "first_common_step": common[0],
    "max_abs_diff": max(diffs),
    "max_abs_diff_smoothed": sm,
    "max_abs_diff_early": max(diffs[:early]) if early else None,
  }


def phase_stats(events: list[dict], tokens_per_step: int, devices: int) -> dict:
  """Medians over the timed steps (the compiling first step of a process has no rate)."""
  rates = [e["tokens_per_s"] for e in events if e.get("tokens_per_s", 0) > 0]
  out = {
    "tokens_per_s": None,
    "tokens_per_s_per_device": None,
    "step_s": None,
    "mfu": None,
    "tflops_per_device": None,
    "peak_memory_gib": None,
  }
  if rates:
    tok = statistics.median(rates)
    out.update(
      tokens_per_s=tok, tokens_per_s_per_device=tok / devices, step_s=tokens_per_step / tok
    )
  for key in ("mfu", "tflops_per_device"):
    vals = [e[key] for e in events if e.get(key) is not None and e.get("tokens_per_s", 0) > 0]
    if vals:
      out[key] = statistics.median(vals)
  mems = [e["peak_memory_gib"] for e in events if e.get("peak_memory_gib") is not None]
  if mems:
    out["peak_memory_gib"] = max(mems)
  if events:
    out["final_loss"] = events[-1]["loss"]
    tail = [e["loss"] for e in events[-10:]]
    out["final_loss_mean10"] = sum(tail) / len(tail)
  return out


def gpu_count() -> int:
  """GPUs listed by ``nvidia-smi -L`` (0 when it is missing or fails)."""
  try:
    proc = subprocess.run(
      ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
    )
  except (OSError, subprocess.SubprocessError):
    return 0
  return (
    sum(line.startswith("GPU ") for line in proc.stdout.splitlines()) if proc.returncode == 0 else 0
  )


def run_env() -> dict[str, str]:
  """The environment settings a run records: multicast off, and the caller's ``XLA_FLAGS`` (every
  phase inherits them, e.g. ``--xla_gpu_deterministic_ops=true``), if any."""
  flags = os.environ.get("XLA_FLAGS", "").strip()
  return {**NO_MULTICAST, **({"XLA_FLAGS": flags} if flags else {})}


def phase_env(platform: str, devices: int, cache_dir: str | None) -> dict[str, str]:
  """The environment of a phase on ``devices`` devices (and multicast off)."""
  env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
  else:
    env["JAX_PLATFORMS"] = "cpu"
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def train_args(
  args, run_dir: str, mesh: dict[str, int] | None, checkpoint_every: int, resume: bool
) -> list[str]:
  cmd = [sys.executable, "-m", "train", "--config", args.config, "--no-progress"]
  if resume:
    cmd.append("--resume")
  cmd += [
    f"train.output_dir={run_dir}",
    f"train.steps={args.steps}",
    f"train.batch_size={args.global_batch}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=0",
    "train.sample_bytes=0",
    "train.tensorboard=false",
    f"train.checkpoint_every={checkpoint_every}",
    f"train.keep_checkpoints={args.keep}",
  ]
  if args.seq_len:
    cmd.append(f"train.seq_len={args.seq_len}")
  if mesh is not None:
    cmd += [f"train.mesh.{a}={n}" for a, n in mesh.items()]
  return cmd + list(args.overrides)


class Runner:
  """Runs phases under the budget and keeps the summary up to date."""

  def __init__(self, args, platform: str, available: int):
    self.args, self.platform, self.available = args, platform, available
    self.t0 = time.perf_counter()
    self.phases: list[dict] = []
    self.overhead_s = 0.0  # Largest startup + compile time seen (wall - timed steps).
    self.step_s: dict[int, float] = {}  # Step time by device count.
    self.cache = (
      None
      if args.no_compile_cache
      else os.path.abspath(args.compile_cache or os.path.join(args.out, "jax_cache"))
    )

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def estimate(self, devices: int, steps: int) -> float:
    step = self.step_s.get(devices, max(self.step_s.values(), default=0.0))
    return self.overhead_s + steps * step

  def run(
    self,
    name: str,
    kind: str,
    mesh,
    steps: int,
    checkpoint_every: int,
    resume: bool = False,
    prepare=None,
  ) -> dict:
    args = self.args
    devices = mesh_devices(mesh)
    run_dir = os.path.join(args.out, name)
    rec = {
      "phase": name,
      "kind": kind,
      "devices": devices,
      "mesh": "none (1 device)" if mesh is None else ",".join(f"{a}={n}" for a, n in mesh.items()),
      "status": "skipped",
    }
    self.phases.append(rec)
    if devices > self.available:
      rec["reason"] = f"needs {devices} devices, {self.available} available"
      return rec
    est = self.estimate(devices, steps)
    left = args.budget_s - self.elapsed()
    if self.phases[:-1] and est > left:
      rec["reason"] = f"budget: estimated {est:.0f} s, {left:.0f} s left"
      print(f"[multi] skip {name}: {rec['reason']}", flush=True)
      return rec
    if left <= 0:
      rec["reason"] = "budget spent"
      return rec
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    if prepare is not None:
      prepare(run_dir)
    cmd = train_args(args, run_dir, mesh, checkpoint_every, resume)
    rec["command"] = shlex.join(["python3"] + cmd[1:])
    env = phase_env(self.platform, devices, self.cache)
    print(
      f"[multi] {name}: {devices} {self.platform} device(s), {rec['mesh']}, {steps} steps "
      f"({self.elapsed():.0f} s of {args.budget_s:.0f} s used)",
      flush=True,
    )
    t = time.perf_counter()
    log_path = os.path.join(run_dir, "log.txt")
    with open(log_path, "w") as log:
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
      try:
        rc = proc.wait(timeout=max(left, 1.0))
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # The job saves after the current step and exits.
        rec["cut_by_budget"] = True
        try:
          rc = proc.wait(timeout=args.grace_s)
        except subprocess.TimeoutExpired:
          proc.kill()
          rc = proc.wait()
    wall = time.perf_counter() - t
    with open(log_path) as f:
      text = f.read()
    curve, events = read_curve(run_dir)
    status = "failed" if rc != 0 or not curve else "cut" if rec.get("cut_by_budget") else "ok"
    rec.update(status=status, rc=rc, wall_s=wall, run_dir=run_dir, steps_run=len(curve))
    if rc != 0 or not curve:
      rec["log_tail"] = text[-_TAIL_CHARS:]
    rec.update(phase_stats(events, args.global_batch * self.seq_len, devices))
    rec["first_step"] = min(curve) if curve else None
    rec["last_step"] = max(curve) if curve else None
    rec["resumed"] = "resumed from" in text
    found = re.search(r"^device: (.*)$", text, re.MULTILINE)
    rec["device"] = found.group(1) if found else None
    if rec["step_s"]:
      self.step_s[devices] = max(self.step_s.get(devices, 0.0), rec["step_s"])
      self.overhead_s = max(self.overhead_s, wall - max(len(curve) - 1, 0) * rec["step_s"])
    else:
      self.overhead_s = max(self.overhead_s, wall)
    print(
      f"[multi] {name}: {rec['status']} (rc {rc}) in {wall:.0f} s, {len(curve)} steps", flush=True
    )
    return rec

  @property
  def seq_len(self) -> int:
    return self.args.resolved_seq_len


def copy_checkpoint(src_dir: str, step: int):
  """A ``prepare`` hook: copies ``src_dir/checkpoints/<step>`` into the new run directory."""

  def prepare(run_dir: str) -> None:
    src = os.path.join(src_dir, "checkpoints", str(step))
    dst = os.path.join(run_dir, "checkpoints", str(step))
    try:  # Hard links: instant for multi-GB checkpoints (Orbax never rewrites a saved file).
      shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(src, dst)

  return prepare


def checkpoint_steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def summarize(runner: Runner, args) -> dict:
  """Adds loss differences, restore checks and scaling efficiency; writes ``summary.json``."""
  phases = runner.phases
  curves = {p["phase"]: read_curve(p["run_dir"])[0] for p in phases if p.get("run_dir")}
  base = next((p for p in phases if p["kind"] == "baseline"), None)
  base_curve = curves.get("baseline", {})
  base_tok = base.get("tokens_per_s") if base else None
  early, early_tol = getattr(args, "early_steps", 0), getattr(args, "early_tol", 0.0)
  for p in phases:
    c = curves.get(p["phase"])
    if not c:
      continue
    if p["kind"] == "mesh" and base_curve:  # (a restore is checked against its source run)
      d = curve_diff(c, base_curve, args.smooth, early)
      p["vs_baseline"] = d
      if d["max_abs_diff_smoothed"] is not None:
        ok = d["max_abs_diff_smoothed"] <= args.loss_tol
        if early:
          ok &= d["max_abs_diff_early"] <= early_tol
        p["loss_check"] = "pass" if ok else "fail"
    if base_tok and p.get("tokens_per_s_per_device"):
      p["scaling_efficiency"] = p["tokens_per_s_per_device"] / base_tok
    if p["kind"] == "restore":
      src = curves.get(p["source"], {})
      d = curve_diff(c, src, args.smooth)
      p["vs_source"] = d
      ok = (
        p["resumed"]
        and p["first_step"] == p["from_step"] + 1
        and p["last_step"] == args.steps
        and d["max_abs_diff"] is not None
        and d["max_abs_diff"] <= args.restore_tol
      )
      p["restore_check"] = "pass" if ok else "fail"
  # The same statistic between every two mesh runs: how far runs that differ only in their
  # reduction order drift apart (the noise floor the baseline comparison is read against).
  meshes = [p["phase"] for p in phases if p["kind"] == "mesh" and curves.get(p["phase"])]
  spread = {
    f"{a} vs {b}": curve_diff(curves[a], curves[b], args.smooth, early)
    for i, a in enumerate(meshes)
    for b in meshes[i + 1 :]
  }
  summary = {
    "config": args.config,
    "platform": runner.platform,
    "devices_available": runner.available,
    "steps": args.steps,
    "seq_len": args.resolved_seq_len,
    "global_batch": args.global_batch,
    "tokens_per_step": args.global_batch * args.resolved_seq_len,
    "meshes": args.meshes,
    "checkpoint_every": args.checkpoint_every,
    "loss_tol": args.loss_tol,
    "restore_tol": args.restore_tol,
    "smooth": args.smooth,
    "early_steps": early,
    "early_tol": early_tol,
    "mesh_spread": spread,
    "budget_s": args.budget_s,
    "elapsed_s": runner.elapsed(),
    "command": getattr(args, "command", None)
    or shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
    "env": getattr(args, "env", None) or run_env(),
    "phases": phases,
  }
  checks = [p[k] for p in phases for k in ("loss_check", "restore_check") if k in p]
  summary["all_checks_pass"] = bool(checks) and all(c == "pass" for c in checks)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _fmt(v, spec: str, scale: float = 1.0) -> str:
  return "-" if v is None else format(v * scale, spec)


def print_table(summary: dict) -> None:
  print(
    f"\nconfig {summary['config']} | seq {summary['seq_len']} x global batch "
    f"{summary['global_batch']} | {summary['steps']} steps | {summary['platform']}"
  )
  head = (
    f"{'phase':<26} {'dev':>3} {'mesh':<22} {'status':<8} {'steps':>9} {'step ms':>9} "
    f"{'tok/s':>10} {'tok/s/dev':>10} {'MFU':>6} {'scale eff':>9} {'final loss':>10} "
    f"{'max|dL|':>9} {'smooth':>8} {'early':>8} {'check':>6}"
  )
  print(head)
  print("-" * len(head))
  for p in summary["phases"]:
    d = p.get("vs_source") if p["kind"] == "restore" else p.get("vs_baseline")
    d = d or {}
    check = p.get("restore_check") or p.get("loss_check") or "-"
    steps = f"{p['first_step']}-{p['last_step']}" if p.get("first_step") is not None else "-"
    print(
      f"{p['phase']:<26} {p['devices']:>3} {p['mesh']:<22} {p['status']:<8} {steps:>9} "
      f"{_fmt(p.get('step_s'), '.1f', 1e3):>9} {_fmt(p.get('tokens_per_s'), ',.0f'):>10} "
      f"{_fmt(p.get('tokens_per_s_per_device'), ',.0f'):>10} "
      f"{_fmt(p.get('mfu'), '.1f', 100):>6} {_fmt(p.get('scaling_efficiency'), '.3f'):>9} "
      f"{_fmt(p.get('final_loss'), '.4f'):>10} {_fmt(d.get('max_abs_diff'), '.2e'):>9} "
      f"{_fmt(d.get('max_abs_diff_smoothed'), '.2e'):>8} "
      f"{_fmt(d.get('max_abs_diff_early'), '.2e'):>8} {check:>6}"
    )
    if p["status"] != "ok" and p.get("reason"):
      print(f"    ({p['reason']})")
  for pair, d in summary.get("mesh_spread", {}).items():
    print(
      f"spread {pair}: max|dL| {_fmt(d['max_abs_diff'], '.2e')}, smoothed "
      f"{_fmt(d['max_abs_diff_smoothed'], '.2e')}, early "
      f"{_fmt(d['max_abs_diff_early'], '.2e')}"
    )
  print(
    f"max|dL|: vs the baseline curve (restore_*: vs the uninterrupted source run at the same "
    f"steps); smooth: of {summary['smooth']}-step means (check <= {summary['loss_tol']}); "
    f"early: over the first {summary.get('early_steps', 0)} steps (check <= "
    f"{summary.get('early_tol')}); scale eff: tok/s per device / 1-device tok/s"
  )
  print(f"all checks pass: {summary['all_checks_pass']}")


def markdown(summary: dict) -> str:
  """A ``benchmarks/RESULTS.md``-ready block: the command and one table row per phase."""
  dev = next((p["device"] for p in summary["phases"] if p.get("device")), "?")
  env = ", ".join(f"{k}={v}" for k, v in summary["env"].items())
  note = (
    f"{summary['config']}, seq {summary['seq_len']} x global batch "
    f"{summary['global_batch']}, {summary['steps']} steps; max |dL| vs the 1-device curve "
    f"(restores: vs the uninterrupted run at the same steps): raw, of "
    f"{summary['smooth']}-step means (check <= {summary['loss_tol']}) and over the first "
    f"{summary.get('early_steps', 0)} steps (check <= {summary.get('early_tol')}); "
    f"scaling efficiency = tokens/s per device / 1-device tokens/s."
  )
  head = (
    "| phase | devices | mesh | steps | step ms | tokens/s | tokens/s/dev | MFU | "
    "scaling eff. | final loss | max abs dL (smoothed, early) | check |"
  )
  lines = [
    f"**Device:** {dev}. **Command** (repository root, {env}):",
    "",
    "```",
    f"python3 {summary['command']}",
    "```",
    "",
    note,
    "",
    head,
    "|---" * 12 + "|",
  ]
  for p in summary["phases"]:
    d = (p.get("vs_source") if p["kind"] == "restore" else p.get("vs_baseline")) or {}
    steps = f"{p['first_step']}-{p['last_step']}" if p.get("first_step") is not None else "-"
    check = p.get("restore_check") or p.get("loss_check") or "-"
    if p["status"] != "ok":
      check = f"{p['status']}: {p.get('reason', 'rc ' + str(p.get('rc')))}"
    lines.append(
      f"| {p['phase']} | {p['devices']} | {p['mesh']} | {steps} | "
      f"{_fmt(p.get('step_s'), '.1f', 1e3)} | {_fmt(p.get('tokens_per_s'), ',.0f')} | "
      f"{_fmt(p.get('tokens_per_s_per_device'), ',.0f')} | "
      f"{_fmt(p.get('mfu'), '.1f', 100)}{'%' if p.get('mfu') is not None else ''} | "
      f"{_fmt(p.get('scaling_efficiency'), '.3f')} | {_fmt(p.get('final_loss'), '.4f')} | "
      f"{_fmt(d.get('max_abs_diff'), '.2e')} ({_fmt(d.get('max_abs_diff_smoothed'), '.2e')}, "
      f"{_fmt(d.get('max_abs_diff_early'), '.2e')}) | {check} |"
    )
  for pair, d in summary.get("mesh_spread", {}).items():
    lines.append(
      f"| spread: {pair} | | | | | | | | | | {_fmt(d['max_abs_diff'], '.2e')} "
      f"({_fmt(d['max_abs_diff_smoothed'], '.2e')}, "
      f"{_fmt(d['max_abs_diff_early'], '.2e')}) | - |"
    )
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("[multi] plot skipped: matplotlib is not installed")
    return None
  fig, ax = plt.subplots(figsize=(8, 5))
  for p in summary["phases"]:
    if not p.get("run_dir"):
      continue
    curve = read_curve(p["run_dir"])[0]
    if curve:
      steps = sorted(curve)
      style = {"baseline": "-", "mesh": "--", "restore": ":"}[p["kind"]]
      ax.plot(steps, [curve[s] for s in steps], style, label=f"{p['phase']} ({p['devices']} dev)")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.set_title(
    f"{os.path.basename(summary['config'])}: seq {summary['seq_len']}, global batch "
    f"{summary['global_batch']}"
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="configs/nsa_340m.yaml")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seq-len", type=int, default=0, help="0 = the config's train.seq_len")
  p.add_argument(
    "--global-batch",
    type=int,
    default=0,
    help="rows per step in every phase (0 = the largest mesh's device count)",
  )
  p.add_argument(
    "--meshes", default="data=2;fsdp=2", help="';'-separated meshes, axes of one mesh ','-separated"
  )
  p.add_argument(
    "--restore-mesh",
    default=None,
    help="mesh the checkpoint is restored onto besides 1 device (default: the next "
    "mesh of --meshes)",
  )
  p.add_argument(
    "--devices-for-baseline",
    type=int,
    default=1,
    choices=(1,),
    help="devices of the baseline phase (1)",
  )
  p.add_argument(
    "--checkpoint-every",
    type=int,
    default=0,
    help="checkpoint period of the mesh runs (0 = steps // 4)",
  )
  p.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints")
  # The check settings default to None so that --resummarize can tell a given flag from the
  # recorded value; CHECK_DEFAULTS fills the rest.
  p.add_argument(
    "--loss-tol",
    type=float,
    default=None,
    help="max |smoothed loss - smoothed baseline loss| for the loss check (0.06)",
  )
  p.add_argument(
    "--early-steps",
    type=int,
    default=None,
    help="the loss check also bounds the raw |dL| over this many first steps (30)",
  )
  p.add_argument(
    "--early-tol",
    type=float,
    default=None,
    help="max raw |loss - baseline loss| over the first --early-steps steps (0.02)",
  )
  p.add_argument(
    "--restore-tol",
    type=float,
    default=None,
    help="max |resumed loss - uninterrupted loss| at the same steps (0.05)",
  )
  p.add_argument(
    "--smooth", type=int, default=None, help="moving-average window of the loss check (50)"
  )
  p.add_argument(
    "--baseline-from",
    metavar="DIR",
    default=None,
    help="reuse the 1-device baseline of an earlier run directory (same config, "
    "steps, global batch, sequence length) and run only the meshes",
  )
  p.add_argument(
    "--resummarize",
    metavar="DIR",
    default=None,
    help="no runs: recompute the checks of a finished run directory (its "
    "summary.json and metrics) and rewrite its summary; tolerances, smoothing "
    "and early steps are the recorded ones unless given on this command line",
  )
  p.add_argument(
    "--platform",
    choices=("auto", "gpu", "cpu"),
    default="auto",
    help="auto: gpu when nvidia-smi lists GPUs",
  )
  p.add_argument(
    "--cpu-devices",
    type=int,
    default=0,
    help="simulated CPU devices available (0 = the largest mesh)",
  )
  p.add_argument("--budget-s", type=float, default=560.0)
  p.add_argument(
    "--grace-s",
    type=float,
    default=60.0,
    help="after SIGTERM at the budget, wait this long before killing the phase",
  )
  p.add_argument("--no-compile-cache", action="store_true")
  p.add_argument(
    "--compile-cache",
    metavar="DIR",
    default=None,
    help="persistent compilation cache (default <out>/jax_cache); a directory kept "
    "between calls lets a later call reuse executables, e.g. a mesh compiled by an "
    "earlier restore",
  )
  p.add_argument(
    "--restore",
    choices=("both", "single", "mesh", "none"),
    default="both",
    help="which restores of the first mesh run's checkpoint to run: on one device, "
    "on another mesh, both, or none",
  )
  p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "multi_device_run"))
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="run into an --out that already holds a run (summary.json): its phases "
    "are run again and replaced",
  )
  p.add_argument(
    "overrides",
    nargs="*",
    metavar="section.key=value",
    help="extra overrides for every phase (e.g. model.remat=dots)",
  )
  return p.parse_args(argv)


CHECK_DEFAULTS = {
  "loss_tol": 0.06,
  "restore_tol": 0.05,
  "smooth": 50,
  "early_steps": 30,
  "early_tol": 0.02,
}
"""Check settings not given on the command line (``--resummarize``: the recorded ones first)."""


def _fill_checks(args, recorded=None) -> None:
  for key, default in CHECK_DEFAULTS.items():
    if getattr(args, key) is None:
      setattr(args, key, (recorded or {}).get(key, default))


def main(argv=None) -> int:
  args = _args(argv)
  if args.resummarize:
    return resummarize(args)
  _fill_checks(args)
  try:
    meshes = parse_meshes(args.meshes)
    restore_mesh = parse_meshes(args.restore_mesh)[0] if args.restore_mesh else None
  except ValueError as e:
    print(e, file=sys.stderr)
    return 2
  if args.steps < 2:
    print(f"--steps: expected an int >= 2, got {args.steps}", file=sys.stderr)
    return 2
  args.config = (
    os.path.relpath(os.path.abspath(args.config), ROOT)
    if os.path.exists(args.config)
    else args.config
  )
  import importlib.util

  missing = [
    m
    for m in ("grain", "tqdm", "orbax.checkpoint")
    if importlib.util.find_spec(m.split(".")[0]) is None
  ]
  if missing:  # `python -m train` needs them; fail before any phase starts.
    print(
      f"missing modules for `python -m train`: {missing}; install them first "
      f"(see this script's docstring)",
      file=sys.stderr,
    )
    return 2
  sys.path.insert(0, ROOT)
  from train.config import load_config  # Validates the config and the overrides up front.

  try:
    cfg = load_config(os.path.join(ROOT, args.config), list(args.overrides))
  except (ValueError, FileNotFoundError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  args.resolved_seq_len = args.seq_len or cfg.train.seq_len
  largest = max(mesh_devices(m) for m in meshes)
  args.global_batch = args.global_batch or largest
  args.checkpoint_every = args.checkpoint_every or max(1, args.steps // 4)
  platform = args.platform
  if platform == "auto":
    platform = "gpu" if gpu_count() > 0 else "cpu"
  available = gpu_count() if platform == "gpu" else (args.cpu_devices or largest)
  if platform == "gpu" and available == 0:  # No nvidia-smi: ask JAX in a throwaway process.
    proc = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.device_count())"],
      capture_output=True,
      text=True,
      check=False,
    )
    available = int(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout else 0
  args.out = os.path.abspath(args.out)
  if os.path.exists(os.path.join(args.out, "summary.json")) and not args.overwrite:
    print(
      f"--out: {args.out} already holds a run (summary.json), whose phases this command "
      f"would run again and replace; pass --overwrite, or choose another --out (with "
      f"--baseline-from to reuse its baseline)",
      file=sys.stderr,
    )
    return 2
  os.makedirs(args.out, exist_ok=True)
  runner = Runner(args, platform, available)
  print(
    f"[multi] {args.config}: {platform}, {available} device(s), {args.steps} steps x "
    f"{args.global_batch} x {args.resolved_seq_len} tokens, meshes {args.meshes}, out "
    f"{args.out}",
    flush=True,
  )

  def step_and_save(rec):
    summary = summarize(runner, args)
    return rec, summary

  if args.baseline_from:
    try:
      runner.phases.append(reuse_baseline(args.baseline_from, args))
    except (ValueError, OSError) as e:
      print(e, file=sys.stderr)
      return 2
    print(f"[multi] baseline: reused from {args.baseline_from}", flush=True)
  else:
    step_and_save(runner.run("baseline", "baseline", None, args.steps, 0))
  mesh_recs = []
  for m in meshes:
    rec = runner.run(f"mesh_{mesh_name(m)}", "mesh", m, args.steps, args.checkpoint_every)
    mesh_recs.append((m, rec))
    step_and_save(rec)
  # Restore the first finished mesh run's newest checkpoint that has steps after it.
  source = next(((m, r) for m, r in mesh_recs if r["status"] == "ok"), None)
  if args.restore == "none":
    pass
  elif source is None:
    runner.phases.append(
      {
        "phase": "restore",
        "kind": "restore",
        "devices": 0,
        "mesh": "-",
        "status": "skipped",
        "reason": "no mesh run finished",
      }
    )
  else:
    src_mesh, src_rec = source
    before = [s for s in checkpoint_steps(src_rec["run_dir"]) if s < args.steps]
    if not before:
      runner.phases.append(
        {
          "phase": "restore",
          "kind": "restore",
          "devices": 0,
          "mesh": "-",
          "status": "skipped",
          "reason": f"no checkpoint before step "
          f"{args.steps} in {src_rec['run_dir']} (lower --checkpoint-every)",
        }
      )
    else:
      k = before[-1]
      other = restore_mesh or next((m for m, _ in mesh_recs if m != src_mesh), None)
      targets = ([None] if args.restore in ("both", "single") else []) + (
        [other] if other is not None and args.restore in ("both", "mesh") else []
      )
      for target in targets:
        rec = runner.run(
          f"restore_{mesh_name(src_mesh)}_on_{mesh_name(target)}",
          "restore",
          target,
          args.steps - k,
          0,
          resume=True,
          prepare=copy_checkpoint(src_rec["run_dir"], k),
        )
        rec.update(source=src_rec["phase"], from_step=k)
        step_and_save(rec)
  return finish(runner, args)


def finish(runner, args) -> int:
  """Final summary: ``summary.json``, ``summary.md``, the loss plot and the printed table."""
  summary = summarize(runner, args)
  summary["plot"] = plot(summary, os.path.join(args.out, "loss_curves.png"))
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(markdown(summary))
  print_table(summary)
  print(f"summary {os.path.join(args.out, 'summary.json')}")
  return 0 if summary["all_checks_pass"] else 1


def reuse_baseline(src: str, args) -> dict:
  """The baseline phase of an earlier run directory ``src`` (same config, steps, global batch and
  sequence length: checked), copied into ``args.out`` so that a later call runs only meshes."""
  src = os.path.abspath(src)
  with open(os.path.join(src, "summary.json")) as f:
    old = json.load(f)
  for key, want in (
    ("config", args.config),
    ("steps", args.steps),
    ("global_batch", args.global_batch),
    ("seq_len", args.resolved_seq_len),
  ):
    if old.get(key) != want:
      raise ValueError(f"--baseline-from: {src} has {key}={old.get(key)!r}, this run {want!r}")
  rec = next((p for p in old["phases"] if p["kind"] == "baseline"), None)
  if rec is None or rec.get("status") != "ok":
    raise ValueError(f"--baseline-from: {src} has no finished baseline phase")
  dst = os.path.join(args.out, "baseline")
  if os.path.abspath(dst) != os.path.join(src, "baseline"):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(
      os.path.join(src, "baseline"), dst, ignore=shutil.ignore_patterns("checkpoints")
    )
  return {**rec, "run_dir": dst, "reused_from": src}


def resummarize(args) -> int:
  """Recomputes the checks of a finished run directory (``--resummarize DIR``; no runs)."""
  out = os.path.abspath(args.resummarize)
  with open(os.path.join(out, "summary.json")) as f:
    old = json.load(f)
  for p in old["phases"]:  # The run may have been made elsewhere: phases live under DIR.
    for key in ("vs_baseline", "loss_check", "vs_source", "restore_check"):
      p.pop(key, None)
    if p.get("run_dir"):
      p["run_dir"] = os.path.join(out, os.path.basename(p["run_dir"]))
  for key in (
    "config",
    "steps",
    "global_batch",
    "meshes",
    "checkpoint_every",
    "budget_s",
    "command",
  ):
    setattr(args, key, old[key])
  _fill_checks(args, old)  # the recorded checks, unless this command line sets them
  args.resolved_seq_len, args.out, args.env = old["seq_len"], out, old.get("env")
  runner = argparse.Namespace(
    platform=old["platform"],
    available=old["devices_available"],
    phases=old["phases"],
    elapsed=lambda: old["elapsed_s"],
  )
  return finish(runner, args)


if __name__ == "__main__":
  sys.exit(main())
