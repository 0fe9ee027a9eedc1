"""NOSA decoding: a step reads ``O(C/d + k*l')`` keys, not the whole cache.

State of one layer (``C`` = capacity, ``NC = num_cmp_tokens(C)``, ``NB = num_blocks(C)``, ``l`` the
compression window, budgets clamped to ``C`` as :func:`~sparse_attention_jax.ops.
nosa.selection.for_length` does):

* :class:`NOSASelectState` -- what selection needs, always on the device (also when the blocks
  are offloaded, :mod:`sparse_attention_jax.nn.offload_decode`):

  - ``k_ring [B, l, H, Dk]``, ``c_ring [B, l, H]`` float32: a ring of the last ``l`` keys and
    eviction scores, the window of the next compressed token;
  - ``k_cmp [B, NC, H, Dk]``: mean-pooled keys; token ``i`` (window ``[i*d, i*d + l)``) is written
    by the step at position ``i*d + l - 1``, exactly when it becomes visible;
  - ``s_a [B, H, NB]`` float32: the query-agnostic block scores. ``s^a`` of block ``j`` is the max
    of the pooled eviction scores of the visible compressed tokens overlapping ``j`` (``-inf``
    while there is none); visibility only grows, so a running max updated when a compressed token
    completes equals the full op's score, and a block's score is static once its last
    overlapping compressed token is complete.

* :class:`NOSACache` -- the device-resident cache: the select state plus linear buffers
  ``k [B, C, H, Dk]``, ``v [B, C, H, Dv]``, ``c [B, C, H]`` float32 from which the ``k``
  selected blocks are gathered.

A step at position ``p`` (per sequence): writes ``k``/``v``/``c``, completes the compressed
token ending at ``p`` (and the block scores it overlaps), attends ``q`` over the ``NC`` compressed
keys for InfLLM-V2's query-aware score ``s^q`` (per-head softmax summed over the group, max
pooling), selects ``Gamma(p) = top_{k_q}(s^q) ∪ best of s^a`` (forced init/local blocks first)
and attends over the ``k*l'`` selected keys with the eviction bias ``c`` on every logit -- the
full op's computation for query ``p`` of the prefix ``0..p`` (one document per sequence).

Packed documents: a decoded sequence is one document, so its compressed tokens, blocks and forced
blocks are counted from position 0 -- the document-relative grids of
:mod:`sparse_attention_jax.ops.documents` with ``ds = 0``; block ids here (and in the offloaded
cache, :mod:`sparse_attention_jax.offload`) are row positions ``// l'``. A prefill of a packed
row is not a decode state (no ``segment_ids`` here).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.compression import compress
from sparse_attention_jax.ops.decode import (
  attend_one,
  fill_linear,
  fill_ring,
  gather_tokens,
  write_linear,
  write_ring,
)
from sparse_attention_jax.ops.nosa.attention import biased_masked_attention
from sparse_attention_jax.ops.nosa.selection import (
  compressed_bias,
  for_length,
  membership,
  pool_agnostic_scores,
  top_blocks,
)
from sparse_attention_jax.ops.selection import block_importance


class NOSASelectState(NamedTuple):
  """Selection state of one NOSA layer (device-resident in both modes; shapes in the module
  docstring)."""

  k_ring: jax.Array
  c_ring: jax.Array
  k_cmp: jax.Array
  s_a: jax.Array


class NOSACache(NamedTuple):
  """Device-resident decode cache of one NOSA layer: ``sel`` and the linear K/V/c buffers."""

  sel: NOSASelectState
  k: jax.Array
  v: jax.Array
  c: jax.Array


def decode_budgets(
  config: NSAConfig, num_query_selected: int, capacity: int
) -> tuple[NSAConfig, int]:
  """``(config, k_q)`` clamped to a cache of ``capacity`` tokens (the same selection as the
  full op's clamping to any prefix length: a budget of at least the candidates takes them all)."""
  _checks.check_config(config)
  if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
    _checks.fail("capacity", "a positive int", capacity)
  if config.compression != "mean":
    _checks.fail(
      "config.compression", "'mean' (NOSA scores blocks with mean-pooled keys)", config.compression
    )
  return for_length(config, num_query_selected, capacity)


def init_select_state(
  batch: int, capacity: int, *, config: NSAConfig, num_kv_heads: int, dk: int, dtype
) -> NOSASelectState:
  """Zero rings and compressed keys, ``s_a = -inf``, for ``batch`` sequences of up to
  ``capacity`` tokens."""
  _checks.check_config(config)
  for name, val in (("batch", batch), ("capacity", capacity)):
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      _checks.fail(name, "a positive int", val)
  cfg = config.for_length(capacity)
  h, l = num_kv_heads, cfg.cmp_window
  nc, nb = cfg.num_cmp_tokens(capacity), cfg.num_blocks(capacity)
  return NOSASelectState(
    k_ring=jnp.zeros((batch, l, h, dk), dtype),
    c_ring=jnp.zeros((batch, l, h), jnp.float32),
    k_cmp=jnp.zeros((batch, nc, h, dk), dtype),
    s_a=jnp.full((batch, h, nb), -jnp.inf, jnp.float32),
  )


def init_nosa_cache(
  batch: int, capacity: int, *, config: NSAConfig, num_kv_heads: int, dk: int, dv: int, dtype
) -> NOSACache:
  """Zero :class:`NOSACache` (K/V in ``dtype``, ``c`` float32)."""
  sel = init_select_state(
    batch, capacity, config=config, num_kv_heads=num_kv_heads, dk=dk, dtype=dtype
  )
  shape = (batch, capacity, num_kv_heads)
  return NOSACache(
    sel,
    jnp.zeros(shape + (dk,), dtype),
    jnp.zeros(shape + (dv,), dtype),
    jnp.zeros(shape, jnp.float32),
  )


def fill_select_state(
  state: NOSASelectState, *, config: NSAConfig, lengths, k, c
) -> NOSASelectState:
  """The select state after a prefill of right-padded prompts: ``k [B, T, H, Dk]`` (RoPE'd),
  ``c [B, T, H]``, ``lengths [B]`` (``1 <= lengths <= T <= capacity``).

  Compressed tokens whose window reaches past a row's length hold padding; they are invisible
  until the decode step that completes them overwrites them.
  """
  _checks.check_config(config)
  nb = state.s_a.shape[-1]
  t = k.shape[1]
  cfg = config.for_length(t)
  k_cmp = compress(k, cfg, name="k")  # [B, NC(T), H, Dk]
  c_cmp = compressed_bias(c, cfg)  # [B, NC(T), H]
  last = jnp.arange(c_cmp.shape[1], dtype=jnp.int32) * cfg.cmp_stride + cfg.cmp_window - 1
  vis = last[None, None, :] <= (lengths.astype(jnp.int32) - 1)[:, None, None]  # [B, 1, NC]
  s_a = pool_agnostic_scores(c_cmp, vis, cfg, seq_len=t)[:, 0]  # [B, H, NB(T)]
  s_a = jnp.pad(s_a, ((0, 0), (0, 0), (0, nb - s_a.shape[-1])), constant_values=-jnp.inf)
  return NOSASelectState(
    k_ring=fill_ring(state.k_ring, k, lengths),
    c_ring=fill_ring(state.c_ring[..., None], c[..., None], lengths)[..., 0],
    k_cmp=fill_linear(state.k_cmp, k_cmp),
    s_a=s_a,
  )


def fill_nosa_cache(cache: NOSACache, *, config: NSAConfig, lengths, k, v, c) -> NOSACache:
  """:func:`fill_select_state` plus the linear K/V/c buffers (``v [B, T, H, Dv]``)."""
  _checks.check_config(config)
  cap = cache.k.shape[1]
  if k.shape[1] > cap:
    _checks.fail("tokens", f"a prompt of at most the cache capacity {cap} tokens", k.shape[1])
  sel = fill_select_state(cache.sel, config=config, lengths=lengths, k=k, c=c)
  return NOSACache(
    sel,
    fill_linear(cache.k, k),
    fill_linear(cache.v, v),
    fill_linear(cache.c[..., None], c[..., None].astype(jnp.float32))[..., 0],
  )


def update_select_state(state: NOSASelectState, *, config: NSAConfig, pos, k, c) -> NOSASelectState:
  """Writes the token at ``pos [B]`` (``k [B, H, Dk]`` RoPE'd, ``c [B, H]``) into the rings and,
  when a compressed window ends at ``pos``, its mean-pooled key and the running max of the block
  scores it overlaps."""
  k_ring = write_ring(state.k_ring, k, pos)
  c_ring = write_ring(state.c_ring[..., None], c[..., None].astype(jnp.float32), pos)[..., 0]
  state = state._replace(k_ring=k_ring, c_ring=c_ring)
  nc, nb = state.k_cmp.shape[1], state.s_a.shape[-1]
  if nc == 0:
    return state
  l, d, bs = config.cmp_window, config.cmp_stride, config.block_size
  done = pos.astype(jnp.int32) + 1 - l  # window start [B]
  complete = (done >= 0) & (done % d == 0)
  i = jnp.clip(done // d, 0, nc - 1)
  start = i * d
  slots = (start[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]) % l  # [B, l], in order
  h = k_ring.shape[2]
  win_k = gather_tokens(k_ring, jnp.broadcast_to(slots[:, :, None], slots.shape + (h,)))
  win_c = jnp.take_along_axis(c_ring, slots[:, :, None], axis=1)  # [B, l, H]
  kc = compress(win_k, config, name="k")[:, 0]  # [B, H, Dk]
  cc = compressed_bias(win_c, config)[:, 0]  # [B, H]
  rows = jnp.arange(pos.shape[0])
  kc = jnp.where(complete[:, None, None], kc, state.k_cmp[rows, i])
  j = jnp.arange(nb, dtype=jnp.int32)[None, :]
  overlap = (j * bs < (start + l)[:, None]) & ((j + 1) * bs > start[:, None])  # [B, NB]
  grow = (complete[:, None] & overlap)[:, None, :]  # [B, 1, NB]
  s_a = jnp.where(grow, jnp.maximum(state.s_a, cc[:, :, None]), state.s_a)
  return state._replace(k_cmp=write_linear(state.k_cmp, kc, i), s_a=s_a)


def select_at(
  state: NOSASelectState, q, *, config: NSAConfig, num_query_selected: int, pos, capacity: int
):
  """``Gamma(pos)`` ``[B, H, k]`` int32 (ascending, ``-1`` padding) of queries ``q [B, HQ, Dk]``
  at positions ``pos [B]``, from the select state holding positions ``<= pos``.

  ``config``/``num_query_selected`` are the budgets clamped to ``capacity``
  (:func:`decode_budgets`)."""
  nc, nb = state.k_cmp.shape[1], state.s_a.shape[-1]
  b, hq, _ = q.shape
  h = state.k_cmp.shape[2]
  cfg = config
  visible = (jnp.arange(nc, dtype=jnp.int32) * cfg.cmp_stride + cfg.cmp_window - 1)[None, :]
  _, probs = attend_one(
    q, state.k_cmp, state.k_cmp, visible <= pos[:, None], cfg.scale(q.shape[-1]), return_probs=True
  )  # [B, H, G, NC]
  s_q = block_importance(probs.reshape(b, 1, hq, nc), cfg, num_kv_heads=h, seq_len=capacity)[
    :, 0
  ]  # [B, H, NB]
  bs = cfg.block_size
  j = jnp.arange(nb, dtype=jnp.int32)[None, None, :]
  p = pos.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
  candidate = j * bs <= p
  forced = candidate & (
    (j < cfg.num_init_blocks) | ((j <= p // bs) & (j > p // bs - cfg.num_local_blocks))
  )
  gq = top_blocks(s_q, num_query_selected, candidate, forced)
  return top_blocks(state.s_a, cfg.num_selected, candidate, forced | membership(gq, nb))


def gather_attend(q, k, v, c, gamma, *, pos, block_size: int, scale: float):
  """Biased attention of ``q [B, HQ, Dk]`` at ``pos [B]`` over the blocks ``gamma [B, H, n]`` of
  linear buffers ``k [B, C, H, Dk]``, ``v [B, C, H, Dv]``, ``c [B, C, H]`` (keys ``<= pos``):
  ``[B, HQ, Dv]`` in ``q.dtype``."""
  b, h, n = gamma.shape
  tok = gamma[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)  # [B,H,n,l']
  ok = (gamma[..., None] >= 0) & (tok <= pos[:, None, None, None])
  tok = tok.reshape(b, h, n * block_size).transpose(0, 2, 1)  # [B, S, H]
  ok = ok.reshape(b, h, n * block_size)  # [B, H, S]
  kg, vg = gather_tokens(k, tok), gather_tokens(v, tok)  # [B, S, H, D]
  cg = gather_tokens(c[..., None], tok)[..., 0]  # [B, S, H]
  return biased_masked_attention(q[:, None], kg, vg, cg, ok[:, None], scale)[:, 0]


def nosa_decode_step(
  cache: NOSACache, q, *, config: NSAConfig, num_query_selected: int, pos, k, v, c
):
  """One device-resident NOSA decode step for the token at position ``pos [B]``.

  Args:
    cache: the :class:`NOSACache` holding positions ``< pos``.
    q: ``[B, HQ, Dk]`` the new token's query (RoPE applied).
    config: the layer's :class:`NSAConfig` (``compression="mean"``; budgets unclamped).
    num_query_selected: k_q (unclamped).
    pos: ``[B]`` int32 positions (``< capacity``).
    k, v, c: ``[B, H, Dk]`` (RoPE'd), ``[B, H, Dv]``, ``[B, H]`` the new token's key, value and
      eviction score.

  Returns:
    ``(o [B, HQ, Dv] in q.dtype, new cache)``.
  """
  _checks.check_config(config)
  cap = cache.k.shape[1]
  cfg, kq = decode_budgets(config, num_query_selected, cap)
  sel = update_select_state(cache.sel, config=cfg, pos=pos, k=k, c=c)
  cache = NOSACache(
    sel,
    write_linear(cache.k, k, pos),
    write_linear(cache.v, v, pos),
    write_linear(cache.c[..., None], c[..., None].astype(jnp.float32), pos)[..., 0],
  )
  gamma = select_at(sel, q, config=cfg, num_query_selected=kq, pos=pos, capacity=cap)
  o = gather_attend(
    q,
    cache.k,
    cache.v,
    cache.c,
    gamma,
    pos=pos,
    block_size=cfg.block_size,
    scale=cfg.scale(q.shape[-1]),
  )
  return o, cache


__all__ = [
  "NOSACache",
  "NOSASelectState",
  "decode_budgets",
  "fill_nosa_cache",
  "fill_select_state",
  "gather_attend",
  "init_nosa_cache",
  "init_select_state",
  "nosa_decode_step",
  "select_at",
  "update_select_state",
]
