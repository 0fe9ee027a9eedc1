"""Inputs are checked where they enter: token ids of prompts and batches, empty inputs, the
command line (one ``error:`` line, exit status 2, never a traceback)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train import loop
from train.__main__ import _check_first_batch, _config_warnings, _Fail, main
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
]


@pytest.mark.parametrize(
  "prompt, needle",
  [([1, 2, 256], "[1, 256]"), ([-1, 5], "[-1, 5]"), ([1.5], "integer token ids")],
)
def test_generator_rejects_token_ids_outside_the_vocabulary(prompt, needle):
  from flax import nnx

  from sparse_attention_jax.generation.generator import Generator

  model, _ = nnx.eval_shape(lambda: loop.build(load_config(TINY, SMALL)))  # No values needed.
  gen = Generator(model, batch=1, capacity=16)
  with pytest.raises(ValueError, match=r"prompts\[0\].*" + needle.replace("[", r"\[")):
    gen.generate([prompt], 2)


class _Batches:
  def __init__(self, tokens):
    self.tokens, self.state = tokens, 0

  def get_state(self):
    return {"i": self.state}

  def set_state(self, s):
    self.state = s["i"]

  def __next__(self):
    self.state += 1
    return {"tokens": self.tokens}


def test_first_batch_is_checked_and_not_consumed():
  it = _Batches(np.zeros((2, 8), np.int32))
  _check_first_batch(it, 2, 8, 256)
  assert it.state == 0
  with pytest.raises(_Fail, match=r"shape \(2, 16\)"):
    _check_first_batch(it, 2, 16, 256)
  with pytest.raises(_Fail, match=r"model.vocab_size=256\), the first batch has ids in \[0, 300\]"):
    _check_first_batch(_Batches(np.array([[0, 300]])), 1, 2, 256)


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--config", "no/such.yaml"], "no/such.yaml"),
    (["--config", TINY, "train.stepz=3"], "train.stepz"),
    (["--config", TINY, "train.batch_size=0"], "train.batch_size"),
    (["--config", TINY, "model.attention=[full,nsa,sw]"], "'sw'"),
  ],
)
def test_cli_failures_are_one_error_line(tmp_path, capsys, args, needle):
  assert main([*args, f"train.output_dir={tmp_path / 'out'}"]) == 2
  err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
  assert not (tmp_path / "out").exists()


def test_num_selected_beyond_the_row_is_a_warning():
  cfg = load_config(
    TINY, ["train.seq_len=64", "model.nsa.block_size=32", "model.nsa.num_selected=4"]
  )
  (warning,) = _config_warnings(cfg)
  assert "model.nsa.num_selected=4" in warning and "only 2 blocks" in warning
  assert _config_warnings(load_config(TINY, [])) == []


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--prompt", "x"], "--max-new-tokens"),  # a required flag missing
    (["--prompt", "x", "--max-new-tokens", "two"], "--max-new-tokens"),
    (["--prompt", "x", "--max-new-tokens", "2", "--offload-copy", "dma"], "--offload-copy"),
    (["--prompt", "x", "--max-new-tokens", "2", "--bogus"], "--bogus"),
    (["--config", "no/such.yaml", "--prompt", "x", "--max-new-tokens", "2"], "no/such.yaml"),
    (["--prompt", "x", "--max-new-tokens", "2", "train.stepz=3"], "train.stepz"),
    (["--prompt", "", "--max-new-tokens", "0"], "--prompt: expected at least one byte"),
    (["--prompt", "x", "--max-new-tokens", "2", "--checkpoint", "no/such/ckpt"], "--checkpoint"),
    (["--prompt", "x", "--max-new-tokens", "2", "--capacity", "1"], "max_new_tokens"),
  ],
)
def test_generate_cli_failures_are_one_error_line(capsys, args, needle):
  """``python -m train.generate``: every failure is one ``error:`` line and status 2."""
  from train import generate

  argv = args if "--config" in args else ["--config", TINY, *args]
  assert generate.main([*argv, *SMALL]) == 2
  captured = capsys.readouterr()
  err = [x for x in captured.err.splitlines() if x.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
  assert "Traceback" not in captured.err + captured.out
