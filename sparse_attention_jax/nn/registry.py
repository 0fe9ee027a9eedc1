"""The attention-kind registry: one :class:`AttentionKind` entry per layer kind name.

An entry is data: everything the library knows about a kind lives in it, so the model, the
decoder and the analysis tools (:mod:`sparse_attention_jax.analysis`) loop over the registry
instead of branching on kind names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

_DECODE_METHODS = ("init_cache", "prefill", "decode")


class KVElements(NamedTuple):
  """KV-cache elements one layer keeps per context token.

  Attributes:
    elements_per_token: cached elements per token (float: compressed tokens are amortized).
    window: tokens actually needed (a sliding window), or None when all are.
    note: one line saying what is counted.
  """

  elements_per_token: float
  window: int | None
  note: str


class LayerQK(NamedTuple):
  """What the analysis tools read from a layer on its input ``x [B, T, d_model]``.

  Attributes:
    q: ``[B, T, HQ, Dk]`` rotated queries.
    k: ``[B, T, H, Dk]`` rotated keys (the ones that score blocks, for kinds with several).
    c: ``[B, T, H]`` query-agnostic eviction scores, or None for kinds without an eviction head.
  """

  q: Any
  k: Any
  c: Any = None


class OffloadElements(NamedTuple):
  """Cache elements of one layer whose KV blocks can live in host memory while decoding.

  Attributes:
    device_per_token: elements per context token kept on the device (what selection reads).
    device_fixed: elements of the fixed device pool per sequence (the block slots).
    fixed_tokens: tokens the pool holds (it never holds more than the context).
    host_per_token: elements per context token in host memory.
  """

  device_per_token: float
  device_fixed: float
  fixed_tokens: int
  host_per_token: float


@dataclasses.dataclass(frozen=True)
class DecodeProtocol:
  """How a kind decodes with a KV cache (see :mod:`sparse_attention_jax.nn.decode`).

  Each field is called with the layer first:

  * ``init_cache(layer, batch, capacity, dtype)`` -> cache (a pytree of arrays);
  * ``prefill(layer, x [B, T, d_model], lengths [B], cache)`` -> ``(y, cache)``;
  * ``step(layer, x [B, 1, d_model], pos [B], cache)`` -> ``(y [B, 1, d_model], cache)``.
  """

  init_cache: Callable
  prefill: Callable
  step: Callable


LAYER_METHODS = DecodeProtocol(
  init_cache=lambda layer, batch, capacity, dtype=None: layer.init_cache(batch, capacity, dtype),
  prefill=lambda layer, x, lengths, cache: layer.prefill(x, lengths, cache),
  step=lambda layer, x, pos, cache: layer.decode(x, pos, cache),
)
"""The protocol of kinds whose module implements ``init_cache`` / ``prefill`` / ``decode``."""


def _has_decode_methods(cls: type) -> bool:
  return all(callable(getattr(cls, m, None)) for m in _DECODE_METHODS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionKind:
  """Everything about one attention layer kind.

  Attributes:
    name: the kind's name in ``ModelConfig.attention``.
    module: the layer class, built as ``module(config: ModelConfig, *, rngs: nnx.Rngs)`` and
      called as ``layer(x [B, T, d_model], positions [B, T], segment_ids [B, T] | None) ->
      [B, T, d_model]``.
    decode: how the kind prefills and steps with a cache (:class:`DecodeProtocol`), or None when
      it cannot decode with a cache.
    kv_elements: ``(config) -> KVElements``: cache elements per context token of one layer
      (None = no KV accounting for this kind).
    train_flops: ``(config, seq_len) -> float``: attention training FLOPs per token of one layer
      (forward + backward; the projections are counted from the parameters; None = not counted).
    qk: ``(layer, x [B, T, d_model], positions [B, T]) -> LayerQK | None``: the q/k (and
      eviction scores) the analysis tools read; None (or a None result) = the kind has no plain
      RoPE'd q/k and is skipped.
    offload_elements: ``(config) -> OffloadElements`` for kinds whose KV blocks can be offloaded
      to host memory while decoding (None = always device-resident).
  """

  name: str
  module: type
  decode: DecodeProtocol | None = None
  kv_elements: Callable[[Any], KVElements] | None = None
  train_flops: Callable[[Any, int], float] | None = None
  qk: Callable[[Any, Any, Any], LayerQK | None] | None = None
  offload_elements: Callable[[Any], OffloadElements] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"name: expected a non-empty str, got {self.name!r}")
    if not isinstance(self.module, type):
      raise TypeError(f"module: expected a class, got {self.module!r}")
    if self.decode is not None and not isinstance(self.decode, DecodeProtocol):
      raise TypeError(f"decode: expected a DecodeProtocol or None, got {self.decode!r}")
    for field in ("kv_elements", "train_flops", "qk", "offload_elements"):
      v = getattr(self, field)
      if v is not None and not callable(v):
        raise TypeError(f"{field}: expected a callable or None, got {v!r}")

  @classmethod
  def from_module(cls, name: str, module: type) -> AttentionKind:
    """An entry with only a module: decodes through its methods when it has all three, and has
    no KV/FLOPs accounting or analysis q/k."""
    if not isinstance(module, type):
      raise TypeError(f"cls: expected a class, got {module!r}")
    return cls(
      name=name, module=module, decode=LAYER_METHODS if _has_decode_methods(module) else None
    )

  def __call__(self, config, *, rngs):
    """Builds the layer: ``module(config, rngs=rngs)``."""
    return self.module(config, rngs=rngs)

  def kv(self, config) -> KVElements:
    """:attr:`kv_elements` of ``config``, or a ``ValueError`` naming the kind."""
    if self.kv_elements is None:
      raise ValueError(
        f"kind: attention kind {self.name!r} registers no kv_elements (KV-cache accounting)"
      )
    return self.kv_elements(config)

  def flops(self, config, seq_len: int) -> float:
    """:attr:`train_flops` of ``config`` at ``seq_len``, or a ``ValueError`` naming the kind."""
    if self.train_flops is None:
      raise ValueError(f"kind: attention kind {self.name!r} registers no train_flops")
    return float(self.train_flops(config, seq_len))


ATTENTION_KINDS: dict[str, AttentionKind] = {}
"""Layer kind name (as used in ``ModelConfig.attention``) -> :class:`AttentionKind`."""


def register_attention_kind(kind: str | AttentionKind, cls: type | None = None):
  """Registers an attention kind.

  Forms:

  * ``register_attention_kind(AttentionKind(name=..., module=..., ...))`` -> the entry;
  * ``register_attention_kind(name, cls)`` -> ``cls`` (an entry with only a module, see
    :meth:`AttentionKind.from_module`);
  * ``@register_attention_kind(name)`` on a class.

  Re-registering a name with a different module class is an error (to catch accidental
  collisions); registering the same class again replaces the entry.
  """
  if isinstance(kind, AttentionKind):
    if cls is not None:
      raise TypeError(f"cls: expected None with an AttentionKind entry, got {cls!r}")
    return _add(kind)
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"name: expected a non-empty str, got {kind!r}")

  def register(c: type) -> type:
    _add(AttentionKind.from_module(kind, c))
    return c

  return register if cls is None else register(cls)


def _add(entry: AttentionKind) -> AttentionKind:
  old = ATTENTION_KINDS.get(entry.name)
  if old is not None and old.module is not entry.module:
    raise ValueError(
      f"name: attention kind {entry.name!r} is already registered to "
      f"{old.module.__module__}.{old.module.__qualname__}"
    )
  ATTENTION_KINDS[entry.name] = entry
  return entry


def unknown_kind_message(what: str, got) -> str:
  """``"<what>: expected one of the registered attention kinds [...], got <got>"``."""
  return (
    f"{what}: expected one of the registered attention kinds {sorted(ATTENTION_KINDS)}, got {got!r}"
  )


def get_attention_kind(name: str) -> AttentionKind:
  """The entry of kind ``name``, or a ``ValueError`` naming it and the registered kinds.

  The entry is callable like the module class: ``get_attention_kind(name)(config, rngs=rngs)``.
  """
  try:
    return ATTENTION_KINDS[name]
  except (KeyError, TypeError):
    raise ValueError(unknown_kind_message("kind", name)) from None


__all__ = [
  "ATTENTION_KINDS",
  "AttentionKind",
  "DecodeProtocol",
  "KVElements",
  "LAYER_METHODS",
  "LayerQK",
  "OffloadElements",
  "get_attention_kind",
  "register_attention_kind",
  "unknown_kind_message",
]
