"""Location-free printouts of the Mosaic GPU modules of the selected-attention kernels.

Cross-lowers, on any machine, the forward (64-row, 128-row per-tile, persistent) and backward (dQ,
dK/dV) kernels of :mod:`pallas_kernels.selected_attention_mgpu` for a fixed list of
representative configurations (:data:`CASES`) and prints every Mosaic GPU module without debug
locations, plus the surrounding StableHLO module with the serialized kernels replaced by a
placeholder. Two printouts of the same case are byte-identical iff the kernels and the XLA code
around them are the same, so a refactor that must not change the kernels is checked by::

  PYTHONPATH=. python tests/kernels/mgpu_modules.py BEFORE_DIR   # before the change
  PYTHONPATH=. python tests/kernels/mgpu_modules.py AFTER_DIR    # after it
  diff -r BEFORE_DIR AFTER_DIR

``tests/kernels/test_kernels_mgpu_modules.py`` runs a few cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import core as mgpu_core


@dataclasses.dataclass(frozen=True)
class Case:
  """One lowering: shapes, selection mode and the kernel tuning knobs."""

  name: str
  mode: str = "exact"
  g: int = 16
  block_size: int = 64
  dk: int = 128
  dv: int = 128
  segments: bool = False
  tile_rows: int = 128
  q_layout: str = "direct"
  ping_pong: bool = True
  persistent: bool = False
  num_stages: int = 2
  t: int = 300
  h: int = 2
  n: int = 4


CASES = (
  Case("fwd64_exact_g16", tile_rows=64, q_layout="tiles"),
  Case("fwd64_shared_g4_bs32_docs", mode="shared", g=4, block_size=32, tile_rows=64, segments=True),
  Case("fwd64_exact_g1_stages1", g=1, tile_rows=64, num_stages=1, q_layout="tiles"),
  Case("fwd128_exact_g16_direct"),
  Case("fwd128_exact_g16_nopp_stages1", ping_pong=False, num_stages=1, block_size=128),
  Case("fwd128_exact_g8_bs32_dk192_docs", g=8, block_size=32, dk=192, segments=True),
  Case("fwd128_exact_g4_tiles", g=4, q_layout="tiles"),
  Case("persistent_exact_g16", persistent=True),
  Case(
    "persistent_exact_g8_bs128_dk192_docs",
    g=8,
    block_size=128,
    dk=192,
    persistent=True,
    segments=True,
  ),
  Case("persistent_shared_g16_stages1", mode="shared", persistent=True, num_stages=1),
  Case("persistent_exact_g4_tiles_nopp", g=4, q_layout="tiles", persistent=True, ping_pong=False),
  Case("fwd64_shared_g16_bs128_dk192", mode="shared", block_size=128, dk=192, tile_rows=64),
)
"""Representative configurations (forward and ``jax.grad``: dQ and dK/dV kernels each)."""


def _call(case: Case):
  """``f(q, k, v, bi)`` running the op with the case's knobs (``segment_ids`` closed over)."""
  from pallas_kernels import selected_attention_mgpu as mg

  seg = None
  if case.segments:
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), -(-case.t // 4))[None, : case.t]
  knobs = {
    "mode": case.mode,
    "block_size": case.block_size,
    "num_stages": case.num_stages,
    "tile_rows": case.tile_rows,
    "q_layout": case.q_layout,
    "ping_pong": case.ping_pong,
    "persistent": case.persistent,
    "num_ctas": 8 if case.persistent else 0,
  }
  if hasattr(mg, "TuningConfig"):
    tuning = mg.TuningConfig(**knobs)
    return lambda q, k, v, bi: mg.selected_attention_mgpu(
      q, k, v, bi, segment_ids=seg, tuning=tuning
    )
  return lambda q, k, v, bi: mg.selected_attention_mgpu(q, k, v, bi, segment_ids=seg, **knobs)


def _avals(case: Case):
  s = jax.ShapeDtypeStruct
  return (
    s((1, case.t, case.h * case.g, case.dk), jnp.bfloat16),
    s((1, case.t, case.h, case.dk), jnp.bfloat16),
    s((1, case.t, case.h, case.dv), jnp.bfloat16),
    s((1, case.t, case.h, case.n), jnp.int32),
  )


@contextlib.contextmanager
def _capture_kernels(texts: list[str]):
  """Appends the location-free text of every Mosaic GPU module lowered inside the block."""
  real = mgpu_core._run_serde_pass

  def spy(module, *args, **kwargs):
    texts.append(module.operation.get_asm(enable_debug_info=False))
    return real(module, *args, **kwargs)

  mgpu_core._run_serde_pass = spy
  try:
    yield
  finally:
    mgpu_core._run_serde_pass = real


_BLOB = re.compile(r'(kernel_hash|module) = "(?:[^"\\]|\\.)*"')


def _outer_text(lowered) -> str:
  """The StableHLO module without locations, serialized kernels replaced by ``"<kernel>"``."""
  ir = lowered.compiler_ir("stablehlo")
  return _BLOB.sub(r'\1 = "<kernel>"', ir.operation.get_asm(enable_debug_info=False))


def module_texts(case: Case, *, grad: bool) -> list[str]:
  """The kernels' module texts (in lowering order), then the outer StableHLO text."""
  fn = _call(case)
  if grad:
    op = fn
    fn = jax.grad(lambda q, k, v, bi: jnp.sum(op(q, k, v, bi).astype(jnp.float32)), (0, 1, 2))
  texts: list[str] = []
  with _capture_kernels(texts):
    lowered = jax.jit(fn).trace(*_avals(case)).lower(lowering_platforms=("cuda",))
  return [*texts, _outer_text(lowered)]


def write_all(out_dir: str, cases=CASES) -> None:
  """Writes ``<case>.fwd.mlir`` and ``<case>.grad.mlir`` for every case under ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  for case in cases:
    for grad in (False, True):
      texts = module_texts(case, grad=grad)
      path = os.path.join(out_dir, f"{case.name}.{'grad' if grad else 'fwd'}.mlir")
      with open(path, "w") as f:
        f.write("\n// ----- next module -----\n".join(texts))
      print(f"{path}: {len(texts) - 1} kernel module(s)", flush=True)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: mgpu_modules.py OUT_DIR")
  write_all(sys.argv[1])
