"""End-to-end smoke test of ``benchmarks/multi_device_run.py`` on 2 simulated CPU devices.

Tiny model (the tiny config with dense attention), seq 64, global batch 4, 6 steps per phase: baseline on 1 device, meshes data=2 and
fsdp=2 (checkpoints every 3 steps), the data=2 checkpoint of step 3 resumed on 1 device and on
fsdp=2. In float32 on CPU the sharded curves equal the 1-device curve up to reduction order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "multi_device_run.py")
# Dense attention keeps the five compiles of the run at ~40 s on 2 busy cores (NSA inside
# shard_map on meshes is tested by tests/train/test_spmd.py; with the NSA layer this run takes ~90 s).
SMALL = [
  "model.d_model=32",
  "model.num_layers=1",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=16",
  "model.mlp_dim=64",
  "model.attention=[full]",
  "train.lr=1.0e-2",
  "train.warmup_steps=1",
  "train.corpus_max_bytes=100000",
]


def _module():
  return load_script(os.path.relpath(SCRIPT, ROOT), "multi_device_run")


def test_mesh_parsing_and_curve_differences():
  m = _module()
  assert m.parse_meshes("data=2;fsdp=2") == [
    {"data": 2, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 2, "tensor": 1},
  ]
  assert m.parse_meshes(" data=1,tensor=2 ;") == [{"data": 1, "fsdp": 1, "tensor": 2}]
  assert [m.mesh_name(x) for x in (None, {"data": 2, "fsdp": 1, "tensor": 2})] == [
    "1dev",
    "data2_tensor2",
  ]
  for bad in ("pipe=2", "data=0", "data=-1", "data", ""):
    with pytest.raises(ValueError, match="--meshes"):
      m.parse_meshes(bad)
  ref = {1: 3.0, 2: 2.5, 3: 2.0, 4: 1.5}
  d = m.curve_diff({2: 2.5, 3: 2.3, 4: 1.5, 5: 9.0}, ref, smooth=2)
  assert d["common_steps"] == 3 and d["first_common_step"] == 2
  assert d["max_abs_diff"] == pytest.approx(0.3)
  assert d["max_abs_diff_smoothed"] == pytest.approx(0.15)
  assert d["max_abs_diff_early"] is None
  assert m.curve_diff({2: 2.5, 3: 2.3, 4: 1.0}, ref, 2, early=1)["max_abs_diff_early"] == 0.0
  assert m.curve_diff({2: 2.5, 3: 2.3, 4: 1.0}, ref, 2, early=2)["max_abs_diff_early"] == (
    pytest.approx(0.3)
  )
  assert m.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
  env = m.phase_env("cpu", 2, None)
  assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
  assert env["NCCL_NVLS_ENABLE"] == "0" and env["NVSHMEM_DISABLE_NVLS"] == "1"
  assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
  assert m.phase_env("gpu", 2, None)["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_callers_xla_flags_reach_the_phases_and_the_record(monkeypatch):
  m = _module()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert m.run_env()["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=true"
  assert m.run_env()["NCCL_NVLS_ENABLE"] == "0"
  assert m.phase_env("gpu", 2, None)["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=true"
  assert "--xla_gpu_deterministic_ops=true" in m.phase_env("cpu", 2, None)["XLA_FLAGS"].split()
  monkeypatch.delenv("XLA_FLAGS")
  assert "XLA_FLAGS" not in m.run_env()


def test_multi_device_run_end_to_end_on_two_cpu_devices(tmp_path):
  out = tmp_path / "multi"
  argv = [
    sys.executable,
    SCRIPT,
    "--config",
    "configs/tiny.yaml",
    "--platform",
    "cpu",
    "--steps",
    "6",
    "--seq-len",
    "64",
    "--global-batch",
    "4",
    "--meshes",
    "data=2;fsdp=2",
    "--checkpoint-every",
    "3",
    "--out",
    str(out),
    "--loss-tol",
    "1e-4",
    "--restore-tol",
    "1e-4",
    *SMALL,
  ]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run(
    argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  phases = {p["phase"]: p for p in summary["phases"]}
  assert list(phases) == [
    "baseline",
    "mesh_data2",
    "mesh_fsdp2",
    "restore_data2_on_1dev",
    "restore_data2_on_fsdp2",
  ]
  assert all(p["status"] == "ok" for p in phases.values()), summary
  assert [p["devices"] for p in phases.values()] == [1, 2, 2, 1, 2]
  base = phases["baseline"]
  first = json.loads((out / "baseline" / "metrics.jsonl").read_text().splitlines()[0])
  assert base["final_loss"] < first["loss"] - 0.3  # It trains.
  for name in ("mesh_data2", "mesh_fsdp2"):
    p = phases[name]
    assert p["steps_run"] == 6 and p["vs_baseline"]["common_steps"] == 6
    assert p["vs_baseline"]["max_abs_diff"] < 1e-4 and p["loss_check"] == "pass"
    assert p["final_loss"] == pytest.approx(base["final_loss"], abs=1e-4)
    assert p["tokens_per_s_per_device"] == pytest.approx(p["tokens_per_s"] / 2)
    assert p["scaling_efficiency"] == pytest.approx(
      p["tokens_per_s_per_device"] / base["tokens_per_s"]
    )
  assert sorted(os.listdir(out / "mesh_data2" / "checkpoints")) == ["3", "6"]
  for name in ("restore_data2_on_1dev", "restore_data2_on_fsdp2"):
    p = phases[name]
    assert p["resumed"] and p["from_step"] == 3 and p["source"] == "mesh_data2"
    assert (p["first_step"], p["last_step"]) == (4, 6)
    assert p["vs_source"]["common_steps"] == 3 and p["vs_source"]["max_abs_diff"] < 1e-4
    assert p["restore_check"] == "pass"
  assert summary["all_checks_pass"]
  assert (out / "loss_curves.png").stat().st_size > 1000
  assert "all checks pass: True" in proc.stdout and "restore_data2_on_fsdp2" in proc.stdout
  assert all(p["device"].startswith("cpu") for p in phases.values())
  md = (out / "summary.md").read_text()
  assert "NCCL_NVLS_ENABLE=0" in md and "--meshes 'data=2;fsdp=2'" in md
  assert (
    sum(
      line.startswith("| restore_data2_on_") and line.endswith("| pass |")
      for line in md.splitlines()
    )
    == 2
  )

  # A later call runs only a mesh against the baseline of this one (--baseline-from), restores
  # only onto another mesh (--restore mesh) and keeps its compilation cache elsewhere.
  out2 = tmp_path / "multi2"
  argv2 = [a if a != str(out) else str(out2) for a in argv]
  argv2[argv2.index("--meshes") + 1] = "fsdp=2"
  cache = tmp_path / "kept_cache"
  proc = subprocess.run(
    [
      *argv2,
      "--baseline-from",
      str(out),
      "--restore",
      "mesh",
      "--restore-mesh",
      "data=2",
      "--compile-cache",
      str(cache),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
  again = {p["phase"]: p for p in json.loads((out2 / "summary.json").read_text())["phases"]}
  assert again["baseline"]["reused_from"] == str(out) and "reused" in proc.stdout
  assert again["baseline"]["tokens_per_s"] == base["tokens_per_s"]
  assert again["mesh_fsdp2"]["loss_check"] == "pass"
  assert [p for p in again if p.startswith("restore")] == ["restore_fsdp2_on_data2"]
  assert again["restore_fsdp2_on_data2"]["restore_check"] == "pass"
  assert any(cache.iterdir()) and not (out2 / "jax_cache").exists()
  assert (out2 / "baseline" / "metrics.jsonl").exists()
  steps_at = argv2.index("--steps") + 1
  bad = subprocess.run(
    [*argv2[:steps_at], "5", *argv2[steps_at + 1 :], "--baseline-from", str(out), "--overwrite"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert bad.returncode == 2 and "--baseline-from" in bad.stderr and "steps=6" in bad.stderr


def test_refuses_an_out_that_holds_a_run(tmp_path, capsys):
  """A second command into the same --out would silently replace the first run's phases."""
  m = load_script("benchmarks/multi_device_run.py")
  (tmp_path / "summary.json").write_text("{}")
  argv = [
    "--config",
    "configs/tiny.yaml",
    "--platform",
    "cpu",
    "--steps",
    "4",
    "--out",
    str(tmp_path),
  ]
  assert m.main(argv) == 2
  err = capsys.readouterr().err
  assert "--out" in err and "--overwrite" in err and str(tmp_path) in err
  assert os.listdir(tmp_path) == ["summary.json"]  # nothing ran


def test_summary_checks_fail_on_diverging_or_unresumed_curves(tmp_path):
  m = _module()

  def run(name, kind, devices, curve, tok_s, **extra):
    d = tmp_path / name
    d.mkdir()
    lines = [
      json.dumps({"step": s, "loss": v, "tokens_per_s": tok_s if s > min(curve) else 0})
      for s, v in sorted(curve.items())
    ]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return {
      "phase": name,
      "kind": kind,
      "devices": devices,
      "mesh": "-",
      "status": "ok",
      "run_dir": str(d),
      "tokens_per_s": tok_s,
      "tokens_per_s_per_device": tok_s / devices,
      "first_step": min(curve),
      "last_step": max(curve),
      "resumed": True,
      **extra,
    }

  base = {s: 5.0 - 0.1 * s for s in range(1, 7)}
  off = {s: v + (0.2 if s == 5 else 0.0) for s, v in base.items()}
  runner = type("R", (), {})()
  runner.platform, runner.available, runner.elapsed = "cpu", 2, lambda: 1.0
  runner.phases = [
    run("baseline", "baseline", 1, base, 100.0),
    run("mesh_data2", "mesh", 2, off, 160.0),
    run(
      "restore_ok",
      "restore",
      1,
      {s: off[s] for s in (4, 5, 6)},
      90.0,
      source="mesh_data2",
      from_step=3,
    ),
    run(
      "restore_bad",
      "restore",
      2,
      {s: base[s] for s in (4, 5, 6)},
      150.0,
      source="mesh_data2",
      from_step=3,
    ),
    run(
      "restore_fresh",
      "restore",
      1,
      {s: off[s] for s in (4, 5, 6)},
      90.0,
      source="mesh_data2",
      from_step=3,
      resumed=False,
    ),
  ]
  args = type(
    "A",
    (),
    {
      "config": "c.yaml",
      "steps": 6,
      "resolved_seq_len": 8,
      "global_batch": 2,
      "meshes": "data=2",
      "checkpoint_every": 3,
      "loss_tol": 0.1,
      "restore_tol": 1e-6,
      "smooth": 1,
      "budget_s": 10.0,
      "out": str(tmp_path),
    },
  )()
  summary = m.summarize(runner, args)
  p = {x["phase"]: x for x in summary["phases"]}
  assert p["mesh_data2"]["loss_check"] == "fail"  # 0.2 > 0.1 at step 5.
  assert p["mesh_data2"]["scaling_efficiency"] == pytest.approx(0.8)
  assert p["restore_ok"]["restore_check"] == "pass"
  assert p["restore_bad"]["restore_check"] == "fail"  # Differs from its source at step 5.
  assert p["restore_fresh"]["restore_check"] == "fail"  # Did not resume.
  assert not summary["all_checks_pass"]
  args.loss_tol, args.smooth = 0.25, 2
  summary = m.summarize(runner, args)
  assert summary["phases"][1]["loss_check"] == "pass"
  assert summary["phases"][1]["vs_baseline"]["max_abs_diff_smoothed"] == pytest.approx(0.1)
  assert all("loss_check" not in x for x in summary["phases"] if x["kind"] == "restore")
  assert summary["mesh_spread"] == {}  # One mesh run: nothing to compare it with.
  # The early check bounds the raw difference over the first steps (0.2 at step 5).
  args.early_steps, args.early_tol = 4, 0.05
  assert m.summarize(runner, args)["phases"][1]["loss_check"] == "pass"
  args.early_steps = 5
  summary = m.summarize(runner, args)
  assert summary["phases"][1]["loss_check"] == "fail"
  assert summary["phases"][1]["vs_baseline"]["max_abs_diff_early"] == pytest.approx(0.2)
  # --resummarize recomputes the checks of the written run directory with new tolerances.
  assert (
    m.main(
      [
        "--resummarize",
        str(tmp_path),
        "--smooth",
        "2",
        "--loss-tol",
        "0.25",
        "--early-steps",
        "4",
        "--restore-tol",
        "1.0",
      ]
    )
    == 1
  )  # restore_fresh: no resume
  again = json.loads((tmp_path / "summary.json").read_text())
  checks = {x["phase"]: x.get("loss_check") or x.get("restore_check") for x in again["phases"]}
  assert checks == {
    "baseline": None,
    "mesh_data2": "pass",
    "restore_ok": "pass",
    "restore_bad": "pass",
    "restore_fresh": "fail",
  }
  assert (again["smooth"], again["early_steps"], again["command"]) == (2, 4, summary["command"])
  assert (tmp_path / "summary.md").read_text().count("| pass |") == 3
  # Without flags, --resummarize keeps the recorded checks (not the parser's defaults).
  assert m.main(["--resummarize", str(tmp_path)]) == 1
  kept = json.loads((tmp_path / "summary.json").read_text())
  assert (kept["smooth"], kept["early_steps"], kept["loss_tol"], kept["restore_tol"]) == (
    2,
    4,
    0.25,
    1.0,
  )
  assert {
    x["phase"]: x.get("loss_check") or x.get("restore_check") for x in kept["phases"]
  } == checks
