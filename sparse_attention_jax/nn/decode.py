"""KV-cache decoding of a :class:`~sparse_attention_jax.nn.DecoderLM`: prefill, then one token per
step, with preallocated fixed-capacity caches and one compiled step for every length.

Layer protocol (the ``decode`` field of a kind's registry entry,
:class:`~sparse_attention_jax.nn.registry.DecodeProtocol`; the built-in kinds implement
it as three methods, ``LAYER_METHODS``)::

  cache = layer.init_cache(batch: int, capacity: int, dtype=None)        # a pytree of arrays
  y, cache = layer.prefill(x [B, T, d_model], lengths [B], cache)        # y [B, T, d_model]
  y, cache = layer.decode(x [B, 1, d_model], pos [B], cache)             # y [B, 1, d_model]

* ``init_cache`` allocates zero buffers (shapes fixed by ``batch`` and ``capacity``, the most
  tokens a sequence may hold; ``dtype`` defaults to the layer's compute dtype). A cache is any
  pytree of arrays (NamedTuples here; ``None`` fields are fine); it holds no lengths.
* ``prefill`` runs the layer on right-padded prompts (row ``b`` holds ``lengths[b]`` real tokens at
  positions ``0 .. lengths[b]-1``; ``T <= capacity``) and returns the layer's outputs -- equal to
  its ``__call__`` -- and the cache of the real tokens. Entries written for padding positions must
  never be read before a decode step overwrites them (causal masks and per-position writes give
  this for free).
* ``decode`` processes the token at position ``pos[b]`` of each row (``pos`` = tokens already
  cached, so rows decode at different positions: no left padding), writes its state at ``pos`` and
  returns its output; it must equal ``__call__`` on the prefix ``0 .. pos[b]`` at its last row.

Sequences are single documents starting at position 0 (RoPE positions = cache positions); packed
prompts are not supported by decoding. Kinds: ``full`` (linear K/V buffer), ``swa`` (ring buffer
of ``window`` slots), ``nsa`` / ``ssa`` (:mod:`sparse_attention_jax.ops.nsa_decode`: linear K/V,
compressed K/V completed as windows fill, ring window, per-step top-n selection), ``asa_local``
(MLA absorbed form: a ring of the latent ``[c ; k_rope]``, attention in latent space),
``asa_global`` (NSA over the GLA latent, values read from the cached keys), ``nosa``
(:mod:`sparse_attention_jax.ops.nosa.decode`: linear K/V/c, compressed keys and running
query-agnostic block scores; offloaded variant in :mod:`sparse_attention_jax.offload`).
A new kind registers a protocol; :func:`check_decodable` names the kinds that have none.

Model level: :func:`init_decode_state` -> :class:`DecodeState` (per-layer caches and the lengths),
:func:`prefill` -> next-token logits of every row, :func:`decode_step` -> logits of the next token.
Both are pure functions of ``(model, ...)`` meant to run under ``jax.jit`` (see
:mod:`sparse_attention_jax.generation.generator`). Capacity is checked on the host by the generator; a
raw ``decode_step`` past the capacity returns NaN logits for that row (never silently wrong).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attention_jax.nn.inputs import check_tokens, is_concrete
from sparse_attention_jax.ops.decode import (
  attend_one,
  fill_linear,
  fill_ring,
  ring_positions,
  window_mask,
  write_linear,
  write_ring,
)

_METHODS = ("init_cache", "prefill", "decode")  # what LAYER_METHODS calls


class DenseCache(NamedTuple):
  """K/V buffers of a dense kind, head-major (attention reads them as a batched matmul without a
  transpose): ``k [B, H, S, Dk]``, ``v [B, H, S, Dv]`` (``v`` None when the values are
  ``k[..., :Dv]``, as for MLA's latent); linear (``S`` = capacity) or a ring of the window
  (``S = min(window, capacity)``)."""

  k: jax.Array
  v: jax.Array | None


def init_dense_cache(
  batch: int,
  capacity: int,
  *,
  num_kv_heads: int,
  dk: int,
  dv: int | None,
  dtype,
  window: int | None = None,
) -> DenseCache:
  """Zero :class:`DenseCache`; a ring of ``min(window, capacity)`` slots when ``window`` is set,
  no ``v`` buffer when ``dv`` is None."""
  for name, val in (("batch", batch), ("capacity", capacity)):
    if not isinstance(val, int) or val < 1:
      raise ValueError(f"{name}: expected a positive int, got {val!r}")
  slots = capacity if window is None else min(window, capacity)
  shape = (batch, num_kv_heads, slots)
  return DenseCache(
    jnp.zeros(shape + (dk,), dtype), None if dv is None else jnp.zeros(shape + (dv,), dtype)
  )


def fill_dense_cache(cache: DenseCache, k, v, lengths, *, ring: bool) -> DenseCache:
  """Prefill: ``k``/``v`` ``[B, T, H, D]`` of right-padded prompts of ``lengths [B]`` tokens."""
  if not ring:
    if k.shape[1] > cache.k.shape[2]:
      raise ValueError(
        f"tokens: expected a prompt of at most the cache capacity "
        f"{cache.k.shape[2]} tokens, got {k.shape[1]}"
      )
    return DenseCache(
      fill_linear(cache.k, k, axis=2), None if v is None else fill_linear(cache.v, v, axis=2)
    )
  return DenseCache(
    fill_ring(cache.k, k, lengths, axis=2),
    None if v is None else fill_ring(cache.v, v, lengths, axis=2),
  )


def dense_decode(
  cache: DenseCache,
  q,
  k,
  v,
  pos,
  *,
  scale: float,
  ring: bool,
  window: int | None,
  dv: int | None = None,
):
  """One dense decode step: writes ``k``/``v`` ``[B, H, D]`` at ``pos [B]``, attends ``q [B, HQ,
  Dk]`` over the cached positions ``<= pos`` (within ``window``); ``dv`` slices the values out of
  the keys when ``cache.v`` is None. Returns ``(o [B, HQ, Dv], cache)``."""
  write = write_ring if ring else write_linear
  ck = write(cache.k, k, pos, axis=2)
  cv = None if cache.v is None else write(cache.v, v, pos, axis=2)
  slots = ck.shape[2]
  slot_pos = ring_positions(slots, pos) if ring else jnp.arange(slots, dtype=jnp.int32)[None, :]
  o = attend_one(
    q, ck, ck[..., :dv] if cv is None else cv, window_mask(slot_pos, pos, window), scale, axis=2
  )
  return o, DenseCache(ck, cv)


class DecodeState(NamedTuple):
  """Decode state of a model: ``caches`` (one per layer, in order), ``lengths [B]`` int32
  (tokens cached per sequence = the position of the next token) and ``capacity`` (int32 scalar:
  the most tokens a sequence may hold)."""

  caches: tuple
  lengths: jax.Array
  capacity: jax.Array


def _protocol(kind: str):
  """The registered :class:`~sparse_attention_jax.nn.registry.DecodeProtocol` of
  ``kind`` (None when it has none)."""
  # Imported here: the attention kinds import this module's dense-cache helpers.
  from sparse_attention_jax.nn.registry import get_attention_kind

  return get_attention_kind(kind).decode


def check_decodable(model) -> None:
  """Raises ``NotImplementedError`` naming the layer kinds of ``model`` without the decode
  protocol (see the module docstring)."""
  missing = sorted({blk.kind for blk in model.layers if _protocol(blk.kind) is None})
  if missing:
    raise NotImplementedError(
      f"model.attention: expected kinds implementing {_METHODS} for "
      f"cached decoding, got {missing} without them"
    )


def init_decode_state(model, batch: int, capacity: int, dtype=None) -> DecodeState:
  """Empty caches of every layer for ``batch`` sequences of up to ``capacity`` tokens."""
  check_decodable(model)
  caches = tuple(
    _protocol(blk.kind).init_cache(blk.attn, batch, capacity, dtype) for blk in model.layers
  )
  return DecodeState(caches, jnp.zeros((batch,), jnp.int32), jnp.asarray(capacity, jnp.int32))


def _logits(model, x):
  x = model.final_norm(x)
  if model.lm_head is None:
    return model.embed.attend(x)
  return model.lm_head(x).astype(jnp.float32)


def prefill(model, tokens, lengths, state: DecodeState) -> tuple[jax.Array, DecodeState]:
  """Runs right-padded prompts through the model and fills the caches.

  Args:
    model: a ``DecoderLM`` whose kinds implement the protocol.
    tokens: ``[B, T]`` int32, row ``b`` = a prompt of ``lengths[b]`` tokens then padding.
    lengths: ``[B]`` int32, ``1 <= lengths <= T <= capacity``.
    state: from :func:`init_decode_state` (its lengths are replaced).

  Returns:
    ``(logits [B, V] float32 of the token after each prompt, state)``.

  Raises:
    ValueError: on bad shapes or dtypes, and, where they are concrete (called outside ``jit``),
      on token ids outside ``[0, vocab_size)``, ``lengths`` outside ``[1, T]`` or
      ``T > capacity``. Under ``jit`` these values are the caller's contract: a length of 0
      or past the prompt gives meaningless logits and caches
      (:class:`~sparse_attention_jax.generation.Generator` checks its prompts on the host).
  """
  check_tokens(tokens, model.config.vocab_size)
  b, t = tokens.shape
  if not hasattr(lengths, "shape") or lengths.shape != (b,):
    got = f"shape {lengths.shape}" if hasattr(lengths, "shape") else type(lengths).__name__
    raise ValueError(f"lengths: expected shape [B] = ({b},), got {got}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths: expected an integer dtype, got {lengths.dtype}")
  if is_concrete(state.capacity) and t > int(state.capacity):
    raise ValueError(
      f"tokens: expected a prompt of at most the cache capacity {int(state.capacity)} tokens, "
      f"got {t}"
    )
  if is_concrete(lengths):
    host = np.asarray(lengths)
    lo, hi = int(host.min()), int(host.max())
    if lo < 1 or hi > t:
      raise ValueError(f"lengths: expected values in [1, T={t}], got values in [{lo}, {hi}]")
  lengths = lengths.astype(jnp.int32)
  x = model.embed(tokens)
  caches = []
  for blk, cache in zip(model.layers, state.caches):
    y, cache = _protocol(blk.kind).prefill(blk.attn, blk.attn_norm(x), lengths, cache)
    x = x + y.astype(x.dtype)
    x = x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype)
    caches.append(cache)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, d]
  return _logits(model, last)[:, 0], state._replace(caches=tuple(caches), lengths=lengths)


def decode_step(model, tokens, state: DecodeState) -> tuple[jax.Array, DecodeState]:
  """Feeds ``tokens [B]`` (the token at position ``state.lengths``) and returns the logits of the
  following token ``[B, V]`` float32 and the state with ``lengths + 1``.

  Rows already at ``state.capacity`` get NaN logits (and their caches are no longer valid).
  """
  if tokens.shape != state.lengths.shape:
    raise ValueError(f"tokens: expected shape [B] = {state.lengths.shape}, got {tokens.shape}")
  pos = state.lengths
  x = model.embed(tokens[:, None])  # [B, 1, d]
  caches = []
  for blk, cache in zip(model.layers, state.caches):
    y, cache = _protocol(blk.kind).step(blk.attn, blk.attn_norm(x), pos, cache)
    x = x + y.astype(x.dtype)
    x = x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype)
    caches.append(cache)
  logits = _logits(model, x)[:, 0]
  logits = jnp.where((pos >= state.capacity)[:, None], jnp.nan, logits)
  return logits, state._replace(caches=tuple(caches), lengths=pos + 1)


def cache_bytes(state: Any) -> int:
  """Bytes of every buffer of a decode state (or any pytree of arrays)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


__all__ = [
  "DecodeState",
  "DenseCache",
  "cache_bytes",
  "check_decodable",
  "decode_step",
  "dense_decode",
  "fill_dense_cache",
  "init_decode_state",
  "init_dense_cache",
  "prefill",
]
