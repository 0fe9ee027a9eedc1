"""Data sources of the training job, chosen by the ``data:`` section (:mod:`train.data_config`).

* ``stdlib``: the embedded corpus of :func:`train.data.load_corpus` (the ``make demo`` default).
* ``text``: every file of the globs ``data.paths`` is one document.
* ``jsonl``: every line of the files is a JSON object; its ``data.text_field`` is a document.
* ``array_record``: every record (read with Grain's ``ArrayRecordDataSource``) is a document:
  UTF-8 text, or a JSON object holding ``data.text_field`` (``data.record_format: json``).
* ``mqar``, ``needle``: synthetic tasks generated on the fly (:mod:`train.synthetic`).

Text is encoded as UTF-8 bytes (ids 0..255) or, with ``data.tokenizer`` (a ``tokenizer.json`` of
the ``tokenizers`` package), as its token ids; the tokenizer's vocabulary must fit
``model.vocab_size``. Documents are packed by :func:`train.data.batches` (segment ids and
positions per document, so no document attends to another). Held-out documents: those of
``data.eval_paths``, else a ``train.heldout_fraction`` share chosen by a hash of each document's
name (``path``, ``path:line``, ``path:record``).

Example::

  setup = make_data(load_config("configs/tiny.yaml", ["data.source=jsonl",
                                                       "data.paths=[corpus/*.jsonl]"]))
  batch = next(setup.train)     # dict of [batch, seq_len] arrays (see train.data.shift_rows)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from train import data as data_lib
from train import synthetic
from train.config import RunConfig
from train.data_config import DataConfig


def expand_globs(patterns: Sequence[str], what: str = "data.paths") -> list[str]:
  """Sorted unique files matching ``patterns`` (``**`` recursive).

  Raises:
    FileNotFoundError: a pattern matches no file (names it).
  """
  out = []
  for pattern in patterns:
    found = sorted(
      p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not found:
      raise FileNotFoundError(f"{what}: pattern {pattern!r} matches no file")
    out.extend(found)
  return sorted(set(out))


class Tokenizer:
  """Text <-> ids: UTF-8 bytes, or a ``tokenizer.json`` (Hugging Face ``tokenizers``)."""

  def __init__(self, path: str | None = None):
    self.path = path
    self._tok = None
    if path is not None:
      try:
        from tokenizers import Tokenizer as HFTokenizer
      except ImportError:
        raise ImportError(
          "data.tokenizer needs the `tokenizers` package (pip install 'sparse-attention-jax[text]')"
        ) from None
      if not os.path.isfile(path):
        raise FileNotFoundError(f"data.tokenizer: expected a tokenizer.json file, got {path!r}")
      self._tok = HFTokenizer.from_file(path)

  @property
  def vocab_size(self) -> int:
    return 256 if self._tok is None else self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of ``text`` (bytes are decoded as UTF-8 for a tokenizer)."""
    if self._tok is None:
      raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
      return np.frombuffer(raw, np.uint8).astype(np.int32)
    if isinstance(text, bytes):
      text = text.decode("utf-8", "replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return data_lib.decode(ids) if self._tok is None else self._tok.decode(ids)

  def check_vocab(self, vocab_size: int) -> None:
    """Raises ValueError when ids of this tokenizer would not fit ``model.vocab_size``."""
    if self.vocab_size > vocab_size:
      raise ValueError(
        f"model.vocab_size: expected >= {self.vocab_size} (the vocabulary of "
        f"data.tokenizer={self.path!r}), got {vocab_size}"
      )


def _read_texts(path: str, cfg: DataConfig) -> Iterator[tuple[str, bytes | str]]:
  """``(name, text)`` of the documents of one file of a file source."""
  if cfg.source == "text":
    with open(path, "rb") as f:
      yield path, f.read()
  elif cfg.source == "jsonl":
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          yield f"{path}:{n}", _field(json.loads(line), cfg.text_field, f"{path}:{n}")
  elif cfg.source == "array_record":
    import grain

    records = grain.sources.ArrayRecordDataSource([path])
    for i in range(len(records)):
      rec = records[i]
      if cfg.record_format == "json":
        rec = _field(json.loads(rec), cfg.text_field, f"{path}:{i}")
      yield f"{path}:{i}", rec
  else:
    raise ValueError(f"data.source: expected one of text, jsonl, array_record, got {cfg.source!r}")


def _field(obj: Any, field: str, where: str) -> str:
  if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"data.text_field: expected a string field {field!r} in {where}, got {got}")
  return obj[field]


def read_documents(
  files: Sequence[str], cfg: DataConfig, tokenizer: Tokenizer
) -> tuple[list[str], list[np.ndarray]]:
  """Names and token ids of the non-empty documents of ``files`` (up to ``cfg.max_bytes``)."""
  names, docs, total = [], [], 0
  for path in files:
    for name, text in _read_texts(path, cfg):
      ids = tokenizer.encode(text)
      if ids.size == 0:
        continue
      names.append(name)
      docs.append(ids)
      total += len(text.encode("utf-8") if isinstance(text, str) else text)
      if cfg.max_bytes and total >= cfg.max_bytes:
        return names, docs
  return names, docs


def load_file_corpus(
  cfg: DataConfig, heldout_fraction: float, tokenizer: Tokenizer
) -> data_lib.Corpus:
  """The train/held-out :class:`train.data.Corpus` of a file source (token-id documents)."""
  files = expand_globs(cfg.paths)
  if cfg.eval_paths:
    eval_files = expand_globs(cfg.eval_paths, "data.eval_paths")
    train_files = [f for f in files if f not in set(eval_files)]
    tn, td = read_documents(train_files, cfg, tokenizer)
    en, ed = read_documents(eval_files, cfg, tokenizer)
    if not td or not ed:
      raise ValueError(
        f"data.paths/eval_paths: expected non-empty documents on both sides, got "
        f"{len(td)} train and {len(ed)} held-out"
      )
    return data_lib.Corpus(
      train=tuple(td), heldout=tuple(ed), train_names=tuple(tn), heldout_names=tuple(en)
    )
  names, docs = read_documents(files, cfg, tokenizer)
  if len(docs) < 2:
    raise ValueError(
      f"data.paths: expected at least 2 non-empty documents to split into train "
      f"and held-out, got {len(docs)} from {len(files)} file(s)"
    )
  return data_lib.split_documents(names, docs, heldout_fraction)


@dataclasses.dataclass
class DataSetup:
  """What the training job needs from its data.

  Attributes:
    train: checkpointable Grain iterator of this process's training batches.
    eval: held-out batches (the same every evaluation).
    description: one line for the job's log.
    tokenizer: text <-> ids of the run (bytes unless ``data.tokenizer``).
    text: True for text sources (sampling text at the end makes sense).
  """

  train: Iterator[dict[str, np.ndarray]]
  eval: list[dict[str, np.ndarray]]
  description: str
  tokenizer: Tokenizer
  text: bool


# A packed row may take at most this many passes over the documents to fill (larger would pack
# for minutes or hours before the first batch, silently).
MAX_PASSES_PER_ROW = 16


def _check_corpus_size(corpus, seq_len: int, shard_count: int, with_eval: bool) -> None:
  """Raises ValueError when ``train.seq_len`` is out of proportion to the documents."""
  sizes = [("training", sum(len(d) for d in corpus.train) // shard_count)]
  if with_eval:
    sizes.append(("held-out", sum(len(d) for d in corpus.heldout) // shard_count))
  for what, tokens in sizes:
    if tokens == 0:
      raise ValueError(f"data: the {what} documents of this process are empty")
    if tokens * MAX_PASSES_PER_ROW < seq_len + 1:
      raise ValueError(
        f"train.seq_len: expected at most {tokens * MAX_PASSES_PER_ROW - 1} (the {what} "
        f"documents of this process hold {tokens} tokens; one packed row of seq_len + 1 tokens "
        f"may take at most {MAX_PASSES_PER_ROW} passes over them), got {seq_len}"
      )


def make_data(
  config: RunConfig, *, shard_index: int = 0, shard_count: int = 1, local_batch: int | None = None
) -> DataSetup:
  """Training iterator and held-out batches of ``config.data`` for this process.

  Args:
    config: the run config (``data``, ``train.seq_len``, ``train.seed``, ...).
    shard_index, shard_count: this process and the number of processes.
    local_batch: this process's rows per batch (default ``train.batch_size / shard_count``).

  Raises:
    ValueError / FileNotFoundError / ImportError: bad paths, fields, tokenizer or vocabulary.
  """
  cfg, tc = config.data, config.train
  local_batch = local_batch or tc.batch_size // shard_count
  shards = {"shard_index": shard_index, "shard_count": shard_count}
  if cfg.source in ("mqar", "needle"):
    task = {
      "context_len": cfg.context_len,
      "num_pairs": cfg.num_pairs,
      "num_queries": cfg.num_queries,
      "needle_depth": cfg.needle_depth,
      "answers_only": cfg.loss_on == "answers",
    }
    train_it = synthetic.task_iterator(
      cfg.source, tc.seq_len, local_batch, tc.seed, **shards, **task
    )
    eval_set = []  # train.eval_batches = 0: no evaluation
    if tc.eval_batches:
      eval_set = synthetic.task_eval_batches(
        cfg.source, tc.seq_len, local_batch, tc.eval_batches, **shards, **task
      )
    extra = (
      f"{cfg.num_pairs} pairs, {cfg.num_queries} queries"
      if cfg.source == "mqar"
      else f"depth {'random' if cfg.needle_depth == -1 else cfg.needle_depth}"
    )
    desc = (
      f"data: synthetic {cfg.source} ({extra}, {cfg.context_len or tc.seq_len + 1} tokens "
      f"per sample, loss on {cfg.loss_on}), held-out stream seed {synthetic.EVAL_SEED}"
    )
    return DataSetup(train_it, eval_set, desc, Tokenizer(), text=False)
  tokenizer = Tokenizer(cfg.tokenizer)
  tokenizer.check_vocab(config.model.vocab_size)
  if cfg.source == "stdlib":
    corpus = data_lib.load_corpus(tc.corpus_max_bytes, tc.heldout_fraction)
    what = f"Python {sys.version.split()[0]} standard library sources"
  else:
    corpus = load_file_corpus(cfg, tc.heldout_fraction, tokenizer)
    what = f"{cfg.source} {list(cfg.paths)}"
  unit = "bytes" if cfg.tokenizer is None else f"tokens of {os.path.basename(cfg.tokenizer)}"
  desc = (
    f"corpus: {what}, {len(corpus.train)} train documents "
    f"({corpus.train_bytes / 1e6:.2f} M {unit}), {len(corpus.heldout)} held-out "
    f"({corpus.heldout_bytes / 1e6:.2f} M)"
  )
  _check_corpus_size(corpus, tc.seq_len, shard_count, tc.eval_batches > 0)
  train_it = data_lib.train_iterator(corpus.train, tc.seq_len, local_batch, tc.seed, **shards)
  eval_set = (
    data_lib.eval_batches(corpus.heldout, tc.seq_len, local_batch, tc.eval_batches, **shards)
    if tc.eval_batches
    else []
  )
  return DataSetup(train_it, eval_set, desc, tokenizer, text=True)
