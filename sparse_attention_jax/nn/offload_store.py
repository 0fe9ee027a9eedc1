"""Host block stores of the offloaded NOSA cache (:mod:`sparse_attention_jax.nn.offload`).

A store holds the complete K/V blocks (``kv [l', Dk + Dv]``, cache dtype) and eviction scores
(``c [l']``, float32) of every (sequence ``b``, KV head ``h``, block ``j``) of one layer, and
loads a list of them onto the device in one go. Three stores share one interface:

* :class:`NumpyBlockStore` (``store="numpy"``, the default): ONE contiguous NumPy array per
  layer, ``kv [B, H, NBmax, l', Dk + Dv]`` and ``c [B, H, NBmax, l']`` with ``NBmax =
  ceil(max_len / l')``, allocated once (``np.empty``; host RAM of the full capacity). Writes are
  one device -> host copy of all ``(b, h)`` at once; a load gathers the named blocks with one
  fancy index ``kv[b_idx, h_idx, j_idx]`` into one host buffer (moved by one ``device_put``).
* :class:`PinnedHostBlockStore` (``store="pinned_host"``): one jax array per block in the
  device's ``pinned_host`` memory (device memory, logged, where the backend has none), in a dict;
  a load moves the list of named blocks (one ``device_put``; stacked by the slot scatter).
* :class:`PinnedArrayBlockStore` (``store="pinned_array"``): ONE jax array per layer in the
  device's ``pinned_host`` memory, ``kv [B, H, NBmax, l', Dk + Dv]`` and ``c [B, H, NBmax, l']``
  (the NumPy store's layout). A load is ONE jitted call per chunk that gathers the named blocks
  from the host-memory operand and scatters them into the device slots
  (:func:`load_into_slots`; the ``d_take`` path of ``benchmarks/h2d_transfer.py``); writes are
  one jitted ``dynamic_update_slice`` whose operand and result stay in host memory (donated, so
  in place).

Each reports ``memory_kind`` from what it actually holds (``"numpy"``: the arrays are NumPy
arrays; else the memory kind of the stored jax arrays), and ``nbytes``. The NumPy store can also
gather straight into caller-owned buffers (:meth:`NumpyBlockStore.gather_into`, the
``transfer="staged"`` load path of the cache).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("sparse_attention_jax.nn.offload")

STORES = ("numpy", "pinned_host", "pinned_array")


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


def row_view(arr: np.ndarray):
  """``(rows, (m0, m1))`` with ``arr[b, h, j]`` == ``rows[b * m0 + h * m1 + j]`` (a read-only
  view, no copy), when the strides of ``arr``'s three leading axes are non-negative multiples of
  the third's (C-contiguous arrays, and stride-0 views that share rows); else None."""
  s0, s1, s2 = arr.strides[:3]
  if s2 <= 0 or s0 < 0 or s1 < 0 or s0 % s2 or s1 % s2:
    return None
  m0, m1 = s0 // s2, s1 // s2
  b, h, nb = arr.shape[:3]
  count = (b - 1) * m0 + (h - 1) * m1 + nb  # row of arr[-1, -1, -1], plus one
  rows = np.lib.stride_tricks.as_strided(
    arr, (count, *arr.shape[3:]), (s2, *arr.strides[3:]), writeable=False
  )
  return rows, (m0, m1)


def host_memory_kind(device) -> str:
  """``"pinned_host"`` if ``device`` can address pinned host memory, else ``"device"`` (logged)."""
  kinds = [m.kind for m in device.addressable_memories()]
  if "pinned_host" in kinds:
    return "pinned_host"
  log.warning(
    "offload: %s has no pinned_host memory (memories: %s); the host block store "
    "falls back to device memory",
    device,
    kinds,
  )
  return "device"


class _LazyArrays:
  """``kv [B, H, NBmax, l', D]`` and ``c [B, H, NBmax, l']`` allocated by ``_allocate`` at their
  first use (so a benchmark that installs its own arrays never reserves the full size), and
  replaceable by assignment."""

  def _allocate(self, shape, dtype):
    raise NotImplementedError

  @property
  def kv(self):
    if self._kv is None:
      self._kv = self._allocate(self.shape, self.dtype)
    return self._kv

  @kv.setter
  def kv(self, value):
    self._kv = value

  @property
  def c(self):
    if self._c is None:
      self._c = self._allocate(self.shape[:4], np.float32)
    return self._c

  @c.setter
  def c(self, value):
    self._c = value


class NumpyBlockStore(_LazyArrays):
  """One contiguous NumPy array per layer (see the module docstring).

  Attributes:
    kv: ``[B, H, NBmax, l', Dk + Dv]`` (cache dtype), allocated (``np.empty``) at the first use
      (so a benchmark that installs its own arrays never reserves the full size). May be
      replaced by a read-only or strided view of the same shape and dtype (the decode benchmark
      shares one copy of each block between rows this way); gathers work on views.
    c: ``[B, H, NBmax, l']`` float32, likewise.
  """

  def __init__(
    self, *, batch: int, heads: int, num_blocks: int, block_size: int, dim: int, dtype, device
  ):
    del device
    self.shape = (batch, heads, num_blocks, block_size, dim)
    self.dtype = np.dtype(dtype)
    self._kv = self._c = None

  def _allocate(self, shape, dtype):
    return np.empty(shape, dtype)

  @property
  def memory_kind(self) -> str:
    arrays = [x for x in (self._kv, self._c) if x is not None]  # not yet allocated: NumPy
    bad = [type(x).__name__ for x in arrays if not isinstance(x, np.ndarray)]
    return bad[0] if bad else "numpy"

  @property
  def nbytes(self) -> int:
    """Bytes of the store's shape (of a shared view: its logical size, not the RAM it uses)."""
    return int(np.prod(self.shape) * self.dtype.itemsize + np.prod(self.shape[:4]) * 4)

  def write(self, start: int, kv, c) -> None:
    """Blocks ``start .. start + n - 1`` of every ``(b, h)``: ``kv [B, H, n, l', D]``, ``c [B, H,
    n, l']`` (device or host arrays; one device -> host copy each)."""
    kv, c = jax.device_get((kv, c))
    self.kv[:, :, start : start + kv.shape[2]] = kv
    self.c[:, :, start : start + c.shape[2]] = c

  def block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Host copy of block ``(b, h, j)``: ``(kv [l', D], c [l'])``."""
    return np.array(self.kv[b, h, j]), np.array(self.c[b, h, j])

  def gather(self, b, h, j):
    """Blocks ``(b[i], h[i], j[i])`` (``[N]`` int arrays) in one host buffer each, ready for one
    ``device_put``: ``(kv [N, l', D], c [N, l'])`` (one fancy-index gather)."""
    return self.kv[b, h, j], self.c[b, h, j]

  def gather_into(self, b, h, j, kv_out: np.ndarray, c_out: np.ndarray) -> None:
    """:meth:`gather` into ``kv_out [N, l', D]`` and ``c_out [N, l']`` (reused buffers: no fresh
    allocation, so no page faults on new memory): one ``np.take`` over a row view of each array
    (:func:`row_view`), or, for a layout without one, a fancy-index gather copied in."""
    for src, out in ((self.kv, kv_out), (self.c, c_out)):
      view = row_view(src)
      if view is None:
        out[...] = src[b, h, j]
        continue
      rows, (m0, m1) = view
      r = np.asarray(b, np.int64) * m0 + np.asarray(h, np.int64) * m1 + np.asarray(j, np.int64)
      np.take(rows, r, axis=0, out=out, mode="clip")  # mode "raise" would buffer `out`

  def zeros(self, n: int):
    """``n`` zero blocks in :meth:`gather`'s format (to compile the scatter)."""
    d = self.shape[3:]
    return np.zeros((n, *d), self.dtype), np.zeros((n, d[0]), np.float32)


class PinnedHostBlockStore:
  """One jax array per block in ``pinned_host`` memory (see the module docstring).

  Attributes:
    blocks: ``{(b, h, j): (kv [l', D], c [l'])}`` jax arrays in host memory.
  """

  def __init__(
    self, *, batch: int, heads: int, num_blocks: int, block_size: int, dim: int, dtype, device
  ):
    del num_blocks
    self.batch, self.heads, self.block_size, self.dim = batch, heads, block_size, dim
    self.dtype = jnp.dtype(dtype)
    self.kind = host_memory_kind(device)
    self._host = jax.sharding.SingleDeviceSharding(device, memory_kind=self.kind)
    self.blocks: dict[tuple[int, int, int], tuple[jax.Array, jax.Array]] = {}

  @property
  def memory_kind(self) -> str:
    if not self.blocks:
      return self.kind
    return next(iter(self.blocks.values()))[0].sharding.memory_kind

  @property
  def nbytes(self) -> int:
    return int(sum(x.size * x.dtype.itemsize for blk in self.blocks.values() for x in blk))

  def write(self, start: int, kv, c) -> None:
    """As :meth:`NumpyBlockStore.write` (one host array per block)."""
    keys = [
      (b, h, start + j)
      for b in range(kv.shape[0])
      for h in range(kv.shape[1])
      for j in range(kv.shape[2])
    ]
    kv, c = jnp.asarray(kv), jnp.asarray(c)
    moved = jax.device_put(
      [(kv[b, h, j - start], c[b, h, j - start]) for b, h, j in keys], self._host
    )
    self.blocks.update(zip(keys, (tuple(m) for m in moved)))

  def block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    kv, c = self.blocks[(b, h, j)]
    return np.asarray(kv), np.asarray(c)

  def gather(self, b, h, j):
    """Blocks ``(b[i], h[i], j[i])`` as two lists of ``[l', D]`` / ``[l']`` host arrays (moved
    by one ``device_put`` of the lists, stacked on the device by the slot scatter)."""
    blocks = [self.blocks[(int(x), int(y), int(z))] for x, y, z in zip(b, h, j)]
    return [x[0] for x in blocks], [x[1] for x in blocks]

  def zeros(self, n: int):
    kv, c = jax.device_put(
      (
        jnp.zeros((self.block_size, self.dim), self.dtype),
        jnp.zeros((self.block_size,), jnp.float32),
      ),
      self._host,
    )
    return [kv] * n, [c] * n


def _block_dims(ndim: int):
  """Gather / scatter dimension numbers that take or put whole blocks ``x[b, h, j]`` of an
  ``ndim``-dimensional store or slot array (``[B, H, N, ...]``), indexed by ``[n, 3]`` int rows
  ``(b, h, j)``, with the block kept as ``[n, 1, 1, 1, ...]``: no collapsed or inserted dimension,
  so XLA needs no reshape between the gather and the scatter (a reshape of a gather that runs in
  host memory fails to compile on GPU, jax 0.11.2: "Bitcast cannot have different memory
  spaces")."""
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


def take_kv_c(store_kv, store_c, rows, *, host: bool):
  """:func:`take_blocks` of both arrays of a :class:`PinnedArrayBlockStore`: ``(kv, c)``."""
  return take_blocks(store_kv, rows, host=host), take_blocks(store_c, rows, host=host)


def put_blocks(slots, dst, blocks):
  """``slots`` with ``blocks [n, 1, 1, 1, ...]`` written at ``dst [n, 3]`` rows ``(b, h, s)``
  (repeated rows must carry the same block)."""
  _, sdn = _block_dims(slots.ndim)
  return jax.lax.scatter(
    slots, dst, blocks.astype(slots.dtype), sdn, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )


def load_into_slots(store_kv, store_c, slot_kv, slot_c, src, dst, *, host: bool):
  """ONE gather of the blocks ``src [n, 3]`` (``(b, h, j)``) of a :class:`PinnedArrayBlockStore`
  and ONE scatter of them into the slots ``dst [n, 3]`` (``(b, h, s)``): ``(slot_kv, slot_c)``.
  Jitted by the cache (slots donated on accelerators), so no intermediate leaves XLA."""
  kv, c = take_kv_c(store_kv, store_c, src, host=host)
  return put_blocks(slot_kv, dst, kv), put_blocks(slot_c, dst, c)


def _write_blocks(kv_store, c_store, kv, c, start, *, host: bool):
  """``(kv_store, c_store)`` with ``kv [B, H, n, l', D]``, ``c [B, H, n, l']`` written at block
  ``start`` (a traced int: one compile per ``n``, not per position)."""
  if host:
    kv, c = jax.device_put((kv, c), jax.memory.Space.Host)
  zero = jnp.int32(0)
  return (
    jax.lax.dynamic_update_slice(
      kv_store, kv.astype(kv_store.dtype), (zero, zero, start, zero, zero)
    ),
    jax.lax.dynamic_update_slice(c_store, c, (zero, zero, start, zero)),
  )


@functools.cache
def _pinned_array_fns(sharding: jax.sharding.Sharding):
  """Jitted ``(write, take)`` of a :class:`PinnedArrayBlockStore` whose arrays have
  ``sharding``: the write donates the store and returns it in the same memory (in place); the
  take returns device memory."""
  host = sharding.memory_kind != "device"
  dev = sharding.with_memory_kind("device")
  write = jax.jit(
    functools.partial(_write_blocks, host=host),
    donate_argnums=(0, 1),
    out_shardings=(sharding, sharding),
  )
  take = jax.jit(functools.partial(take_kv_c, host=host), out_shardings=(dev, dev))
  return write, take


class PinnedArrayBlockStore(_LazyArrays):
  """One jax array per layer in host memory (see the module docstring).

  Attributes:
    kv: ``[B, H, NBmax, l', Dk + Dv]`` (cache dtype) jax array in ``pinned_host`` memory (the
      backend's device memory, logged, where it has none), zero-filled at the first use.
    c: ``[B, H, NBmax, l']`` float32, likewise.
    sharding: their sharding (one device, that memory kind).
  """

  def __init__(
    self, *, batch: int, heads: int, num_blocks: int, block_size: int, dim: int, dtype, device
  ):
    self.shape = (batch, heads, num_blocks, block_size, dim)
    self.dtype = jnp.dtype(dtype)
    self.kind = host_memory_kind(device)
    self.sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=self.kind)
    self._kv = self._c = None

  @property
  def host(self) -> bool:
    """Whether the arrays are in a host memory (else the fallback: device memory)."""
    return self.kind != "device"

  def _allocate(self, shape, dtype) -> jax.Array:
    return jax.device_put(np.zeros(shape, dtype), self.sharding)

  @property
  def memory_kind(self) -> str:
    arrays = [x for x in (self._kv, self._c) if x is not None]
    return arrays[0].sharding.memory_kind if arrays else self.kind

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape) * self.dtype.itemsize + np.prod(self.shape[:4]) * 4)

  def write(self, start: int, kv, c) -> None:
    """As :meth:`NumpyBlockStore.write`: one jitted in-place update of each array (device ->
    host copy inside it; compiles once per block count ``n``)."""
    write, _ = _pinned_array_fns(self.sharding)
    self.kv, self.c = write(
      self.kv, self.c, jnp.asarray(kv), jnp.asarray(c, jnp.float32), jnp.int32(start)
    )

  def block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    kv, c = self.gather(np.array([b]), np.array([h]), np.array([j]))
    return np.asarray(kv)[0], np.asarray(c)[0]

  def gather(self, b, h, j):
    """Blocks ``(b[i], h[i], j[i])`` in device memory, ``(kv [N, l', D], c [N, l'])`` (one jitted
    gather; the cache's loads use :func:`load_into_slots` instead)."""
    _, take = _pinned_array_fns(self.sharding)
    rows = np.stack([np.asarray(x, np.int32) for x in (b, h, j)], axis=1)
    kv, c = take(self.kv, self.c, rows)
    return kv.reshape(len(rows), *self.shape[3:]), c.reshape(len(rows), self.shape[3])

  def zeros(self, n: int):
    d = self.shape[3:]
    return np.zeros((n, *d), self.dtype), np.zeros((n, d[0]), np.float32)


def make_store(store: str, **kw):
  """The host store named ``store`` (one of :data:`STORES`)."""
  if store == "numpy":
    return NumpyBlockStore(**kw)
  if store == "pinned_host":
    return PinnedHostBlockStore(**kw)
  if store == "pinned_array":
    return PinnedArrayBlockStore(**kw)
  raise ValueError(f"store: expected one of {STORES}, got {store!r}")


__all__ = [
  "STORES",
  "NumpyBlockStore",
  "PinnedArrayBlockStore",
  "PinnedHostBlockStore",
  "aligned_empty",
  "host_memory_kind",
  "load_into_slots",
  "make_store",
  "put_blocks",
  "row_view",
  "take_blocks",
]
