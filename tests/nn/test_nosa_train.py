"""NOSA's training path: biased selected attention (``impl="auto"``: the selected-attention
kernels on keys with bias columns on a Hopper GPU) against ``impl="reference"`` (dense masked
form), and fwd+bwd time / XLA temp memory.

* ``gpu``-marked cases (skipped without a Hopper GPU): correctness at the nosa_1b head layout
  (bf16, B = 1, T = 2048, HQ = 32, H = 2, D = 64; the selection of ``nosa_attention`` on the same
  inputs, 24 of 32 blocks with k_q = 20, packed into 2 documents): the output and the gradients
  w.r.t. q, k, v and the eviction scores c against the reference on float32 copies, relative L2
  error <= 2e-2 each, finite, and equal when computed twice (no race); then time and temp memory
  of one fwd+bwd at T = 8192 with nosa_1b's budgets (k = 64, k_q = 33) for ``auto``, the whole
  ``nosa_attention`` op (selection included) and ``reference`` where it fits. With ``$OUT`` set,
  the rows go to ``$OUT/nosa_train.json``.
* The CPU case runs the same checks on tiny shapes (the plumbing: selection, both impls,
  gradients w.r.t. q/k/v/c, timing rows).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention
from sparse_attention_jax.ops.nosa.selection import for_length

TIMING_CASES = ("biased auto", "biased reference", "nosa_attention auto")


def _inputs(key, t: int, heads: tuple[int, int, int], dtype=jnp.bfloat16):
  """``q [1, T, HQ, D]``, ``k``/``v`` ``[1, T, H, D]`` in ``dtype``, ``c [1, T, H]``, a cotangent
  ``ct [1, T, HQ, D]`` and ``segment_ids [1, T]`` of two documents."""
  hq, h, d = heads
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (1, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (1, t, h, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (1, t, h, d), jnp.float32).astype(dtype)
  c = 2.0 * jax.random.normal(ks[3], (1, t, h), jnp.float32)
  ct = jax.random.normal(ks[4], (1, t, hq, d), jnp.float32)
  seg = jnp.asarray(np.repeat(np.arange(2, dtype=np.int32), t // 2)[None])
  return q, k, v, c, ct, seg


def _grads(impl: str, block_size: int):
  """``(q, k, v, c, idx, seg, ct) -> ((dq, dk, dv, dc), o)``, jitted; every array is an argument
  (a captured one would be an HLO constant that XLA may fold)."""

  def loss(q, k, v, c, idx, seg, ct):
    o = biased_selected_attention(
      q, k, v, c, idx, block_size=block_size, segment_ids=seg, impl=impl
    )
    return jnp.sum(o.astype(jnp.float32) * ct), o

  return jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _select(cfg, kq, q, k, v, c, seg):
  return jax.jit(
    lambda q, k, v, c, seg: (
      nosa_attention(
        q, k, v, c, config=cfg, num_query_selected=kq, segment_ids=seg, return_aux=True
      )[1].block_indices
    )
  )(q, k, v, c, seg)


def correctness_row(t: int, budgets: tuple[NSAConfig, int], heads) -> dict:
  """Errors of ``auto`` against ``reference`` (output and the four gradients) at length ``t``."""
  cfg, kq = for_length(*budgets, t)
  q, k, v, c, ct, seg = _inputs(jax.random.key(0), t, heads)
  idx = _select(cfg, kq, q, k, v, c, seg)
  g1, o1 = _grads("auto", cfg.block_size)(q, k, v, c, idx, seg, ct)
  g2, o2 = _grads("auto", cfg.block_size)(q, k, v, c, idx, seg, ct)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  gr, orf = _grads("reference", cfg.block_size)(*f32, c, idx, seg, ct)
  row = {
    "check": "correctness",
    "T": t,
    "o_rel": _rel(o1, orf),
    **{f"d{n}_rel": _rel(a, b) for n, a, b in zip("qkvc", g1, gr)},
    "repeat_equal": all(bool(jnp.array_equal(a, b)) for a, b in zip((o1, *g1), (o2, *g2))),
    "finite": all(bool(jnp.all(jnp.isfinite(x))) for x in (o1, *g1)),
  }
  row["ok"] = (
    row["finite"]
    and row["repeat_equal"]
    and all(row[key] <= 2e-2 for key in row if key.endswith("_rel"))
  )
  return row


def timing_rows(t: int, budgets: tuple[NSAConfig, int], heads) -> list[dict]:
  """Median fwd+bwd ms (5 runs) and XLA temp GiB of :data:`TIMING_CASES` at length ``t``; a
  case that fails (e.g. the reference out of memory) records its error."""
  cfg, kq = for_length(*budgets, t)
  q, k, v, c, ct, seg = _inputs(jax.random.key(1), t, heads)
  idx = _select(cfg, kq, q, k, v, c, seg)

  def whole(q, k, v, c, idx, seg, ct):
    del idx  # nosa_attention selects by itself
    o = nosa_attention(q, k, v, c, config=cfg, num_query_selected=kq, segment_ids=seg)
    return jnp.sum(o.astype(jnp.float32) * ct)

  fns = (
    _grads("auto", cfg.block_size),
    _grads("reference", cfg.block_size),
    jax.jit(jax.grad(whole, (0, 1, 2, 3))),
  )
  args = (q, k, v, c, idx, seg, ct)
  rows = []
  for name, fn in zip(TIMING_CASES, fns):
    row = {"check": "time", "T": t, "case": name}
    try:
      compiled = fn.lower(*args).compile()
      row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
      jax.block_until_ready(compiled(*args))
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
      row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
    except Exception as e:  # noqa: BLE001 -- e.g. the reference out of memory: record it
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows.append(row)
  return rows


def _record(rows: list[dict]) -> None:
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  for row in rows:
    print(row)
  out = os.environ.get("OUT")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "nosa_train.json"), "w") as f:
      json.dump(rows, f, indent=1)


# --------------------------------------------------------------------------------- CPU
_SMOKE_HEADS = (4, 2, 16)  # HQ, H, D
_SMOKE_CFG = NSAConfig.infllm_v2(
  cmp_window=16, cmp_stride=8, block_size=16, num_selected=6, local_window=32
)


def test_nosa_train_checks_on_tiny_shapes(tmp_path, monkeypatch):
  """The GPU cases' plumbing on the CPU (the reference stands in for the kernels) and the JSON
  record."""
  row = correctness_row(256, (_SMOKE_CFG, 4), _SMOKE_HEADS)
  assert row["ok"] and 0 < row["dc_rel"] < 2e-2, row  # bf16 vs f32: small, not zero
  rows = timing_rows(512, (_SMOKE_CFG, 4), _SMOKE_HEADS)
  assert [r["case"] for r in rows] == list(TIMING_CASES)
  assert all(r["fwd_bwd_ms"] > 0 for r in rows), rows
  monkeypatch.setenv("OUT", str(tmp_path))
  _record([row, *rows])
  assert json.loads((tmp_path / "nosa_train.json").read_text()) == [row, *rows]


# --------------------------------------------------------------------------------- GPU
_HEADS = (32, 2, 64)  # nosa_1b's head layout


@pytest.mark.gpu
def test_biased_selected_attention_kernels_match_reference():
  # 24 of the 32 blocks of T = 2048 (nosa_1b's k = 64 would take them all), k_q = 20.
  row = correctness_row(2048, (NSAConfig.infllm_v2(num_selected=24), 20), _HEADS)
  _record([row])
  assert row["finite"] and row["repeat_equal"], row
  for key in ("o_rel", "dq_rel", "dk_rel", "dv_rel", "dc_rel"):
    assert row[key] <= 2e-2, (key, row)


@pytest.mark.gpu
def test_nosa_train_time_and_memory_at_8k():
  rows = [correctness_row(2048, (NSAConfig.infllm_v2(num_selected=24), 20), _HEADS)]
  rows += timing_rows(8192, (NSAConfig.infllm_v2(num_selected=64), 33), _HEADS)
  _record(rows)
  assert rows[0]["ok"], rows[0]
  by_case = {r["case"]: r for r in rows[1:]}
  for case in ("biased auto", "nosa_attention auto"):  # the reference may not fit
    assert by_case[case].get("fwd_bwd_ms", 0) > 0, by_case[case]
