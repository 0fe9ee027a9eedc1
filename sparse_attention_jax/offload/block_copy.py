"""Block copy of offloaded KV caches: listed blocks of a host-memory store into device slots.

* :func:`copy_blocks` (the default, ``copy="kernel"``): a Pallas (Triton) kernel whose loads read
  the ``pinned_host`` store directly (pinned host memory is mapped into the GPU's address space):
  no host thread, no staging copy. Program ``i`` copies row ``i`` of the load list when ``i < n``
  (``n`` read on the device), so what moves follows the selection without a host round trip or a
  recompilation. The slots are updated in place. On CPU it runs in the Pallas interpreter.
* :func:`load_planned` (``copy="xla"``, and the fallback where the kernel cannot serve a call,
  :func:`kernel_serves`): XLA's gather on the host array (run as host compute) and a scatter into
  the slots, in a ``lax.while_loop`` of chunks.
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
  dims = (*store_kv.shape[3:], store_c.shape[3])
  return interpret or not any(x & (x - 1) for x in dims)


def copy_blocks(store_kv, store_c, slot_kv, slot_c, loads, n, *, interpret: bool = False):
  """Copies ``n`` listed blocks from the store into the slots (Pallas kernel).

  Args:
    store_kv: ``[B, H, NB, l', D]`` block store (any memory the kernel can read: device or
      ``pinned_host``); ``store_c [B, H, NB, l']`` float32 beside it.
    slot_kv: ``[B, H, NS, l', D]`` device slots (same dtype as ``store_kv``); ``slot_c
      [B, H, NS, l']``.
    loads: ``[L, 4]`` int32 rows ``(b, h, block, slot)``; the first ``n`` are copied (at most
      ``L`` programs run). A row with an index outside its array (e.g. slot ``-1``) is skipped,
      never written out of bounds.
    n: int32 scalar, the number of rows to copy (``0 <= n <= L``).
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``(slot_kv, slot_c)`` with ``slot_kv[b, h, slot] = store_kv[b, h, block]`` (and ``c``) for
    each copied row; the other slots unchanged.
  """
  if slot_kv.dtype != store_kv.dtype:
    raise ValueError(f"slot_kv: expected the store's dtype {store_kv.dtype}, got {slot_kv.dtype}")
  if not kernel_serves(store_kv, store_c, interpret=interpret):
    raise NotImplementedError(
      f"copy_blocks: the Triton lowering needs power-of-two block "
      f"shapes, got [l', D] = {list(store_kv.shape[3:])}"
    )
  rows = loads.shape[0]
  bsz, heads, num_blocks = store_kv.shape[:3]
  num_slots = slot_kv.shape[2]
  count = jnp.reshape(n, (1,)).astype(jnp.int32)

  def kernel(count_ref, loads_ref, store_kv_ref, store_c_ref, _skv, _sc, slot_kv_ref, slot_c_ref):
    i = pl.program_id(0)

    @pl.when(i < count_ref[0])
    def _():
      b, h, j, s = (loads_ref[i, c] for c in range(4))
      inside = (
        (b >= 0)
        & (b < bsz)
        & (h >= 0)
        & (h < heads)
        & (j >= 0)
        & (j < num_blocks)
        & (s >= 0)
        & (s < num_slots)
      )

      @pl.when(inside)
      def _():
        slot_kv_ref[b, h, s] = store_kv_ref[b, h, j]
        slot_c_ref[b, h, s] = store_c_ref[b, h, j]

  whole = lambda x: pl.BlockSpec(x.shape, lambda i, nd=x.ndim: (0,) * nd)
  operands = (count, loads, store_kv, store_c, slot_kv, slot_c)
  return pl.pallas_call(
    kernel,
    grid=(rows,),
    in_specs=[whole(x) for x in operands],
    out_specs=[whole(slot_kv), whole(slot_c)],
    out_shape=[
      jax.ShapeDtypeStruct(slot_kv.shape, slot_kv.dtype),
      jax.ShapeDtypeStruct(slot_c.shape, slot_c.dtype),
    ],
    input_output_aliases={4: 0, 5: 1},
    interpret=interpret,
    name="offload_copy_blocks",
  )(*operands)


# ----------------------------------------------------------------------------- XLA copy
def _block_dims(ndim: int):
  """Gather / scatter dimension numbers that take or put whole blocks ``x[b, h, j]`` of an
  ``ndim``-dimensional store or slot array (``[B, H, N, ...]``), indexed by ``[n, 3]`` int rows
  ``(b, h, j)``, with the block kept as ``[n, 1, 1, 1, ...]``: no collapsed or inserted dimension,
  so XLA needs no reshape between the gather and the scatter (a reshape of a gather that runs in
  host memory fails to compile on GPU: "Bitcast cannot have different memory spaces")."""
  window = tuple(range(1, ndim + 1))
  return (
    jax.lax.GatherDimensionNumbers(
      offset_dims=window, collapsed_slice_dims=(), start_index_map=(0, 1, 2)
    ),
    jax.lax.ScatterDimensionNumbers(
      update_window_dims=window, inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1, 2)
    ),
  )


def take_blocks(store, rows, *, host: bool):
  """Blocks ``store[b, h, j]`` for ``rows [n, 3]`` as ``[n, 1, 1, 1, ...]`` in device memory. With
  ``host``, ``store`` is in host memory: the rows move there first (XLA wants every operand of
  the gather in one memory space) and the gathered blocks move to the device."""
  gdn, _ = _block_dims(store.ndim)
  if host:
    rows = jax.device_put(rows, jax.memory.Space.Host)
  out = jax.lax.gather(
    store, rows, gdn, slice_sizes=(1, 1, 1, *store.shape[3:]), mode=jax.lax.GatherScatterMode.CLIP
  )
  return jax.device_put(out, jax.memory.Space.Device) if host else out


def put_blocks(slots, dst, blocks):
  """``slots`` with ``blocks [n, 1, 1, 1, ...]`` written at ``dst [n, 3]`` rows ``(b, h, s)``
  (repeated rows must carry the same block)."""
  _, sdn = _block_dims(slots.ndim)
  return jax.lax.scatter(
    slots, dst, blocks.astype(slots.dtype), sdn, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )


def step_sizes(chunk: int) -> tuple[int, ...]:
  """Gather sizes of :func:`load_planned`: the powers of two and their 1.5 multiples from 8 up to
  ``chunk`` (``chunk`` itself last): at most ~50% padding per iteration, one compiled branch each."""
  out, n = [], 8
  while n < chunk:
    out += [n] + ([n * 3 // 2] if n * 3 // 2 < chunk else [])
    n *= 2
  return tuple(out + [chunk])


def load_planned(store_kv, store_c, slot_kv, slot_c, loads, n, *, chunk: int, host: bool):
  """Loads the ``n`` (traced) blocks listed first in ``loads`` (``[L, 4]`` rows ``(b, h, block,
  slot)``, ``L >= n + chunk``) into the slots with XLA gathers, inside one traced computation.

  A ``lax.while_loop`` takes up to ``chunk`` rows per iteration; a ``lax.switch`` picks the
  smallest of :func:`step_sizes` holding them, and that branch gathers from the store
  (:func:`take_blocks`; ``host``: the store is in host memory) and scatters into the slots
  (padding rows repeat the chunk's first row). A step with no missing block runs no iteration.
  Returns ``(slot_kv, slot_c)``."""
  sizes = step_sizes(chunk)

  def branch(size):
    def run(skv, sc, at, valid):
      rows = jax.lax.dynamic_slice_in_dim(loads, at, size, axis=0)  # [size, 4]
      rows = jnp.where((jnp.arange(size) < valid)[:, None], rows, rows[:1])
      src, dst = rows[:, :3], jnp.stack([rows[:, 0], rows[:, 1], rows[:, 3]], axis=1)
      kv, c = take_blocks(store_kv, src, host=host), take_blocks(store_c, src, host=host)
      return put_blocks(skv, dst, kv), put_blocks(sc, dst, c)

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
  """The ``n`` blocks listed first in ``loads`` into the slots: :func:`copy_blocks` when ``copy``
  is ``"kernel"`` and the kernel serves these shapes (interpreted on CPU), else
  :func:`load_planned`. Returns ``(slot_kv, slot_c)``."""
  interpret = jax.default_backend() == "cpu"
  if copy == "kernel" and kernel_serves(store_kv, store_c, interpret=interpret):
    most = math.prod(slot_kv.shape[:3])
    return copy_blocks(store_kv, store_c, slot_kv, slot_c, loads[:most], n, interpret=interpret)
  return load_planned(store_kv, store_c, slot_kv, slot_c, loads, n, chunk=chunk, host=host)


__all__ = ["copy_blocks", "copy_into_slots", "kernel_serves", "load_planned", "step_sizes"]
