"""Multi-device scenarios of ``tests/train/test_spmd.py``, run in a subprocess with 8 CPU devices.

``jax_num_cpu_devices`` must be set before JAX initializes its backend, so these run as
``python tests/train/spmd_worker.py SCENARIO [DIR]`` and print one JSON object on the last line.

Scenarios:
  equivalence: the same tiny model trained on one device (no mesh) and on meshes (2, 2, 2),
    (2, 2, 2) with 2 microbatches, and (1, 2, 4) with remat (its 2 KV heads do not split over
    tensor=4: heads replicated), a 2-layer model with its layers in one lax.scan on (2, 2, 2) vs
    unrolled on one device; plus the partition specs of parameters and optimizer moments and
    whether attention ran in shard_map; synthetic-task answer metrics on one device and the mesh.
  checkpoint DIR: uninterrupted run vs stop-at-step-k + resume from the async checkpoint (new
    model, optimizer, iterator, trainer), keep-last-N, and restoring the (2, 2, 2) checkpoint
    onto (1, 8, 1) and onto one device.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

import json
import os
import sys

import numpy as np
from flax import nnx

from train import checkpoint, data, loop, synthetic
from train import mesh as mesh_lib
from train import sharding as shd
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
  "model.d_model=32",
  "model.num_layers=1",
  "model.num_heads=4",
  "model.num_kv_heads=2",
  "model.head_dim=16",
  "model.mlp_dim=64",
  "model.window=32",
  "model.nsa.block_size=16",
  "model.nsa.cmp_window=16",
  "model.nsa.cmp_stride=8",
  "model.nsa.num_selected=3",
  "model.nsa.window=32",
  "train.seq_len=64",
  "train.batch_size=8",
  "train.lr=1.0e-2",
  "train.warmup_steps=2",
  "train.steps=8",
]
DOCS = [
  np.frombuffer((f"def f{i}(x):\n  return x * {i} + {i * i}\n" * (10 + i)).encode(), np.uint8)
  for i in range(16)
]


def config(*extra: str):
  return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), SMALL + list(extra))


def iterator(cfg):
  return data.train_iterator(DOCS, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed)


def losses(cfg, mesh, steps, accum=1):
  it = iterator(cfg)
  model, opt = loop.build(cfg)
  trainer = loop.Trainer(model, opt, mesh=mesh, grad_accum_steps=accum)
  return [float(trainer.step(next(it))["loss"]) for _ in range(steps)], trainer


def specs(state) -> dict[str, str]:
  return {k.removesuffix("/value"): v for k, v in shd.describe_state(state).items()}


def equivalence() -> dict:
  cfg = config()
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  out = {}
  out["single"], single = losses(cfg, None, 5)
  out["mesh_222"], trainer = losses(cfg, mesh, 5)
  # Synthetic-task answer metrics: sharded evaluation = one-device evaluation.
  task = synthetic.task_eval_batches("mqar", 64, 8, 2, num_pairs=8, num_queries=4)
  out["answers_single"] = single.evaluate_answers(task)
  out["answers_mesh"] = trainer.evaluate_answers(task)
  out["mesh_222_accum2"] = losses(cfg, mesh, 5, accum=2)[0]
  out["mesh_124_remat"] = losses(
    config("model.remat=full"), mesh_lib.make_mesh({"fsdp": 2, "tensor": 4}), 5
  )[0]
  # Two layers applied by one lax.scan (model.scan_layers) on the mesh, with remat, = the
  # unrolled layers on one device.
  out["single_2layers"] = losses(config("model.num_layers=2"), None, 5)[0]
  out["mesh_222_scan_remat"] = losses(
    config("model.num_layers=2", "model.scan_layers=true", "model.remat=full"), mesh, 5
  )[0]
  out["param_specs"] = specs(trainer._model_state)
  out["opt_specs"] = specs(trainer._opt_state)
  # Attention runs inside shard_map under the mesh (and as a plain call without one).
  model = trainer.model
  x = np.zeros((8, 64, cfg.model.d_model), np.float32)
  pos = np.tile(np.arange(64, dtype=np.int32), (8, 1))
  with shd.activate(mesh):
    out["jaxpr_mesh"] = "shard_map" in str(
      jax.make_jaxpr(lambda x, p: model.layers[0].attn(x, p))(x, pos)
    )
  out["jaxpr_plain"] = "shard_map" in str(
    jax.make_jaxpr(lambda x, p: model.layers[0].attn(x, p))(x, pos)
  )
  return out


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def checkpointing(directory: str) -> dict:
  cfg = config()
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  stop = 4
  out = {}

  # Uninterrupted: 8 steps, async checkpoints every 2 steps, keep 2.
  it = iterator(cfg)
  model, opt = loop.build(cfg)
  trainer = loop.Trainer(model, opt, mesh=mesh)
  full_dir = os.path.join(directory, "full")
  with checkpoint.Checkpointer(full_dir, every=2, keep=2) as ckpt:
    result = loop.train(
      trainer,
      cfg.train,
      it,
      progress=False,
      log=lambda s: None,
      on_step=lambda s, f: ckpt.save(s, model, opt, it, force=f),
    )
  out["full"] = result.losses
  out["kept"] = sorted(int(n) for n in os.listdir(full_dir) if n.isdigit())
  saved = _leaves(model)

  # Interrupted after step 4 (the process "dies": nothing but the checkpoint survives) ...
  it = iterator(cfg)
  model, opt = loop.build(cfg)
  trainer = loop.Trainer(model, opt, mesh=mesh)
  part_dir = os.path.join(directory, "part")
  with checkpoint.Checkpointer(part_dir, every=2, keep=2) as ckpt:
    for _ in range(stop):
      trainer.step(next(it))
      ckpt.save(trainer.step_count, model, opt, it)
  del model, opt, trainer, it
  # ... and resumed by a fresh model (another seed), optimizer, iterator and trainer.
  cfg7 = config("train.seed=7")
  it = data.train_iterator(DOCS, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed)
  model, opt = loop.build(cfg7)
  trainer = loop.Trainer(model, opt, mesh=mesh)
  with checkpoint.Checkpointer(part_dir, every=2, keep=2) as ckpt:
    out["resumed_from"] = ckpt.restore(model, opt, it)
    trainer.refresh()
    result = loop.train(trainer, cfg.train, it, progress=False, log=lambda s: None)
  out["resumed"] = result.losses
  out["resumed_steps"] = trainer.step_count

  # The (2, 2, 2) checkpoint of step 8 restored onto (1, 8, 1) and onto one device.
  for name, target in (
    ("mesh_181", mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})),
    ("single", None),
  ):
    model, opt = loop.build(cfg7)
    trainer = loop.Trainer(model, opt, mesh=target)
    with checkpoint.Checkpointer(full_dir, keep=2) as ckpt:
      step = ckpt.restore(model, opt)
    trainer.refresh()
    out[f"restore_{name}_step"] = step
    out[f"restore_{name}_equal"] = all(np.array_equal(a, b) for a, b in zip(saved, _leaves(model)))
    out[f"restore_{name}_embed_spec"] = str(
      getattr(model.embed.embedding[...].sharding, "spec", None)
    )
    out[f"restore_{name}_devices"] = len(model.embed.embedding[...].sharding.device_set)
  return out


if __name__ == "__main__":
  scenario = sys.argv[1]
  if scenario == "equivalence":
    result = equivalence()
  elif scenario == "checkpoint":
    result = checkpointing(sys.argv[2])
  else:
    raise SystemExit(f"scenario: expected 'equivalence' or 'checkpoint', got {scenario!r}")
  print(json.dumps(result))
