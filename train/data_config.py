"""The ``data:`` section of a run config: where training and held-out tokens come from.

Example (YAML)::

  data:
    source: jsonl                # stdlib | text | jsonl | array_record | mqar | needle
    paths: ["data/*.jsonl"]      # globs (recursive ``**`` allowed)
    text_field: text
    tokenizer: tok/tokenizer.json   # optional (``tokenizers``); default: UTF-8 bytes

The default (``source: stdlib``) is the embedded Python standard library corpus of ``make demo``.
Held-out data: file sources hold out ``train.heldout_fraction`` of their documents by a hash of
the document's name (file path, or ``path:line`` / ``path:record``), or exactly the documents of
``eval_paths`` when given; the synthetic tasks draw evaluation samples from a separate stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attention_jax.nn._config_io import checked_mapping

SOURCES = ("stdlib", "text", "jsonl", "array_record", "mqar", "needle")
FILE_SOURCES = ("text", "jsonl", "array_record")
SYNTHETIC_SOURCES = ("mqar", "needle")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """The ``data:`` section.

  Attributes:
    source: ``stdlib`` (default corpus), ``text`` (every file is a document), ``jsonl`` (every
      line is a JSON object, ``text_field`` is a document), ``array_record`` (every record is a
      document: UTF-8 text, or a JSON object when ``record_format: json``), ``mqar`` or
      ``needle`` (synthetic long-context tasks, :mod:`train.synthetic`).
    paths: file globs of the file sources.
    eval_paths: globs of held-out files (file sources); empty = hash split of ``paths``.
    text_field: the JSON field holding the text (``jsonl``, ``array_record`` + json).
    record_format: ``text`` or ``json`` (``array_record`` only).
    tokenizer: path of a ``tokenizer.json`` (Hugging Face ``tokenizers``) to encode the text of
      the file sources; None = UTF-8 bytes (ids 0..255). Its vocabulary must fit
      ``model.vocab_size``.
    max_bytes: stop reading file sources after this many bytes of text (0 = no cap).
    loss_on: ``all`` (every next-token target of a document) or ``answers`` (synthetic tasks:
      only the answer tokens).
    num_pairs: MQAR key-value pairs per sequence.
    num_queries: MQAR queries per sequence (keys asked again, distinct).
    needle_depth: needle position as a fraction of the filler (0 = start, 1 = end); -1 = a
      uniform random depth per sample.
    context_len: synthetic tokens per sequence before padding (0 = fill ``train.seq_len + 1``).
  """

  source: str = "stdlib"
  paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  text_field: str = "text"
  record_format: str = "text"
  tokenizer: str | None = None
  max_bytes: int = 0
  loss_on: str = "all"
  num_pairs: int = 16
  num_queries: int = 16
  needle_depth: float = -1.0
  context_len: int = 0

  def __post_init__(self):
    def fail(name, expected):
      raise ValueError(f"data.{name}: expected {expected}, got {getattr(self, name)!r}")

    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    if self.source not in SOURCES:
      fail("source", f"one of {list(SOURCES)}")
    for name in ("paths", "eval_paths"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        fail(name, "a list of non-empty path globs")
      object.__setattr__(self, name, tuple(value))
    if self.source in FILE_SOURCES and not self.paths:
      fail("paths", f"at least one file glob for data.source={self.source!r}")
    if not isinstance(self.text_field, str) or not self.text_field:
      fail("text_field", "a non-empty field name")
    if self.record_format not in ("text", "json"):
      fail("record_format", "'text' or 'json'")
    if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
      fail("tokenizer", "a tokenizer.json path or null")
    if self.tokenizer is not None and self.source not in FILE_SOURCES:
      fail(
        "tokenizer",
        f"null for data.source={self.source!r} (tokenizers apply to {list(FILE_SOURCES)})",
      )
    if not is_int(self.max_bytes) or self.max_bytes < 0:
      fail("max_bytes", "an int >= 0")
    if self.loss_on not in ("all", "answers"):
      fail("loss_on", "'all' or 'answers'")
    if self.loss_on == "answers" and self.source not in SYNTHETIC_SOURCES:
      fail(
        "loss_on",
        f"'all' for data.source={self.source!r} (answers exist only in {list(SYNTHETIC_SOURCES)})",
      )
    for name in ("num_pairs", "num_queries"):
      if not is_int(getattr(self, name)) or not 1 <= getattr(self, name) <= 127:
        fail(name, "an int in [1, 127]")
    if self.num_queries > self.num_pairs:
      fail("num_queries", f"at most data.num_pairs={self.num_pairs}")
    d = self.needle_depth
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 <= d <= 1 or d == -1):
      fail("needle_depth", "a number in [0, 1] or -1 (random)")
    if not is_int(self.context_len) or self.context_len < 0:
      fail("context_len", "an int >= 0")

  @classmethod
  def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    return cls(**checked_mapping("data", d or {}, cls))

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["paths"], out["eval_paths"] = list(self.paths), list(self.eval_paths)
    return out
