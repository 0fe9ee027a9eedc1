"""benchmarks/h2d_transfer.py on tiny sizes on CPU: every path the backend supports moves the
right blocks bit for bit (chunked, padded and threaded variants included), unsupported paths
are skipped with a reason, the JSON carries the device facts, and bad arguments are refused."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

TINY = [
  "--store-mib",
  "1",
  "--block-bytes",
  "2048",
  "--block-tokens",
  "16",
  "--batch",
  "2",
  "--heads",
  "2",
  "--chunk",
  "16",
  "--unroll",
  "8",
  "--threads",
  "1,3",
  "--reps",
  "2",
]


@pytest.fixture(scope="module")
def h2d():
  return load_script("benchmarks/h2d_transfer.py", "h2d_transfer")


def test_every_supported_path_is_bit_exact(h2d, tmp_path):
  out = tmp_path / "h2d.json"
  res = h2d.main(TINY + ["--blocks", "5,70", "--paths", "a,b,c,d,e,ref,c_view", "--out", str(out)])
  ran = {r["path"] for r in res["rows"]}
  assert ran | set(res["skipped"]) == set(h2d.ALL_PATHS)
  assert all(reason for reason in res["skipped"].values())
  bad = [r for r in res["rows"] if not r["ok"]]
  assert not bad, bad
  # 70 blocks = 4 full chunks of 16 + a partial one; threaded rows for 1 and 3 threads.
  assert {(r["blocks"], r["threads"]) for r in res["rows"] if r["path"] == "e_b"} == {
    (5, 1),
    (5, 3),
    (70, 1),
    (70, 3),
  }
  assert all(r["gbps"] > 0 and r["reps"] >= 1 for r in res["rows"])
  saved = json.loads(out.read_text())
  assert saved["rows"] == res["rows"]
  meta = saved["meta"]
  assert meta["platform"] == "cpu" and meta["host_cpus"] >= 1 and meta["jax"]
  assert meta["store_shape"] == [2, 2, 128, 16, 64]  # 1 MiB of 2 KiB blocks over 4 rows
  if "pinned_host" in meta["memory_kinds"]:
    assert {"c_put", "d_loop", "d_take"} <= ran


def test_staged_buffers_are_not_reused_while_a_result_aliases_them(h2d):
  # The CPU backend's device_put of an aligned NumPy buffer aliases it: `unaliased` copies then.
  import jax
  import numpy as np

  buf = h2d.aligned_empty((8, 4), np.float32)
  assert buf.ctypes.data % 4096 == 0
  buf[:] = 1.0
  x = h2d.unaliased(jax.device_put(buf), buf)
  buf[:] = 2.0
  np.testing.assert_array_equal(np.asarray(x), 1.0)


@pytest.mark.parametrize(
  "args,msg",
  [
    (["--paths", "a,zz"], "--paths: expected comma-separated names"),
    (["--blocks", "4,-1"], "--blocks: expected comma-separated positive ints"),
    (["--block-bytes", "1000"], "--block-bytes: expected a multiple of --block-tokens"),
    (["--blocks", "100000"], "--store-mib: expected at least"),
    (["--chunk", "0"], "--chunk: expected a positive int, got 0"),
  ],
)
def test_bad_arguments_name_the_argument(h2d, args, msg):
  with pytest.raises(SystemExit, match=msg):
    h2d.main(TINY + args)
