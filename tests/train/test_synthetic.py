"""Synthetic tasks (``train.synthetic``), answer accuracy and run scalars (TensorBoard, MFU)."""

from __future__ import annotations

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import loop, scalars, synthetic
from train.__main__ import main
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
  "model.window=32",
  "model.nsa.block_size=16",
  "model.nsa.num_selected=3",
  "model.nsa.window=32",
  "train.seq_len=96",
  "train.batch_size=2",
]


@pytest.mark.parametrize("index", range(6))
def test_mqar_answers_are_in_the_context(index):
  ids, answer = synthetic.mqar_sample(7, index, 80, num_pairs=10, num_queries=6)
  assert ids.shape == (80,) and answer.sum() == 6
  pairs = dict(zip(ids[0:20:2].tolist(), ids[1:20:2].tolist()))
  assert len(pairs) == 10 and all(1 <= k < 128 for k in pairs)
  asked = []
  for i in np.flatnonzero(answer):
    key = int(ids[i - 1])
    assert pairs[key] == ids[i], "the answer is the value given after its key in the context"
    asked.append(key)
  assert len(set(asked)) == 6
  assert np.all(ids[20 : 80 - 12] == 0)  # Filler between the pairs and the queries.


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0, -1.0])
def test_needle_answer_is_in_the_context_at_the_depth(depth):
  ids, answer = synthetic.needle_sample(3, 11, 400, depth)
  text = bytes(ids.astype(np.uint8))
  value = bytes(ids[answer].astype(np.uint8))
  assert len(text) == 400 and len(value) == 6 and value.isdigit()
  key = text[text.rindex(b"code of ") + 8 : text.rindex(b"? ")]
  needle = b" The secret code of " + key + b" is " + value + b". "
  at = text.find(needle)
  assert at >= 0 and text.endswith(b"? " + value + b".")
  if depth >= 0:
    filler = 400 - len(needle) - len(b" What is the secret code of " + key + b"? " + value + b".")
    assert at == round(depth * filler)


def test_streams_are_deterministic_and_iterator_state_restores():
  kw = {"num_pairs": 8, "num_queries": 4, "answers_only": True}
  a = synthetic.task_iterator("mqar", 63, 3, seed=5, **kw)
  b = synthetic.task_iterator("mqar", 63, 3, seed=5, **kw)
  c = synthetic.task_iterator("mqar", 63, 3, seed=6, **kw)
  first = [next(a) for _ in range(2)]
  for x, y in zip(first, [next(b) for _ in range(2)]):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(first[0]["tokens"], next(c)["tokens"])
  state = a.get_state()
  after = [next(a) for _ in range(2)]
  fresh = synthetic.task_iterator("mqar", 63, 3, seed=5, **kw)
  fresh.set_state(json.loads(json.dumps(state)))
  for x, y in zip(after, [next(fresh) for _ in range(2)]):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  batch = after[0]
  assert batch["tokens"].shape == (3, 63)
  np.testing.assert_array_equal(batch["loss_mask"], batch["answer_mask"])
  assert batch["answer_mask"].sum() == 3 * 4
  # Eval stream differs from training and shards of two processes are disjoint.
  ev = synthetic.task_eval_batches("mqar", 63, 3, 1, **kw)[0]
  assert not np.array_equal(ev["tokens"], first[0]["tokens"])
  s0 = next(synthetic.task_iterator("needle", 127, 1, 5, shard_index=0, shard_count=2))
  s1 = next(synthetic.task_iterator("needle", 127, 1, 5, shard_index=1, shard_count=2))
  assert not np.array_equal(s0["tokens"], s1["tokens"])
  all_mask = next(synthetic.task_iterator("needle", 127, 1, 5))
  assert all_mask["loss_mask"].sum() == 127 and all_mask["answer_mask"].sum() == 6


def test_context_len_pads_and_bad_sizes_name_the_setting():
  row = synthetic.sample_row("needle", 0, 0, 200, context_len=150)
  assert np.all(row["tokens_segment_ids"][150:] == 0) and np.all(row["tokens_segment_ids"][:150])
  with pytest.raises(ValueError, match="seq_len"):
    synthetic.task_batches("mqar", 20, 1, 0, num_pairs=16, num_queries=16)
  with pytest.raises(ValueError, match="context_len"):
    synthetic.sample_row("mqar", 0, 0, 64, context_len=65)


def test_answer_accuracy_matches_a_plain_reference():
  cfg = load_config(TINY, SMALL + ["data.source=mqar", "data.num_pairs=8", "data.num_queries=5"])
  model, optimizer = loop.build(cfg)
  trainer = loop.Trainer(model, optimizer)
  batches = synthetic.task_eval_batches("mqar", 96, 2, 2, num_pairs=8, num_queries=5)
  got = trainer.evaluate_answers(batches)
  forward = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
  ce, correct, count = 0.0, 0.0, 0.0
  for b in batches:
    logits = np.asarray(
      forward(
        model, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
      ),
      np.float64,
    )
    m = b["answer_mask"] > 0
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    tgt = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    ce += -tgt[m].sum()
    correct += (logits.argmax(-1) == b["targets"])[m].sum()
    count += m.sum()
  assert count == 2 * 2 * 5
  assert got["answer_loss"] == pytest.approx(ce / count, rel=1e-5)
  assert got["answer_accuracy"] == pytest.approx(correct / count)
  with pytest.raises(ValueError, match="answer_mask"):
    trainer.evaluate_answers([{k: v for k, v in batches[0].items() if k != "answer_mask"}])


def _tb_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads TensorBoard event files (TFRecord framing) with tensorboardX's protos."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      raw = f.read()
    i = 0
    while i < len(raw):
      (n,) = struct.unpack("<Q", raw[i : i + 8])
      ev = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def test_short_mqar_run_logs_accuracy_tensorboard_and_throughput(tmp_path, capsys):
  out = tmp_path / "run"
  args = [
    "--config",
    TINY,
    "--no-progress",
    *SMALL,
    f"train.output_dir={out}",
    "train.steps=4",
    "train.log_every=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "data.source=mqar",
    "data.num_pairs=8",
    "data.num_queries=4",
    "data.loss_on=answers",
    "train.peak_flops=1.0e9",
  ]  # A made-up peak: CPUs have none in the table.
  assert main(args) == 0
  text = capsys.readouterr().out
  assert "answer accuracy" in text and "| MFU " in text and "synthetic mqar" in text
  assert "peak 0.001 TFLOP/s per device" in text
  events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  train_ev = [e for e in events if "loss" in e]
  eval_ev = [e for e in events if "eval_loss" in e]
  assert [e["step"] for e in train_ev] == [2, 4] and [e["step"] for e in eval_ev] == [2, 4]
  assert all(0 <= e["eval_answer_accuracy"] <= 1 for e in eval_ev)
  for e in train_ev:
    assert e["tokens_per_s_per_device"] == pytest.approx(e["tokens_per_s"] / jax.device_count())
    assert e["tflops_per_device"] > 0
    assert e["mfu"] == pytest.approx(e["tflops_per_device"] * 1e12 / 1e9)
  tb = _tb_scalars(str(out / "tensorboard"))
  assert [s for s, _ in tb["train/loss"]] == [2, 4]
  assert tb["train/loss"][1][1] == pytest.approx(train_ev[1]["loss"], rel=1e-6)
  assert tb["eval/answer_accuracy"][0][1] == pytest.approx(eval_ev[0]["eval_answer_accuracy"])


def test_throughput_fields_mfu():
  f = scalars.throughput_fields(2000.0, 1e9, 4, 1e12)
  assert f["tokens_per_s_per_device"] == 500.0
  assert f["tflops_per_device"] == pytest.approx(0.5) and f["mfu"] == pytest.approx(0.5)
  assert scalars.describe_throughput(f).startswith(" | MFU 50.0%")
  none = scalars.throughput_fields(2000.0, 1e9, 4, None)
  assert none["mfu"] is None and scalars.describe_throughput(none).startswith(" | MFU n/a")
