"""Tests of the training job (``train/``): config overrides, packing, checkpoints, a short run."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from train import checkpoint, data, loop
from train.__main__ import main
from train.config import RunConfig, TrainConfig, load_config, save_config
from train.sample import sample

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

# A very small NSA model (one layer) and short rows: compiles in a few seconds on CPU.
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


def _docs(*texts: str) -> list[np.ndarray]:
  return [np.frombuffer(t.encode(), np.uint8) for t in texts]


# ----------------------------------------------------------------------------------------------
# config


def test_overrides_reach_every_section():
  cfg = load_config(
    TINY,
    [
      "train.steps=50",
      "model.d_model=64",
      "model.nsa.num_selected=3",
      "train.lr=3e-3",
      "model.attention=[swa, nsa]",
      "model.nsa.score_pooling=max",
    ],
  )
  assert cfg.train.steps == 50 and cfg.model.d_model == 64
  assert cfg.model.nsa.num_selected == 3 and cfg.model.nsa.score_pooling == "max"
  assert cfg.train.lr == pytest.approx(3e-3)  # YAML reads "3e-3" as a string; accepted.
  assert cfg.model.attention == ("swa", "nsa")
  # Unchanged fields keep the file's values.
  assert cfg.model.nsa.block_size == 32 and cfg.train.batch_size == 8


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.stepz=1", "train.stepz"),
    ("model.nsa.foo=1", "model.nsa.foo"),
    ("model.dmodel=3", "model.dmodel"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("steps=5", "dotted key"),
    ("train.steps", "section.key=value"),
    ("train.steps=-1", "train.steps"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.lr=fast", "train.lr"),
    ("train.output_dir=", "train.output_dir"),
    ("model.nsa=3", "model.nsa"),
    ("model.nsa.block_size=12", "model.nsa."),
    ("model.vocab_size=100", "model.vocab_size"),
  ],
)
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
    load_config(TINY, [override])


def test_unknown_key_in_file_and_saved_config_round_trip(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: {d_model: 32}\ntrain: {steps: 3, learning_rate: 0.1}\n")
  with pytest.raises(ValueError, match="learning_rate"):
    load_config(bad)
  cfg = load_config(TINY, SMALL + ["train.steps=7"])
  save_config(cfg, tmp_path / "out" / "config.yaml")
  assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_every_config_file_loads():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and isinstance(cfg.train, TrainConfig), path


def test_config_error_before_any_compile(tmp_path, capsys):
  out = tmp_path / "never"
  assert main(["--config", TINY, f"train.output_dir={out}", "train.seq_len=1"]) == 2
  assert "train.seq_len" in capsys.readouterr().err
  assert not out.exists()


# ----------------------------------------------------------------------------------------------
# data


def test_packing_keeps_every_byte_in_order():
  docs = _docs("alpha beta gamma delta", "x", "0123456789" * 5, "hello, world\n", "")
  rows = list(data.packed_rows(docs, 16, shuffle=False, repeat=False, num_packing_bins=1))
  toks = np.stack([r["tokens"] for r in rows])
  seg = np.stack([r["tokens_segment_ids"] for r in rows])
  pos = np.stack([r["tokens_positions"] for r in rows])
  assert toks.shape[1] == 16
  # Concatenating the non-padding bytes row by row gives back the documents.
  assert bytes(toks[seg > 0].astype(np.uint8)) == b"".join(bytes(d) for d in docs)
  for s, p in zip(seg, pos):
    used = s > 0
    assert not np.any(used[np.argmin(used) :]) or used.all(), "padding only at the row end"
    ids = s[used]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    starts = np.r_[True, np.diff(ids) == 1]
    assert np.all(p[used][starts] == 0), "positions restart at each document"
    assert np.all(np.diff(p[used])[~starts[1:]] == 1), "positions count up inside a document"
  # Pieces are at most one row long and tile each document.
  pieces = data.chunk_documents(docs, 16)
  assert max(len(x) for x in pieces) == 16
  assert b"".join(bytes(x.astype(np.uint8)) for x in pieces) == b"".join(bytes(d) for d in docs)


def test_shuffled_packing_keeps_the_pieces():
  docs = _docs(*[chr(ord("a") + i) * (3 + 7 * i) for i in range(10)])
  rows = list(data.packed_rows(docs, 32, seed=3, shuffle=True, repeat=False, num_packing_bins=4))
  got = sorted(
    bytes(r["tokens"][r["tokens_segment_ids"] == s].astype(np.uint8))
    for r in rows
    for s in range(1, r["tokens_segment_ids"].max() + 1)
  )
  want = sorted(bytes(x.astype(np.uint8)) for x in data.chunk_documents(docs, 32))
  assert got == want


def test_loss_mask_never_crosses_documents():
  # Every document uses its own byte range, so a cross-document target is easy to spot.
  rng = np.random.default_rng(0)
  docs = [
    rng.integers(20 * i, 20 * i + 20, size=n).astype(np.uint8)
    for i, n in enumerate([5, 40, 17, 3, 90, 1, 33, 64, 2, 70])
  ]
  batches = list(data.batches(docs, 31, 3, seed=1, shuffle=True, repeat=False))
  assert batches
  for b in batches:
    assert all(
      b[k].shape == (3, 31) for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")
    )
    m = b["loss_mask"] > 0
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    assert np.all(b["tokens"][m] // 20 == b["targets"][m] // 20)
    assert np.all(b["segment_ids"][m] > 0)
    # Masked exactly where the next token starts another document or is padding.
    nxt_same = b["segment_ids"][:, :-1] == b["segment_ids"][:, 1:]
    np.testing.assert_array_equal(m[:, :-1], nxt_same & (b["segment_ids"][:, :-1] > 0))


def test_batches_are_deterministic_given_the_seed():
  docs = _docs(*[f"document {i}: " + "abcdefghij"[i] * (50 + 13 * i) for i in range(10)])

  def take(seed):
    it = data.train_iterator(docs, 32, 2, seed)
    return [next(it) for _ in range(6)]

  a, b, c = take(0), take(0), take(1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))
  ev1 = data.eval_batches(docs, 32, 2, 3)
  ev2 = data.eval_batches(docs, 32, 2, 3)
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(ev1, ev2))


def test_corpus_split_is_deterministic(tmp_path):
  for i in range(40):
    sub = tmp_path / ("pkg" if i % 2 else "") / ("test" if i % 7 == 0 else "")
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f"m{i}.py").write_text(f"x = {i}\n" * (i + 1))
  (tmp_path / "notes.txt").write_text("not python")
  c1 = data.load_corpus(10_000, 0.2, root=tmp_path)
  c2 = data.load_corpus(10_000, 0.2, root=tmp_path)
  assert c1.train_names == c2.train_names and c1.heldout_names == c2.heldout_names
  names = c1.train_names + c1.heldout_names
  assert not set(c1.train_names) & set(c1.heldout_names) and c1.heldout_names
  assert all(n.endswith(".py") and "test" not in n.split(os.sep) for n in names)
  assert len(names) == 40 - len(range(0, 40, 7))
  # The default corpus: the standard library, capped.
  std = data.load_corpus(300_000, 0.05)
  assert 0 < std.train_bytes + std.heldout_bytes <= 300_000 and std.heldout


# ----------------------------------------------------------------------------------------------
# optimizer, checkpoint, sampling, a short run


def test_schedule_and_decay_mask():
  tc = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
  s = loop.lr_schedule(tc)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3)
  assert float(s(100)) == pytest.approx(1e-4)
  params = {
    "norm": {"scale": np.ones(4)},
    "dense": {"kernel": np.ones((4, 4))},
    "phi": {"b1": np.ones((1, 4)), "w1": np.ones((1, 2, 4, 4))},
    "emb": np.ones((8, 4)),
  }
  assert loop.decay_mask(params) == {
    "norm": {"scale": False},
    "dense": {"kernel": True},
    "phi": {"b1": False, "w1": True},
    "emb": True,
  }


def test_checkpoint_round_trip(tmp_path):
  cfg = load_config(TINY, SMALL)
  docs = _docs(*[f"def f{i}(x):\n  return x * {i}\n" * 6 for i in range(8)])
  it = data.train_iterator(docs, cfg.train.seq_len, cfg.train.batch_size, 0)
  model, opt = loop.build(cfg)
  trainer = loop.Trainer(model, opt)
  for _ in range(2):
    trainer.step(next(it))
  path = checkpoint.save(tmp_path / "checkpoints", model, opt, trainer.step_count)
  saved_embedding = np.array(model.embed.embedding[...])
  assert path.endswith(os.path.join("checkpoints", "2"))
  assert checkpoint.latest(tmp_path / "checkpoints") == path

  other = load_config(TINY, SMALL + ["train.seed=7"])  # Different initial weights.
  model2, opt2 = loop.build(other)
  assert checkpoint.restore(path, model2, opt2) == 2
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(model2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(nnx.state(opt)), jax.tree.leaves(nnx.state(opt2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trainer2 = loop.Trainer(model2, opt2)
  assert trainer2.step_count == 2
  batch = next(it)
  loss1, loss2 = float(trainer.step(batch)["loss"]), float(trainer2.step(batch)["loss"])
  assert loss1 == loss2

  model3, _ = loop.build(other)  # Parameters only.
  checkpoint.restore(path, model3)
  np.testing.assert_array_equal(np.asarray(model3.embed.embedding[...]), saved_embedding)
  wrong, wrong_opt = loop.build(load_config(TINY, SMALL + ["model.d_model=48"]))
  with pytest.raises(ValueError, match="does not match"):
    checkpoint.restore(path, wrong, wrong_opt)
  with pytest.raises(FileNotFoundError):
    checkpoint.restore(tmp_path / "nope", model2)


def test_short_run_lowers_loss_and_writes_outputs(tmp_path, capsys):
  out = tmp_path / "run"
  rc = main(
    [
      "--config",
      TINY,
      "--no-progress",
      *SMALL,
      "train.steps=30",
      "train.log_every=10",
      "train.eval_every=15",
      "train.eval_batches=2",
      "train.sample_bytes=16",
      "train.corpus_max_bytes=400000",
      f"train.output_dir={out}",
    ]
  )
  assert rc == 0
  text = capsys.readouterr().out
  assert "eval loss" in text and "tokens/s" in text and "checkpoint" in text
  events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  losses = [e["loss"] for e in events if "loss" in e]
  evals = [e["eval_loss"] for e in events if "eval_loss" in e]
  assert [e["step"] for e in events if "loss" in e] == [10, 20, 30]
  assert len(evals) == 2 and all(np.isfinite(evals))
  assert losses[-1] < losses[0] - 0.5 and losses[-1] < 4.0, losses
  assert evals[-1] < np.log(256) - 1.0, evals
  assert load_config(out / "config.yaml").train.steps == 30
  ckpt = checkpoint.latest(out / "checkpoints")
  assert ckpt is not None and ckpt.endswith("30")


def test_no_evaluation_with_zero_eval_batches(tmp_path, capsys, monkeypatch):
  """``train.eval_batches=0``: the run never evaluates (no eval program to compile), still
  trains and saves; a negative count is refused by name."""
  calls = []
  monkeypatch.setattr(loop.Trainer, "evaluate", lambda self, b: calls.append(b) or 0.0)
  out = tmp_path / "run"
  rc = main(
    [
      "--config",
      TINY,
      "--no-progress",
      *SMALL,
      "train.steps=4",
      "train.log_every=2",
      "train.eval_every=2",
      "train.eval_batches=0",
      "train.sample_bytes=0",
      "train.corpus_max_bytes=100000",
      f"train.output_dir={out}",
    ]
  )
  assert rc == 0 and calls == []
  text = capsys.readouterr().out
  assert "eval loss" not in text and "tokens/s" in text
  events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in events if "loss" in e] == [2, 4]
  assert not any("eval_loss" in e for e in events)
  assert checkpoint.latest(out / "checkpoints").endswith("4")
  assert main(["--config", TINY, "train.eval_batches=-1", f"train.output_dir={out}x"]) == 2
  assert "train.eval_batches" in capsys.readouterr().err


def test_sampling_is_fixed_length_and_reproducible():
  cfg = load_config(TINY, SMALL)
  model, _ = loop.build(cfg)
  a = sample(model, "def ", 10, temperature=0.0, max_len=8)  # Slides past max_len.
  b = sample(model, "def ", 10, temperature=0.0, max_len=8)
  assert a.shape == (10,) and a.dtype == np.int32 and np.array_equal(a, b)
  assert np.all((a >= 0) & (a < 256))
  c = sample(model, b"x", 5, temperature=1.0, seed=3)
  d = sample(model, b"x", 5, temperature=1.0, seed=3)
  assert np.array_equal(c, d)
  with pytest.raises(ValueError, match="prompt"):
    sample(model, "", 3)


def test_latent_overrides_reach_the_asa_config():
  cfg = load_config("configs/asa_tiny.yaml", ["model.latent.groups=1", "model.latent.rope_dim=8"])
  assert cfg.model.latent.groups == 1 and cfg.model.latent.rope_dim == 8
  with pytest.raises(ValueError, match="no_such_field"):
    load_config("configs/asa_tiny.yaml", ["model.latent.no_such_field=1"])
