"""Benchmark: cached decode throughput and memory vs batch size and context length.

Kinds (random weights, bf16 compute, bf16 caches):

* ``full``: ``configs/full_1p3b.yaml`` (dense causal attention over the whole cache).
* ``nsa``: ``configs/nsa_1p3b.yaml`` (paper NSA: phi-MLP compression l=32 d=16, top-16 blocks of
  64, window 512, independent K/V per branch), GPU-resident cache.
* ``infllm_v2``: ``configs/infllm_v2_1p3b.yaml`` (selection only: top-64 blocks incl. 17 local,
  shared K/V).

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

Writes ``decode.json`` under ``--out`` (default ``$OUT`` or ``benchmarks/results``) and prints
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_attention_jax.config import NSAConfig  # noqa: E402
from sparse_attention_jax.nn import DecoderLM, ModelConfig, load_model_config  # noqa: E402
from sparse_attention_jax.nn import decode as dec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"full": "configs/full_1p3b.yaml", "nsa": "configs/nsa_1p3b.yaml",
           "infllm_v2": "configs/infllm_v2_1p3b.yaml"}
GiB = 2 ** 30


def model_config(kind: str, tiny: bool) -> ModelConfig:
  """The 1.3B config of ``kind`` (or a CPU-sized one with the same attention settings)."""
  if kind not in CONFIGS:
    raise ValueError(f"--kinds: expected names from {sorted(CONFIGS)}, got {kind!r}")
  cfg = load_model_config(os.path.join(ROOT, CONFIGS[kind]))
  if not tiny:
    return cfg
  nsa = {"full": cfg.nsa,
         "nsa": NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3,
                                window=16),
         "infllm_v2": NSAConfig.infllm_v2(local_window=8, block_size=8, cmp_window=8,
                                          cmp_stride=4, num_selected=4)}[kind]
  return dataclasses.replace(cfg, vocab_size=256, d_model=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=128, nsa=nsa, dtype="float32")


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random(key, shape, dtype, scale):
  """``scale * N(0, 1)`` of a static shape (compiled once per distinct shape: layers repeat)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.full(shape, -1, dtype)          # int state (e.g. a stored selection): padding
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _random_tree(abstract, key, scale: float):
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [_random(k, tuple(x.shape), jnp.dtype(x.dtype), scale)
                                      for k, x in zip(keys, leaves)])


def random_params(cfg: ModelConfig, seed: int, *, compute_dtype_params: bool = True):
  """``(graphdef, params)`` of ``DecoderLM(cfg)`` with N(0, 0.02) weights, made on the device
  without an eager init; stored in the compute dtype (inference weights) unless
  ``compute_dtype_params`` is False (then float32 master weights, cast at every use)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if compute_dtype_params:
    dt = jnp.dtype(cfg.dtype)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, state)
  return graphdef, _random_tree(state, jax.random.key(seed), 0.02)


def filled_state(graphdef, params, batch: int, context: int, capacity: int, seed: int):
  """A decode state as after a prefill of ``context`` tokens per row: random K/V everywhere
  (every position ``< context`` and every compressed token), ``lengths = context``."""
  abstract = jax.eval_shape(
      lambda p: dec.init_decode_state(nnx.merge(graphdef, p), batch, capacity), params)
  caches = _random_tree(abstract.caches, jax.random.key(seed + 1), 1.0)
  return dec.DecodeState(caches, jnp.full((batch,), context, jnp.int32),
                         jnp.asarray(capacity, jnp.int32))


def memory_stats() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {"bytes_in_use": stats.get("bytes_in_use"), "peak_bytes": stats.get("peak_bytes_in_use")}


def run_one(graphdef, params, *, batch: int, context: int, steps: int, warmup: int,
            seed: int) -> dict:
  capacity = context + warmup + steps
  state = filled_state(graphdef, params, batch, context, capacity, seed)
  state_bytes = dec.cache_bytes(state)
  donate = jax.default_backend() != "cpu"

  def step(params, tokens, state):
    logits, state = dec.decode_step(nnx.merge(graphdef, params), tokens, state)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

  tokens = jnp.zeros((batch,), jnp.int32)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(2,) if donate else ()).lower(
      params, tokens, state).compile()
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
  return {"batch": batch, "context": context, "steps": steps, "ms_per_step": wall / steps * 1e3,
          "tokens_per_s": batch * steps / wall, "state_bytes": state_bytes,
          "step_temp_bytes": temp, "compile_s": compile_s, "lengths_ok": ok, **memory_stats()}


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


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--kinds", default="full,nsa,infllm_v2")
  ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--context", default="16384,32768,65536", help="comma-separated contexts")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tiny", action="store_true", help="CPU-sized model (smoke test)")
  ap.add_argument("--f32-params", action="store_true",
                  help="keep float32 master weights (default: weights in the compute dtype)")
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks",
                                                                         "results"))
  args = ap.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  batches = _ints(args.batch, "--batch")
  contexts = _ints(args.context, "--context")
  dev = jax.devices()[0]
  meta = {"device": f"{dev.platform} ({dev.device_kind})", "jax": jax.__version__,
          "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup,
          "params": "float32" if args.f32_params else "compute dtype"}
  print(f"device {meta['device']}, jax {jax.__version__}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "decode.json")
  rows = []

  def save():                    # after every row: a run cut short keeps what it measured
    with open(path, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)

  header = (f"{'kind':<10} {'B':>4} {'context':>8} {'ms/step':>9} {'tokens/s':>10} "
            f"{'state GiB':>9} {'temp GiB':>9} {'in use GiB':>10} {'peak GiB':>9} "
            f"{'compile s':>9}")
  print(header, flush=True)
  for kind in kinds:
    cfg = model_config(kind, args.tiny)
    graphdef, params = random_params(cfg, args.seed,
                                     compute_dtype_params=not args.f32_params)
    for context in sorted(contexts):
      for batch in sorted(batches):
        try:
          r = run_one(graphdef, params, batch=batch, context=context, steps=args.steps,
                      warmup=args.warmup, seed=args.seed)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record and go on
          r = {"batch": batch, "context": context, "error": f"{type(e).__name__}: "
                                                            f"{str(e)[:300]}"}
          print(f"{kind:<10} {batch:>4} {context:>8} error {r['error']}", flush=True)
        else:
          print(f"{kind:<10} {batch:>4} {context:>8} {r['ms_per_step']:>9.2f} "
                f"{r['tokens_per_s']:>10.1f} {_gib(r['state_bytes']):>9} "
                f"{_gib(r['step_temp_bytes']):>9} {_gib(r['bytes_in_use']):>10} "
                f"{_gib(r['peak_bytes']):>9} {r['compile_s']:>9.1f}", flush=True)
        rows.append({"kind": kind, "config": CONFIGS[kind], **r})
        save()
    del params
  save()
  print(f"wrote {path}")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
