"""Shared pieces of the analysis CLIs (``train.attention_stats``, ``train.locality``,
``train.ssa_eval``): config loading with a clean exit, a model from a checkpoint, held-out batches."""

from __future__ import annotations

import sys


def load_config_or_none(path: str, overrides):
  """The resolved config, or ``None`` after printing the error (the caller exits with 2)."""
  from train.config import load_config

  try:
    return load_config(path, overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: config: {e}", file=sys.stderr)
    return None


def model_and_batches(config, checkpoint_path: str | None, num_batches: int):
  """``(model, step, batches)``: the config's ``DecoderLM`` (restored from ``checkpoint_path`` when
  given; ``step`` is ``None`` otherwise) and ``num_batches`` held-out batches of the stdlib corpus
  (``train.seq_len`` x ``train.batch_size``)."""
  from flax import nnx

  from sparse_attention_jax.nn import DecoderLM
  from train import checkpoint, data

  tc = config.train
  model = DecoderLM(config.model, rngs=nnx.Rngs(tc.seed))
  step = None
  if checkpoint_path:
    step = checkpoint.restore(checkpoint_path, model)
    print(f"restored {checkpoint_path} (step {step})")
  corpus = data.load_corpus(tc.corpus_max_bytes, tc.heldout_fraction)
  return model, step, data.eval_batches(corpus.heldout, tc.seq_len, tc.batch_size, num_batches)
