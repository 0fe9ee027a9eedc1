"""The location-free module printouts of ``mgpu_modules.py`` (the refactor identity check): every
case lowers its forward and backward kernels, the printouts carry no source locations and are
reproducible, and distinct tunings give distinct kernels."""

from __future__ import annotations

import re

import mgpu_modules
import pytest

# Mosaic GPU names each kernel's dump file by a per-process counter; not part of the kernel.
_BASENAME = re.compile(r'mosaic_gpu.dump_basename = "[^"]*"')


def _texts(case, grad):
  return [_BASENAME.sub("", t) for t in mgpu_modules.module_texts(case, grad=grad)]


CASES = {case.name: case for case in mgpu_modules.CASES}


@pytest.mark.parametrize("name", ["fwd64_shared_g4_bs32_docs", "persistent_exact_g16"])
def test_printouts_are_location_free_and_reproducible(name):
  case = CASES[name]
  fwd, grad = _texts(case, False), _texts(case, True)
  assert len(fwd) == 2 and len(grad) == 4  # forward; forward, dQ, dK/dV (+ the outer module)
  assert grad[0] == fwd[0]  # the forward kernel is the same under jax.grad
  for text in fwd + grad:
    assert "loc(" not in text and ".py" not in text
  assert '"<kernel>"' in fwd[-1]  # serialized kernels replaced in the outer module
  assert _texts(case, False) == fwd


def test_the_cases_cover_every_kernel_and_tuning_knob():
  cases = mgpu_modules.CASES
  assert len({c.name for c in cases}) == len(cases) >= 12
  assert {c.tile_rows for c in cases} == {64, 128} and {c.persistent for c in cases} == {0, 1}
  assert {c.mode for c in cases} == {"exact", "shared"} and {c.g for c in cases} >= {1, 4, 8, 16}
  assert {c.block_size for c in cases} == {32, 64, 128} and {c.dk for c in cases} == {128, 192}
  assert {c.segments for c in cases} == {0, 1} and {c.ping_pong for c in cases} == {0, 1}
  assert {c.num_stages for c in cases} == {1, 2}
