"""SPMD training on simulated CPU devices: mesh, sharding rules, sharded steps, checkpoints.

The multi-device scenarios run in subprocesses (``tests/train/spmd_worker.py``) that set
``jax_num_cpu_devices=8`` before JAX starts; this process keeps its single device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention_jax.nn import DecoderLM
from sparse_attention_jax.nn.parallel import sharded_call
from train import data, loop
from train import mesh as mesh_lib
from train import sharding as shd
from train.__main__ import main
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
WORKER = os.path.join(ROOT, "tests", "train", "spmd_worker.py")
SMALL = [
  "model.d_model=32",
  "model.num_layers=1",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=16",
  "model.mlp_dim=64",
  "model.window=32",
  "model.nsa.block_size=16",
  "model.nsa.num_selected=3",
  "model.nsa.window=32",
  "train.seq_len=64",
  "train.batch_size=4",
  "train.lr=1.0e-2",
  "train.warmup_steps=5",
]
DOCS = [
  np.frombuffer((f"def f{i}(x):\n  return x * {i}\n" * (8 + i)).encode(), np.uint8)
  for i in range(8)
]


def _worker(*args: str) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(
    [sys.executable, WORKER, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# mesh, rules, annotations (one device)


def test_mesh_shape_fills_the_free_axis_and_names_errors():
  assert mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  assert mesh_lib.mesh_shape({"tensor": 2}, 8) == (1, 4, 2)  # fsdp defaults to -1.
  assert mesh_lib.mesh_shape({"data": -1}, 4) == (4, 1, 1)
  with pytest.raises(ValueError, match=r"train\.mesh.*product is the number of devices \(8\)"):
    mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match=r"train\.mesh.*do not divide the 8 devices"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match=r"train\.mesh: unknown axes \['pipe'\]"):
    mesh_lib.mesh_shape({"pipe": 2}, 8)
  with pytest.raises(ValueError, match=r"train\.mesh\.data"):
    load_config(TINY, ["train.mesh.data=0"])
  with pytest.raises(ValueError, match="at most one axis of size -1"):
    load_config(TINY, ["train.mesh={data: -1, fsdp: -1}"])
  with pytest.raises(ValueError, match=r"train\.grad_accum_steps"):
    load_config(TINY, ["train.grad_accum_steps=3"])
  mesh = mesh_lib.make_mesh({"fsdp": -1})  # One device here.
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_distributed_initialize_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_PROCESS_COUNT",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_INDEX",
    "JAX_PROCESS_ID",
  ):
    monkeypatch.delenv(name, raising=False)
  assert not mesh_lib.initialize_distributed(False) and calls == []
  assert mesh_lib.initialize_distributed(True) and calls == [{}]  # jax detects the cluster.
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_PROCESS_COUNT", "4")
  monkeypatch.setenv("JAX_PROCESS_INDEX", "2")
  assert mesh_lib.initialize_distributed(False)
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
  monkeypatch.setenv("JAX_PROCESS_INDEX", "two")
  with pytest.raises(ValueError, match="JAX_PROCESS_INDEX: expected an int, got 'two'"):
    mesh_lib.initialize_distributed(False)


def test_rules_map_logical_axes_with_divisibility_fallback():
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})
  P = jax.sharding.PartitionSpec
  assert shd.logical_to_spec(("embed", "q_heads", "head_dim"), (32, 4, 16), mesh) == P(
    "fsdp", "tensor", None
  )
  assert shd.logical_to_spec(("vocab", "embed"), (256, 32), mesh) == P("tensor", "fsdp")
  # One KV head cannot split over tensor=2: replicated.
  assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 1, 16), mesh) == P(
    "fsdp", None, None
  )
  assert shd.logical_to_spec(("norm",), (32,), mesh) == P(None)
  assert shd.batch_spec(mesh) == P(("data", "fsdp"), None)
  one = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 1})
  assert shd.logical_to_spec(("mlp", "embed"), (64, 32), one) == P(None, "fsdp")
  assert shd.batch_spec(one) == P(("fsdp",), None)
  with pytest.raises(ValueError, match="logical axis 'heads'"):
    shd.logical_to_spec(("heads",), (4,), mesh)


def test_every_param_has_logical_axes_and_no_mesh_is_needed():
  # Built with no mesh (tests/nn/test_nn.py runs these models without one).
  cfg = load_config(
    TINY,
    SMALL + ["model.attention=[nsa, swa, full]", "model.num_layers=3", "model.tie_embeddings=true"],
  )
  model = nnx.eval_shape(lambda: DecoderLM(cfg.model, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(leaves) > 20
  for v in leaves:
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(v.shape), (names, v.shape)
  # Without a mesh the attention helper is a plain call.
  assert (
    sharded_call(
      lambda q: q * 2, {"q": jnp.ones((2, 4, 1, 8))}, {"q": "bthd"}, num_kv_heads=1
    ).sum()
    == 2 * 64
  )


def test_single_process_sharded_build_equals_the_one_device_build(monkeypatch):
  """One process: the sharded build places the eagerly built state (bit-equal values, no jitted
  initializer); several processes (faked here) take the jitted path."""
  cfg = load_config(TINY, SMALL + ["model.attention=[nsa, full]", "model.num_layers=2"])
  mesh = mesh_lib.make_mesh({"fsdp": -1})
  want = nnx.state(loop.build(cfg)[0], nnx.Param)
  got_model, _ = loop.build_sharded(cfg, mesh)
  for a, b in zip(jax.tree.leaves(nnx.state(got_model, nnx.Param)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jitted = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "jit", lambda f, **kw: jitted.append(kw) or real_jit(f, **kw))
  loop.build_sharded(cfg, mesh)
  assert jitted and "out_shardings" in jitted[0]


def test_bf16_compute_keeps_f32_master_weights():
  cfg = load_config(TINY, SMALL + ["model.dtype=bfloat16", "model.attention=[full]"])
  model, opt = loop.build(cfg)
  trainer = loop.Trainer(model, opt)
  it = data.train_iterator(DOCS, 64, 4, 0)
  loss = float(trainer.step(next(it))["loss"])
  assert np.isfinite(loss)
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  moments = {x.dtype for x in jax.tree.leaves(nnx.state(opt)) if jnp.ndim(x) > 0}
  assert moments == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------------------
# 8 simulated devices (subprocesses)


def test_sharded_training_matches_one_device_and_shards_by_the_rules():
  out = _worker("equivalence")
  single = np.asarray(out["single"])
  assert single[-1] < single[0] - 1.0, single  # It trains.
  # (a) Same losses on 1 device and on (data=2, fsdp=2, tensor=2), with and without
  # gradient accumulation; replicated heads (2 KV heads on tensor=4) with remat too.
  np.testing.assert_allclose(out["mesh_222"], single, rtol=1e-5)
  np.testing.assert_allclose(out["mesh_222_accum2"], single, rtol=1e-5)
  np.testing.assert_allclose(out["mesh_124_remat"], single, rtol=1e-5)
  np.testing.assert_allclose(out["mesh_222_scan_remat"], out["single_2layers"], rtol=1e-5)
  assert not np.allclose(out["single_2layers"], single)  # (a different model)
  # Answer metrics of synthetic tasks (train.synthetic) evaluate the same under the mesh.
  assert out["answers_mesh"]["answer_loss"] == pytest.approx(
    out["answers_single"]["answer_loss"], rel=1e-4
  )
  assert out["answers_mesh"]["answer_accuracy"] == pytest.approx(
    out["answers_single"]["answer_accuracy"]
  )
  # (b) Parameters and optimizer moments are sharded as the rules say.
  p, o = out["param_specs"], out["opt_specs"]
  assert p["embed/embedding"] == "P('tensor', 'fsdp')"
  assert p["layers/0/attn/q_proj/kernel"] == "P('fsdp', 'tensor', None)"
  assert p["layers/0/attn/k_cmp/kernel"] == "P('fsdp', 'tensor', None)"  # 2 KV heads / tensor=2
  assert p["layers/0/attn/o_proj/kernel"] == "P('tensor', None, 'fsdp')"
  assert p["layers/0/attn/phi_k/w1"] == "P('tensor', None, None, None)"
  assert p["layers/0/mlp/down/kernel"] == "P('tensor', 'fsdp')"
  assert p["lm_head/kernel"] == "P('fsdp', 'tensor')"
  assert p["final_norm/scale"] == "P(None,)"
  for name, spec in p.items():
    for moment in ("mu", "nu"):
      assert o[f"opt_state/1/0/{moment}/{name}"] == spec, (moment, name)
  assert o["step"] == "P()"
  # Attention runs per shard inside shard_map under the mesh, as a plain call without one.
  assert out["jaxpr_mesh"] and not out["jaxpr_plain"]


def test_checkpoint_resume_reshard_and_keep_last_n(tmp_path):
  out = _worker("checkpoint", str(tmp_path))
  # (c) Stop after step 4, resume in fresh objects: the same losses bit for bit.
  assert out["resumed_from"] == 4 and out["resumed_steps"] == 8
  assert out["resumed"] == out["full"][4:]
  # (d) The (2, 2, 2) checkpoint restores onto (1, 8, 1) and onto one device unchanged.
  for name, spec, devices in (("mesh_181", "P(None, 'fsdp')", 8), ("single", "None", 1)):
    assert out[f"restore_{name}_step"] == 8
    assert out[f"restore_{name}_equal"], name
    assert out[f"restore_{name}_embed_spec"] == spec
    assert out[f"restore_{name}_devices"] == devices
  # (e) keep_checkpoints=2 with saves every 2 steps of 8: steps 6 and 8 remain.
  assert out["kept"] == [6, 8]


def test_sigterm_saves_and_resume_continues_the_same_curve(tmp_path):
  # Dense attention: this tests the job (signals, checkpoints, data state), and compiles fast.
  common = [
    "--config",
    TINY,
    "--no-progress",
    *SMALL,
    "model.attention=[full]",
    "train.steps=150",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_bytes=0",
    "train.corpus_max_bytes=100000",
    "train.checkpoint_every=25",
  ]

  def curve(out):
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if "loss" in e}

  full = tmp_path / "full"
  assert main([*common, f"train.output_dir={full}"]) == 0

  part = tmp_path / "part"
  env = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  proc = subprocess.Popen(
    [sys.executable, "-m", "train", *common, f"train.output_dir={part}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step     3 |"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  text = "".join(lines) + rest
  assert proc.returncode == 0, text[-3000:]
  assert "stopped by SIGTERM" in text, text[-3000:]
  stopped = max(int(n) for n in os.listdir(part / "checkpoints") if n.isdigit())
  assert 3 <= stopped < 150  # Many steps left: the signal lands mid-run even on a busy host.

  t0 = time.perf_counter()
  assert main([*common, f"train.output_dir={part}", "--resume"]) == 0
  assert time.perf_counter() - t0 < 300
  want, got = curve(full), curve(part)
  assert sorted(got) == list(range(1, 151))
  assert [got[s] for s in range(1, 151)] == [want[s] for s in range(1, 151)]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _launch_two_processes(args: list[str], signal_one_after: str | None = None) -> list[str]:
  """``python -m train ARGS`` as 2 processes x 4 CPU devices (gloo collectives); their output.

  ``signal_one_after``: SIGTERM goes to process 1 alone once it prints a line starting so."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = {
      **os.environ,
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_PROCESS_COUNT": "2",
      "JAX_PROCESS_INDEX": str(i),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  head = ""
  if signal_one_after is not None:
    for line in procs[1].stdout:
      head += line
      if line.startswith(signal_one_after):
        procs[1].send_signal(signal.SIGTERM)
        break
  outs = [p.communicate(timeout=400)[0] for p in procs]
  outs[1] = head + outs[1]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  # Each process loads its shard of the data; batches are assembled into global arrays on the
  # (data=2, fsdp=2, tensor=2) mesh spanning both processes.
  out = tmp_path / "run"
  args = [
    "--config",
    TINY,
    "--no-progress",
    *SMALL,
    "model.attention=[full]",
    "train.batch_size=8",
    "train.mesh.data=2",
    "train.mesh.tensor=2",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_bytes=0",
    "train.corpus_max_bytes=100000",
    "train.checkpoint_every=3",
    f"train.output_dir={out}",
  ]
  logs = _launch_two_processes(args)
  assert all("mesh data=2 fsdp=2 tensor=2 (8 cpu devices, 2 processes)" in log for log in logs)
  ckpts = out / "checkpoints"
  assert sorted(os.listdir(ckpts / "3" / "data")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]

  def curve():
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if "loss" in e]

  first = curve()
  assert [s for s, _ in first] == [1, 2, 3, 4, 5, 6]
  # "Lose" the last checkpoint, resume both processes from step 3: steps 4-6 repeat exactly.
  shutil.rmtree(ckpts / "6")
  logs = _launch_two_processes([*args, "--resume"])
  assert all("(step 3 of 6)" in log for log in logs)
  # metrics.jsonl was trimmed to step 3, so steps 4-6 appear once, equal to the first run's.
  assert curve() == first


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """SIGTERM reaches process 1 only: both processes stop after the same step, save one complete
  checkpoint there and exit cleanly (none is left waiting at a collective)."""
  out = tmp_path / "run"
  args = [
    "--config",
    TINY,
    "--no-progress",
    *SMALL,
    "model.attention=[full]",
    "train.batch_size=8",
    "train.mesh.data=2",
    "train.steps=400",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_bytes=0",
    "train.corpus_max_bytes=100000",
    "train.checkpoint_every=1000",
    f"train.output_dir={out}",
  ]
  logs = _launch_two_processes(args, signal_one_after="step     3 |")
  assert "stopped by SIGTERM" in logs[1], logs[1][-3000:]
  assert "stopped by a signal to another process" in logs[0], logs[0][-3000:]
  steps = [int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 400, steps
  assert sorted(os.listdir(out / "checkpoints" / str(steps[0]) / "data")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
