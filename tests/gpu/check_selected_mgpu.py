"""GPU check of the Mosaic GPU selected-attention forward against the float32 reference.

Run on the H100 from the repository root:
``PYTHONPATH=$PWD python3 tests/gpu/check_selected_mgpu.py [--quick | --persistent |
--persistent-rest]`` (``--persistent``: only the persistent-grid variants; ``--persistent-rest``:
five of them, T=4096 with 5 CTAs and one per SM, the tiles layout, no ping-pong).
Each config draws fresh random inputs (never zeros), runs the kernel twice (a difference between
the two runs means a race), and compares O and LSE with the reference on float32 copies. Exits 1
on any failure.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import selected_attention_mgpu as mg
from sparse_attention_jax.ops.masked import masked_attention
from sparse_attention_jax.ops.selected import selected_attention, selected_mask
from sparse_attention_jax.ops.selection import share_selection

BS = 64


def random_selection(key, b, t, h, n, *, forced=True, pad_frac=0.15, block_size=BS):
  """``[B, T, H, n]`` ids: current block forced in slot 0, random earlier blocks, -1 padding,
  some duplicates and some future / out-of-range ids (all must be ignored or masked)."""
  k1, k2, k3 = jax.random.split(key, 3)
  cur = (jnp.arange(t, dtype=jnp.int32) // block_size)[None, :, None, None]
  u = jax.random.uniform(k1, (b, t, h, n))
  ids = jnp.floor(u * (cur + 1)).astype(jnp.int32)  # in [0, cur]
  ids = jnp.where(jax.random.uniform(k2, ids.shape) < pad_frac, -1, ids)
  ids = jnp.where(jax.random.uniform(k3, ids.shape) < 0.03, cur + 1, ids)  # future block
  if forced:
    ids = ids.at[..., 0].set(cur[..., 0])
  return ids.at[..., -1].set(ids[..., 1])  # a duplicate


def check(name, b, t, hq, h, d, n, dtype, mode, seed, variant=(64, "tiles", True)):
  tile_rows, q_layout, pp, *ctas = variant  # ctas: persistent grid of that many CTAs
  persistent = bool(ctas)
  name = (
    f"{name} [{tile_rows},{q_layout}{'' if pp else ',nopp'}"
    f"{f',persistent{ctas[0]}' if persistent else ''}]"
  )
  key = jax.random.key(seed)
  kq, kk, kv, ki = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, h, d), jnp.float32).astype(dtype)
  bi = random_selection(ki, b, t, h, n)
  f = jax.jit(
    lambda q, k, v, bi: mg.selected_attention_mgpu(
      q,
      k,
      v,
      bi,
      mode=mode,
      return_lse=True,
      tile_rows=tile_rows,
      q_layout=q_layout,
      ping_pong=pp,
      persistent=persistent,
      num_ctas=ctas[0] if persistent else 0,
    )
  )
  o1, l1 = jax.block_until_ready(f(q, k, v, bi))
  o2, l2 = jax.block_until_ready(f(q, k, v, bi))
  g = hq // h
  bi_ref = share_selection(bi, mg.tokens_per_tile(g)) if mode == "shared" else bi
  f32 = lambda x: x.astype(jnp.float32)
  mask = selected_mask(bi_ref, block_size=BS, seq_len=t)
  o_ref, l_ref = masked_attention(f32(q), f32(k), f32(v), mask, d**-0.5)
  o1f, o_ref = np.asarray(f32(o1)), np.asarray(o_ref)
  err = np.abs(o1f - o_ref)
  rel = np.linalg.norm(o1f - o_ref) / np.linalg.norm(o_ref)
  l1, l_ref = np.asarray(l1), np.asarray(l_ref)
  fin = np.isfinite(l_ref)
  lse_err = np.max(np.abs(l1[fin] - l_ref[fin])) if fin.any() else 0.0
  lse_inf_ok = bool(np.all(np.isneginf(l1[~fin])))
  race = not (
    np.array_equal(np.asarray(o1), np.asarray(o2))
    and np.array_equal(np.asarray(l1), np.asarray(l2))
  )
  nan = bool(np.isnan(o1f).any())
  cfg = mg.resolve_config(
    mg._Config(softmax_scale=1.0, mode=mode, tile_rows=tile_rows, q_layout=q_layout, group_size=g),
    g,
  )
  union = float(jnp.mean(mg.prepare(q, bi, cfg, h)[1].counts.astype(jnp.float32)))
  ok = rel < 1e-2 and err.max() < 6e-2 and lse_err < 2e-2 and lse_inf_ok and not race and not nan
  print(
    f"{'OK  ' if ok else 'FAIL'} {name:50s} max|dO|={err.max():.2e} rel={rel:.2e} "
    f"max|dLSE|={lse_err:.2e} -inf_ok={lse_inf_ok} race={race} nan={nan} "
    f"mean_list={union:.1f} (n={n})",
    flush=True,
  )
  return ok


def check_dispatch(seed=100):
  """``impl="auto"`` picks the kernel on the GPU (gradients: ``check_selected_mgpu_bwd.py``)."""
  b, t, hq, h, d, n = 1, 200, 32, 2, 64, 4
  kq, kk, kv, ki = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
  bi = random_selection(ki, b, t, h, n)
  auto = selected_attention(q, k, v, bi, block_size=BS, impl="auto")
  same = bool(jnp.array_equal(auto, mg.selected_attention_mgpu(q, k, v, bi)))
  print(f"{'OK  ' if same else 'FAIL'} auto==pallas_gpu: {same}", flush=True)
  return same


CONFIGS = [
  # name, b, t, hq, h, d, n, dtype, mode
  ("G16 D128 bf16 exact T=301", 1, 301, 32, 2, 128, 16, jnp.bfloat16, "exact"),
  ("G16 D128 bf16 shared T=301", 1, 301, 32, 2, 128, 16, jnp.bfloat16, "shared"),
  ("G16 D64 f16 exact T=1000 B=2", 2, 1000, 32, 2, 64, 8, jnp.float16, "exact"),
  ("G16 D64 f16 shared T=1000 B=2", 2, 1000, 32, 2, 64, 8, jnp.float16, "shared"),
  ("G8 D128 f16 exact T=517", 1, 517, 16, 2, 128, 6, jnp.float16, "exact"),
  ("G4 D128 bf16 exact T=333", 1, 333, 8, 2, 128, 5, jnp.bfloat16, "exact"),
  ("G4 D128 bf16 shared T=333", 1, 333, 8, 2, 128, 5, jnp.bfloat16, "shared"),
  ("G3 D128 bf16 exact T=250", 1, 250, 6, 2, 128, 4, jnp.bfloat16, "exact"),
  ("G1 D64 bf16 exact T=250", 1, 250, 2, 2, 64, 4, jnp.bfloat16, "exact"),
  ("G1 D128 bf16 shared T=250", 1, 250, 2, 2, 128, 4, jnp.bfloat16, "shared"),
  ("G16 D128 bf16 exact T=4096 std", 1, 4096, 64, 4, 128, 16, jnp.bfloat16, "exact"),
]
WS = [(128, "tiles", True), (128, "direct", True)]
# Persistent grids with few CTAs, so that every CTA walks several tiles (double buffers, the K/V
# ring running on across tiles) even at these small shapes; 0 = one CTA per SM.
PERSISTENT = [
  (128, "direct", True, 5),
  (128, "tiles", True, 3),
  (128, "direct", False, 7),
  (128, "direct", True, 0),
]
CONFIGS_WS = [CONFIGS[i] for i in (0, 1, 2, 4, 6, 7, 9, 10)]


def main():
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  ok = True
  jobs = [(c, (64, "tiles", True)) for c in CONFIGS] + [(c, w) for w in WS for c in CONFIGS_WS]
  jobs += [(CONFIGS[i], (128, "direct", False)) for i in (0, 10)]
  jobs += [(c, w) for w in PERSISTENT[:2] for c in CONFIGS_WS]
  jobs += [(CONFIGS[i], w) for w in PERSISTENT[2:] for i in (0, 2, 10)]
  if "--quick" in sys.argv:
    jobs = [jobs[i] for i in (0, 1, 2, 8, 9, 10)] + [
      (CONFIGS[i], (128, "direct", True)) for i in (0, 1, 10)
    ]
  if "--persistent" in sys.argv:
    jobs = [j for j in jobs if len(j[1]) > 3]
  elif "--persistent-rest" in sys.argv:  # what the first --persistent run (150 s) left out
    jobs = [
      (CONFIGS[10], PERSISTENT[0]),
      (CONFIGS[0], PERSISTENT[1]),
      (CONFIGS[6], PERSISTENT[1]),
      (CONFIGS[2], PERSISTENT[2]),
      (CONFIGS[10], PERSISTENT[3]),
    ]
  for i, (c, w) in enumerate(jobs):
    t0 = time.perf_counter()
    try:
      ok &= check(*c, seed=i, variant=w)
    except Exception as e:  # noqa: BLE001  (report and continue with the other configs)
      ok = False
      print(f"FAIL {c[0]}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print(f"     ({time.perf_counter() - t0:.1f} s)", flush=True)
  try:
    ok &= check_dispatch()
  except Exception as e:  # noqa: BLE001  (report, then exit 1)
    ok = False
    print(f"FAIL dispatch: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  print("ALL OK" if ok else "SOME FAILED", flush=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
