"""Probe: can a GPU kernel gather blocks straight out of a ``pinned_host`` jax array (zero copy
over PCIe, the way NOSI's CUDA kernels read pinned memory), instead of XLA's host-compute gather
(``h2d_transfer.py`` path ``d_take``, 15-18 GB/s on the H200)?

A Pallas (Triton) kernel takes the store ``[NB, l', D]`` as one whole-array block and copies
``G`` blocks per program (``store_ref[idx]``) into a device output. Inside ``jit`` with the store
in ``pinned_host`` memory XLA may (a) refuse to compile, (b) copy the whole store to the device
first (then the time does not fall with the number of blocks), or (c) pass the host buffer to
the kernel (a real zero-copy gather). The script records which, checks every result bit for bit
against a NumPy gather, and times ``n`` random blocks per call against the same kernel on a
device-resident store and against ``d_take``.

Usage (GPU): ``python3 benchmarks/h2d_zero_copy.py [--blocks 65536] [--counts 256,4096,41000]
[--out PATH.json]``; ``--interpret`` runs the kernel in the Pallas interpreter (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def zero_copy_gather(store, idx, *, per_program: int = 8, interpret: bool = False):
  """Blocks ``store[idx]``: ``store [NB, l', D]``, ``idx [n]`` int32 (``n % per_program == 0``)
  -> ``[n, l', D]`` in device memory, copied by a Pallas kernel that reads ``store`` where it
  is."""
  nb, bs, d = store.shape
  n = idx.shape[0]

  def kernel(idx_ref, store_ref, out_ref):
    rows = idx_ref[pl.ds(pl.program_id(0) * per_program, per_program)]
    out_ref[...] = store_ref[rows]

  return pl.pallas_call(
    kernel,
    grid=(n // per_program,),
    in_specs=[pl.BlockSpec((n,), lambda i: (0,)), pl.BlockSpec((nb, bs, d), lambda i: (0, 0, 0))],
    out_specs=pl.BlockSpec((per_program, bs, d), lambda i: (i, 0, 0)),
    out_shape=jax.ShapeDtypeStruct((n, bs, d), store.dtype),
    interpret=interpret,
  )(idx, store)


def _host_take(store, idx):
  """``h2d_transfer.py``'s ``d_take``: XLA's gather on the host store (run as host compute),
  the result moved to the device: ``[n, 1, l', D]``."""
  dnums = jax.lax.GatherDimensionNumbers(
    offset_dims=(1, 2, 3), collapsed_slice_dims=(), start_index_map=(0,)
  )
  rows = jax.device_put(idx[:, None], jax.memory.Space.Host)
  out = jax.lax.gather(
    store, rows, dnums, slice_sizes=(1, *store.shape[1:]), mode=jax.lax.GatherScatterMode.CLIP
  )
  return jax.device_put(out, jax.memory.Space.Device)


def _time(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--blocks", type=int, default=65536, help="blocks in the store")
  ap.add_argument("--block-size", type=int, default=64)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--counts", default="256,4096,41000")
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "zero_copy.json"))
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  kinds = {m.kind for m in dev.addressable_memories()}
  host = "pinned_host" if "pinned_host" in kinds else "device"
  rng = np.random.default_rng(0)
  shape = (args.blocks, args.block_size, args.dim)
  store_np = rng.standard_normal(shape, np.float32).astype(jnp.bfloat16)
  block_bytes = args.block_size * args.dim * 2
  stores = {
    "pinned_host": jax.device_put(
      store_np, jax.sharding.SingleDeviceSharding(dev, memory_kind=host)
    ),
    "device": jax.device_put(store_np, dev),
  }
  gather = jax.jit(lambda s, i: zero_copy_gather(s, i, interpret=args.interpret))
  take = jax.jit(_host_take)
  rows = []
  print(
    f"device {dev.platform} ({dev.device_kind}), jax {jax.__version__}, store "
    f"{store_np.nbytes / 2**30:.2f} GiB in {host}"
  )
  print(f"{'path':<26} {'blocks':>7} {'ms':>8} {'GB/s':>7} exact")
  for n in [int(x) for x in args.counts.split(",")]:
    idx_np = rng.integers(0, args.blocks, n).astype(np.int32)
    want = store_np[idx_np]
    idx = jax.device_put(idx_np, dev)
    for name, fn, store in (
      ("pallas, pinned_host store", gather, stores["pinned_host"]),
      ("pallas, device store", gather, stores["device"]),
      ("d_take (XLA host gather)", take, stores["pinned_host"]),
    ):
      row = {"path": name, "blocks": n, "memory_kind": store.sharding.memory_kind}
      try:
        out = fn(store, idx)
        row["exact"] = bool(
          np.array_equal(np.asarray(out).reshape(want.shape).view(np.uint16), want.view(np.uint16))
        )
        row["out_memory_kind"] = out.sharding.memory_kind
        row["s"] = _time(fn, store, idx)
        row["gb_per_s"] = n * block_bytes / row["s"] / 1e9
        print(
          f"{name:<26} {n:>7} {row['s'] * 1e3:>8.3f} {row['gb_per_s']:>7.2f} {row['exact']}",
          flush=True,
        )
      except Exception as e:  # noqa: BLE001 -- the probe records what XLA refuses
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        row["trace"] = traceback.format_exc()[-1500:]
        print(f"{name:<26} {n:>7} error {row['error'][:300]}", flush=True)
      rows.append(row)
  try:
    hlo = gather.lower(stores["pinned_host"], idx).compile().as_text()
    copies = [ln.strip()[:200] for ln in hlo.splitlines() if "S(5)" in ln][:20]
  except Exception as e:  # noqa: BLE001
    copies = [f"{type(e).__name__}: {str(e)[:300]}"]
  meta = {
    "device": f"{dev.platform} ({dev.device_kind})",
    "jax": jax.__version__,
    "store_bytes": int(store_np.nbytes),
    "host_memory_kind": host,
    "hlo_host_memory_lines": copies,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
