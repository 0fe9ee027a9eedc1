"""Host -> device transfer paths for the block gather of the offloaded NOSA cache, not a test.

The offloaded cache (:mod:`sparse_attention_jax.offload`) keeps every block of a layer in a host
store ``[B, H, NB, l', D]`` and, each decode step, moves the ``n`` missing blocks (random
``(b, h, j)``) to the device in chunks of ``--chunk`` blocks. The library copies them with a
zero-copy kernel (``benchmarks/h2d_zero_copy.py``), XLA's host gather (path ``d_take``) as the
fallback; the other paths are those of the retired stores and staging buffers. This
script times only that move, for several ways of doing it, on a store of ``--store-mib`` MiB of
``--block-bytes``-byte bf16 blocks of ``--block-tokens`` tokens (default 32 KiB = 64 x 256 x 2 B).
Every path is checked bit for bit against a NumPy gather of the same blocks (column ``ok``).

Paths (``--paths`` takes letters or names):

* ``a``: the retired NumPy store's path: a fancy-index gather ``store[b, h, j]`` into a fresh array and
  ``jax.device_put`` of it (pageable memory; on GPU, PJRT copies it through its own pinned
  staging buffer on a worker thread).
* ``b``: ``np.take(..., out=)`` into reused host buffers (a ring of two, so no page faults on
  fresh memory) and ``jax.device_put``. A ``device_put`` of a NumPy array may read it after it
  returned (zero-copy semantics), so a buffer is refilled only after its last transfer is done.
  The CPU backend makes the device array an alias of an aligned NumPy buffer (even with
  ``may_alias=False``, jax 0.12), so there an aliasing result is copied once more.
* ``c_put``: b's gather, then ``device_put`` to ``pinned_host`` memory and ``device_put`` of that
  to device memory. ``c_jit``: the second move is a jitted identity with ``out_shardings`` of
  memory kind device. ``c_dma``: b's buffers page-aligned and registered with
  ``client.dma_map`` (cudaHostRegister on GPU), moved by ``device_put(..., may_alias=True)``,
  which PJRT then DMAs without its staging copy (skipped where ``dma_map`` is unimplemented, as
  on the CPU backend). ``c_view`` (run only when named): the staging buffers are
  ``pinned_host`` jax arrays filled in place through a NumPy view of their memory
  (``unsafe_buffer_pointer``), then moved by ``device_put`` (bends jax's immutability: benchmark
  only).
* ``d_loop`` / ``d_unroll`` / ``d_take``: the whole store as ONE jax array in ``pinned_host``
  memory and a jitted gather that reads it and returns device memory (no host gather at all):
  a ``fori_loop`` of ``dynamic_slice`` + ``device_put(Space.Device)`` per block (XLA's host
  offloader turns a dynamic slice of a host-memory operand moved to the device into an async
  host -> device slice), the same unrolled (``--unroll`` blocks per call), or ``jnp.take`` with
  host-memory indices (a gather in host memory: XLA runs it as host compute) then one move. A
  call gathers a fixed count (padded with repeats), so each compiles once.
* ``e_b`` / ``e_cput`` / ``e_cdma``: ``--threads`` threads, each taking every T-th chunk of b, of
  c_put or of c_dma (own buffers per thread).
* ``ref_gather``: b's gather alone (host only); ``ref_put``: ``device_put`` of already gathered
  pageable chunks; ``ref_put_pinned``: ``device_put`` of chunks already in ``pinned_host`` memory
  (the DMA alone). They bound what a path can reach.

A row's time is the median over ``--reps`` calls (after one warm-up call that also compiles; at
most ``--budget-s`` seconds of timed calls per row, at least one), each ending with
``jax.block_until_ready``; GB/s = moved bytes / time (1 GB = 1e9 B). Paths that need a memory
kind the device lacks are skipped with the reason printed, and so are the larger sizes of a path
whose fastest call took more than ``--slow-s`` seconds (keeps the default run under 2 minutes).

A path that raises (say a jitted gather this XLA version cannot compile) gets a row with
``ok=False`` and the error; the exit status is 1 only if some path moved wrong bytes.

Usage: ``PYTHONPATH=$PWD python3 benchmarks/h2d_transfer.py [--blocks 256,4096,41000] [--paths a,b,c,d,e,ref]
[--threads 4,8] [--out h2d.json]``. Prints a progress line per row and a table; writes the rows
and the device, jax version and host CPU count as JSON to ``--out`` (default
``$OUT/h2d.json`` or ``runs/bench/h2d.json``), rewritten after every row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def aligned_empty(shape, dtype, align: int = 4096) -> np.ndarray:
  """An uninitialized C-contiguous array whose data starts on an ``align``-byte boundary (page
  aligned by default, as host-memory registration for DMA wants)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + align, np.uint8)
  off = (-raw.ctypes.data) % align
  return raw[off : off + nbytes].view(dtype).reshape(shape)


def unaliased(x: jax.Array, buf: np.ndarray) -> jax.Array:
  """``x``, or a device copy of it when its memory is ``buf``'s: the CPU backend makes the
  ``device_put`` of an aligned NumPy array an alias of it (even with ``may_alias=False``, jax
  0.12), which a refill of the staging buffer would overwrite."""
  try:
    ptr = x.unsafe_buffer_pointer()
  except Exception:  # noqa: BLE001
    return x
  return jnp.copy(x) if buf.ctypes.data <= ptr < buf.ctypes.data + max(buf.nbytes, 1) else x


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = {
  "a": ["a"],
  "b": ["b"],
  "c": ["c_put", "c_jit", "c_dma"],
  "d": ["d_loop", "d_unroll", "d_take"],
  "e": ["e_b", "e_cput", "e_cdma"],
  "ref": ["ref_gather", "ref_put", "ref_put_pinned"],
}
# Only when named: writes through a raw pointer into pinned_host arrays (a wrong pointer would
# crash the process, not fail a row).
OPT_IN = ["c_view"]
ALL_PATHS = [p for group in GROUPS.values() for p in group] + OPT_IN
NEEDS_PINNED = {
  "c_put",
  "c_jit",
  "c_view",
  "d_loop",
  "d_unroll",
  "d_take",
  "e_cput",
  "ref_put_pinned",
}
NEEDS_DMA = {"c_dma", "e_cdma"}
DTYPE = np.dtype(jnp.bfloat16)


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    vals = []
  if not vals or min(vals) < 1:
    raise SystemExit(f"{name}: expected comma-separated positive ints, got {text!r}")
  return vals


def _paths(text: str) -> list[str]:
  out = []
  for name in (x.strip() for x in text.split(",") if x.strip()):
    if name not in GROUPS and name not in ALL_PATHS:
      raise SystemExit(
        f"--paths: expected comma-separated names from {sorted(GROUPS)} or "
        f"{ALL_PATHS}, got {name!r}"
      )
    out += [p for p in GROUPS.get(name, [name]) if p not in out]
  return out


def fill_store(store: np.ndarray) -> None:
  """Every 32-bit word distinct (a multiplicative hash of its index), so a wrong block or a
  stale buffer cannot compare equal; written in slabs (no full-size temporary)."""
  words = store.reshape(-1).view(np.uint32)
  step = 1 << 24
  for at in range(0, words.size, step):
    w = np.arange(at, min(at + step, words.size), dtype=np.uint32)
    w *= np.uint32(2654435761)
    words[at : at + w.size] = w


def pinned_view(arr: jax.Array) -> np.ndarray:
  """A writable NumPy view of a single-device host-memory jax array's buffer."""
  ptr = arr.unsafe_buffer_pointer()
  nbytes = arr.size * arr.dtype.itemsize
  raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
  return np.frombuffer(raw, np.uint8).view(arr.dtype).reshape(arr.shape)


class Ring:
  """``count`` reused staging buffers; a buffer is handed out again only after the transfer last
  made from it is complete (``pending``)."""

  def __init__(self, bufs):
    self.bufs, self.pending, self.at = list(bufs), [None] * len(bufs), 0

  def take(self):
    k = self.at
    self.at = (k + 1) % len(self.bufs)
    if self.pending[k] is not None:
      jax.block_until_ready(self.pending[k])
      self.pending[k] = None
    return k, self.bufs[k]


def _fetch_loop(store, idx):
  """``store [R, l', D]`` in host memory, ``idx [K]``: ``store[idx]`` in device memory, one
  dynamic slice per block in a ``fori_loop``."""
  out = jnp.zeros((idx.shape[0], *store.shape[1:]), store.dtype)

  def body(i, out):
    blk = lax.dynamic_slice_in_dim(store, idx[i], 1, axis=0)
    return lax.dynamic_update_slice_in_dim(
      out, jax.device_put(blk, jax.memory.Space.Device), i, axis=0
    )

  return lax.fori_loop(0, idx.shape[0], body, out)


def _fetch_unrolled(store, idx):
  """As :func:`_fetch_loop`, one dynamic slice per block unrolled."""
  blks = [
    jax.device_put(lax.dynamic_slice_in_dim(store, idx[i], 1, axis=0), jax.memory.Space.Device)
    for i in range(idx.shape[0])
  ]
  return jnp.concatenate(blks, axis=0)


def _fetch_take(store, idx):
  """As :func:`_fetch_loop`, one gather in host memory (indices moved there) and one move."""
  blks = jnp.take(store, jax.device_put(idx, jax.memory.Space.Host), axis=0, mode="clip")
  return jax.device_put(blks, jax.memory.Space.Device)


class Bench:
  """The store, the shardings and one fetch function per path (``fetch(chunks) -> [(array,
  valid_rows)]``, ``chunks`` = int32 arrays of flat block indices)."""

  def __init__(self, args):
    self.dev = jax.devices()[0]
    self.kinds = [m.kind for m in self.dev.addressable_memories()]
    self.dev_s = jax.sharding.SingleDeviceSharding(self.dev, memory_kind="device")
    self.host_s = (
      jax.sharding.SingleDeviceSharding(self.dev, memory_kind="pinned_host")
      if "pinned_host" in self.kinds
      else None
    )
    self.chunk, self.unroll = args.chunk, min(args.unroll, args.chunk)
    d = args.block_bytes // (args.block_tokens * DTYPE.itemsize)
    self.block = (args.block_tokens, d)
    rows = args.batch * args.heads
    nb = (args.store_mib << 20) // (rows * args.block_bytes)
    self.shape5 = (args.batch, args.heads, nb, *self.block)
    self.store5 = aligned_empty(self.shape5, DTYPE)
    fill_store(self.store5)
    self.flat = self.store5.reshape(-1, *self.block)  # [R, l', D], a view
    self._pinned_store = None
    self._jits = {}
    self._pools = {}
    self.dma_error = self._probe_dma()

  # ---------------------------------------------------------------------------- support
  def _probe_dma(self) -> str | None:
    """Why ``client.dma_map`` cannot be used here, or None."""
    fn = getattr(self.dev.client, "dma_map", None)
    if fn is None:
      return "this jaxlib's Client has no dma_map"
    buf = aligned_empty((4096,), np.uint8)
    try:
      fn(buf.ctypes.data, buf.nbytes)
      self.dev.client.dma_unmap(buf.ctypes.data)
    except Exception as e:  # noqa: BLE001
      return f"client.dma_map failed on {self.dev.platform}: {str(e).splitlines()[0]}"
    return None

  def skip_reason(self, path: str) -> str | None:
    if path in NEEDS_PINNED and self.host_s is None:
      return f"{self.dev} has no pinned_host memory (memories: {self.kinds})"
    if path in NEEDS_DMA and self.dma_error:
      return self.dma_error
    if path == "c_view" and self.host_s is not None:
      try:
        probe = jax.device_put(np.zeros((4,), np.float32), self.host_s)
        view = pinned_view(probe)
        view[:] = 3.0
        if not np.array_equal(np.asarray(jax.device_put(probe, self.dev_s)), view):
          return "writes through unsafe_buffer_pointer are not seen by device_put"
      except Exception as e:  # noqa: BLE001
        return f"no writable view of pinned_host memory: {str(e).splitlines()[0]}"
    return None

  @property
  def pinned_store(self):
    if self._pinned_store is None:
      self._pinned_store = jax.block_until_ready(jax.device_put(self.flat, self.host_s))
    return self._pinned_store

  def close(self):
    for pool in self._pools.values():
      pool.shutdown()

  # ---------------------------------------------------------------------------- staging
  def _buffers(self, count: int, kind: str):
    """``count`` staging buffers of ``chunk`` blocks: NumPy (``"numpy"``), page-aligned and
    DMA-registered (``"dma"``), or pinned_host jax arrays with NumPy views (``"view"``)."""
    shape = (self.chunk, *self.block)
    if kind == "view":
      arrs = [jax.device_put(np.zeros(shape, DTYPE), self.host_s) for _ in range(count)]
      return arrs, [pinned_view(a) for a in arrs]
    bufs = [aligned_empty(shape, DTYPE) for _ in range(count)]
    for b in bufs:
      b.fill(0)  # touch every page once
      if kind == "dma":
        self.dev.client.dma_map(b.ctypes.data, b.nbytes)
    return bufs, bufs

  def _unmap(self, bufs):
    for b in bufs:
      self.dev.client.dma_unmap(b.ctypes.data)

  def _gather(self, chunk, out):
    np.take(self.flat, chunk, axis=0, out=out, mode="clip")  # "raise" would buffer `out`

  def _staged(self, move: str):
    """Per-chunk fetch through a fresh ring: gather into a staging buffer, then ``move`` it."""
    kind = {"c_dma": "dma", "c_view": "view"}.get(move, "numpy")
    arrs, views = self._buffers(2, kind)
    ring = Ring(range(len(views)))
    to_dev = self._jits.setdefault("identity", jax.jit(lambda x: x, out_shardings=self.dev_s))

    def one(chunk):
      k, _ = ring.take()
      m = len(chunk)
      view = views[k][:m]
      self._gather(chunk, view)
      if move == "b":
        x = jax.device_put(view, self.dev_s)
        if self.dev.platform == "cpu":  # device memory is host memory: may alias
          x = unaliased(x, view)
      elif move == "c_dma":
        x = jax.device_put(view, self.dev_s, may_alias=True)
      elif move == "c_view":
        x = jax.device_put(arrs[k], self.dev_s)  # the whole chunk buffer
      else:
        p = jax.device_put(view, self.host_s)
        x = jax.device_put(p, self.dev_s) if move == "c_put" else to_dev(p)
      ring.pending[k] = x
      return x, m

    cleanup = (lambda: self._unmap(arrs)) if kind == "dma" else (lambda: None)
    return one, cleanup

  # ---------------------------------------------------------------------------- paths
  def make(self, path: str, threads: int = 1):
    """``(fetch, cleanup)`` for ``path``."""
    nothing = lambda: None
    if path == "a":

      def fetch(chunks):
        out = []
        for c in chunks:
          b, h, j = np.unravel_index(c, self.shape5[:3])
          out.append((jax.device_put(self.store5[b, h, j], self.dev_s), len(c)))
        return out

      return fetch, nothing
    if path in ("b", "c_put", "c_jit", "c_dma", "c_view"):
      one, cleanup = self._staged(path)
      return (lambda chunks: [one(c) for c in chunks]), cleanup
    if path.startswith("e_"):
      move = {"e_b": "b", "e_cput": "c_put", "e_cdma": "c_dma"}[path]
      workers = [self._staged(move) for _ in range(threads)]
      pool = self._pools.setdefault(threads, concurrent.futures.ThreadPoolExecutor(threads))

      def fetch(chunks):
        futs = [
          pool.submit(lambda w=w: [workers[w][0](c) for c in chunks[w::threads]])
          for w in range(threads)
        ]
        parts = [f.result() for f in futs]
        return [parts[i % threads][i // threads] for i in range(len(chunks))]

      return fetch, lambda: [w[1]() for w in workers]
    if path.startswith("d_"):
      size = self.unroll if path == "d_unroll" else self.chunk
      fn = {"d_loop": _fetch_loop, "d_unroll": _fetch_unrolled, "d_take": _fetch_take}[path]
      jitted = self._jits.setdefault(path, jax.jit(fn, out_shardings=self.dev_s))
      store = self.pinned_store

      def fetch(chunks):
        out = []
        for c in chunks:
          for at in range(0, len(c), size):
            part = c[at : at + size]
            idx = np.full((size,), part[0], np.int32)
            idx[: len(part)] = part
            out.append((jitted(store, jax.device_put(idx, self.dev_s)), len(part)))
        return out

      return fetch, nothing
    raise ValueError(f"path: expected one of {ALL_PATHS}, got {path!r}")

  def make_ref(self, path: str, chunks):
    """Reference rows: inputs prepared outside the timed call."""
    if path == "ref_gather":
      out = np.empty((sum(len(c) for c in chunks), *self.block), DTYPE)
      out.fill(0)
      offs = np.cumsum([0] + [len(c) for c in chunks])

      def fetch(_):
        for c, at in zip(chunks, offs):
          self._gather(c, out[at : at + len(c)])
        return [(out, len(out))]

      return fetch
    host = [self.flat[c] for c in chunks]
    if path == "ref_put_pinned":
      host = jax.block_until_ready(jax.device_put(host, self.host_s))
    return lambda _: [(jax.device_put(x, self.dev_s), len(c)) for x, c in zip(host, chunks)]


def _check(out, want: np.ndarray) -> bool:
  got = np.concatenate([np.asarray(x)[:m] for x, m in out])
  return got.shape == want.shape and np.array_equal(got.view(np.uint16), want.view(np.uint16))


def time_row(fetch, chunks, want, reps: int, budget_s: float):
  """Warm-up call, then up to ``reps`` timed calls within ``budget_s``: (times, ok)."""
  jax.block_until_ready([x for x, _ in fetch(chunks)])
  times, spent = [], 0.0
  while len(times) < reps and (not times or spent < budget_s):
    t0 = time.perf_counter()
    out = fetch(chunks)
    jax.block_until_ready([x for x, _ in out])
    times.append(time.perf_counter() - t0)
    spent += times[-1]
  return times, _check(out, want)


def _jaxlib_version() -> str | None:
  try:
    import jaxlib

    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def _write(path: str, result: dict) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--blocks", default="256,4096,41000", help="blocks moved per row (n)")
  ap.add_argument("--block-bytes", type=int, default=32768, help="bytes of one bf16 block")
  ap.add_argument("--block-tokens", type=int, default=64, help="tokens (l') of one block")
  ap.add_argument("--store-mib", type=int, default=2048, help="host store size in MiB")
  ap.add_argument("--batch", type=int, default=16, help="B of the store [B, H, NB, l', D]")
  ap.add_argument("--heads", type=int, default=2, help="H of the store")
  ap.add_argument("--paths", default="a,b,c,d,e,ref")
  ap.add_argument("--threads", default="4,8", help="thread counts of the e paths")
  ap.add_argument("--chunk", type=int, default=256, help="blocks per gather / transfer")
  ap.add_argument("--unroll", type=int, default=64, help="blocks per d_unroll call")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--budget-s", type=float, default=1.5, help="timed seconds per row, at most")
  ap.add_argument(
    "--slow-s",
    type=float,
    default=3.0,
    help="a path whose fastest call takes longer is not run at larger sizes",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--out",
    default=os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "runs", "bench"), "h2d.json"),
  )
  args = ap.parse_args(argv)
  sizes = _ints(args.blocks, "--blocks")
  threads = _ints(args.threads, "--threads")
  paths = _paths(args.paths)
  for name in (
    "block_bytes",
    "block_tokens",
    "store_mib",
    "batch",
    "heads",
    "chunk",
    "unroll",
    "reps",
  ):
    if getattr(args, name) < 1:
      raise SystemExit(
        f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}"
      )
  if args.block_bytes % (args.block_tokens * DTYPE.itemsize):
    raise SystemExit(
      f"--block-bytes: expected a multiple of --block-tokens * 2 = "
      f"{args.block_tokens * 2} (bf16), got {args.block_bytes}"
    )
  need = max(sizes) * args.block_bytes
  rows = args.batch * args.heads
  if (args.store_mib << 20) // (rows * args.block_bytes) * rows < max(sizes):
    raise SystemExit(
      f"--store-mib: expected at least {-(-need >> 20)} MiB (plus a block per "
      f"row) to hold {max(sizes)} distinct blocks, got {args.store_mib}"
    )

  t0 = time.perf_counter()
  bench = Bench(args)
  rng = np.random.default_rng(args.seed)
  result = {
    "meta": {
      "device": str(bench.dev),
      "device_kind": bench.dev.device_kind,
      "platform": bench.dev.platform,
      "jax": jax.__version__,
      "jaxlib": _jaxlib_version(),
      "python": platform.python_version(),
      "host_cpus": os.cpu_count(),
      "memory_kinds": bench.kinds,
      "store_shape": list(bench.shape5),
      "dtype": "bfloat16",
      "block_bytes": args.block_bytes,
      "chunk": args.chunk,
      "unroll": bench.unroll,
      "reps": args.reps,
      "budget_s": args.budget_s,
      "dma_map": bench.dma_error or "ok",
      "setup_s": None,
    },
    "skipped": {},
    "rows": [],
  }
  print(
    f"[h2d] jax {jax.__version__} on {bench.dev} ({bench.dev.device_kind}), "
    f"{os.cpu_count()} CPUs, memories {bench.kinds}; store {list(bench.shape5)} bf16 "
    f"({args.store_mib} MiB), block {args.block_bytes} B, chunk {args.chunk}",
    flush=True,
  )
  for path in paths:
    reason = bench.skip_reason(path)
    if reason:
      result["skipped"][path] = reason
      print(f"[h2d] skip {path}: {reason}", flush=True)
  runnable = [p for p in paths if p not in result["skipped"]]
  slow = {}  # label -> why its larger sizes are skipped
  result["meta"]["setup_s"] = round(time.perf_counter() - t0, 2)
  for n in sizes:
    flat_idx = np.sort(rng.choice(bench.flat.shape[0], n, replace=False)).astype(np.int32)
    chunks = [flat_idx[at : at + args.chunk] for at in range(0, n, args.chunk)]
    want = bench.flat[flat_idx]
    for path in runnable:
      for t in threads if path.startswith("e_") else [1]:
        label = f"{path} x{t}" if path.startswith("e_") else path
        if label in slow:
          result["skipped"][f"{label} @{n}"] = slow[label]
          print(f"[h2d] skip {label} at {n} blocks: {slow[label]}", flush=True)
          continue
        print(f"[h2d] {label:<16} {n:>6} blocks ...", end=" ", flush=True)
        row = {"path": path, "threads": t, "blocks": n, "mib": n * args.block_bytes / 2**20}
        cleanup = None
        try:
          if path.startswith("ref_"):
            fetch = bench.make_ref(path, chunks)
          else:
            fetch, cleanup = bench.make(path, t)
          times, ok = time_row(fetch, chunks, want, args.reps, args.budget_s)
          ms = 1e3 * statistics.median(times)
          row.update(
            ms=ms,
            gbps=n * args.block_bytes / ms / 1e6,
            ok=ok,
            reps=len(times),
            ms_min=1e3 * min(times),
          )
          if min(times) > args.slow_s:
            slow[label] = f"a call took {min(times):.3g} s at {n} blocks (> --slow-s)"
        except Exception as e:  # noqa: BLE001
          row.update(
            ms=None,
            gbps=None,
            ok=False,
            reps=0,
            error=f"{type(e).__name__}: {str(e).strip()[:400]}",
          )
        finally:
          if cleanup:
            cleanup()
        result["rows"].append(row)
        _write(args.out, result)
        print(
          f"{row['ms'] or float('nan'):9.2f} ms {row['gbps'] or float('nan'):7.2f} GB/s "
          f"ok={row['ok']}" + (f" ({row['error']})" if "error" in row else ""),
          flush=True,
        )
  bench.close()
  print(f"\n{'path':<16} {'blocks':>7} {'MiB':>8} {'ms':>9} {'GB/s':>7} {'reps':>4}  ok")
  for r in result["rows"]:
    label = f"{r['path']} x{r['threads']}" if r["path"].startswith("e_") else r["path"]
    print(
      f"{label:<16} {r['blocks']:>7} {r['mib']:>8.1f} {r['ms'] or float('nan'):>9.2f} "
      f"{r['gbps'] or float('nan'):>7.2f} {r['reps']:>4}  {r['ok']}"
    )
  for path, reason in result["skipped"].items():
    print(f"{path:<16} skipped: {reason}")
  result["meta"]["total_s"] = round(time.perf_counter() - t0, 2)
  _write(args.out, result)
  print(f"[h2d] wrote {args.out} ({result['meta']['total_s']} s)")
  return result


if __name__ == "__main__":
  res = main()
  # A path that raised (e.g. a jitted gather this XLA cannot compile) is reported in its row;
  # only wrong bytes fail the run.
  sys.exit(1 if any(not r["ok"] and "error" not in r for r in res["rows"]) else 0)
