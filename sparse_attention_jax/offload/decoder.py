"""Offloaded NOSA decoding of a ``DecoderLM``: every NOSA layer's K/V/c in pinned host memory.

The device keeps per NOSA layer its selection state, block slots and current block. The prefill
runs layer by layer (a layer's K/V/c reach its host store before the next layer runs); a decode
step is ONE jitted call over every layer; the host only rolls completed tails over to the stores
and reads a step's counts back one step later, so its dispatch overlaps the device's work.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.offload.layer import (
  STAT_KEYS,
  OffloadConfig,
  OffloadedLayer,
  check_positive,
  layer_step,
)
from sparse_attention_jax.ops.nosa import decode as nd

log = logging.getLogger("sparse_attention_jax.offload")


def offload_slots(config, capacity: int) -> int:
  """Device block slots per (sequence, KV head) besides the current block: ``k - 1`` (``k``
  clamped to the capacity's blocks) when every selection holds the current block (forced local
  blocks, or a budget covering every block), else ``k``."""
  cfg = config.nsa.for_length(capacity)
  always_current = config.nsa.num_local_blocks >= 1 or cfg.num_selected >= cfg.num_blocks(capacity)
  return max(1, cfg.num_selected - (1 if always_current else 0))


def _sum_stats(stats: list) -> dict:
  out = {key: sum(s[key] for s in stats) for key in STAT_KEYS}
  return {**out, "hit_rate": out["hits"] / out["requested"] if out["requested"] else 1.0}


def _mlp(blk, x, y):
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype)


def _prefill_layer(gd, st, kind, x, lengths, state):
  """One layer over the prompt ``x [B, T, d]``: ``(x, state, kvc)``, ``state`` the select state
  (NOSA) or the layer's cache, ``kvc = (k [B, T, H, Dk], v [B, T, H, Dv], c [B, T, H])`` (NOSA,
  for its host store) or ``None``."""
  blk, kvc = nnx.merge(gd, st), None
  if kind == "nosa":
    y, k, v, c = blk.attn.prefill_outputs(blk.attn_norm(x))
    state = nd.fill_select_state(state, config=blk.attn.config.nsa, lengths=lengths, k=k, c=c)
    kvc = (k, v, c)
  else:
    y, state = blk.attn.prefill(blk.attn_norm(x), lengths, state)
  return _mlp(blk, x, y), state, kvc


def _step(decoder, host, copy, params, tokens, t, states, stores):
  """One decode step of ``tokens [B]`` at ``t``. ``states[i]``: ``(select state, LayerState)``
  with ``stores[i] = (kv, c)`` (NOSA), else the layer's cache with ``stores[i] = None``.
  Returns ``(logits [B, V], states, info [L_nosa, 5])``."""
  model, cap = decoder._model(params), decoder.capacity
  pos = jnp.full(tokens.shape, t, jnp.int32)
  x, out, infos = model.embed(tokens[:, None]), [], []
  for blk, state, store in zip(model.layers, states, stores):
    if store is None:
      y, state = blk.attn.decode(blk.attn_norm(x), pos, state)
    else:
      attn, (sel, layer) = blk.attn, state
      q, k, v, c = attn.qkvc(blk.attn_norm(x), pos[:, None])
      cfg, kq = nd.decode_budgets(attn.config.nsa, attn.query_selected, cap)
      sel = nd.update_select_state(sel, config=cfg, pos=pos, k=k[:, 0], c=c[:, 0])
      gamma = nd.select_at(sel, q[:, 0], config=cfg, num_query_selected=kq, pos=pos, capacity=cap)
      kv_t = jnp.concatenate([k[:, 0], v[:, 0].astype(k.dtype)], axis=-1)
      o, layer, info = layer_step(
        layer, *store, kv_t, c[:, 0], gamma, q[:, 0], t, chunk=decoder.config.chunk,
        scale=decoder.scale, host=host, copy=copy,
      )  # fmt: skip
      y, state = attn.o_proj(o[:, None]), (sel, layer)
      infos.append(info)
    x = _mlp(blk, x, y)
    out.append(state)
  return dec._logits(model, x)[:, 0], out, jnp.stack(infos)


class _PendingStats(Mapping):
  """The stats of :meth:`OffloadedDecoder.step`, read back at the first access (or the next step,
  or ``flush``) and accounted by every NOSA layer (:meth:`~.layer.OffloadedLayer.account`)."""

  def __init__(self, info, layers, t: int, dispatch_s: float):
    self._args = info, layers, t, dispatch_s

  @functools.cached_property
  def stats(self) -> dict:
    (info, layers, t, dispatch_s), t0 = self._args, time.perf_counter()
    info, n = np.asarray(jax.device_get(info)), len(layers)
    seconds = {"wait_s": (time.perf_counter() - t0) / n, "dispatch_s": dispatch_s / n}
    per_layer = [layer.account(row, t=t, **seconds) for layer, row in zip(layers, info)]
    return {**_sum_stats(per_layer), "per_layer": per_layer}

  __getitem__ = lambda self, key: self.stats[key]
  __iter__ = lambda self: iter(self.stats)
  __len__ = lambda self: len(self.stats)


@dataclasses.dataclass
class OffloadStats:
  """Transfers of an offloaded generation: ``per_step`` (per decode step, summed over the NOSA
  layers: :data:`~.layer.STAT_KEYS` and ``hit_rate``), ``total`` (over all steps), ``per_layer``,
  ``slots``, ``host_memory_kind``, ``device_bytes`` (slots, tails, select states) and
  ``host_bytes`` (stores), at capacity."""

  per_step: list
  total: dict
  per_layer: list
  slots: int
  host_memory_kind: str
  device_bytes: int
  host_bytes: int


class OffloadedDecoder:
  """Prefill and per-step decoding of a ``DecoderLM`` (at least one ``nosa`` layer; the others
  decode device-resident) for ``batch`` rows of up to ``capacity`` tokens, cache ``dtype``
  (default: the layers'), ``num_slots`` per (sequence, KV head) besides the current block
  (default :func:`offload_slots`) and ``config`` (:class:`~.layer.OffloadConfig`). ``traces``
  counts the traces of each jitted piece; ``copy`` is the copy in use (``"xla"`` after the
  kernel failed to compile)."""

  def __init__(self, model, *, batch: int, capacity: int, dtype=None, num_slots=None, config=None):
    dec.check_decodable(model)
    kinds = tuple(blk.kind for blk in model.layers)
    if "nosa" not in kinds:
      raise ValueError(
        f"offload: expected a model with at least one 'nosa' layer, got kinds {sorted(set(kinds))}"
      )
    check_positive(batch=batch, capacity=capacity)
    config = OffloadConfig() if config is None else config
    if not isinstance(config, OffloadConfig):
      raise ValueError(f"config: expected an OffloadConfig, got {type(config).__name__}")
    self.model, self.batch, self.capacity, self.dtype = model, batch, capacity, dtype
    self.config, self.copy, self._copy_checked = config, config.copy, False
    self.num_slots = offload_slots(model.config, capacity) if num_slots is None else num_slots
    check_positive(num_slots=self.num_slots)
    self.traces = {"embed": 0, "prefill": 0, "logits": 0, "step": 0}
    self.scale = float(model.config.nsa.scale(model.config.head_dim))
    self._graphdef, state = nnx.split(model)
    self._params, self._params_def = jax.tree.flatten(state)  # once: nnx flattens in Python
    self._layers = [nnx.split(blk) for blk in model.layers]
    donate = (5,) if jax.devices()[0].platform != "cpu" else ()  # the states
    self._embed = self._counted("embed", lambda d, p, tokens: d._model(p).embed(tokens))
    self._prefill = self._counted("prefill", lambda d, *a: _prefill_layer(*a), (0, 2))
    last = lambda d, p, x: dec._logits(d._model(p), x[:, -1:])[:, 0]
    self._logits = self._counted("logits", last)
    self._step = self._counted("step", _step, (0, 1), donate)
    self._pending = None  # the step not yet accounted

  def _counted(self, name, fn, static=(), donate=()):
    """``fn(self, *args)`` jitted, its traces counted in :attr:`traces`."""

    def wrapped(*args):
      self.traces[name] += 1
      return fn(self, *args)

    return jax.jit(wrapped, static_argnums=static, donate_argnums=donate)

  def _model(self, params):
    return nnx.merge(self._graphdef, jax.tree.unflatten(self._params_def, params))

  def _new_caches(self) -> list:
    """Per layer: ``[select state, OffloadedLayer]`` (NOSA) or the layer's decode cache."""
    c, caches = self.model.config, []
    for blk in self.model.layers:
      if blk.kind != "nosa":
        caches.append(blk.attn.init_cache(self.batch, self.capacity, self.dtype))
        continue
      dt = self.dtype or blk.attn.dtype
      sel = nd.init_select_state(
        self.batch, self.capacity, config=c.nsa, num_kv_heads=c.num_kv_heads, dk=c.head_dim,
        dtype=dt,
      )  # fmt: skip
      layer = OffloadedLayer(
        batch=self.batch, num_kv_heads=c.num_kv_heads, k_dim=c.head_dim, v_dim=c.dv,
        block_size=c.nsa.block_size, num_slots=self.num_slots, max_len=self.capacity, dtype=dt,
        config=self.config,
      )  # fmt: skip
      caches.append([sel, layer])
    return caches

  def prefill(self, tokens):
    """``tokens [B, T]`` (one length, ``T <= capacity``) -> ``(logits [B, V], caches)``."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[0] != self.batch or not 1 <= tokens.shape[1] <= self.capacity:
      raise ValueError(
        f"tokens: expected shape [B, T] with B = {self.batch} and 1 <= T <= "
        f"capacity = {self.capacity}, got {tokens.shape}"
      )
    caches, lengths = self._new_caches(), jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    x = self._embed(self._params, tokens)
    for i, ((gd, st), blk) in enumerate(zip(self._layers, self.model.layers)):
      nosa = isinstance(caches[i], list)
      x, state, kvc = self._prefill(
        gd, st, blk.kind, x, lengths, caches[i][0] if nosa else caches[i]
      )
      if nosa:
        caches[i][0] = state
        caches[i][1].prefill(*kvc)
      else:
        caches[i] = state
    return self._logits(self._params, x), caches

  def step(self, tokens, caches, pos: int):
    """Feeds ``tokens [B]`` at ``pos`` (the caches' length), updating ``caches`` in place:
    ``(logits [B, V], stats)``. Rolls tails over, dispatches ONE jitted call, then reads back the
    PREVIOUS step's counts (the only wait). ``stats`` (transfer counts summed over the NOSA
    layers, and ``"per_layer"``) are read at first access, the next step or :meth:`flush`, so a
    selection error is raised one step late. A kernel copy that does not compile falls back to
    the XLA copy (logged once)."""
    nosa = [c[1] for c in caches if isinstance(c, list)]
    if any(layer.length != pos for layer in nosa):
      raise ValueError(f"pos: expected the caches' length {nosa[0].length}, got {pos}")
    t0 = time.perf_counter()
    for layer in nosa:
      layer.roll_over()
    states = [(c[0], c[1].state) if isinstance(c, list) else c for c in caches]
    stores = [(c[1].store.kv, c[1].store.c) if isinstance(c, list) else None for c in caches]
    args = (self._params, jnp.asarray(tokens, jnp.int32), jnp.int32(pos), states, stores)
    host = nosa[0].store.host
    try:
      logits, states, info = self._step(host, self.copy, *args)
    except Exception as e:
      if self.copy != "kernel" or self._copy_checked:
        raise
      err = str(e).splitlines()[0]
      log.warning(f"offload: the step with copy='kernel' does not compile ({err}); using 'xla'")
      self.copy = "xla"
      logits, states, info = self._step(host, self.copy, *args)
    self._copy_checked = True
    for i, state in enumerate(states):
      if isinstance(caches[i], list):
        caches[i][0] = state[0]
        caches[i][1].adopt(state[1])
      else:
        caches[i] = state
    stats = _PendingStats(info, nosa, pos, time.perf_counter() - t0)
    self.flush()
    self._pending = stats
    return logits, stats

  def flush(self) -> None:
    """Reads back and accounts the last step's counts, raising its selection's errors."""
    pending, self._pending = self._pending, None
    if pending is not None:
      _ = pending.stats  # reads back and accounts

  def summarize(self, caches, per_step: list) -> OffloadStats:
    """:class:`OffloadStats` of a run (``per_step`` from :meth:`step`)."""
    self.flush()
    nosa = [c for c in caches if isinstance(c, list)]
    dev = sum(dec.cache_bytes((s, *x.state[:2], *x.state[3:5])) for s, x in nosa)
    steps = [{k: v for k, v in s.items() if k != "per_layer"} for s in per_step]
    per_layer = [_sum_stats([x.totals]) for _, x in nosa]
    host = sum(x.store.nbytes for _, x in nosa)
    return OffloadStats(
      steps, _sum_stats(steps), per_layer, self.num_slots, nosa[0][1].store.kind, dev, host
    )


def generate_offloaded(decoder: OffloadedDecoder, tokens, max_new_tokens: int, *, sample, keys):
  """Generation from ``tokens [B, T]`` with ``sample(logits, key) -> [B]``, one of ``keys`` per
  new token: ``(new tokens [B, N] numpy, prefill_s, decode_s, OffloadStats)``."""
  t0 = time.perf_counter()
  logits, caches = decoder.prefill(tokens)
  logits.block_until_ready()
  prefill_s, pos = time.perf_counter() - t0, tokens.shape[1]
  out, per_step = [sample(logits, keys[0])], []
  t0 = time.perf_counter()
  for i in range(1, max_new_tokens):
    logits, stats = decoder.step(out[-1], caches, pos + i - 1)
    out.append(sample(logits, keys[i]))
    per_step.append(stats)
  jax.block_until_ready(out)
  decode_s = time.perf_counter() - t0
  new = np.stack([np.asarray(t) for t in out], axis=1)
  return new, prefill_s, decode_s, decoder.summarize(caches, per_step)
