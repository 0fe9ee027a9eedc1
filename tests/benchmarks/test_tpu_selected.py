"""CPU smoke test of ``benchmarks/tpu_selected.py``: arguments, the selections it builds, the
union measure, and that it declines a CPU backend without ``--interpret`` (the kernels' numerics
are tested in ``tests/kernels/test_kernels_tpu.py``; a full ``--interpret`` run takes ~30 s)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("benchmarks/tpu_selected.py", "tpu_selected")


def test_arguments_are_parsed_and_refused_with_the_flag_named(bench, capsys):
  args = bench.parse_args([])
  assert (args.hq, args.h, args.d, args.block, args.n) == (64, 4, 128, 64, 16)
  assert args.seqs == [8192, 32768, 65536] and args.tile_rows == [128, 256]
  for bad, flag in (
    (["--seqs", "a"], "--seqs"),
    (["--kinds", "bogus"], "--kinds"),
    (["--tile-rows", "100"], "--tile-rows"),
    (["--slots", "1"], "--slots"),
    (["--hq", "6", "--h", "4"], "--hq"),
  ):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["exact-corr", "exact-random"])
def test_selection_forces_the_current_block_and_picks_earlier_ones(bench, kind):
  t, h, n, bs = 200, 2, 4, 16
  bi = np.asarray(bench.selection(jax.random.PRNGKey(0), t, h, n, bs, kind))
  cur = np.arange(t) // bs
  assert bi.shape == (1, t, h, n)
  np.testing.assert_array_equal(bi[0, :, :, 0], np.broadcast_to(cur[:, None], (t, h)))
  rest = bi[0, :, :, 1:]
  assert ((rest == -1) | (rest < cur[:, None, None])).all()
  if kind == "exact-corr":  # tokens of one block share their picks
    np.testing.assert_array_equal(rest[:bs], np.broadcast_to(rest[:1], rest[:bs].shape))
  ratio = bench.union_ratio(
    bench.selection(jax.random.PRNGKey(0), t, h, n, bs, kind), block=bs, tile_rows=128, group=4
  )
  assert 0 < ratio <= 128 // 4


def test_declines_cpu_without_interpret(bench, capsys):
  if jax.default_backend() == "tpu":
    pytest.skip("runs on a TPU")
  assert bench.main(["--seqs", "128"]) == 2
  assert "needs a TPU" in capsys.readouterr().out
