"""Synthetic long-context tasks generated on the fly: MQAR and needle retrieval (byte ids).

Every sample is a function of ``(seed, index)`` only (``np.random.default_rng([seed, index])``),
so a stream is deterministic and a Grain iterator over it saves/restores its position like the
text sources (``get_state``/``set_state``; the training checkpoints store it). Held-out samples
come from the stream of another seed (:data:`EVAL_SEED`), never seen in training.

A sample is one document of ``L = context_len`` (or ``seq_len + 1``) byte ids, padded to
``seq_len + 1`` with segment id 0; batches have the keys of :func:`train.data.shift_rows` plus
``answer_mask [B, T]`` (1 where the target is an answer token). ``loss_mask`` covers every
target of the document (``data.loss_on: all``) or only the answers (``answers``).

* MQAR (multi-query associative recall, Zoology): ``k1 v1 k2 v2 ... kn vn`` (distinct keys from
  ids 1..127, values from 128..255), filler id 0, then at the end ``q1 a1 ... qm am``: ``m``
  distinct keys asked again in random order, each followed by its value. The answers are the
  ``a_i``; each ``a_i`` is in the context right after its key.
* Needle: filler sentences (a fixed word list), with ``" The secret code of KEY is VALUE. "``
  inserted at ``needle_depth`` of the filler, and at the end ``" What is the secret code of
  KEY? VALUE."``; the answer is the 6 digits of VALUE (KEY: 6 capitals/digits).
"""

from __future__ import annotations

import grain
import numpy as np

# Held-out samples: the stream of this seed (the same for every training seed; training seeds
# other than this one never produce it).
EVAL_SEED = 1_000_003
# Enough indices for any run (Grain ranges are lazy).
_STREAM_LEN = 2**40

_WORDS = (
  "the",
  "grass",
  "is",
  "green",
  "sky",
  "blue",
  "and",
  "a",
  "river",
  "runs",
  "past",
  "old",
  "mill",
  "where",
  "birds",
  "sing",
  "every",
  "morning",
  "under",
  "bright",
  "sun",
  "quiet",
  "town",
  "sleeps",
  "while",
  "wind",
  "moves",
  "through",
  "tall",
  "trees",
)
_KEY_CHARS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", np.uint8)
_DIGITS = np.frombuffer(b"0123456789", np.uint8)


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])


def mqar_sample(
  seed: int, index: int, length: int, num_pairs: int, num_queries: int
) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR sequence.

  Returns:
    ``(ids [length] int32, answer [length] bool)``: ``answer[i]`` marks the value tokens of the
    queries (token ``i`` is predicted from position ``i - 1``).
  """
  need = 2 * num_pairs + 2 * num_queries
  if length < need:
    raise ValueError(
      f"length: expected >= 2 * (num_pairs + num_queries) = {need} tokens for "
      f"MQAR, got {length} (raise train.seq_len or lower data.num_pairs)"
    )
  if not 1 <= num_queries <= num_pairs <= 127:
    raise ValueError(
      f"num_pairs, num_queries: expected 1 <= num_queries <= num_pairs <= 127, "
      f"got {num_pairs}, {num_queries}"
    )
  rng = _rng(seed, index)
  keys = rng.choice(np.arange(1, 128), size=num_pairs, replace=False)
  values = rng.integers(128, 256, size=num_pairs)
  asked = rng.choice(num_pairs, size=num_queries, replace=False)
  ids = np.zeros(length, np.int32)
  ids[0 : 2 * num_pairs : 2], ids[1 : 2 * num_pairs : 2] = keys, values
  start = length - 2 * num_queries
  ids[start::2], ids[start + 1 :: 2] = keys[asked], values[asked]
  answer = np.zeros(length, bool)
  answer[start + 1 :: 2] = True
  return ids, answer


def _filler(rng: np.random.Generator, n: int) -> bytes:
  out, size = [], 0
  while size < n:
    words = rng.choice(len(_WORDS), size=int(rng.integers(4, 10)))
    s = " ".join(_WORDS[w] for w in words).capitalize() + ". "
    out.append(s)
    size += len(s)
  return "".join(out).encode()[:n]


def needle_sample(
  seed: int, index: int, length: int, depth: float = -1.0
) -> tuple[np.ndarray, np.ndarray]:
  """One needle-retrieval sequence of ``length`` byte ids (see the module docstring).

  Args:
    depth: needle position as a fraction of the filler, or -1 = uniform random.

  Returns:
    ``(ids [length] int32, answer [length] bool)``; ``answer`` marks the value digits at the end.
  """
  rng = _rng(seed, index)
  key = bytes(rng.choice(_KEY_CHARS, 6))
  value = bytes(rng.choice(_DIGITS, 6))
  needle = b" The secret code of " + key + b" is " + value + b". "
  question = b" What is the secret code of " + key + b"? "
  tail = question + value + b"."
  filler_len = length - len(needle) - len(tail)
  if filler_len < 0:
    raise ValueError(
      f"length: expected >= {len(needle) + len(tail)} tokens for a needle "
      f"sample, got {length} (raise train.seq_len or data.context_len)"
    )
  d = rng.uniform() if depth == -1 else float(depth)
  filler = _filler(rng, filler_len)
  cut = int(round(d * filler_len))
  text = filler[:cut] + needle + filler[cut:] + tail
  ids = np.frombuffer(text, np.uint8).astype(np.int32)
  answer = np.zeros(length, bool)
  answer[length - 1 - len(value) : length - 1] = True
  return ids, answer


def sample_row(
  source: str,
  seed: int,
  index: int,
  row_len: int,
  *,
  context_len: int = 0,
  num_pairs: int = 16,
  num_queries: int = 16,
  needle_depth: float = -1.0,
) -> dict[str, np.ndarray]:
  """One packed row ``[row_len]`` (``tokens``, ``tokens_segment_ids``, ``tokens_positions``,
  ``answer``): the sample of ``source`` (``mqar``/``needle``) then padding (segment 0)."""
  n = context_len or row_len
  if n > row_len:
    raise ValueError(f"data.context_len: expected <= train.seq_len + 1 = {row_len}, got {n}")
  if source == "mqar":
    ids, answer = mqar_sample(seed, index, n, num_pairs, num_queries)
  elif source == "needle":
    ids, answer = needle_sample(seed, index, n, needle_depth)
  else:
    raise ValueError(f"source: expected 'mqar' or 'needle', got {source!r}")
  pad = row_len - n
  return {
    "tokens": np.pad(ids, (0, pad)),
    "tokens_segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
    "tokens_positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
    "answer": np.pad(answer, (0, pad)),
  }


def shift_task_rows(rows: dict[str, np.ndarray], answers_only: bool) -> dict[str, np.ndarray]:
  """Rows ``[B, T + 1]`` -> model batch ``[B, T]`` with ``answer_mask`` (see module doc)."""
  from train.data import shift_rows

  out = shift_rows(rows)
  answer = np.asarray(rows["answer"])[..., 1:].astype(np.float32)
  out["answer_mask"] = answer
  if answers_only:
    out["loss_mask"] = answer * out["loss_mask"]
  return out


def task_batches(
  source: str,
  seq_len: int,
  batch_size: int,
  seed: int,
  *,
  shard_index: int = 0,
  shard_count: int = 1,
  answers_only: bool = False,
  **task,
) -> grain.IterDataset:
  """Endless Grain dataset of batches of ``source`` samples ``seed``, indices ``shard_index,
  shard_index + shard_count, ...`` (this process's share). ``task``: see :func:`sample_row`."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"shard_index: expected 0 <= shard_index < shard_count={shard_count}, got {shard_index}"
    )
  sample_row(source, seed, 0, seq_len + 1, **task)  # Fail now on a bad size, not in a worker.
  ds = grain.MapDataset.range(_STREAM_LEN)[shard_index::shard_count]
  ds = ds.map(lambda i: sample_row(source, seed, int(i), seq_len + 1, **task))
  return (
    ds.to_iter_dataset()
    .batch(batch_size, drop_remainder=True)
    .map(lambda rows: shift_task_rows(rows, answers_only))
  )


def task_iterator(
  source: str, seq_len: int, batch_size: int, seed: int, **kwargs
) -> grain.DatasetIterator:
  """Training batches (a checkpointable Grain iterator); see :func:`task_batches`."""
  return iter(task_batches(source, seq_len, batch_size, seed, **kwargs))


def task_eval_batches(
  source: str, seq_len: int, batch_size: int, num_batches: int, *, seed: int = EVAL_SEED, **kwargs
) -> list[dict[str, np.ndarray]]:
  """``num_batches`` held-out batches from the stream of ``seed`` (default :data:`EVAL_SEED`)."""
  it = iter(task_batches(source, seq_len, batch_size, seed, **kwargs))
  return [next(it) for _ in range(num_batches)]
