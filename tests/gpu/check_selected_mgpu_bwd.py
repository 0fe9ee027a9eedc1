"""GPU check of the selected-attention backward kernels (dQ, dK/dV) against the float32 reference.

Run on the GPU machine from the repository root:
``PYTHONPATH=$PWD python3 tests/gpu/check_selected_mgpu_bwd.py [--quick | --docs | --dims-quick |
--dims | --blocks-quick | --blocks | --smoke | --all | --persistent-docs]`` (``--docs``: only the
packed-document configs; ``--persistent-docs``: five of them with ``persistent=True`` (the default
since they passed, H200, 2026-11-30);
``--smoke``: 9 configs across the default dims, documents, Dk != Dv and blocks 32/128;
``--new-quick``: Dk/Dv 192/128 and 160/128, blocks 32 and 128, one config each;
``--dims``: only the ``Dk != Dv`` configs, e.g. Dk=192/Dv=128 and the ASA GLA global layer's
Dk=160/Dv=128 (zero padded to 192); ``--blocks``: only KV block sizes 32 and 128; the ``-quick``
forms run a subset of about ten configs that fits one 10-minute device call; ``--all``:
everything). ``--configs I,J,...`` keeps only those positions of the chosen suite (no
dispatch checks unless ``--dispatch`` is given too), e.g. to rerun what a cut run left unverified;
``--shard I/N`` (after ``--configs``) runs only the configs ``I, I+N, ...`` and the dispatch checks
``I, I+N, ...``, so N processes side by side cover a suite (compilation dominates: about 50 s per
config; on one H200, 8 processes of ``--all`` ran out of memory in the T=1000/4096 configs, whose
float32 references hold [B, HQ, T, T] scores, so 4 per GPU is the safe number). Each config also
checks the forward (O and LSE) of the same call; configs use the public op's defaults (exact: 128-row
tiles, direct layout, persistent forward without documents) unless they name other settings.
Each config draws fresh random inputs and a random output cotangent (never zeros), takes
``jax.vjp`` of the kernel op twice (a difference between the two runs means a race) and compares
dQ, dK, dV with the VJP of the plain-JAX reference on float32 copies of the same inputs
(relative L2 error and max error over max |ref|). Exits 1 on any failure.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import selected_attention_dims as dims
from pallas_kernels import selected_attention_mgpu as mg
from sparse_attention_jax.ops.masked import document_starts, masked_attention
from sparse_attention_jax.ops.selected import selected_attention, selected_mask
from sparse_attention_jax.ops.selection import share_selection

sys.path.insert(0, "tests/gpu")
from check_selected_mgpu import BS, random_selection

CONFIGS = [
  # name, b, t, hq, h, d, n, dtype, mode
  ("G16 D128 bf16 exact T=301", 1, 301, 32, 2, 128, 16, jnp.bfloat16, "exact"),
  ("G16 D128 bf16 shared T=301", 1, 301, 32, 2, 128, 16, jnp.bfloat16, "shared"),
  ("G16 D64 f16 exact T=1000 B=2", 2, 1000, 32, 2, 64, 8, jnp.float16, "exact"),
  ("G8 D128 f16 exact T=517", 1, 517, 16, 2, 128, 6, jnp.float16, "exact"),
  ("G4 D128 bf16 shared T=333", 1, 333, 8, 2, 128, 5, jnp.bfloat16, "shared"),
  ("G3 D128 bf16 exact T=250", 1, 250, 6, 2, 128, 4, jnp.bfloat16, "exact"),
  ("G1 D64 bf16 exact T=250", 1, 250, 2, 2, 64, 4, jnp.bfloat16, "exact"),
  ("G16 D128 bf16 exact T=4096 std", 1, 4096, 64, 4, 128, 16, jnp.bfloat16, "exact"),
]

DIM_CONFIGS = [
  # name, b, t, hq, h, (dk, dv), n, dtype, mode: Dk != Dv; 160 is padded to 192 by the wrapper
  ("G16 Dk192 Dv128 bf16 exact T=301", 1, 301, 32, 2, (192, 128), 16, jnp.bfloat16, "exact"),
  ("G4 Dk192 Dv128 bf16 exact T=333", 1, 333, 8, 2, (192, 128), 5, jnp.bfloat16, "exact"),
  ("G16 Dk160 Dv128 bf16 exact T=517", 1, 517, 32, 2, (160, 128), 8, jnp.bfloat16, "exact"),
  ("G4 Dk160 Dv128 bf16 shared T=250", 1, 250, 8, 2, (160, 128), 4, jnp.bfloat16, "shared"),
  ("G16 Dk160 Dv128 bf16 shared T=301", 1, 301, 32, 2, (160, 128), 16, jnp.bfloat16, "shared"),
  ("G16 Dk160 Dv128 bf16 exact T=4096 GLA", 1, 4096, 32, 2, (160, 128), 16, jnp.bfloat16, "exact"),
  ("G8 Dk192 Dv128 f16 exact T=300 B=2", 2, 300, 16, 2, (192, 128), 6, jnp.float16, "exact"),
  ("G16 Dk256 Dv128 bf16 exact T=301", 1, 301, 32, 2, (256, 128), 8, jnp.bfloat16, "exact"),
  ("G16 Dk64 Dv128 bf16 exact T=301", 1, 301, 32, 2, (64, 128), 8, jnp.bfloat16, "exact"),
]


def segments(b, t, seed):
  """Packed documents with boundaries inside blocks and tiles: ``[B, T]`` int32."""
  cuts = jax.random.randint(jax.random.key(seed + 999), (b, 5), 1, t)
  return jnp.cumsum(jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], cuts].set(1), axis=1)


def check(name, b, t, hq, h, d, n, dtype, mode, seed, docs=False, **kw):
  """``d``: the head dim, or ``(Dk, Dv)``; dims that are not multiples of 64 go through the
  wrapper's zero padding (:func:`pallas_kernels.selected_attention_dims.with_padded_head_dims`).
  ``kw``: :class:`~pallas_kernels.selected_attention_mgpu._Config` fields (``block_size`` too)."""
  name = f"{name}{' docs' if docs else ''} {kw}" if (kw or docs) else name
  dk, dv = d if isinstance(d, tuple) else (d, d)
  key = jax.random.key(seed)
  kq, kk, kv, ki, kd = jax.random.split(key, 5)
  q = jax.random.normal(kq, (b, t, hq, dk), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, t, h, dk), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, t, h, dv), jnp.float32).astype(dtype)
  do = jax.random.normal(kd, (b, t, hq, dv), jnp.float32).astype(dtype)
  bs = kw.get("block_size", BS)
  bi = random_selection(ki, b, t, h, n, block_size=bs).at[:, 70:74].set(-1)  # rows see nothing
  opts = {
    "tile_rows": 128 if mode == "exact" else 64,
    "q_layout": "direct",  # public defaults
    "persistent": not docs,
  }
  cfg = mg._Config(softmax_scale=dk**-0.5, mode=mode, **{**opts, **kw})
  seg = segments(b, t, seed) if docs else None
  doc_start = None if seg is None else document_starts(seg, b, t)
  padded = lambda fn: (
    lambda q, k, v, bi: dims.with_padded_head_dims(fn, q, k, v, bi, doc_start, cfg)
  )
  f = jax.jit(
    lambda q, k, v, do, bi: jax.vjp(lambda q, k, v: padded(mg._attention)(q, k, v, bi), q, k, v)[1](
      do
    )
  )
  g1 = jax.block_until_ready(f(q, k, v, do, bi))
  g2 = jax.block_until_ready(f(q, k, v, do, bi))
  o_k, lse_k = jax.jit(padded(mg._forward))(q, k, v, bi)
  g = hq // h
  bi_ref = share_selection(bi, mg.tokens_per_tile(g)) if mode == "shared" else bi
  f32 = lambda x: x.astype(jnp.float32)
  mask = selected_mask(bi_ref, block_size=bs, seq_len=t, segment_ids=seg)
  (o_r, lse_r), vjp = jax.vjp(
    lambda q, k, v: masked_attention(q, k, v, mask, dk**-0.5), f32(q), f32(k), f32(v)
  )
  want = vjp((f32(do), jnp.zeros_like(lse_r)))
  o_k, o_r = np.asarray(f32(o_k)), np.asarray(o_r)
  o_rel = np.linalg.norm(o_k - o_r) / np.linalg.norm(o_r)
  lse_k, lse_r = np.asarray(lse_k), np.asarray(lse_r)
  fin = np.isfinite(lse_r)
  lse_ok = bool(np.all(np.isneginf(lse_k[~fin]))) and (
    not fin.any() or np.max(np.abs(lse_k[fin] - lse_r[fin])) < 2e-2
  )
  ok = o_rel < 1e-2 and lse_ok
  parts = [f"o: rel={o_rel:.1e} lse_ok={lse_ok}"]
  for nm, a, a2, w in zip(("dq", "dk", "dv"), g1, g2, want):
    a, a2, w = np.asarray(f32(a)), np.asarray(f32(a2)), np.asarray(w)
    rel = np.linalg.norm(a - w) / max(np.linalg.norm(w), 1e-30)
    mx = np.max(np.abs(a - w)) / max(np.max(np.abs(w)), 1e-30)
    race = not np.array_equal(a, a2)
    nan = bool(np.isnan(a).any())
    ok &= rel < 2e-2 and mx < 5e-2 and not race and not nan
    parts.append(
      f"{nm}: rel={rel:.1e} max/|ref|={mx:.1e}{' RACE' if race else ''}{' NAN' if nan else ''}"
    )
  print(f"{'OK  ' if ok else 'FAIL'} {name:50s} " + "  ".join(parts), flush=True)
  return ok


def check_dispatch_grad(seed=100, dk=64, dv=64, bs=BS):
  """``selected_attention(impl="pallas_gpu")`` under jax.grad uses the kernel backward."""
  b, t, hq, h, n = 1, 200, 32, 2, 4
  kq, kk, kv, ki, kw = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(kq, (b, t, hq, dk), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(kk, (b, t, h, dk), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(kv, (b, t, h, dv), jnp.float32).astype(jnp.bfloat16)
  bi = random_selection(ki, b, t, h, n, block_size=bs)
  w = jax.random.normal(kw, (b, t, hq, dv), jnp.float32)
  loss = lambda impl: (
    lambda q, k, v: jnp.sum(
      selected_attention(q, k, v, bi, block_size=bs, impl=impl).astype(jnp.float32) * w
    )
  )
  gk = jax.jit(jax.grad(loss("pallas_gpu"), argnums=(0, 1, 2)))(q, k, v)
  gr = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, k, v)
  rel = max(
    float(jnp.linalg.norm(f32a - f32b) / jnp.linalg.norm(f32b))
    for f32a, f32b in ((a.astype(jnp.float32), c.astype(jnp.float32)) for a, c in zip(gk, gr))
  )
  ok = rel < 2e-2
  print(
    f"{'OK  ' if ok else 'FAIL'} grad through impl='pallas_gpu' vs reference (Dk={dk}, "
    f"Dv={dv}, block {bs}): max rel={rel:.1e}",
    flush=True,
  )
  return ok


def main():
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  jobs = [(c, {}) for c in CONFIGS]
  jobs += [(CONFIGS[i], {"tile_rows": 64, "q_layout": "tiles"}) for i in (0, 3)]
  jobs += [(CONFIGS[i], {"bwd_direct": False}) for i in (0, 2, 7)]  # tiles backward
  jobs += [(CONFIGS[i], {"bwd_chunk": 3}) for i in (2, 7)]  # many split items
  docs = [
    (CONFIGS[i], {"docs": True, **kw})
    for i, kw in (
      (0, {}),
      (1, {}),
      (2, {}),
      (3, {"tile_rows": 64, "q_layout": "tiles"}),
      (4, {}),
      (5, {}),
      (6, {}),
      (7, {}),
      (2, {"bwd_direct": False}),
    )
  ]  # packed documents
  dim_jobs = [(c, {}) for c in DIM_CONFIGS]
  dim_jobs += [(DIM_CONFIGS[i], {"tile_rows": 64, "q_layout": "tiles"}) for i in (0, 2)]
  dim_jobs += [(DIM_CONFIGS[i], {"tile_rows": 128, "q_layout": "tiles"}) for i in (1,)]
  dim_jobs += [(DIM_CONFIGS[i], {"bwd_direct": False}) for i in (0, 2)]  # tiles backward
  dim_jobs += [(DIM_CONFIGS[i], {"docs": True}) for i in (2, 3)]  # packed documents
  dim_jobs += [(DIM_CONFIGS[5], {"bwd_chunk": 3, "num_stages": 3})]
  c = CONFIGS
  block_jobs = [
    (c[0], {"block_size": 32}),
    (c[0], {"block_size": 128}),
    (c[4], {"block_size": 32}),
    (c[4], {"block_size": 128}),
    (c[5], {"block_size": 128, "docs": True}),
    (c[6], {"block_size": 32, "docs": True}),
    (c[3], {"block_size": 128, "tile_rows": 64, "q_layout": "tiles"}),
    (c[2], {"block_size": 32, "bwd_direct": False, "bwd_chunk": 3}),
    (DIM_CONFIGS[2], {"block_size": 128}),
    (DIM_CONFIGS[0], {"block_size": 32}),
    (c[7][:6] + (8,) + c[7][7:], {"block_size": 128}),  # T=4096, n*bs = 1024
    (c[7][:6] + (32,) + c[7][7:], {"block_size": 32}),
  ]
  dispatch_dims = [(64, 64, BS)]
  if "--new-quick" in sys.argv:  # the four new shapes only: 192/128, 160/128, 32, 128
    jobs = [dim_jobs[0], dim_jobs[2], block_jobs[0], block_jobs[1]]
    dispatch_dims = [(160, 128, BS)]
  elif "--smoke" in sys.argv:  # one short call: regression + new dims + new blocks
    jobs = [jobs[i] for i in (0, 4, 7, 13)] + [
      docs[0],
      dim_jobs[0],
      dim_jobs[2],
      block_jobs[0],
      block_jobs[1],
    ]
    dispatch_dims = [(160, 128, BS)]
  elif "--quick" in sys.argv:
    jobs = [jobs[i] for i in (0, 1, 4, 6, 7, 13)]
  if "--persistent-docs" in sys.argv:  # packed documents on the persistent forward
    jobs = [(c, {**kw, "persistent": True}) for c, kw in (docs[i] for i in (0, 2, 4, 6, 7))]
  elif "--docs-quick" in sys.argv:
    jobs = [docs[i] for i in (0, 3, 4, 6, 8)]
  elif "--docs" in sys.argv:
    jobs = docs
  elif "--dims-quick" in sys.argv:  # 192/128 and 160/128, both tile sizes and
    jobs = [dim_jobs[i] for i in (0, 1, 2, 3, 5, 7, 9, 13, 14, 16)]  # layouts, docs, 256/128
    dispatch_dims = [(160, 128, BS)]
  elif "--dims" in sys.argv:
    jobs, dispatch_dims = dim_jobs, [(160, 128, BS)]
  elif "--blocks-quick" in sys.argv:
    jobs = [block_jobs[i] for i in (0, 1, 3, 4, 5, 7, 8, 9, 10)]
    dispatch_dims = [(64, 64, 32), (160, 128, 128)]
  elif "--blocks" in sys.argv:
    jobs, dispatch_dims = block_jobs, [(64, 64, 32), (160, 128, 128)]
  elif "--all" in sys.argv:
    jobs += docs + dim_jobs + block_jobs
    dispatch_dims += [(160, 128, BS), (64, 64, 32), (160, 128, 128)]
  opt = lambda name: next(
    (
      a.split("=", 1)[1] if "=" in a else sys.argv[j + 1]
      for j, a in enumerate(sys.argv)
      if a.split("=", 1)[0] == name
    ),
    None,
  )
  jobs = list(enumerate(jobs))
  picked = opt("--configs")
  if picked is not None:
    try:
      keep = [int(x) for x in picked.split(",")]
      jobs = [jobs[i] for i in keep]
    except (ValueError, IndexError):
      sys.exit(f"--configs: expected comma-separated positions in [0, {len(jobs)}), got {picked!r}")
    if "--dispatch" not in sys.argv:
      dispatch_dims = []
  shard = opt("--shard")
  if shard is not None:
    try:
      si, sn = (int(x) for x in shard.split("/"))
      assert 0 <= si < sn
    except (ValueError, AssertionError):
      sys.exit(f"--shard: expected I/N with 0 <= I < N, got {shard!r}")
    jobs = jobs[si::sn]
    dispatch_dims = dispatch_dims[si::sn]
    print(f"shard {si}/{sn}: {len(jobs)} configs, {len(dispatch_dims)} dispatch checks", flush=True)
  ok = True
  for i, (c, kw) in jobs:
    t0 = time.perf_counter()
    try:
      ok &= check(*c, seed=i, **kw)
    except Exception as e:  # noqa: BLE001  (report and continue with the other configs)
      ok = False
      print(f"FAIL {c[0]}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
    print(f"     ({time.perf_counter() - t0:.1f} s)", flush=True)
  for dk, dv, bs in dispatch_dims:
    try:
      ok &= check_dispatch_grad(dk=dk, dv=dv, bs=bs)
    except Exception as e:  # noqa: BLE001
      ok = False
      print(
        f"FAIL dispatch grad (Dk={dk}, Dv={dv}): {type(e).__name__}: {str(e)[:3000]}", flush=True
      )
  print("ALL OK" if ok else "SOME FAILED", flush=True)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
