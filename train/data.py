"""Byte-level text data: the embedded default corpus, a held-out split and packed batches.

The default corpus is the source of the Python standard library (``*.py`` files of
``sysconfig.get_paths()["stdlib"]``): present on every machine that runs this code, nothing to
download. Files are documents; a deterministic hash of each file's relative path puts about
``heldout_fraction`` of them in the held-out set.

Batches are packed with Grain: documents are cut into pieces of at most ``seq_len + 1`` bytes,
(optionally) shuffled, first-fit packed into rows of ``seq_len + 1`` with per-row segment ids
(1, 2, ... per piece, 0 for padding) and positions restarting at 0 at each piece, then shifted:

  tokens      = row[:-1]        positions, segment_ids of row[:-1]
  targets     = row[1:]
  loss_mask   = segment_ids[:-1] == segment_ids[1:] and segment_ids[:-1] != 0

so no position is trained to predict a byte of another document (or padding). The model gets
``tokens``, ``positions`` and ``segment_ids``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import grain
import grain.experimental
import numpy as np

# Directories of the standard library that are not ordinary library source.
_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents as uint8 arrays, split into train and held-out.

  Attributes:
    train: training documents.
    heldout: held-out documents (evaluation only).
    train_names: names (relative paths) of the training documents.
    heldout_names: names of the held-out documents.
  """

  train: tuple[np.ndarray, ...]
  heldout: tuple[np.ndarray, ...]
  train_names: tuple[str, ...]
  heldout_names: tuple[str, ...]

  @property
  def train_bytes(self) -> int:
    return sum(len(d) for d in self.train)

  @property
  def heldout_bytes(self) -> int:
    return sum(len(d) for d in self.heldout)


def _hash_unit(text: str) -> float:
  """A deterministic pseudo-random number in [0, 1) from a string (stable across runs)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def list_source_files(root: str | os.PathLike | None = None, suffix: str = ".py") -> list[str]:
  """Relative paths of the ``suffix`` files under ``root`` (default: the stdlib), sorted.

  Directories named ``site-packages``, ``test``, ``tests``, ``idle_test`` and ``__pycache__`` are
  skipped.
  """
  root = sysconfig.get_paths()["stdlib"] if root is None else os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"corpus root: expected a directory, got {root!r}")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in filenames:
      if name.endswith(suffix):
        out.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(out)


def split_documents(
  names: Sequence[str], docs: Sequence[np.ndarray], heldout_fraction: float
) -> Corpus:
  """Splits documents by a hash of their names; both sides get at least one document."""
  if len(names) != len(docs):
    raise ValueError(f"names/docs: expected equal lengths, got {len(names)} and {len(docs)}")
  if len(docs) < 2:
    raise ValueError(f"docs: expected at least 2 documents to split, got {len(docs)}")
  held = [_hash_unit("heldout:" + n) < heldout_fraction for n in names]
  if not any(held):  # Tiny corpora: hold out the document with the smallest hash.
    held[min(range(len(names)), key=lambda i: _hash_unit("heldout:" + names[i]))] = True
  if all(held):
    held[max(range(len(names)), key=lambda i: _hash_unit("heldout:" + names[i]))] = False
  tr = tuple(i for i, h in enumerate(held) if not h)
  he = tuple(i for i, h in enumerate(held) if h)
  return Corpus(
    train=tuple(docs[i] for i in tr),
    heldout=tuple(docs[i] for i in he),
    train_names=tuple(names[i] for i in tr),
    heldout_names=tuple(names[i] for i in he),
  )


def load_corpus(
  max_bytes: int = 4_000_000,
  heldout_fraction: float = 0.05,
  *,
  root: str | os.PathLike | None = None,
  max_file_bytes: int = 200_000,
) -> Corpus:
  """The default corpus: Python standard library sources as byte documents.

  Files are taken in the order of a hash of their relative path (a deterministic sample spread
  over the whole library) until ``max_bytes`` is reached; files larger than ``max_file_bytes``
  (generated tables, bundled docs) are skipped.

  Args:
    max_bytes: cap on the total size of the corpus.
    heldout_fraction: fraction of files held out (by hash of the path).
    root: directory to read instead of the standard library (tests).
    max_file_bytes: skip larger files.

  Returns:
    A :class:`Corpus`.
  """
  root = sysconfig.get_paths()["stdlib"] if root is None else os.fspath(root)
  names = sorted(list_source_files(root), key=lambda n: (_hash_unit("order:" + n), n))
  chosen, docs, total = [], [], 0
  for name in names:
    path = os.path.join(root, name)
    size = os.path.getsize(path)
    if size == 0 or size > max_file_bytes:
      continue
    if total + size > max_bytes and docs:
      continue  # Smaller files later in the order may still fit.
    with open(path, "rb") as f:
      data = f.read()
    chosen.append(name)
    docs.append(np.frombuffer(data, dtype=np.uint8))
    total += len(data)
  if len(docs) < 2:
    raise ValueError(
      f"corpus: expected at least 2 non-empty *.py files under {root!r} "
      f"(<= {max_file_bytes} bytes each), found {len(docs)}"
    )
  # Restore path order so the split and the documents do not depend on the sampling order.
  order = sorted(range(len(chosen)), key=lambda i: chosen[i])
  return split_documents([chosen[i] for i in order], [docs[i] for i in order], heldout_fraction)


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of ``text`` as int32 token ids."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Token ids (bytes) to text; invalid UTF-8 becomes U+FFFD."""
  return bytes(int(t) & 0xFF for t in np.asarray(tokens).reshape(-1)).decode("utf-8", "replace")


def chunk_documents(docs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
  """Cuts every document into consecutive int32 pieces of at most ``max_len`` tokens (in order).

  Concatenating the pieces gives back the documents; empty documents give no piece.
  """
  if max_len < 1:
    raise ValueError(f"max_len: expected >= 1, got {max_len}")
  out = []
  for d in docs:
    d = np.asarray(d).astype(np.int32)
    out.extend(d[i : i + max_len] for i in range(0, len(d), max_len))
  return out


def packed_rows(
  docs: Sequence[np.ndarray],
  row_len: int,
  *,
  seed: int = 0,
  shuffle: bool = True,
  repeat: bool = True,
  num_packing_bins: int = 16,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Grain dataset of packed rows ``{"tokens", "tokens_segment_ids", "tokens_positions"}``.

  Args:
    docs: documents (1-D integer arrays).
    row_len: tokens per row; documents are cut into pieces of at most ``row_len``.
    seed: order of the pieces (per epoch) and of the packed bins.
    shuffle: shuffle pieces and bins; off = pieces in document order (evaluation, tests).
    repeat: loop over the data forever (epochs reshuffled) instead of once.
    num_packing_bins: rows filled at a time by first-fit packing (more = less padding).
    shard_index, shard_count: this process reads pieces ``shard_index::shard_count`` only
      (multi-process data loading; every process packs its own rows).

  Returns:
    A ``grain.IterDataset`` of dicts of ``[row_len]`` int32 arrays; segment ids count pieces
    1, 2, ... within a row (0 = padding) and positions restart at 0 at each piece.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"shard_index: expected 0 <= shard_index < shard_count={shard_count}, got {shard_index}"
    )
  pieces = chunk_documents(docs, row_len)[shard_index::shard_count]
  if not pieces:
    raise ValueError(
      f"docs: expected at least one non-empty document piece for shard "
      f"{shard_index} of {shard_count}, got none"
    )
  ds = grain.MapDataset.source(pieces)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(lambda x: {"tokens": x}).to_iter_dataset()
  return grain.experimental.FirstFitPackIterDataset(
    ds,
    length_struct={"tokens": row_len},
    num_packing_bins=num_packing_bins,
    seed=seed,
    shuffle_bins=shuffle,
  )


def shift_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows ``[..., T + 1]`` -> model inputs ``[..., T]`` and next-token targets.

  Returns:
    ``tokens``, ``positions``, ``segment_ids``, ``targets`` (int32) and ``loss_mask`` (float32,
    1 where the target is the next byte of the same document).
  """
  tok = np.asarray(rows["tokens"], np.int32)
  seg = np.asarray(rows["tokens_segment_ids"], np.int32)
  pos = np.asarray(rows["tokens_positions"], np.int32)
  mask = (seg[..., :-1] == seg[..., 1:]) & (seg[..., :-1] != 0)
  return {
    "tokens": tok[..., :-1],
    "positions": pos[..., :-1],
    "segment_ids": seg[..., :-1],
    "targets": tok[..., 1:],
    "loss_mask": mask.astype(np.float32),
  }


def batches(
  docs: Sequence[np.ndarray],
  seq_len: int,
  batch_size: int,
  *,
  seed: int = 0,
  shuffle: bool = True,
  repeat: bool = True,
  num_packing_bins: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Grain dataset of model batches (dicts of ``[batch_size, seq_len]`` numpy arrays).

  See :func:`shift_rows` for the keys. With ``repeat=True`` it never ends; otherwise the last
  partial batch is dropped. ``shard_index``/``shard_count``: see :func:`packed_rows`
  (``batch_size`` is then this process's rows).
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len, batch_size: expected >= 1, got {seq_len}, {batch_size}")
  bins = 2 * batch_size if num_packing_bins is None else num_packing_bins
  rows = packed_rows(
    docs,
    seq_len + 1,
    seed=seed,
    shuffle=shuffle,
    repeat=repeat,
    num_packing_bins=bins,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  return rows.batch(batch_size, drop_remainder=True).map(shift_rows)


def eval_batches(
  docs: Sequence[np.ndarray],
  seq_len: int,
  batch_size: int,
  num_batches: int,
  *,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """``num_batches`` held-out batches, the same every call (and for every training seed).

  The pieces are drawn in a fixed shuffled order (``seed``), so a few batches sample all held-out
  files rather than the first one; if the held-out text is too short it is cycled.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches: expected >= 1, got {num_batches}")
  it = iter(
    batches(
      docs,
      seq_len,
      batch_size,
      seed=seed,
      shuffle=True,
      repeat=True,
      shard_index=shard_index,
      shard_count=shard_count,
    )
  )
  return [next(it) for _ in range(num_batches)]


def train_iterator(
  docs: Sequence[np.ndarray],
  seq_len: int,
  batch_size: int,
  seed: int,
  *,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.DatasetIterator:
  """Endless shuffled training batches, deterministic given ``seed``.

  A Grain ``DatasetIterator``: ``get_state()``/``set_state()`` save and restore its position (the
  training checkpoints do), so a resumed run sees the same data stream. With ``shard_count > 1``
  it yields this process's ``batch_size`` rows of its shard of the pieces.
  """
  return iter(
    batches(
      docs,
      seq_len,
      batch_size,
      seed=seed,
      shuffle=True,
      repeat=True,
      shard_index=shard_index,
      shard_count=shard_count,
    )
  )
