"""Data sources of the training job (``train.sources``): files, JSONL, ArrayRecord, tokenizer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from train import data as data_lib
from train import sources
from train.config import load_config
from train.data_config import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL_TRAIN = [
  "train.seq_len=32",
  "train.batch_size=2",
  "train.eval_batches=2",
  "train.heldout_fraction=0.3",
]


def _texts(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "ünïcode", "x", "0123", "\n"]
  return [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(n)]


def _write_jsonl(path, texts, field="text"):
  with open(path, "w", encoding="utf-8") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({field: t, "id": i}) + "\n")


def _bytes_of(docs) -> bytes:
  return b"".join(bytes(np.asarray(d, np.uint8)) for d in docs)


def _check_packed(batch, docs_ids: set[tuple[int, ...]] | None = None):
  """Positions restart per segment, the loss never crosses documents, padding has segment 0."""
  seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
  for s, p, m in zip(seg, pos, mask):
    starts = np.r_[True, s[1:] != s[:-1]]
    assert np.all(p[starts & (s > 0)] == 0)
    cont = ~starts & (s > 0)
    assert np.all(p[cont] == p[np.r_[cont[1:], False]] + 1)
    inside = np.r_[s[:-1] == s[1:], False]
    assert np.all(m[(s == 0)] == 0)
    # A target is trained only when the next token is in the same document.
    assert np.all(m[:-1][~inside[:-1]] == 0)


def test_text_files_by_glob_split_by_hash(tmp_path):
  texts = _texts(12)
  for i, t in enumerate(texts):
    sub = tmp_path / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    (sub / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
  cfg = DataConfig(source="text", paths=(str(tmp_path / "**" / "*.txt"),))
  corpus = sources.load_file_corpus(cfg, 0.3, sources.Tokenizer())
  assert len(corpus.train) + len(corpus.heldout) == 12 and corpus.heldout and corpus.train
  by_name = {
    os.path.basename(n): d
    for n, d in zip(corpus.train_names + corpus.heldout_names, corpus.train + corpus.heldout)
  }
  for i, t in enumerate(texts):
    assert bytes(by_name[f"doc{i:02d}.txt"].astype(np.uint8)) == t.encode("utf-8")
  # The split is a function of the names: the same every call.
  again = sources.load_file_corpus(cfg, 0.3, sources.Tokenizer())
  assert again.heldout_names == corpus.heldout_names
  with pytest.raises(FileNotFoundError, match="data.paths"):
    sources.load_file_corpus(
      DataConfig(source="text", paths=(str(tmp_path / "*.md"),)), 0.3, sources.Tokenizer()
    )


def test_jsonl_field_eval_paths_and_errors(tmp_path):
  train_texts, eval_texts = _texts(6, 1), _texts(3, 2)
  _write_jsonl(tmp_path / "train.jsonl", train_texts, "body")
  _write_jsonl(tmp_path / "eval.jsonl", eval_texts, "body")
  cfg = DataConfig(
    source="jsonl",
    paths=(str(tmp_path / "*.jsonl"),),
    eval_paths=(str(tmp_path / "eval.jsonl"),),
    text_field="body",
  )
  corpus = sources.load_file_corpus(cfg, 0.5, sources.Tokenizer())
  assert _bytes_of(corpus.train) == "".join(train_texts).encode()
  assert _bytes_of(corpus.heldout) == "".join(eval_texts).encode()
  assert corpus.heldout_names[0].endswith("eval.jsonl:1")
  bad = DataConfig(source="jsonl", paths=(str(tmp_path / "train.jsonl"),), text_field="text")
  with pytest.raises(ValueError, match=r"data.text_field.*'text'.*train.jsonl:1"):
    sources.load_file_corpus(bad, 0.5, sources.Tokenizer())


def test_array_record_text_and_json_records(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  texts = _texts(8, 3)
  for fmt in ("text", "json"):
    path = str(tmp_path / f"{fmt}.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    for t in texts:
      w.write(t.encode() if fmt == "text" else json.dumps({"text": t}).encode())
    w.close()
    cfg = DataConfig(source="array_record", paths=(path,), record_format=fmt)
    names, docs = sources.read_documents([path], cfg, sources.Tokenizer())
    assert [bytes(d.astype(np.uint8)).decode() for d in docs] == texts
    assert names == [f"{path}:{i}" for i in range(8)]


def _tokenizer_json(tmp_path, texts) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(texts, trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return path


def test_tokenizer_encodes_documents_packs_and_checks_vocab(tmp_path):
  from tokenizers import Tokenizer

  texts = _texts(10, 4)
  _write_jsonl(tmp_path / "d.jsonl", texts)
  tok_path = _tokenizer_json(tmp_path, texts)
  hf = Tokenizer.from_file(tok_path)
  vocab = hf.get_vocab_size()
  assert 256 < vocab <= 300
  base = SMALL_TRAIN + [
    "data.source=jsonl",
    f"data.paths=[{tmp_path}/d.jsonl]",
    f"data.tokenizer={tok_path}",
  ]
  setup = sources.make_data(load_config(TINY, base + [f"model.vocab_size={vocab}"]))
  tok = setup.tokenizer
  assert tok.vocab_size == vocab and tok.decode(tok.encode(texts[0])) == texts[0]
  corpus = sources.load_file_corpus(load_config(TINY, base).data, 0.3, tok)
  encoded = {tuple(hf.encode(t, add_special_tokens=False).ids) for t in texts}
  assert {tuple(d) for d in corpus.train + corpus.heldout} == encoded
  for _ in range(3):
    batch = next(setup.train)
    assert batch["tokens"].shape == (2, 32) and batch["tokens"].max() < vocab
    _check_packed(batch)
  assert len(setup.eval) == 2
  with pytest.raises(ValueError, match=rf"model.vocab_size: expected >= {vocab}.*tokenizer"):
    sources.make_data(load_config(TINY, base + [f"model.vocab_size={vocab - 1}"]))


def test_packed_pieces_of_a_file_source_tile_the_documents(tmp_path):
  texts = _texts(5, 5)
  _write_jsonl(tmp_path / "d.jsonl", texts)
  cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "d.jsonl"),))
  names, docs = sources.read_documents([str(tmp_path / "d.jsonl")], cfg, sources.Tokenizer())
  rows = list(data_lib.packed_rows(docs, 17, shuffle=False, repeat=False, num_packing_bins=1))
  toks = np.stack([r["tokens"] for r in rows])
  seg = np.stack([r["tokens_segment_ids"] for r in rows])
  assert bytes(toks[seg > 0].astype(np.uint8)) == "".join(texts).encode()


def test_data_config_validation_and_overrides():
  cfg = load_config(TINY, ["data.source=text", "data.paths=[a/*.txt, b.txt]"])
  assert cfg.data.paths == ("a/*.txt", "b.txt")
  assert load_config(TINY).data == DataConfig()  # No data section: the stdlib default.
  for override, message in [
    ("data.source=csv", "data.source"),
    ("data.source=text", "data.paths"),
    ("data.loss_on=answers", "data.loss_on"),
    ("data.num_queries=20", "data.num_queries"),
    ("data.needle_depth=1.5", "data.needle_depth"),
    ("data.tokenizer=t.json", "data.tokenizer"),
    ("data.bogus=1", "data.bogus"),
  ]:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
      load_config(TINY, [override])


def test_training_job_on_tokenized_jsonl(tmp_path, capsys):
  from train.__main__ import main

  texts = _texts(12, 6)
  _write_jsonl(tmp_path / "d.jsonl", texts)
  tok_path = _tokenizer_json(tmp_path, texts)
  small = [
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
    "model.vocab_size=320",
  ]
  out = tmp_path / "run"
  args = [
    "--config",
    TINY,
    "--no-progress",
    *small,
    *SMALL_TRAIN,
    f"train.output_dir={out}",
    "train.steps=3",
    "train.log_every=3",
    "train.tensorboard=false",
    "data.source=jsonl",
    f"data.paths=[{tmp_path}/d.jsonl]",
    f"data.tokenizer={tok_path}",
  ]
  assert main(args) == 0
  text = capsys.readouterr().out
  assert "tokens of tokenizer.json" in text and "uniform over 320 ids" in text
  assert "sample          skipped" in text
  events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert any("eval_loss" in e for e in events) and not (out / "tensorboard").exists()
  # The tokenizer has ~300 ids; the error comes before --overwrite deletes anything.
  assert main(args + ["model.vocab_size=256", "--overwrite"]) == 2
  assert "model.vocab_size: expected >=" in capsys.readouterr().err
  assert (out / "metrics.jsonl").exists()
