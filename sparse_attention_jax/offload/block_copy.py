"""Block copy of offloaded KV caches: listed blocks of a host-memory store into device slots.

``copy="kernel"``: :func:`copy_blocks`, a Pallas (Triton) kernel that reads the ``pinned_host``
store in place (mapped into the GPU's address space; no host thread, no staging copy); the
count of rows to copy is read on the device, so what moves follows the selection without a host
round trip or a recompilation. ``copy="xla"`` (and where the kernel cannot serve,
:func:`kernel_serves`): :func:`load_planned`, XLA's gather on the host array (host compute) and
a scatter into the slots in a ``lax.while_loop`` of chunks.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Registers a config option that joins jit's tracing context. The Pallas interpreter imports it on
# its first run, which would make every jitted caller retrace once; importing it here keeps the
# context fixed from the start (absent on older jax).
with contextlib.suppress(ImportError):
  from jax.experimental.pallas import fuser as _fuser  # noqa: F401


def kernel_serves(store_kv, store_c, *, interpret: bool) -> bool:
  """Whether :func:`copy_blocks` can copy these stores: the Triton lowering needs power-of-two
  block shapes ``[l', D]`` and ``[l']`` (the interpreter takes any)."""
  return interpret or not any(x & (x - 1) for x in (*store_kv.shape[3:], store_c.shape[3]))


def copy_blocks(store_kv, store_c, slot_kv, slot_c, loads, n, *, interpret: bool = False):
  """Copies the first ``n`` (int32 scalar, ``<= L``) rows ``(b, h, block, slot)`` of ``loads
  [L, 4]`` from the store (``kv [B, H, NB, l', D]``, float32 ``c [B, H, NB, l']``; device or
  ``pinned_host`` memory) into the device slots (``kv [B, H, NS, l', D]`` of the store's dtype,
  ``c [B, H, NS, l']``). A row with an index outside its array (e.g. slot ``-1``) is skipped.
  Returns ``(slot_kv, slot_c)``, the other slots unchanged."""
  if slot_kv.dtype != store_kv.dtype:
    raise ValueError(f"slot_kv: expected the store's dtype {store_kv.dtype}, got {slot_kv.dtype}")
  if not kernel_serves(store_kv, store_c, interpret=interpret):
    raise NotImplementedError(
      "copy_blocks: the Triton lowering needs power-of-two block shapes, got [l', D] = "
      f"{list(store_kv.shape[3:])}"
    )
  sizes = (*store_kv.shape[:3], slot_kv.shape[2])  # B, H, NB, NS

  def kernel(count_ref, loads_ref, store_kv_ref, store_c_ref, _skv, _sc, slot_kv_ref, slot_c_ref):
    i = pl.program_id(0)

    @pl.when(i < count_ref[0])
    def _():
      b, h, j, s = (loads_ref[i, c] for c in range(4))
      ok = [(x >= 0) & (x < size) for x, size in zip((b, h, j, s), sizes)]

      @pl.when(ok[0] & ok[1] & ok[2] & ok[3])
      def _():
        slot_kv_ref[b, h, s] = store_kv_ref[b, h, j]
        slot_c_ref[b, h, s] = store_c_ref[b, h, j]

  whole = lambda x: pl.BlockSpec(x.shape, lambda i, nd=x.ndim: (0,) * nd)
  count = jnp.reshape(n, (1,)).astype(jnp.int32)
  operands = (count, loads, store_kv, store_c, slot_kv, slot_c)
  return pl.pallas_call(
    kernel,
    grid=(loads.shape[0],),
    in_specs=[whole(x) for x in operands],
    out_specs=[whole(slot_kv), whole(slot_c)],
    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (slot_kv, slot_c)],
    input_output_aliases={4: 0, 5: 1},
    interpret=interpret,
    name="offload_copy_blocks",
  )(*operands)


def _block_dims(ndim: int):
  """Gather / scatter dimension numbers of whole blocks ``x[b, h, j]`` of an ``[B, H, N, ...]``
  array, indexed by ``[n, 3]`` rows ``(b, h, j)``, each block kept as ``[n, 1, 1, 1, ...]``: with
  no collapsed dimension XLA needs no reshape between the gather and the scatter (a reshape of a
  host-memory gather fails to compile on GPU: "Bitcast cannot have different memory spaces")."""
  window, axes = tuple(range(1, ndim + 1)), (0, 1, 2)
  return (
    jax.lax.GatherDimensionNumbers(window, collapsed_slice_dims=(), start_index_map=axes),
    jax.lax.ScatterDimensionNumbers(window, (), scatter_dims_to_operand_dims=axes),
  )


def take_blocks(store, rows, *, host: bool):
  """Blocks ``store[b, h, j]`` for ``rows [n, 3]`` as ``[n, 1, 1, 1, ...]`` in device memory. With
  ``host`` (the store in host memory) the rows move there first (XLA wants every operand of the
  gather in one memory space) and the blocks move to the device after."""
  if host:
    rows = jax.device_put(rows, jax.memory.Space.Host)
  out = jax.lax.gather(
    store, rows, _block_dims(store.ndim)[0], (1, 1, 1, *store.shape[3:]),
    mode=jax.lax.GatherScatterMode.CLIP,
  )  # fmt: skip
  return jax.device_put(out, jax.memory.Space.Device) if host else out


def step_sizes(chunk: int) -> tuple[int, ...]:
  """Gather sizes of :func:`load_planned`: the powers of two and their 1.5 multiples from 8 up to
  ``chunk`` (``chunk`` last): at most ~50% padding per iteration, one compiled branch each."""
  out, n = [], 8
  while n < chunk:
    out += [n] + ([n * 3 // 2] if n * 3 // 2 < chunk else [])
    n *= 2
  return tuple(out + [chunk])


def load_planned(store_kv, store_c, slot_kv, slot_c, loads, n, *, chunk: int, host: bool):
  """:func:`copy_blocks` with XLA (``loads`` needs ``L >= n + chunk`` rows), in one traced
  computation: a ``lax.while_loop`` takes up to ``chunk`` rows per iteration, a ``lax.switch``
  picks the smallest of :func:`step_sizes` holding them, whose branch gathers from the store
  (:func:`take_blocks`) and scatters into the slots (padding rows repeat the chunk's first row).
  No missing block, no iteration. Returns ``(slot_kv, slot_c)``."""
  sizes = step_sizes(chunk)
  sdn = _block_dims(slot_kv.ndim)[1], _block_dims(slot_c.ndim)[1]
  put = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS

  def branch(size):
    def run(skv, sc, at, valid):
      rows = jax.lax.dynamic_slice_in_dim(loads, at, size, axis=0)  # [size, 4]
      rows = jnp.where((jnp.arange(size) < valid)[:, None], rows, rows[:1])
      src, dst = rows[:, :3], rows[:, [0, 1, 3]]
      kv, c = take_blocks(store_kv, src, host=host), take_blocks(store_c, src, host=host)
      return (
        jax.lax.scatter(skv, dst, kv.astype(skv.dtype), sdn[0], mode=put),
        jax.lax.scatter(sc, dst, c.astype(sc.dtype), sdn[1], mode=put),
      )

    return run

  def body(carry):
    at, skv, sc = carry
    valid = jnp.minimum(n - at, chunk)
    which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), valid).astype(jnp.int32)
    skv, sc = jax.lax.switch(which, [branch(s) for s in sizes], skv, sc, at, valid)
    return at + valid, skv, sc

  _, slot_kv, slot_c = jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), slot_kv, slot_c))
  return slot_kv, slot_c


def copy_into_slots(
  store_kv, store_c, slot_kv, slot_c, loads, n, *, copy: str, chunk: int, host: bool
):
  """:func:`copy_blocks` when ``copy == "kernel"`` and the kernel serves these shapes
  (interpreted on CPU), else :func:`load_planned`. Returns ``(slot_kv, slot_c)``."""
  interpret = jax.default_backend() == "cpu"
  if copy == "kernel" and kernel_serves(store_kv, store_c, interpret=interpret):
    most = math.prod(slot_kv.shape[:3])
    return copy_blocks(store_kv, store_c, slot_kv, slot_c, loads[:most], n, interpret=interpret)
  return load_planned(store_kv, store_c, slot_kv, slot_c, loads, n, chunk=chunk, host=host)
