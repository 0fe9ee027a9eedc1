"""GPU check of NOSA cached decoding, device-resident and offloaded.

Run from the repository root on a CUDA machine (jax >= 0.11.2, flax, no grain/pytest needed):
``PYTHONPATH=$PWD python3 tests/gpu/check_nosa_decode.py``; results go to
``$OUT/nosa_decode.json`` (default ``./nosa_decode_out``). ``--tiny`` runs a CPU-sized case.

What it checks on a random-init NOSA model (eviction scale ``A`` set to non-zero values so the
bias and the query-agnostic part matter), float32, prompts of one length:

1. greedy tokens of ``Generator(offload=True, offload_store=S, offload_plan=P)`` (K/V/c in host
   memory, selected blocks copied into device slots) equal those of the device-resident
   ``Generator``, for each entry ``S`` or ``S:P`` of ``--stores`` (default
   ``numpy,pinned_host,pinned_array:fused``; ``P`` = ``host``, the default, ``device`` or
   ``fused``, e.g. ``pinned_array:device``);
2. the host store holds its blocks where it says (``numpy``: NumPy arrays; ``pinned_host``:
   every block a jax array in ``pinned_host`` memory; ``pinned_array``: one jax array per layer
   in ``pinned_host`` memory), read from the arrays of the last generation's caches;
3. the transfer totals add up over the steps (bytes = blocks x block bytes).

Prints a table (tokens/s of the resident path and of each store, blocks/step, hit rate, MiB
moved) and exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, ModelConfig, NOSAConfig
from sparse_attention_jax.nn.generate import Generator


def build(tiny: bool) -> tuple[DecoderLM, int, int]:
  """Model, prompt length, new tokens."""
  if tiny:
    nsa = NSAConfig.infllm_v2(
      local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=5, num_local_blocks=1
    )
    cfg = ModelConfig(
      vocab_size=64,
      d_model=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      mlp_dim=64,
      attention=("nosa",),
      nsa=nsa,
      nosa=NOSAConfig(query_selected=3),
    )
    prompt, new = 30, 24
  else:
    nsa = NSAConfig.infllm_v2(
      local_window=128,
      block_size=64,
      cmp_window=32,
      cmp_stride=16,
      num_selected=16,
      num_local_blocks=2,
    )
    cfg = ModelConfig(
      vocab_size=512,
      d_model=256,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      head_dim=64,
      mlp_dim=512,
      attention=("nosa",),
      nsa=nsa,
      nosa=NOSAConfig(query_selected=8),
    )
    prompt, new = 2000, 200
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  for i, blk in enumerate(model.layers):
    blk.attn.a[...] = jnp.array([1.0, -1.5]) * (1 + i % 2)
  return model, prompt, new


def _keep_caches(gen) -> None:
  """Makes ``gen``'s offloaded decoder keep the caches of its latest prefill in
  ``last_caches`` (to read the host stores after a generation)."""
  dec = gen._offload
  orig = dec.prefill

  def prefill(tokens):
    logits, caches = orig(tokens)
    dec.last_caches = caches
    return logits, caches

  dec.prefill = prefill


def _store_kinds(caches) -> set:
  """Memory kinds of the NOSA layers' host stores, read from the stored arrays themselves."""
  kinds = set()
  for c in caches:
    if isinstance(c, list):
      st = c[1].store
      if hasattr(st, "blocks"):
        kinds |= {x.sharding.memory_kind for blk in st.blocks.values() for x in blk}
      elif isinstance(st.kv, jax.Array):
        kinds |= {st.kv.sharding.memory_kind, st.c.sharding.memory_kind}
      else:
        kinds.add(
          "numpy"
          if type(st.kv) is np.ndarray and type(st.c) is np.ndarray
          else type(st.kv).__name__
        )
  return kinds


# Memory kind each host store reports (and holds its arrays in).
STORE_KIND = {"numpy": "numpy", "pinned_host": "pinned_host", "pinned_array": "pinned_host"}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument(
    "--stores",
    default="numpy,pinned_host,pinned_array:fused",
    help="comma-separated offload host stores to check, each S or S:PLAN "
    "(PLAN host, device or fused, e.g. pinned_array:device)",
  )
  args = ap.parse_args(argv)
  out_dir = os.environ.get("OUT") or "nosa_decode_out"
  os.makedirs(out_dir, exist_ok=True)
  model, plen, new = build(args.tiny)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, model.config.vocab_size, (args.batch, plen)).tolist()
  cap = plen + new
  resident = Generator(model, batch=args.batch, capacity=cap, prefill_bucket=plen)
  a = resident.generate(prompts, new, greedy=True)
  block_bytes = model.config.nsa.block_size * ((model.config.head_dim + model.config.dv) * 4 + 4)
  dev = jax.devices()[0]
  result = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "batch": args.batch,
    "prompt": plen,
    "new_tokens": new,
    "resident_tokens_per_s": a.decode_tokens_per_s,
    "stores": {},
  }
  ok = True
  for entry in [x for x in args.stores.split(",") if x]:
    store, _, plan = entry.partition(":")
    gen = Generator(
      model,
      batch=args.batch,
      capacity=cap,
      offload=True,
      offload_store=store,
      offload_plan=plan or "host",
    )
    _keep_caches(gen)
    b = gen.generate(prompts, new, greedy=True)
    st = b.offload
    checks = {
      "tokens_equal": bool(np.array_equal(a.tokens, b.tokens)),
      "host_store": st.host_memory_kind == STORE_KIND[store]
      and _store_kinds(gen._offload.last_caches) == {STORE_KIND[store]},
      "totals_add_up": st.total["transferred"] == sum(s["transferred"] for s in st.per_step)
      and st.total["bytes"] == st.total["transferred"] * block_bytes,
    }
    ok &= all(checks.values())
    result["stores"][entry] = {
      "checks": checks,
      "host_memory_kind": st.host_memory_kind,
      "offload_tokens_per_s": b.decode_tokens_per_s,
      "blocks_per_step": st.total["transferred"] / max(len(st.per_step), 1),
      "hit_rate": st.total["hit_rate"],
      "mib_moved": st.total["bytes"] / 2**20,
      "first_mismatch_step": None
      if checks["tokens_equal"]
      else int(np.argmax(np.any(a.tokens != b.tokens, axis=0))),
    }
  with open(os.path.join(out_dir, "nosa_decode.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(
    f"device {result['device']}, jax {jax.__version__}, batch {args.batch}, prompt {plen}, "
    f"{new} new tokens"
  )
  print(
    f"{'path':<29} {'tokens/s':>10} {'blocks/step':>11} {'hit rate':>8} {'MiB moved':>9} checks"
  )
  print(f"{'resident':<29} {a.decode_tokens_per_s:>10.1f} {'-':>11} {'-':>8} {'-':>9}")
  for store, r in result["stores"].items():
    bad = [k for k, v in r["checks"].items() if not v]
    print(
      f"{'offload ' + store:<29} {r['offload_tokens_per_s']:>10.1f} "
      f"{r['blocks_per_step']:>11.1f} {r['hit_rate']:>8.3f} {r['mib_moved']:>9.2f} "
      f"{'ok' if not bad else 'FAIL ' + ','.join(bad)}"
    )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
