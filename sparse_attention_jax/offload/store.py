"""The host block store of one offloaded NOSA layer.

ONE jax array per layer in the device's ``pinned_host`` memory: ``kv [B, H, NB, l', Dk + Dv]``
(cache dtype) and ``c [B, H, NB, l']`` (float32), ``NB = ceil(max_len / l')``. Pinned host memory
is mapped into the GPU's address space, so the block copy
(:mod:`sparse_attention_jax.offload.block_copy`) reads the missing blocks straight from it. A
write (the prompt's blocks, then each completed tail block) is one jitted
``dynamic_update_slice`` whose operand and result stay in host memory (donated: in place).
Where the backend has no ``pinned_host`` memory the arrays live in device memory (logged); the
CPU backend has it (the CPU's own memory).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.offload.block_copy import take_blocks

log = logging.getLogger("sparse_attention_jax.offload")


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


def _write(kv_store, c_store, kv, c, start, *, host: bool):
  """The stores with ``kv [B, H, n, l', D]``, ``c [B, H, n, l']`` written at block ``start``."""
  if host:
    kv, c = jax.device_put((kv, c), jax.memory.Space.Host)
  at = (0, 0, start, 0, 0)
  return (
    jax.lax.dynamic_update_slice(kv_store, kv.astype(kv_store.dtype), at),
    jax.lax.dynamic_update_slice(c_store, c, at[:4]),
  )


@functools.cache
def _store_fns(sharding: jax.sharding.Sharding):
  """Jitted ``(write, take)`` of a store whose arrays have ``sharding``: the write donates the
  store and returns it in the same memory (in place, one compile per block count); the take
  returns blocks in device memory."""
  host = sharding.memory_kind != "device"
  write = jax.jit(
    functools.partial(_write, host=host), donate_argnums=(0, 1), out_shardings=(sharding,) * 2
  )
  take = jax.jit(
    lambda kv, c, rows: (take_blocks(kv, rows, host=host), take_blocks(c, rows, host=host)),
    out_shardings=(sharding.with_memory_kind("device"),) * 2,
  )
  return write, take


class BlockStore:
  """One layer's blocks in host memory (see the module docstring).

  Args:
    shape: ``(B, H, NB, l', D)``. dtype: the K/V cache dtype (``c`` is float32).
    device: the accelerator whose ``pinned_host`` memory holds the arrays.

  Attributes:
    kv: ``[B, H, NB, l', D]`` jax array, zero-filled at its first use (a benchmark may assign its
      own array of that shape and sharding instead, never allocating the zeros).
    c: ``[B, H, NB, l']`` float32, likewise.
    sharding: their sharding (one device, memory kind :attr:`kind`).
  """

  def __init__(self, shape, dtype, device):
    self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)
    self.kind = host_memory_kind(device)
    self.sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=self.kind)

  @property
  def host(self) -> bool:
    """Whether the arrays are in a host memory (else the fallback: device memory)."""
    return self.kind != "device"

  @functools.cached_property
  def kv(self) -> jax.Array:
    return jax.device_put(np.zeros(self.shape, self.dtype), self.sharding)

  @functools.cached_property
  def c(self) -> jax.Array:
    return jax.device_put(np.zeros(self.shape[:4], np.float32), self.sharding)

  @property
  def memory_kind(self) -> str:
    """The memory kind of the stored arrays (:attr:`kind` before the first use)."""
    return self.__dict__["kv"].sharding.memory_kind if "kv" in self.__dict__ else self.kind

  @property
  def nbytes(self) -> int:
    """Bytes of both arrays (the full ``max_len`` capacity)."""
    return int(np.prod(self.shape) * self.dtype.itemsize + np.prod(self.shape[:4]) * 4)

  def write(self, start: int, kv, c) -> None:
    """Blocks ``start .. start + n - 1`` of every ``(b, h)``: ``kv [B, H, n, l', D]``, ``c [B, H,
    n, l']`` (device or host arrays), in place."""
    write, _ = _store_fns(self.sharding)
    self.kv, self.c = write(self.kv, self.c, kv, jnp.asarray(c, jnp.float32), jnp.int32(start))

  def block(self, b: int, h: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Host copy of block ``(b, h, j)``: ``(kv [l', D], c [l'])``."""
    kv, c = _store_fns(self.sharding)[1](self.kv, self.c, np.array([[b, h, j]], np.int32))
    return np.asarray(kv).reshape(self.shape[3:]), np.asarray(c).reshape(self.shape[3])


__all__ = ["BlockStore", "host_memory_kind"]
