"""No large constants in the lowered training step of any layer kind.

Index tables and masks built with NumPy at trace time become program constants, one per layer and
per use (``stablehlo.constant`` literals in the module text up to jax 0.12.0; from jax 0.12.1 on,
constants hoisted to extra arguments of the lowered program, listed in ``Traced.jaxpr.consts``): a ``[T, NC]`` compressed-visibility table was 4 MB per NSA layer at
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
MAX_LITERAL_BYTES = 16 * 1024  # e.g. [NB, K] overlap tables; a [T, NC] table is 256 KiB+
SMALL = [
  "model.d_model=64",
  "model.num_heads=4",
  "model.num_kv_heads=1",
  "model.head_dim=16",
  "model.mlp_dim=128",
  f"train.seq_len={T}",
  "train.batch_size=1",
]


def _largest_constant_bytes(traced) -> int:
  """Bytes of the largest constant of a ``jax.jit(f).trace(...)`` result: literals in the lowered
  module text and constants the trace hoisted out of the program (both forms, any jax version)."""
  text = traced.lower().as_text()
  sizes = [len(m) // 2 for m in re.findall(r'constant dense<"0x([0-9A-Fa-f]+)"', text)]
  sizes += [int(np.asarray(c).nbytes) for c in traced.jaxpr.consts]
  return max(sizes, default=0)


@pytest.mark.parametrize("config", ["tiny", "asa_tiny", "ssa_tiny", "nosa_tiny", "full_tiny"])
def test_no_large_literals_in_the_train_step(config):
  cfg = load_config(f"configs/{config}.yaml", SMALL)
  model, _ = nnx.eval_shape(lambda: build(cfg))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  seg = np.repeat(np.arange(4, dtype=np.int32), T // 4)[None]  # 4 packed documents
  batch = {
    "tokens": jnp.zeros((1, T), jnp.int32),
    "positions": jnp.asarray(np.tile(np.arange(T // 4, dtype=np.int32), 4)[None]),
    "segment_ids": jnp.asarray(seg),
    "targets": jnp.zeros((1, T), jnp.int32),
    "loss_mask": jnp.ones((1, T), bool),
  }

  def grads(params, rest, batch):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)[0])(params)

  largest = _largest_constant_bytes(jax.jit(grads).trace(params, rest, batch))
  assert largest <= MAX_LITERAL_BYTES, f"{config}: a {largest}-byte constant in the lowered step"


def test_the_constant_scan_finds_numpy_tables():
  """The check sees what it guards against: a NumPy table closed over by a jitted function, at
  the top level and inside a scan body and a rematerialized function."""
  table = np.arange(T)[:, None] <= np.arange(512)[None, :]
  x = jnp.zeros((T, 512), bool)
  plain = lambda x: x | jnp.asarray(table)
  in_scan = lambda x: jax.lax.scan(lambda c, _: (plain(c), None), x, None, length=2)[0]
  for fn in (plain, in_scan, jax.checkpoint(plain)):
    assert _largest_constant_bytes(jax.jit(fn).trace(x)) >= T * 512
  assert _largest_constant_bytes(jax.jit(lambda x: x | (jnp.arange(T)[:, None] <= 3)).trace(x)) < 64
