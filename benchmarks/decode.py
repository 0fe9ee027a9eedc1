"""Benchmark: cached decode throughput and memory vs batch size and context length.

Kinds (random weights, bf16 compute, bf16 caches):

* ``full``: ``configs/full_1p3b.yaml`` (dense causal attention over the whole cache).
* ``nsa``: ``configs/nsa_1p3b.yaml`` (paper NSA: phi-MLP compression l=32 d=16, top-16 blocks of
  64, window 512, independent K/V per branch), GPU-resident cache.
* ``infllm_v2``: ``configs/infllm_v2_1p3b.yaml`` (selection only: top-64 blocks incl. 17 local,
  shared K/V).
* ``nosa``: ``configs/nosa_1b.yaml`` (InfLLM-V2 scoring, k = 64 blocks of which k_q = 33 query-aware
  and 31 by the eviction head, eviction bias), device-resident cache, one jitted step.
* ``nosa_offload``: the same model with every layer's K/V/c in pinned host memory
  (:class:`sparse_attention_jax.offload.OffloadedDecoder`): the device holds the selection
  state, ``k - 1`` block slots and the current block per (sequence, KV head); the whole token
  step (every layer's selection, slot plan, copy of only the missing blocks, attention) is ONE
  jitted call. ``--offload-copy kernel`` (default: a Pallas kernel reading the pinned store
  directly) or ``xla`` (XLA's host gather, ``--offload-chunk`` blocks per load iteration). Rows
  add the blocks transferred per step, hit rate and bytes moved. The host store is filled with
  ``--host-pool`` distinct random blocks per layer, tiled over the blocks of every row (0 =
  every block distinct; the store holds every block either way, the pool only saves random
  draws).

``--shape 1b`` builds every kind on the 1B shape of ``configs/nosa_1b.yaml`` (hidden 2048, 16
layers, 32 q / 2 KV heads, vocab 128256): ``full`` with dense attention, ``nsa`` with
``nsa_1p3b``'s NSA settings, ``infllm_v2`` with NOSA's own InfLLM-V2 settings (k = 64), so the rows
differ only in attention. ``--report-fit`` adds, per row, the bytes a device-resident cache of
that kind/batch/context needs against the device's memory (``bytes_limit``), so the offloaded
rows can be run at batch sizes whose resident cache does not fit.

Weights are stored in the compute dtype (``--f32-params``: float32 master weights cast at use).
For each kind, batch ``B`` and context ``T`` the decode state is filled with random K/V (and
compressed tokens) as if ``T`` tokens had been prefilled (a prefill at 64k through the plain-JAX
reference would not fit), then the jitted decode step (cache donated, updated in place) runs
``--warmup`` times and ``--steps`` timed times. Reported per row: ms per step, tokens/s
(``B * steps / time``), the decode state's bytes, the step's XLA temporary bytes
(``compiled.memory_analysis()``), device bytes in use after the run and the process's peak
(monotone over the run: rows go from the smallest to the largest state per kind, and the peak
is reset by nothing, so read it as "peak so far").

Usage (from the repository root; no grain, orbax or tensorboard needed)::

  python3 benchmarks/decode.py --kinds full,nsa,infllm_v2 --batch 1,8 \\
      --context 16384,32768,65536 --steps 32 --out $OUT
  python3 benchmarks/decode.py --shape 1b --kinds full,nsa,infllm_v2,nosa,nosa_offload \\
      --batch 1,8,32 --context 32768,131072 --steps 16 --report-fit --out $OUT

Writes ``decode.json`` under ``--out`` (default ``$OUT`` or ``runs/bench``) and prints
a table. ``--tiny`` swaps in a CPU-sized model for smoke tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import (
  DecoderLM,
  ModelConfig,
  NOSAConfig,
  load_model_config,
)
from sparse_attention_jax.nn import decode as dec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
  "full": "configs/full_1p3b.yaml",
  "nsa": "configs/nsa_1p3b.yaml",
  "infllm_v2": "configs/infllm_v2_1p3b.yaml",
  "nosa": "configs/nosa_1b.yaml",
  "nosa_offload": "configs/nosa_1b.yaml",
}
GiB = 2**30


def model_config(kind: str, tiny: bool, shape: str = "1p3b") -> ModelConfig:
  """The config of ``kind`` (1.3B configs, or with ``shape="1b"`` every kind on the shape of
  ``configs/nosa_1b.yaml``), or a CPU-sized one with the same attention settings."""
  if kind not in CONFIGS:
    raise ValueError(f"--kinds: expected names from {sorted(CONFIGS)}, got {kind!r}")
  if shape not in ("1p3b", "1b"):
    raise ValueError(f"--shape: expected '1p3b' or '1b', got {shape!r}")
  cfg = load_model_config(os.path.join(ROOT, CONFIGS[kind]))
  if shape == "1b" and not tiny and kind not in ("nosa", "nosa_offload"):
    base = load_model_config(os.path.join(ROOT, CONFIGS["nosa"]))
    nsa = {"full": base.nsa, "nsa": cfg.nsa, "infllm_v2": base.nsa}[kind]
    cfg = dataclasses.replace(
      base,
      attention=("full",) if kind == "full" else ("nsa",),
      nsa=nsa,
      nsa_independent_kv=cfg.nsa_independent_kv,
      nosa=None,
    )
  if not tiny:
    return cfg
  nosa = NSAConfig.infllm_v2(
    local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=5, num_local_blocks=1
  )
  nsa = {
    "full": cfg.nsa,
    "nsa": NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=16),
    "infllm_v2": NSAConfig.infllm_v2(
      local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=4
    ),
    "nosa": nosa,
    "nosa_offload": nosa,
  }[kind]
  extra = {"nosa": NOSAConfig(query_selected=3)} if kind.startswith("nosa") else {}
  return dataclasses.replace(
    cfg,
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    nsa=nsa,
    dtype="float32",
    **extra,
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random(key, shape, dtype, scale):
  """``scale * N(0, 1)`` of a static shape (compiled once per distinct shape: layers repeat)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.full(shape, -1, dtype)  # int state (e.g. a stored selection): padding
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _random_tree(abstract, key, scale: float):
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(
    treedef, [_random(k, tuple(x.shape), jnp.dtype(x.dtype), scale) for k, x in zip(keys, leaves)]
  )


def random_params(cfg: ModelConfig, seed: int, *, compute_dtype_params: bool = True):
  """``(graphdef, params)`` of ``DecoderLM(cfg)`` with N(0, 0.02) weights, made on the device
  without an eager init; stored in the compute dtype (inference weights) unless
  ``compute_dtype_params`` is False (then float32 master weights, cast at every use)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if compute_dtype_params:
    dt = jnp.dtype(cfg.dtype)
    state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      state,
    )
  return graphdef, _random_tree(state, jax.random.key(seed), 0.02)


def filled_state(graphdef, params, batch: int, context: int, capacity: int, seed: int):
  """A decode state as after a prefill of ``context`` tokens per row: random K/V everywhere
  (every position ``< context`` and every compressed token), ``lengths = context``."""
  abstract = jax.eval_shape(
    lambda p: dec.init_decode_state(nnx.merge(graphdef, p), batch, capacity), params
  )
  caches = _random_tree(abstract.caches, jax.random.key(seed + 1), 1.0)
  return dec.DecodeState(
    caches, jnp.full((batch,), context, jnp.int32), jnp.asarray(capacity, jnp.int32)
  )


def memory_stats() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "bytes_in_use": stats.get("bytes_in_use"),
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "bytes_limit": stats.get("bytes_limit"),
  }


def run_one(
  graphdef, params, *, batch: int, context: int, steps: int, warmup: int, seed: int
) -> dict:
  capacity = context + warmup + steps
  state = filled_state(graphdef, params, batch, context, capacity, seed)
  state_bytes = dec.cache_bytes(state)
  donate = jax.default_backend() != "cpu"

  def step(params, tokens, state):
    logits, state = dec.decode_step(nnx.merge(graphdef, params), tokens, state)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

  tokens = jnp.zeros((batch,), jnp.int32)
  t0 = time.perf_counter()
  compiled = (
    jax.jit(step, donate_argnums=(2,) if donate else ()).lower(params, tokens, state).compile()
  )
  compile_s = time.perf_counter() - t0
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # noqa: BLE001 -- not every backend reports it
    temp = None
  for _ in range(warmup):
    tokens, state = compiled(params, tokens, state)
  jax.block_until_ready(tokens)
  t0 = time.perf_counter()
  for _ in range(steps):
    tokens, state = compiled(params, tokens, state)
  jax.block_until_ready((tokens, state))
  wall = time.perf_counter() - t0
  ok = bool(jnp.all(state.lengths == context + warmup + steps))
  return {
    "batch": batch,
    "context": context,
    "steps": steps,
    "ms_per_step": wall / steps * 1e3,
    "tokens_per_s": batch * steps / wall,
    "state_bytes": state_bytes,
    "step_temp_bytes": temp,
    "compile_s": compile_s,
    "lengths_ok": ok,
    **memory_stats(),
  }


def resident_cache_bytes(graphdef, params, batch: int, capacity: int) -> int:
  """Bytes of the device-resident decode state of ``batch`` rows of ``capacity`` tokens
  (abstract: nothing is allocated)."""
  abstract = jax.eval_shape(
    lambda p: dec.init_decode_state(nnx.merge(graphdef, p), batch, capacity), params
  )
  return dec.cache_bytes(abstract)


def _fill_offloaded(caches, context: int, seed: int, pool: int):
  """Offloaded caches as after a prefill of ``context`` tokens: random select states and tails
  on the device, random host blocks for every block: with ``pool > 0``, block ``j`` of every
  (sequence, KV head) is pool block ``j % pool`` (``pool`` distinct random blocks per layer);
  ``pool = 0``: every block distinct."""
  key = jax.random.key(seed + 2)
  for i, cache in enumerate(caches):
    if not isinstance(cache, list):
      cache_abs = jax.eval_shape(lambda c=cache: c)
      caches[i] = _random_tree(cache_abs, jax.random.fold_in(key, i), 1.0)
      continue
    sel, layer = cache
    cache[0] = _random_tree(jax.eval_shape(lambda s=sel: s), jax.random.fold_in(key, i), 1.0)
    lk = jax.random.fold_in(key, 1000 + i)
    store = layer.store
    b, h, nb, bs, d = store.shape
    n = b * h * nb if pool <= 0 else min(pool, nb)
    kv = np.asarray(_random(lk, (n, bs, d), layer.dtype, 1.0))
    cc = np.asarray(_random(jax.random.fold_in(lk, 1), (n, bs), jnp.dtype(jnp.float32), 1.0))
    if pool <= 0:
      kv, cc = kv.reshape(store.shape), cc.reshape(store.shape[:4])
    else:
      reps = -(-nb // n)
      kv, cc = np.tile(kv, (reps, 1, 1))[:nb], np.tile(cc, (reps, 1))[:nb]
      kv = np.broadcast_to(kv, (b, h, *kv.shape))
      cc = np.broadcast_to(cc, (b, h, *cc.shape))
    store.kv, store.c = jax.device_put((kv, cc), store.sharding)
    tail = _random(jax.random.fold_in(lk, 2), tuple(layer.state.tail_kv.shape), layer.dtype, 1.0)
    layer.state = layer.state._replace(tail_kv=tail)
    layer.length, layer._stored = context, (context - 1) // bs


def run_offload(
  model,
  *,
  batch: int,
  context: int,
  steps: int,
  warmup: int,
  seed: int,
  pool: int,
  chunk: int = 1024,
  copy: str = "kernel",
) -> dict:
  """The ``nosa_offload`` row: :class:`OffloadedDecoder` steps over a filled offloaded cache.

  ``compile_s`` is the warm-up steps' time (compilation included); the row also reports the
  median step time."""
  from sparse_attention_jax.offload import OffloadConfig, OffloadedDecoder

  capacity = context + warmup + steps
  decoder = OffloadedDecoder(
    model, batch=batch, capacity=capacity, config=OffloadConfig(copy=copy, chunk=chunk)
  )
  caches = decoder._new_caches()
  _fill_offloaded(caches, context, seed, pool)
  pick = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))
  tokens = jnp.zeros((batch,), jnp.int32)
  pos = context
  t0 = time.perf_counter()
  for _ in range(warmup):
    logits, _ = decoder.step(tokens, caches, pos)
    tokens, pos = pick(logits), pos + 1
  jax.block_until_ready(tokens)
  warm_s = time.perf_counter() - t0
  per_step, times = [], []
  t0 = time.perf_counter()
  for _ in range(steps):
    t1 = time.perf_counter()
    logits, st = decoder.step(tokens, caches, pos)
    tokens, pos = pick(logits), pos + 1
    per_step.append(st)
    times.append(time.perf_counter() - t1)  # host time per step (dispatch + last read-back)
  jax.block_until_ready(tokens)
  wall = time.perf_counter() - t0
  summary = decoder.summarize(caches, per_step)
  return {
    "batch": batch,
    "context": context,
    "steps": steps,
    "ms_per_step": wall / steps * 1e3,
    "tokens_per_s": batch * steps / wall,
    "state_bytes": summary.device_bytes,
    "ms_per_step_median": float(np.median(times)) * 1e3,
    "host_bytes": summary.host_bytes,
    "step_temp_bytes": None,
    "compile_s": warm_s,
    "lengths_ok": pos == capacity,
    "slots": summary.slots,
    "host_memory_kind": summary.host_memory_kind,
    "chunk": chunk,
    "copy": decoder.copy,
    "blocks_per_step": summary.total["transferred"] / steps,
    "hit_rate": summary.total["hit_rate"],
    "bytes_per_step": summary.total["bytes"] / steps,
    # Host ms per step: reading the counts back, dispatching the step.
    "host_ms_per_step": {
      key[:-2]: summary.total[key] / steps * 1e3 for key in ("wait_s", "dispatch_s")
    },
    **memory_stats(),
  }


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise SystemExit(f"{name}: expected comma-separated positive ints, got {text!r}") from None
  if not vals or min(vals) < 1:
    raise SystemExit(f"{name}: expected comma-separated positive ints, got {text!r}")
  return vals


def _gib(x) -> str:
  return "-" if x is None else f"{x / GiB:.2f}"


def _mib(x):
  return None if x is None else x / 2**20


def _opt(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--kinds", default="full,nsa,infllm_v2")
  ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--context", default="16384,32768,65536", help="comma-separated contexts")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tiny", action="store_true", help="CPU-sized model (smoke test)")
  ap.add_argument(
    "--shape",
    default="1p3b",
    choices=("1p3b", "1b"),
    help="1p3b: each kind's 1.3B config; 1b: every kind on configs/nosa_1b.yaml's shape",
  )
  ap.add_argument(
    "--report-fit",
    action="store_true",
    help="per row, the bytes a device-resident cache needs vs the device memory",
  )
  ap.add_argument(
    "--host-pool",
    type=int,
    default=256,
    help="nosa_offload: distinct random host blocks per layer, tiled over every "
    "sequence and KV head (0 = all distinct; see _fill_offloaded)",
  )
  ap.add_argument(
    "--offload-copy",
    default="kernel",
    choices=("kernel", "xla"),
    help="nosa_offload: the zero-copy Pallas kernel "
    "(sparse_attention_jax/offload/block_copy.py) or XLA's host gather",
  )
  ap.add_argument(
    "--offload-chunk",
    type=int,
    default=1024,
    help="nosa_offload with --offload-copy xla: most blocks one load iteration of a layer gathers",
  )
  ap.add_argument(
    "--f32-params",
    action="store_true",
    help="keep float32 master weights (default: weights in the compute dtype)",
  )
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "bench"))
  args = ap.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  if args.offload_chunk < 1:
    ap.error(f"--offload-chunk: expected a positive int, got {args.offload_chunk}")
  batches = _ints(args.batch, "--batch")
  contexts = _ints(args.context, "--context")
  dev = jax.devices()[0]
  meta = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "tiny": args.tiny,
    "steps": args.steps,
    "warmup": args.warmup,
    "shape": args.shape,
    "host_pool": args.host_pool,
    "offload_chunk": args.offload_chunk,
    "offload_copy": args.offload_copy,
    "params": "float32" if args.f32_params else "compute dtype",
  }
  print(f"device {meta['device']}, jax {jax.__version__}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "decode.json")
  rows = []

  def save():  # after every row: a run cut short keeps what it measured
    with open(path, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)

  header = (
    f"{'kind':<10} {'B':>4} {'context':>8} {'ms/step':>9} {'tokens/s':>10} "
    f"{'state GiB':>9} {'temp GiB':>9} {'in use GiB':>10} {'peak GiB':>9} "
    f"{'compile s':>9} {'blk/step':>8} {'hit':>5} {'MiB/step':>8} {'resident GiB':>12}"
    f" {'fits':>4}"
  )
  print(header, flush=True)
  for kind in kinds:
    cfg = model_config(kind, args.tiny, args.shape)
    graphdef, params = random_params(cfg, args.seed, compute_dtype_params=not args.f32_params)
    model = nnx.merge(graphdef, params) if kind == "nosa_offload" else None
    for context in sorted(contexts):
      for batch in sorted(batches):
        capacity = context + args.warmup + args.steps
        fit = {}
        if args.report_fit:
          need = resident_cache_bytes(graphdef, params, batch, capacity)
          limit = memory_stats()["bytes_limit"]
          fit = {"resident_cache_bytes": need, "fits": None if limit is None else need < limit}
        try:
          if kind == "nosa_offload":
            r = run_offload(
              model,
              batch=batch,
              context=context,
              steps=args.steps,
              warmup=args.warmup,
              seed=args.seed,
              pool=args.host_pool,
              chunk=args.offload_chunk,
              copy=args.offload_copy,
            )
          elif fit.get("fits") is False:
            raise MemoryError(
              f"resident cache {need / GiB:.1f} GiB > device memory {limit / GiB:.1f} GiB (skipped)"
            )
          else:
            r = run_one(
              graphdef,
              params,
              batch=batch,
              context=context,
              steps=args.steps,
              warmup=args.warmup,
              seed=args.seed,
            )
          r.update(fit)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record and go on
          r = {
            "batch": batch,
            "context": context,
            **fit,
            "error": f"{type(e).__name__}: {str(e)[:300]}",
          }
          print(f"{kind:<10} {batch:>4} {context:>8} error {r['error']}", flush=True)
        else:
          print(
            f"{kind:<10} {batch:>4} {context:>8} {r['ms_per_step']:>9.2f} "
            f"{r['tokens_per_s']:>10.1f} {_gib(r['state_bytes']):>9} "
            f"{_gib(r['step_temp_bytes']):>9} {_gib(r['bytes_in_use']):>10} "
            f"{_gib(r['peak_bytes']):>9} {r['compile_s']:>9.1f} "
            f"{_opt(r.get('blocks_per_step'), '.1f'):>8} {_opt(r.get('hit_rate'), '.3f'):>5} "
            f"{_opt(_mib(r.get('bytes_per_step')), '.2f'):>8} "
            f"{_gib(r.get('resident_cache_bytes')):>12} {_opt(r.get('fits'), ''):>4}",
            flush=True,
          )
          if "host_ms_per_step" in r:
            print(
              "    host ms/step over the NOSA layers: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms_per_step"].items()),
              flush=True,
            )
        rows.append({"kind": kind, "config": CONFIGS[kind], **r})
        save()
    del params, model
  save()
  print(f"wrote {path}")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
