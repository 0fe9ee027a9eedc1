"""NSA decoding: the state one sequence needs so a decode step reads ``O(n*l' + w + T/d)`` keys.

State (:class:`NSACache`, a pytree; ``C`` = capacity, ``NC = num_cmp_tokens(C)``, ``W =
min(window, C)``, ``n = config.for_length(C).num_selected``):

* ``k [B, C, H, Dk]``, ``v [B, C, H, Dv]``: linear buffers of the keys/values that are compressed
  (and, with shared K/V, selected). ``v`` is None when the values are the first ``Dv`` features of
  the keys (ASA's GLA latent ``[c ; k_rope]``: ``v = c``), so the latent is cached once.
* ``k_cmp [B, NC, H, Dk]``, ``v_cmp [B, NC, H, Dv]``: compressed tokens. Token ``i`` (window
  ``[i*d, i*d + l)``) is computed by the step that writes position ``i*d + l - 1`` (mean pooling or
  the learnable phi over the cached window), so it exists exactly when it becomes visible.
* ``k_slc``, ``v_slc``: linear buffers of the selected branch's own K/V (None = shared).
* ``k_win``, ``v_win``: ring buffers of ``W`` slots for the window branch (None without it).
* ``sel [B, H, n]``: the block list of the current run's first token when
  ``config.selection_share > 1`` (ASA's shared selection), else None.

A step at position ``p`` (per sequence): writes the new K/V, completes the compressed token whose
window ends at ``p``, attends over the visible compressed tokens (``NC``), pools their
probabilities into block scores, picks the top-``n`` blocks (forced initial/local blocks first)
and attends over their ``n*l'`` keys (causal in the own block) and over the ``W`` window keys, then
mixes the branches with the gates -- exactly the full op's computation for query ``p`` of the
prefix ``0..p`` (single document per sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.ops import _checks
from sparse_attention_jax.ops.compression import CompressorParams, compress
from sparse_attention_jax.ops.decode import (
  attend_one,
  fill_linear,
  fill_ring,
  gather_tokens,
  ring_positions,
  window_mask,
  write_linear,
  write_ring,
)
from sparse_attention_jax.ops.nsa import combine_branches
from sparse_attention_jax.ops.selection import block_importance, top_n_blocks


class NSACache(NamedTuple):
  """Decode state of one NSA layer (see the module docstring for shapes)."""

  k: jax.Array
  v: jax.Array | None
  k_cmp: jax.Array
  v_cmp: jax.Array
  k_slc: jax.Array | None
  v_slc: jax.Array | None
  k_win: jax.Array | None
  v_win: jax.Array | None
  sel: jax.Array | None


def decode_config(config: NSAConfig, capacity: int) -> NSAConfig:
  """The op config of a cache of ``capacity`` tokens (``num_selected`` clamped as the modules'
  ``config.for_length(T)``: the same selected set for every prefix length)."""
  _checks.check_config(config)
  return config.for_length(capacity)


def init_nsa_cache(
  batch: int,
  capacity: int,
  *,
  config: NSAConfig,
  num_kv_heads: int,
  dk: int,
  dv: int,
  dtype,
  values_in_keys: bool = False,
  independent_slc: bool = False,
  independent_win: bool = False,
) -> NSACache:
  """Zero buffers for ``batch`` sequences of up to ``capacity`` tokens.

  Args:
    batch, capacity: B and C (positive ints).
    config: the layer's :class:`NSAConfig` (branches, l, d, l', n, w, r).
    num_kv_heads, dk, dv: H, key and value widths.
    dtype: buffer dtype (the model's compute dtype).
    values_in_keys: values are ``k[..., :dv]`` (no ``v`` buffer).
    independent_slc, independent_win: own K/V for the selected / window branch.
  """
  for name, val in (("batch", batch), ("capacity", capacity)):
    if not isinstance(val, int) or val < 1:
      _checks.fail(name, "a positive int", val)
  cfg = decode_config(config, capacity)
  h, nc = num_kv_heads, cfg.num_cmp_tokens(capacity)

  def z(s, d):
    return jnp.zeros((batch, s, h, d), dtype)

  slc = "slc" in cfg.branches and independent_slc
  win = "win" in cfg.branches
  w = min(cfg.window, capacity)
  return NSACache(
    k=z(capacity, dk),
    v=None if values_in_keys else z(capacity, dv),
    k_cmp=z(nc, dk),
    v_cmp=z(nc, dv),
    k_slc=z(capacity, dk) if slc else None,
    v_slc=z(capacity, dv) if slc else None,
    k_win=z(w, dk) if win else None,
    v_win=z(w, dv) if win and (independent_win or not values_in_keys) else None,
    sel=(
      jnp.full((batch, h, cfg.num_selected), -1, jnp.int32) if cfg.selection_share > 1 else None
    ),
  )


def _values(cache: NSACache, dv: int):
  return cache.k[..., :dv] if cache.v is None else cache.v


def fill_nsa_cache(
  cache: NSACache,
  *,
  config: NSAConfig,
  lengths,
  k,
  v,
  k_slc=None,
  v_slc=None,
  k_win=None,
  v_win=None,
  compress_params: CompressorParams | None = None,
  block_indices=None,
) -> NSACache:
  """The cache after a prefill of ``[B, T]`` right-padded prompts of ``lengths [B]`` tokens.

  Args:
    cache: from :func:`init_nsa_cache` (capacity ``C >= T``).
    config: the layer's :class:`NSAConfig`.
    lengths: ``[B]`` int32 prompt lengths (``1 <= lengths <= T``).
    k, v: ``[B, T, H, Dk|Dv]`` the prompts' keys/values (``v`` ignored when the cache keeps
      values inside the keys); ``k_slc`` ... ``v_win``: the branches' own K/V when independent.
    compress_params: phi's parameters for ``compression == "mlp"``.
    block_indices: ``[B, T, H, n']`` the prefill's selection (needed with
      ``selection_share > 1``: the next tokens of the current run reuse it).

  Entries past a row's length are padding: they are overwritten before any query sees them.
  """
  c = cache.k.shape[1]
  t = k.shape[1]
  if t > c:
    _checks.fail("tokens", f"a prompt of at most the cache capacity {c} tokens", t)
  cfg = decode_config(config, c)
  dv = cache.v_cmp.shape[-1]
  v = k[..., :dv] if cache.v is None else v
  pk = None if compress_params is None else compress_params.k
  pv = None if compress_params is None else compress_params.v
  kc = compress(k, cfg, pk, name="k")
  vc = compress(v, cfg, pv, name="v")
  new = dict(
    k=fill_linear(cache.k, k),
    k_cmp=fill_linear(cache.k_cmp, kc),
    v_cmp=fill_linear(cache.v_cmp, vc),
  )
  if cache.v is not None:
    new["v"] = fill_linear(cache.v, v)
  if cache.k_slc is not None:
    new.update(k_slc=fill_linear(cache.k_slc, k_slc), v_slc=fill_linear(cache.v_slc, v_slc))
  if cache.k_win is not None:
    kw = k if k_win is None else k_win
    new["k_win"] = fill_ring(cache.k_win, kw, lengths)
    if cache.v_win is not None:
      new["v_win"] = fill_ring(cache.v_win, v if v_win is None else v_win, lengths)
  if cache.sel is not None:
    if block_indices is None:
      _checks.fail(
        "block_indices",
        "the prefill's [B, T, H, n] selection when config.selection_share > 1",
        None,
      )
    last = jnp.take_along_axis(block_indices, (lengths - 1)[:, None, None, None], axis=1)[:, 0]
    n = cache.sel.shape[-1]
    last = last[..., :n]
    new["sel"] = jnp.pad(last, ((0, 0), (0, 0), (0, n - last.shape[-1])), constant_values=-1)
  return cache._replace(**new)


def _compress_step(cache: NSACache, cfg: NSAConfig, pos, dv: int, compress_params):
  """Writes compressed token ``i = (pos + 1 - l) / d`` when its window ends at ``pos``."""
  nc = cache.k_cmp.shape[1]
  if nc == 0:
    return cache
  l, d = cfg.cmp_window, cfg.cmp_stride
  done = pos + 1 - l  # [B]
  complete = (done >= 0) & (done % d == 0)
  i = jnp.clip(done // d, 0, nc - 1)
  tok = i[:, None] * d + jnp.arange(l, dtype=jnp.int32)[None, :]  # [B, l]
  h = cache.k.shape[2]
  tok3 = jnp.broadcast_to(tok[:, :, None], tok.shape + (h,))
  win_k = gather_tokens(cache.k, tok3)  # [B, l, H, Dk]
  win_v = gather_tokens(_values(cache, dv), tok3)
  pk = None if compress_params is None else compress_params.k
  pv = None if compress_params is None else compress_params.v
  kc = compress(win_k, cfg, pk, name="k")[:, 0]  # [B, H, Dk]
  vc = compress(win_v, cfg, pv, name="v")[:, 0]
  rows = jnp.arange(pos.shape[0])
  kc = jnp.where(complete[:, None, None], kc, cache.k_cmp[rows, i])
  vc = jnp.where(complete[:, None, None], vc, cache.v_cmp[rows, i])
  return cache._replace(
    k_cmp=write_linear(cache.k_cmp, kc, i), v_cmp=write_linear(cache.v_cmp, vc, i)
  )


def select_at(probs, cfg: NSAConfig, pos, *, capacity: int):
  """``[B, H, n]`` int32 blocks of query position ``pos [B]`` from its compressed-attention
  probabilities ``probs [B, H, G, NC]`` (NSA eq. 9-11, as :func:`select_blocks`)."""
  b, h, g, nc = probs.shape
  imp = block_importance(probs.reshape(b, 1, h * g, nc), cfg, num_kv_heads=h, seq_len=capacity)[
    :, 0
  ]  # [B, H, NB]
  nb, bs = imp.shape[-1], cfg.block_size
  j = jnp.arange(nb, dtype=jnp.int32)[None, :]
  p = pos[:, None]
  candidate = j * bs <= p
  forced = candidate & (
    (j < cfg.num_init_blocks) | ((j <= p // bs) & (j > p // bs - cfg.num_local_blocks))
  )
  return top_n_blocks(imp, candidate[:, None], forced[:, None], cfg.num_selected)


def nsa_decode_step(
  cache: NSACache,
  q,
  *,
  config: NSAConfig,
  pos,
  k,
  v=None,
  k_slc=None,
  v_slc=None,
  k_win=None,
  v_win=None,
  gates=None,
  compress_params: CompressorParams | None = None,
):
  """One NSA decode step for the token at position ``pos [B]`` of every sequence.

  Args:
    cache: the :class:`NSACache` holding positions ``< pos``.
    q: ``[B, HQ, Dk]`` the new token's query (RoPE applied).
    config: the layer's :class:`NSAConfig`.
    pos: ``[B]`` int32 positions (= tokens already cached, ``< capacity``).
    k, v: ``[B, H, Dk|Dv]`` the new token's key/value (``v`` unused when values live in the
      keys); ``k_slc`` ... ``v_win``: its branch-own K/V when independent.
    gates: ``[B, HQ, 3]`` sigmoid gates (cmp, slc, win) or None (ungated sum).
    compress_params: phi's parameters for ``compression == "mlp"``.

  Returns:
    ``(o [B, HQ, Dv] in q.dtype, new cache)``.
  """
  cap = cache.k.shape[1]
  cfg = decode_config(config, cap)
  dv = cache.v_cmp.shape[-1]
  new = {"k": write_linear(cache.k, k, pos)}
  if cache.v is not None:
    new["v"] = write_linear(cache.v, v, pos)
  if cache.k_slc is not None:
    new.update(
      k_slc=write_linear(cache.k_slc, k_slc, pos), v_slc=write_linear(cache.v_slc, v_slc, pos)
    )
  if cache.k_win is not None:
    new["k_win"] = write_ring(cache.k_win, k if k_win is None else k_win, pos)
    if cache.v_win is not None:
      vw = v_win if v_win is not None else (k[..., :dv] if v is None else v)
      new["v_win"] = write_ring(cache.v_win, vw, pos)
  cache = _compress_step(cache._replace(**new), cfg, pos, dv, compress_params)
  scale = cfg.scale(q.shape[-1])
  nc = cache.k_cmp.shape[1]
  visible = (jnp.arange(nc, dtype=jnp.int32) * cfg.cmp_stride + cfg.cmp_window - 1)[None, :]
  o_cmp, probs = attend_one(
    q, cache.k_cmp, cache.v_cmp, visible <= pos[:, None], scale, return_probs=True
  )
  outputs = {}
  if "cmp" in cfg.branches:
    outputs["cmp"] = o_cmp
  if "slc" in cfg.branches:
    sel = select_at(probs, cfg, pos, capacity=cap)  # [B, H, n]
    if cache.sel is not None:
      sel = jnp.where((pos % cfg.selection_share == 0)[:, None, None], sel, cache.sel)
      cache = cache._replace(sel=sel)
    bs = cfg.block_size
    b, h, n = sel.shape
    tok = sel[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)  # [B, H, n, l']
    ok = (sel[..., None] >= 0) & (tok <= pos[:, None, None, None])
    tok = tok.reshape(b, h, n * bs).transpose(0, 2, 1)  # [B, n*l', H]
    ok = ok.reshape(b, h, n * bs).transpose(0, 2, 1)
    ks = cache.k if cache.k_slc is None else cache.k_slc
    vs = _values(cache, dv) if cache.v_slc is None else cache.v_slc
    outputs["slc"] = attend_one(q, gather_tokens(ks, tok), gather_tokens(vs, tok), ok, scale)
  if "win" in cfg.branches:
    wslots = cache.k_win.shape[1]
    vw = cache.k_win[..., :dv] if cache.v_win is None else cache.v_win
    mask = window_mask(ring_positions(wslots, pos), pos, cfg.window)
    outputs["win"] = attend_one(q, cache.k_win, vw, mask, scale)
  order = {name: outputs[name] for name in ("cmp", "slc", "win") if name in outputs}
  return combine_branches(order, gates), cache


__all__ = [
  "NSACache",
  "decode_config",
  "fill_nsa_cache",
  "init_nsa_cache",
  "nsa_decode_step",
  "select_at",
]
