"""A damaged newest checkpoint is skipped: restore walks back to the newest one that reads back
and verifies (structure, shapes, content checksums), logs why, and moves the bad one aside."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from train import checkpoint, data, loop
from train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = [
  "model.d_model=32",
  "model.num_layers=1",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=16",
  "model.mlp_dim=64",
  "model.attention=[full]",
  "train.seq_len=32",
  "train.batch_size=2",
]


def _iterator(cfg):
  docs = [
    np.frombuffer(f"def f{i}(x):\n  return x * {i}\n".encode() * 6, np.uint8) for i in range(8)
  ]
  return data.train_iterator(docs, cfg.train.seq_len, cfg.train.batch_size, 0)


def _leaves(obj):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(obj))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Checkpoints of steps 2 and 4 (model, optimizer, data position) and the step-2 values."""
  cfg = load_config(TINY, SMALL)
  model, opt = loop.build(cfg)
  it = _iterator(cfg)
  directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
  with checkpoint.Checkpointer(directory, every=2, config=cfg.to_dict()) as ckpt:
    next(it)
    ckpt.save(2, model, opt, it)
    ckpt.wait()
    want = {"model": _leaves(model), "opt": _leaves(opt), "next": next(_copy(it))["tokens"]}
    next(it)
    for obj in (model, opt):  # Other values at step 4 (no training step: nothing to compile).
      nnx.update(obj, jax.tree.map(lambda x: x + 1, nnx.state(obj)))
    ckpt.save(4, model, opt, it)
  return cfg, directory, want


def _copy(it):
  """An iterator at the same position (the original is not advanced)."""
  other = _iterator(load_config(TINY, SMALL))
  other.set_state(it.get_state())
  return other


def _data_file(step_dir) -> str:
  """The largest array data file of the step's state item."""
  files = [
    os.path.join(d, f)
    for d, _, fs in os.walk(step_dir / "state")
    for f in fs
    if "/d" in d[len(str(step_dir)) :]
  ]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_4k(step_dir):
  path = _data_file(step_dir)
  size = os.path.getsize(path)
  assert size > 3 * 4096, size
  with open(path, "r+b") as f:
    f.seek(size // 2 - 2048)
    block = f.read(4096)
    f.seek(size // 2 - 2048)
    f.write(bytes(b ^ 0xFF for b in block))


def _empty(step_dir):
  for name in os.listdir(step_dir):
    p = step_dir / name
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _other_checksum(step_dir):
  """Values that read back fine but differ from those saved (what a bit flip inside an
  uncompressed chunk gives): the saved checksum of one array no longer matches."""
  path = step_dir / "meta" / "meta.json"
  meta = json.loads(path.read_text())
  name = sorted(meta["checksums"])[0]
  meta["checksums"][name] = f"{int(meta['checksums'][name], 16) ^ 1:016x}"
  path.write_text(json.dumps(meta))


DAMAGES = {
  "changed_values": _other_checksum,
  "truncated_data_file": _truncate,
  "missing_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
  "missing_data_state": lambda d: (d / "data" / "process_0-of-1.json").unlink(),
  "missing_state": lambda d: shutil.rmtree(d / "state"),
  "emptied_folder": _empty,
  "flipped_4KiB": _flip_4k,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(saved, tmp_path, damage):
  cfg, src, want = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(src, directory)
  DAMAGES[damage](directory / "4")
  model, opt = loop.build(load_config(TINY, SMALL + ["train.seed=5"]))
  it = _iterator(cfg)
  logged = []
  with checkpoint.Checkpointer(directory, every=2) as ckpt:
    restored = ckpt.restore_latest(model, opt, it, log=logged.append)
    assert restored is not None and restored.step == 2 and restored.verified
    assert [s for s, _, _ in restored.skipped] == [4]
    assert ckpt.steps() == [2]
  assert len(logged) == 1 and "skipped step 4" in logged[0] and "moved aside" in logged[0], logged
  if damage == "changed_values":
    assert "checksum mismatch" in logged[0], logged
  assert sorted(os.listdir(directory)) == ["2", "4.corrupt"]  # Kept, never deleted.
  for a, b in zip(_leaves(model), want["model"]):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(opt), want["opt"]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(next(it)["tokens"], want["next"])  # The data position too.


def test_checksum_catches_a_changed_value_and_nothing_restores(saved, tmp_path):
  """Every checkpoint damaged: nothing restores (None), both moved aside; the single-tree
  reader verifies the checksums of a Checkpointer step too."""
  cfg, src, _ = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(src, directory)
  model, opt = loop.build(cfg)
  _flip_4k(directory / "2")
  with pytest.raises(checkpoint.CorruptCheckpoint):
    checkpoint.restore(directory / "2", model, opt)
  _empty(directory / "4")
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.restore_latest(model, opt, _iterator(cfg), log=lambda s: None) is None
  assert sorted(os.listdir(directory)) == ["2.corrupt", "4.corrupt"]


def test_checksums_ignore_the_sharding_and_see_one_word():
  x = jax.numpy.arange(4096, dtype=jax.numpy.float32).reshape(64, 64)
  a = checkpoint.integrity.checksums({"x": x})
  assert a == checkpoint.integrity.checksums({"x": jax.numpy.array(np.asarray(x))})
  y = x.at[17, 3].set(np.float32(np.nextafter(np.float32(x[17, 3]), np.float32(1e9))))
  assert checkpoint.integrity.checksums({"x": y})["x"][:8] != a["x"][:8]
  bf = x.astype(jax.numpy.bfloat16)
  assert (
    checkpoint.integrity.checksums({"b": bf})["b"]
    != checkpoint.integrity.checksums({"b": bf.at[0, 0].set(7)})["b"]
  )


def test_a_model_of_another_shape_is_a_mismatch_not_damage(saved, tmp_path):
  cfg, src, _ = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(src, directory)
  wider = load_config(TINY, SMALL + ["model.d_model=48"])
  model, opt = nnx.eval_shape(lambda: loop.build(wider))  # Shapes are all a restore checks.
  with (
    checkpoint.Checkpointer(directory) as ckpt,
    pytest.raises(checkpoint.CheckpointMismatch, match="shape"),
  ):
    ckpt.restore_latest(model, opt, _iterator(cfg))
  assert sorted(os.listdir(directory)) == ["2", "4"]  # Nothing moved.


def test_checkpoints_folder_instead_of_a_step_is_a_clear_error(saved):
  cfg, src, _ = saved
  model, _ = loop.build(cfg)
  with pytest.raises(FileNotFoundError, match="checkpoints folder"):
    checkpoint.restore(src, model)


def test_a_checkpoint_without_meta_restores_unverified(saved, tmp_path):
  """Checkpoints written without the meta item (older versions) still restore, marked
  unverified."""
  cfg, src, _ = saved
  directory = tmp_path / "checkpoints"
  shutil.copytree(src, directory)
  shutil.rmtree(directory / "4" / "meta")
  model, opt = loop.build(cfg)
  with checkpoint.Checkpointer(directory) as ckpt:
    restored = ckpt.restore_latest(model, opt, _iterator(cfg))
  assert restored.step == 4 and not restored.verified and restored.config is None
