"""Zero-copy block loads for offloaded KV caches: a Pallas (Triton) kernel that copies listed
blocks of a host-memory store straight into device slots.

The store arrays may live in ``pinned_host`` memory. Pinned host memory is mapped into the GPU's
address space, so the kernel's loads read it over PCIe/C2C directly: no host thread gathers the
blocks and no staging copy is made. On an H200 (jax 0.11.2) a gather of 41,000 random 16 KiB
blocks this way ran at 50.8 GB/s, the DMA ceiling, against 18.6 GB/s for XLA's gather on the
host array (``benchmarks/h2d_zero_copy.py``).

One program per possible load: program ``i`` copies row ``i`` of ``loads`` when ``i < n``
(``n`` read on the device), so the number of blocks moved follows the selection without a host
round trip or a recompilation, and idle programs return at once. The slot arrays are updated
in place (aliased to the outputs).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Registers a config option that joins jit's tracing context. The Pallas interpreter imports it on
# its first run, which would make every jitted caller retrace once; importing it here keeps the
# context fixed from the start (absent on older jax).
with contextlib.suppress(ImportError):
  from jax.experimental.pallas import fuser as _fuser  # noqa: F401


def copy_blocks(store_kv, store_c, slot_kv, slot_c, loads, n, *, interpret: bool = False):
  """Copies ``n`` listed blocks from the store into the slots.

  Args:
    store_kv: ``[B, H, NB, l', D]`` block store (any memory the kernel can read: device or
      ``pinned_host``); ``store_c [B, H, NB, l']`` float32 beside it.
    slot_kv: ``[B, H, NS, l', D]`` device slots (same dtype as ``store_kv``); ``slot_c
      [B, H, NS, l']``.
    loads: ``[L, 4]`` int32 rows ``(b, h, block, slot)``; the first ``n`` are copied
      (``plan_slots_on_device``'s list; at most ``L`` programs run). A row with an index outside
      its array (e.g. slot ``-1``) is skipped, never written out of bounds.
    n: int32 scalar, the number of rows to copy (``0 <= n <= L``).
    interpret: run the Pallas interpreter (CPU tests).

  Returns:
    ``(slot_kv, slot_c)`` with ``slot_kv[b, h, slot] = store_kv[b, h, block]`` (and ``c``) for
    each copied row; the other slots unchanged.
  """
  if slot_kv.dtype != store_kv.dtype:
    raise ValueError(f"slot_kv: expected the store's dtype {store_kv.dtype}, got {slot_kv.dtype}")
  block = store_kv.shape[3:]
  if not interpret and any(x & (x - 1) for x in (*block, store_c.shape[3])):
    raise NotImplementedError(
      f"copy_blocks: the Triton lowering needs power-of-two block "
      f"shapes, got [l', D] = {list(block)}"
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
  return pl.pallas_call(
    kernel,
    grid=(rows,),
    in_specs=[
      whole(count),
      whole(loads),
      whole(store_kv),
      whole(store_c),
      whole(slot_kv),
      whole(slot_c),
    ],
    out_specs=[whole(slot_kv), whole(slot_c)],
    out_shape=[
      jax.ShapeDtypeStruct(slot_kv.shape, slot_kv.dtype),
      jax.ShapeDtypeStruct(slot_c.shape, slot_c.dtype),
    ],
    input_output_aliases={4: 0, 5: 1},
    interpret=interpret,
    name="offload_copy_blocks",
  )(count, loads, store_kv, store_c, slot_kv, slot_c)


__all__ = ["copy_blocks"]
