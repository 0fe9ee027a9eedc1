"""CPU smoke test of ``benchmarks/packed_selected.py``: argument checks, the packed rows and
document-relative selections it builds, and a ``--tiny`` run (on CPU only the XLA-side packed
preparation is timed; the kernels need a Hopper GPU)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("benchmarks/packed_selected.py", "packed_selected")


def test_arguments_are_parsed_and_refused_with_the_flag_named(bench, capsys):
  args = bench.parse_args([])
  assert (args.seq_len, args.hq, args.h, args.d, args.block, args.n) == (8192, 64, 4, 128, 64, 16)
  assert args.docs == [0, 4, 16] and args.kinds == ["random", "corr"]
  assert args.doc_blocks == [None, 16]
  for bad, flag in (
    (["--docs", "a"], "--docs"),
    (["--docs", "-1"], "--docs"),
    (["--kinds", "bogus"], "--kinds"),
    (["--doc-blocks", "-2"], "--doc-blocks"),
    (["--hq", "6", "--h", "4"], "--hq"),
  ):
    with pytest.raises(SystemExit):
      bench.parse_args(bad)
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["random", "corr"])
def test_segments_and_relative_selection(bench, kind):
  seg = bench.segments(np.random.default_rng(1), 2, 300, 16)
  new = np.asarray(seg[:, 1:] != seg[:, :-1])
  assert (new.sum(axis=1) == 15).all()
  bi = np.asarray(bench.selection(jax.random.key(0), seg, 2, 6, 32, kind))
  ds = np.asarray(bench.document_starts(seg, 2, 300))
  cur = ((np.arange(300)[None] - ds) // 32)[..., None, None]
  assert bi.shape == (2, 300, 2, 6) and bi.dtype == np.int32
  assert (bi >= 0).all() and (bi <= cur).all()  # inside the query's document, causal
  assert (bi[..., 0] == 0).all() and (bi[..., 1] == cur[..., 0]).all()


def test_tiny_run_writes_json(bench, tmp_path):
  out = tmp_path / "packed.json"
  res = bench.main(
    ["--tiny", "--docs", "0,4", "--kinds", "corr", "--doc-blocks", "default,3", "--out", str(out)]
  )
  saved = json.loads(out.read_text())
  assert saved["meta"]["T"] == 512 and saved["meta"]["NB"] == 8
  rows = saved["rows"]
  assert [(r["docs"], r.get("nb_pad")) for r in rows] == [(0, None), (4, 16), (4, 11)]
  assert all("error" not in r for r in rows)
  if jax.default_backend() != "gpu":
    assert all("fwd_ms" not in r for r in rows) and rows[1]["prep_ms"] > 0
  assert res["meta"] == saved["meta"]
