"""Shared helpers for the op tests: random inputs, segment ids and a brute-force NumPy reference."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# float32 comparisons against the references must not run through reduced-precision (TF32) matmul
# passes, which XLA uses by default on GPUs; on CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")


def load_script(relpath: str, name: str | None = None):
  """The module of a script outside the packages (``benchmarks/...``, ``scripts/...``), loaded
  from ``relpath`` under the repository root (imported fresh each call)."""
  path = os.path.join(ROOT, relpath)
  spec = importlib.util.spec_from_file_location(
    name or os.path.splitext(os.path.basename(path))[0], path
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def rand_qkv(key, b, t, hq, h, dk, dv=None, dtype=jnp.float32):
  """Fresh standard-normal ``q [B,T,HQ,Dk]``, ``k [B,T,H,Dk]``, ``v [B,T,H,Dv]``."""
  dv = dk if dv is None else dv
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, t, hq, dk), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, h, dk), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, h, dv), jnp.float32).astype(dtype)
  return q, k, v


def segments(b, t, cuts):
  """``[B, T]`` int32 document ids with new documents starting at the positions in ``cuts``."""
  ids = np.zeros(t, np.int32)
  for c in cuts:
    ids[c:] += 1
  return jnp.asarray(np.broadcast_to(ids, (b, t)).copy())


def np_attend(q_row, keys, vals, scale):
  """float64 softmax attention of one query row over ``keys [S, Dk]``: ``(o [Dv], lse)``."""
  if keys.shape[0] == 0:
    return np.zeros(vals.shape[-1]), -np.inf
  logits = keys.astype(np.float64) @ q_row.astype(np.float64) * scale
  m = logits.max()
  w = np.exp(logits - m)
  return (w / w.sum()) @ vals.astype(np.float64), m + np.log(w.sum())


def np_reference(q, k, v, visible, scale=None):
  """Brute-force per-query loop: ``visible(b, t, h) -> key positions`` of KV head ``h``.

  Returns ``(o [B, T, HQ, Dv], lse [B, T, HQ])`` in float64.
  """
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  b, t, hq, dk = q.shape
  h = k.shape[2]
  g = hq // h
  scale = dk**-0.5 if scale is None else scale
  o = np.zeros((b, t, hq, v.shape[-1]))
  lse = np.zeros((b, t, hq))
  for bi in range(b):
    for ti in range(t):
      for hh in range(hq):
        pos = np.asarray(sorted(visible(bi, ti, hh // g)), np.int64)
        o[bi, ti, hh], lse[bi, ti, hh] = np_attend(
          q[bi, ti, hh], k[bi, pos, hh // g], v[bi, pos, hh // g], scale
        )
  return o, lse


@pytest.fixture
def key():
  return jax.random.key(0)


def np_doc_starts(seg_row):
  """First position of each token's document (maximal runs of equal ids) for one ``[T]`` row."""
  starts = np.zeros(len(seg_row), np.int64)
  for i in range(1, len(seg_row)):
    starts[i] = i if seg_row[i] != seg_row[i - 1] else starts[i - 1]
  return starts


def np_block_importance(probs, cfg, num_kv_heads):
  """Hand-written 0-based NSA eq. 9 (``"sum"``) / max over the same tokens (``"max"``), after the
  eq. 10 sum over the G heads of a group. ``probs [B, T, HQ, NC]`` -> ``[B, T, H, NB]``."""
  p = np.asarray(probs, np.float64)
  b, t, hq, nc = p.shape
  p = p.reshape(b, t, num_kv_heads, hq // num_kv_heads, nc).sum(axis=3)
  l, d, bs = cfg.cmp_window, cfg.cmp_stride, cfg.block_size
  nb = -(-t // bs)
  out = np.zeros((b, t, num_kv_heads, nb))
  for j in range(nb):
    terms = []
    for m in range(bs // d):
      for n in range(l // d):
        i = (bs // d) * (j + 1) - 1 - m - n
        if 0 <= i < nc:
          terms.append(i)
    if not terms:
      continue
    if cfg.score_pooling == "sum":
      out[..., j] = sum(p[..., i] for i in terms)
    else:
      out[..., j] = p[..., sorted(set(terms))].max(axis=-1)
  return out


def np_select(score, cfg, seg=None):
  """Exact top-n with forced init/local blocks, candidate rules and lower-index tie-break; block
  indices are relative to the query's document (``u`` its document position)."""
  score = np.asarray(score, np.float64)
  b, t, h, nb = score.shape
  bs, n = cfg.block_size, cfg.num_selected
  out = np.full((b, t, h, n), -1, np.int32)
  for bi in range(b):
    starts = np.zeros(t, np.int64) if seg is None else np_doc_starts(np.asarray(seg)[bi])
    for ti in range(t):
      u = ti - starts[ti]
      cand = [j for j in range(nb) if j * bs <= u]
      forced = [
        j for j in cand if j < cfg.num_init_blocks or u // bs - cfg.num_local_blocks < j <= u // bs
      ]
      for hh in range(h):
        rest = sorted(
          (j for j in cand if j not in forced), key=lambda j: (-score[bi, ti, hh, j], j)
        )
        chosen = sorted(forced + rest[: max(n - len(forced), 0)])
        out[bi, ti, hh, : len(chosen)] = chosen
  return out


def hopper_gpu_available() -> bool:
  """True when the default backend is a GPU of compute capability 9.x (H100/H200)."""
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", None)
  return cc is not None and str(cc).startswith("9")


def pytest_collection_modifyitems(config, items):
  """Tests marked ``gpu`` run only where a Hopper GPU is the default backend."""
  if hopper_gpu_available():
    return
  skip = pytest.mark.skip(reason="needs a Hopper GPU (sm90) as the default JAX backend")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
