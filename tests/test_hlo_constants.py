"""No large literals in the lowered training step of any layer kind.

Index tables and masks built with NumPy at trace time become ``stablehlo.constant`` literals, one
per layer and per use: a ``[T, NC]`` compressed-visibility table was 4 MB per NSA layer at
T = 8192 (the 340M model's HLO was 9 MB per layer instead of 0.4 MB). Built from iotas inside the
program they cost nothing. This lowers (no compile) the loss and gradient of small models of every
attention kind at T = 4096 with packed documents and bounds the largest literal.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.config import load_config
from train.loop import build, loss_fn

T = 4096
MAX_LITERAL_BYTES = 16 * 1024     # e.g. [NB, K] overlap tables; a [T, NC] table is 256 KiB+
SMALL = ["model.d_model=64", "model.num_heads=4", "model.num_kv_heads=1", "model.head_dim=16",
         "model.mlp_dim=128", f"train.seq_len={T}", "train.batch_size=1"]


def _largest_literal_bytes(text: str) -> int:
  sizes = [len(m) // 2 for m in re.findall(r'constant dense<"0x([0-9A-Fa-f]+)"', text)]
  return max(sizes, default=0)


@pytest.mark.parametrize("config", ["tiny", "asa_tiny", "ssa_tiny", "nosa_tiny", "full_tiny"])
def test_no_large_literals_in_the_train_step(config):
  cfg = load_config(f"configs/{config}.yaml", SMALL)
  model, _ = nnx.eval_shape(lambda: build(cfg))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  seg = np.repeat(np.arange(4, dtype=np.int32), T // 4)[None]      # 4 packed documents
  batch = {"tokens": jnp.zeros((1, T), jnp.int32),
           "positions": jnp.asarray(np.tile(np.arange(T // 4, dtype=np.int32), 4)[None]),
           "segment_ids": jnp.asarray(seg), "targets": jnp.zeros((1, T), jnp.int32),
           "loss_mask": jnp.ones((1, T), bool)}

  def grads(params, rest, batch):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)[0])(params)

  text = jax.jit(grads).trace(params, rest, batch).lower().as_text()
  assert _largest_literal_bytes(text) <= MAX_LITERAL_BYTES, (
      f"{config}: a {_largest_literal_bytes(text)}-byte literal in the lowered step")


def test_the_literal_scan_finds_numpy_tables():
  """The check sees what it guards against: a NumPy table closed over by a jitted function."""
  table = np.arange(T)[:, None] <= np.arange(512)[None, :]
  text = jax.jit(lambda x: x | jnp.asarray(table)).trace(jnp.zeros((T, 512), bool)).lower()
  assert _largest_literal_bytes(text.as_text()) >= T * 512
