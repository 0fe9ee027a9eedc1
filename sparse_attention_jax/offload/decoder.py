"""Offloaded NOSA decoding of a ``DecoderLM``: every NOSA layer's K/V/c in host memory.

The device keeps per NOSA layer the selection state (a ring of the last ``l`` keys, the
compressed keys and the query-agnostic block scores,
:class:`~sparse_attention_jax.ops.nosa_decode.NOSASelectState`), the block slots and the current
block of every (sequence, KV head) (:class:`~sparse_attention_jax.offload.layer.OffloadedLayer`).
A decode step is ONE jitted call: every layer in order, a NOSA layer running its selection, slot
plan, copy of the missing blocks from the pinned host store and attention
(:func:`~sparse_attention_jax.offload.layer.layer_step`) between its projections; the host only
rolls completed tail blocks over to the stores (every ``l'`` tokens) and reads the step's counts
back one step later, so the host's dispatch overlaps the device's work.

The tokens equal the device-resident decode's (same selection code, same biased attention),
which the tests check. Limits: the rows of a batch share one length, so prompts must have equal
lengths; one document per sequence.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.offload.config import OffloadConfig
from sparse_attention_jax.offload.layer import STAT_KEYS, OffloadedLayer, layer_step
from sparse_attention_jax.ops.nosa_decode import (
  decode_budgets,
  fill_select_state,
  init_select_state,
  select_at,
  update_select_state,
)

log = logging.getLogger("sparse_attention_jax.offload")


def offload_slots(config, capacity: int) -> int:
  """Device block slots per (sequence, KV head) besides the current block: ``k - 1`` (``k``
  clamped to the capacity's blocks) when every selection holds the current block (forced local
  blocks, or a budget covering every block), else ``k``."""
  cfg = config.nsa.for_length(capacity)
  always_current = config.nsa.num_local_blocks >= 1 or cfg.num_selected >= cfg.num_blocks(capacity)
  return max(1, cfg.num_selected - (1 if always_current else 0))


def _sum_stats(stats: list[dict]) -> dict:
  out = {key: sum(s[key] for s in stats) for key in STAT_KEYS}
  out["hit_rate"] = out["hits"] / out["requested"] if out["requested"] else 1.0
  return out


# ------------------------------------------------------------------------ traced pieces
def _nosa_prefill(gd, st, x, lengths, sel):
  blk = nnx.merge(gd, st)
  y, k, v, c = blk.attn.prefill_outputs(blk.attn_norm(x))
  sel = fill_select_state(sel, config=blk.attn.config.nsa, lengths=lengths, k=k, c=c)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), k, v, c, sel


def _other_prefill(gd, st, x, lengths, cache):
  blk = nnx.merge(gd, st)
  y, cache = blk.attn.prefill(blk.attn_norm(x), lengths, cache)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), cache


def _nosa_layer(gd, st, x, pos, sel, layer, store, *, capacity, t, chunk, scale, host, copy):
  """One NOSA layer of a step: projections, selection, :func:`layer_step`, ``o_proj`` and MLP."""
  blk = nnx.merge(gd, st)
  attn = blk.attn
  q, k, v, c = attn.qkvc(blk.attn_norm(x), pos[:, None])
  cfg, kq = decode_budgets(attn.config.nsa, attn.query_selected, capacity)
  sel = update_select_state(sel, config=cfg, pos=pos, k=k[:, 0], c=c[:, 0])
  gamma = select_at(sel, q[:, 0], config=cfg, num_query_selected=kq, pos=pos, capacity=capacity)
  kv_t = jnp.concatenate([k[:, 0], v[:, 0].astype(k.dtype)], axis=-1)
  o, layer, info = layer_step(
    layer,
    *store,
    kv_t,
    c[:, 0],
    gamma,
    q[:, 0],
    t,
    chunk=chunk,
    k_dim=k.shape[-1],
    scale=scale,
    host=host,
    copy=copy,
  )
  x = x + attn.o_proj(o[:, None]).astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), sel, layer, info


def _other_step(gd, st, x, pos, cache):
  blk = nnx.merge(gd, st)
  y, cache = blk.attn.decode(blk.attn_norm(x), pos, cache)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), cache


class _Head(nnx.Module):
  """The embedding, final norm and LM head of a model (shared with it, not copied)."""

  def __init__(self, embed, final_norm, lm_head):
    self.embed, self.final_norm, self.lm_head = embed, final_norm, lm_head


def _embed(gd, st, tokens):
  return nnx.merge(gd, st).embed(tokens)


def _logits(gd, st, x):
  h = nnx.merge(gd, st)
  x = h.final_norm(x)
  if h.lm_head is None:
    return h.embed.attend(x)
  return h.lm_head(x).astype(jnp.float32)


class _Structure:
  """The graph definitions of the head and the layers and the tree of the flat parameters, one
  static argument of the step. Hashed and compared by identity (the default), so jit's key costs
  nothing per call (hashing a GraphDef per layer would cost about a millisecond per step)."""

  def __init__(self, head_gd, gds, params_def):
    self.head_gd, self.gds, self.params_def = head_gd, gds, params_def


def _step(structure, capacity, chunk, scale, host, copy, params, tokens, t, states, stores):
  """One decode step of the whole model as ONE traced computation. ``states[i]`` is ``(select
  state, LayerState)`` for a NOSA layer (``stores[i] = (kv, c)`` host arrays), else the layer's
  cache (``stores[i] = None``). ``params``: the leaves of the head's and the layers' parameter
  states (``structure.params_def`` their tree). Returns ``(logits [B, V], states, info
  [L_nosa, 5])``."""
  head_st, sts = jax.tree.unflatten(structure.params_def, params)
  posv = jnp.full(tokens.shape, t, jnp.int32)
  x = _embed(structure.head_gd, head_st, tokens[:, None])
  out, infos = [], []
  for gd, st, state, store in zip(structure.gds, sts, states, stores):
    if store is None:
      x, state = _other_step(gd, st, x, posv, state)
    else:
      x, sel, layer, info = _nosa_layer(
        gd,
        st,
        x,
        posv,
        *state,
        store,
        capacity=capacity,
        t=t,
        chunk=chunk,
        scale=scale,
        host=host,
        copy=copy,
      )
      state = (sel, layer)
      infos.append(info)
    out.append(state)
  return _logits(structure.head_gd, head_st, x)[:, 0], out, jnp.stack(infos)


class _PendingStats(Mapping):
  """The stats :meth:`OffloadedDecoder.step` returns: the step's counts stay on the device until
  read (any access, the next step or ``flush``), then every NOSA layer accounts them
  (:meth:`~sparse_attention_jax.offload.layer.OffloadedLayer.account`, which raises the
  selection's errors)."""

  def __init__(self, info, layers, t: int, *, dispatch_s: float):
    self._info, self._layers, self._t, self._dispatch_s = info, layers, t, dispatch_s
    self._stats = None

  def resolve(self) -> dict:
    if self._stats is None:
      t0 = time.perf_counter()
      info = np.asarray(jax.device_get(self._info))
      wait, dispatch = (time.perf_counter() - t0, self._dispatch_s)
      n = len(self._layers)
      per_layer = [
        layer.account(row, t=self._t, wait_s=wait / n, dispatch_s=dispatch / n)
        for layer, row in zip(self._layers, info)
      ]
      self._stats = {**_sum_stats(per_layer), "per_layer": per_layer}
    return self._stats

  def __getitem__(self, key):
    return self.resolve()[key]

  def __iter__(self):
    return iter(self.resolve())

  def __len__(self):
    return len(self.resolve())


@dataclasses.dataclass
class OffloadStats:
  """Transfers of an offloaded generation: ``per_step`` (one dict per decode step, summed over
  the NOSA layers: requested, hits, transferred, hit_rate, bytes, wait_s, dispatch_s), ``total``
  (the same over all steps), ``per_layer`` (totals of each NOSA layer, in order), ``slots``
  (device slots per sequence and KV head), ``host_memory_kind``, ``device_bytes`` /
  ``host_bytes`` (the NOSA layers' slot pools and select states / host stores, at capacity)."""

  per_step: list
  total: dict
  per_layer: list
  slots: int
  host_memory_kind: str
  device_bytes: int
  host_bytes: int


class OffloadedDecoder:
  """Prefill and per-step decoding of a ``DecoderLM`` with its NOSA layers offloaded.

  Args:
    model: a ``DecoderLM`` with at least one ``nosa`` layer; every kind implements the decode
      protocol (the non-NOSA layers decode device-resident as usual).
    batch, capacity: rows and most tokens per row.
    dtype: cache dtype (default: the layers' compute dtype).
    num_slots: device slots per (sequence, KV head) besides the current block (default
      :func:`offload_slots`); fewer than a selection needs is an error at the first step that
      needs them.
    config: :class:`~sparse_attention_jax.offload.config.OffloadConfig` (the block copy;
      default ``OffloadConfig()``).

  Attributes:
    traces: how often each jitted piece was traced (``embed``, ``logits``, ``nosa_prefill``,
      ``other_prefill``, ``step``).
    copy: the copy in use (``config.copy``, or ``"xla"`` after the kernel failed to compile).
  """

  def __init__(
    self,
    model,
    *,
    batch: int,
    capacity: int,
    dtype=None,
    num_slots: int | None = None,
    config: OffloadConfig | None = None,
  ):
    dec.check_decodable(model)
    kinds = [blk.kind for blk in model.layers]
    if "nosa" not in kinds:
      raise ValueError(
        f"offload: expected a model with at least one 'nosa' layer, got kinds {sorted(set(kinds))}"
      )
    for name, val in (("batch", batch), ("capacity", capacity), ("num_slots", num_slots)):
      if val is None and name == "num_slots":
        continue
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name}: expected a positive int, got {val!r}")
    config = OffloadConfig() if config is None else config
    if not isinstance(config, OffloadConfig):
      raise ValueError(f"config: expected an OffloadConfig, got {type(config).__name__}")
    self.model, self.batch, self.capacity, self.dtype = model, batch, capacity, dtype
    self.config, self.copy = config, config.copy
    self.model_config = model.config
    self.num_slots = offload_slots(model.config, capacity) if num_slots is None else num_slots
    self.traces = dict.fromkeys(("embed", "logits", "nosa_prefill", "other_prefill", "step"), 0)
    self._blocks = [nnx.split(blk) for blk in model.layers]
    self._copy_checked = False  # a step ran with self.copy
    self._head_gd, self._head_st = nnx.split(_Head(model.embed, model.final_norm, model.lm_head))
    donate = (9,) if jax.devices()[0].platform != "cpu" else ()  # the states
    self._fns = {
      "embed": self._counted("embed", _embed, (0,)),
      "logits": self._counted("logits", _logits, (0,)),
      "nosa_prefill": self._counted("nosa_prefill", _nosa_prefill, (0,)),
      "other_prefill": self._counted("other_prefill", _other_prefill, (0,)),
      "step": self._counted("step", _step, tuple(range(6)), donate),
    }
    # The parameters as one flat list, flattened once (nnx states flatten in Python).
    self._params, params_def = jax.tree.flatten((self._head_st, [st for _, st in self._blocks]))
    self._structure = _Structure(self._head_gd, tuple(gd for gd, _ in self._blocks), params_def)
    self._pending = None  # the step not yet accounted

  def _counted(self, name, fn, static, donate=()):
    def wrapped(*args):
      self.traces[name] += 1
      return fn(*args)

    return jax.jit(wrapped, static_argnums=static, donate_argnums=donate)

  def _new_caches(self, dtype):
    caches = []
    for blk in self.model.layers:
      a, c = blk.attn, self.model_config
      if blk.kind == "nosa":
        dt = dtype or a.dtype
        sel = init_select_state(
          self.batch,
          self.capacity,
          config=c.nsa,
          num_kv_heads=c.num_kv_heads,
          dk=c.head_dim,
          dtype=dt,
        )
        layer = OffloadedLayer(
          batch=self.batch,
          num_kv_heads=c.num_kv_heads,
          k_dim=c.head_dim,
          v_dim=c.dv,
          block_size=c.nsa.block_size,
          num_slots=self.num_slots,
          max_len=self.capacity,
          dtype=dt,
          config=self.config,
        )
        caches.append([sel, layer])
      else:
        caches.append(a.init_cache(self.batch, self.capacity, dtype))
    return caches

  def prefill(self, tokens):
    """``tokens [B, T]`` (one length for every row, ``T <= capacity``) -> ``(logits [B, V],
    caches)``; the NOSA layers' K/V/c go to the host stores."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if b != self.batch or not 1 <= t <= self.capacity:
      raise ValueError(
        f"tokens: expected shape [B, T] with B = {self.batch} and 1 <= T <= "
        f"capacity = {self.capacity}, got {tokens.shape}"
      )
    caches = self._new_caches(self.dtype)
    lengths = jnp.full((b,), t, jnp.int32)
    x = self._fns["embed"](self._head_gd, self._head_st, tokens)
    for i, (gd, st) in enumerate(self._blocks):
      if isinstance(caches[i], list):
        x, k, v, c, caches[i][0] = self._fns["nosa_prefill"](gd, st, x, lengths, caches[i][0])
        caches[i][1].prefill(k, v, c)
      else:
        x, caches[i] = self._fns["other_prefill"](gd, st, x, lengths, caches[i])
    return self._fns["logits"](self._head_gd, self._head_st, x[:, -1:])[:, 0], caches

  def step(self, tokens, caches, pos: int):
    """Feeds ``tokens [B]`` at position ``pos`` (host int, the caches' length, ``< capacity``);
    returns ``(logits [B, V], stats)`` (``caches`` are updated in place).

    Rolls completed tails over to the host stores, then ONE jitted call for the token; then the
    PREVIOUS step's counts are read back (the only wait for the device). ``stats`` (the step's
    transfer counts summed over the NOSA layers, and ``stats["per_layer"]``) is a mapping that
    reads the counts back when first read, else at the next step or at :meth:`flush` /
    :meth:`summarize`; a selection error (too many blocks for the slots) is raised there, one
    step late. If the kernel copy does not compile, logs it once and uses the XLA copy.
    """
    if not 0 <= pos < self.capacity:
      raise ValueError(f"pos: expected 0 <= pos < capacity = {self.capacity}, got {pos}")
    nosa = [c[1] for c in caches if isinstance(c, list)]
    if any(layer.length != pos for layer in nosa):
      raise ValueError(f"pos: expected the caches' length {nosa[0].length}, got {pos}")
    t0 = time.perf_counter()
    for layer in nosa:
      layer.roll_over()
    states = [(c[0], c[1].state()) if isinstance(c, list) else c for c in caches]
    stores = [(c[1].store.kv, c[1].store.c) if isinstance(c, list) else None for c in caches]
    scale = float(self.model_config.nsa.scale(self.model_config.head_dim))

    def call():
      return self._fns["step"](
        self._structure,
        self.capacity,
        self.config.chunk,
        scale,
        nosa[0].store.host,
        self.copy,
        self._params,
        jnp.asarray(tokens, jnp.int32),
        jnp.int32(pos),
        states,
        stores,
      )

    try:
      logits, states, info = call()
    except Exception as e:
      if self.copy != "kernel" or self._copy_checked:
        raise
      log.warning(
        "offload: the step with copy='kernel' does not compile on %s (%s); using copy='xla'",
        jax.devices()[0].platform,
        str(e).splitlines()[0],
      )
      self.copy = "xla"
      logits, states, info = call()
    self._copy_checked = True
    for i, state in enumerate(states):
      if isinstance(caches[i], list):
        caches[i][0] = state[0]
        caches[i][1].adopt(state[1])
      else:
        caches[i] = state
    stats = _PendingStats(info, nosa, pos, dispatch_s=time.perf_counter() - t0)
    self.flush()
    self._pending = stats
    return logits, stats

  def flush(self) -> None:
    """Reads back and accounts the last step's counts (waits for it); raises the errors of its
    selection (see :meth:`step`)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.resolve()

  def summarize(self, caches, per_step: list) -> OffloadStats:
    """:class:`OffloadStats` of a run (``per_step`` from :meth:`step`)."""
    self.flush()
    nosa = [c for c in caches if isinstance(c, list)]
    dev = sum(
      dec.cache_bytes((sel, layer.slot_kv, layer.slot_c, layer.tail_kv, layer.tail_c))
      for sel, layer in nosa
    )
    per_layer = [_sum_stats([layer.totals]) for _, layer in nosa]
    steps = [{k: v for k, v in s.items() if k != "per_layer"} for s in per_step]
    return OffloadStats(
      steps,
      _sum_stats(steps),
      per_layer,
      self.num_slots,
      nosa[0][1].host_memory_kind,
      dev,
      sum(layer.host_bytes for _, layer in nosa),
    )


def generate_offloaded(
  decoder: OffloadedDecoder, tokens: np.ndarray, max_new_tokens: int, *, sample, keys
):
  """Greedy/sampled generation with ``decoder``: ``tokens [B, T]`` prompts of one length,
  ``sample(logits, key) -> [B]`` (jitted), ``keys`` one PRNG key per new token. Returns
  ``(new tokens [B, N] numpy, prefill_s, decode_s, OffloadStats)`` (times include any
  compilation: warm the decoder up first to time steady state)."""
  t0 = time.perf_counter()
  logits, caches = decoder.prefill(tokens)
  logits.block_until_ready()
  prefill_s = time.perf_counter() - t0
  tok = sample(logits, keys[0])
  out, per_step = [tok], []
  pos = tokens.shape[1]
  t0 = time.perf_counter()
  for i in range(1, max_new_tokens):
    logits, stats = decoder.step(tok, caches, pos)
    tok = sample(logits, keys[i])
    out.append(tok)
    per_step.append(stats)
    pos += 1
  jax.block_until_ready(out)
  decode_s = time.perf_counter() - t0
  return (
    np.stack([np.asarray(t) for t in out], axis=1),
    prefill_s,
    decode_s,
    decoder.summarize(caches, per_step),
  )


__all__ = ["OffloadStats", "OffloadedDecoder", "generate_offloaded", "offload_slots"]
