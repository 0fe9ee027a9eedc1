"""Offloaded NOSA decoding of a ``DecoderLM``: every NOSA layer's K/V/c in pinned host memory.

The device keeps per NOSA layer the selection state
(:class:`~sparse_attention_jax.ops.nosa.decode.NOSASelectState`), the block slots and the current
block of every (sequence, KV head) (:class:`~sparse_attention_jax.offload.layer.OffloadedLayer`).
The prefill runs layer by layer (each NOSA layer's K/V/c go to its host store before the next
layer runs); each decode step is ONE jitted call over every layer, a NOSA layer running its
selection and :func:`~sparse_attention_jax.offload.layer.layer_step` between its projections;
the host only rolls completed tail blocks over to the stores (every ``l'`` tokens) and reads a
step's counts back one step later, so its dispatch overlaps the device's work. The tokens equal
the device-resident decode's. Limits: the rows of a batch share one length (prompts of equal
lengths); one document per sequence.
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
from sparse_attention_jax.offload.config import OffloadConfig, check_positive
from sparse_attention_jax.offload.layer import STAT_KEYS, OffloadedLayer, layer_step
from sparse_attention_jax.ops.nosa.decode import (
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


def _sum_stats(stats: list) -> dict:
  out = {key: sum(s[key] for s in stats) for key in STAT_KEYS}
  return {**out, "hit_rate": out["hits"] / out["requested"] if out["requested"] else 1.0}


class _Head(nnx.Module):
  """The embedding, final norm and LM head of a model (shared with it, not copied)."""

  def __init__(self, embed, final_norm, lm_head):
    self.embed, self.final_norm, self.lm_head = embed, final_norm, lm_head

  def logits(self, x):
    x = self.final_norm(x)
    return self.embed.attend(x) if self.lm_head is None else self.lm_head(x).astype(jnp.float32)


@dataclasses.dataclass(eq=False)  # hashed by identity: a free jit key (no GraphDef hashing)
class _Static:
  """The static argument of the traced calls: graph definitions, kinds, parameter tree and the
  step's options."""

  head_gd: object
  gds: tuple
  kinds: tuple
  params_def: object
  capacity: int
  chunk: int
  scale: float


def _mlp(blk, x, y):
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype)


def _embed(gd, st, tokens):
  return nnx.merge(gd, st).embed(tokens)


def _last_logits(gd, st, x):
  return nnx.merge(gd, st).logits(x[:, -1:])[:, 0]


def _prefill_layer(gd, st, kind, x, lengths, state):
  """One layer of the prompt ``x [B, T, d]``; ``state``: a NOSA layer's select state, else the
  layer's cache. Returns ``(x, state, kvc)``, ``kvc = (k [B, T, H, Dk], v [B, T, H, Dv],
  c [B, T, H])`` for a NOSA layer (for its host store), else ``None``. One call per layer, so a
  layer's K/V/c reach its host store before the next layer runs."""
  blk, kvc = nnx.merge(gd, st), None
  if kind == "nosa":
    y, k, v, c = blk.attn.prefill_outputs(blk.attn_norm(x))
    state = fill_select_state(state, config=blk.attn.config.nsa, lengths=lengths, k=k, c=c)
    kvc = (k, v, c)
  else:
    y, state = blk.attn.prefill(blk.attn_norm(x), lengths, state)
  return _mlp(blk, x, y), state, kvc


def _step(static, host, copy, params, tokens, t, states, stores):
  """One decode step: ``tokens [B]`` at position ``t``. ``states[i]`` is ``(select state,
  LayerState)`` for a NOSA layer (``stores[i] = (kv, c)``, its host arrays), else the layer's
  cache (``stores[i] = None``). Returns ``(logits [B, V], states, info [L_nosa, 5])``."""
  head_st, sts = jax.tree.unflatten(static.params_def, params)
  head = nnx.merge(static.head_gd, head_st)
  pos = jnp.full(tokens.shape, t, jnp.int32)
  x, out, infos = head.embed(tokens[:, None]), [], []
  for gd, st, state, store in zip(static.gds, sts, states, stores):
    blk = nnx.merge(gd, st)
    if store is None:
      y, state = blk.attn.decode(blk.attn_norm(x), pos, state)
    else:
      attn, (sel, layer) = blk.attn, state
      q, k, v, c = attn.qkvc(blk.attn_norm(x), pos[:, None])
      cfg, kq = decode_budgets(attn.config.nsa, attn.query_selected, static.capacity)
      sel = update_select_state(sel, config=cfg, pos=pos, k=k[:, 0], c=c[:, 0])
      gamma = select_at(
        sel, q[:, 0], config=cfg, num_query_selected=kq, pos=pos, capacity=static.capacity
      )
      kv_t = jnp.concatenate([k[:, 0], v[:, 0].astype(k.dtype)], axis=-1)
      o, layer, info = layer_step(
        layer, *store, kv_t, c[:, 0], gamma, q[:, 0], t, chunk=static.chunk, scale=static.scale,
        host=host, copy=copy,
      )  # fmt: skip
      y, state = attn.o_proj(o[:, None]), (sel, layer)
      infos.append(info)
    x = _mlp(blk, x, y)
    out.append(state)
  return head.logits(x)[:, 0], out, jnp.stack(infos)


class _PendingStats(Mapping):
  """The stats of :meth:`OffloadedDecoder.step`: the counts stay on the device until read (any
  access, the next step or ``flush``); then every NOSA layer accounts them
  (:meth:`~sparse_attention_jax.offload.layer.OffloadedLayer.account`, raising the selection's
  errors)."""

  def __init__(self, info, layers, t: int, dispatch_s: float):
    self._info, self._layers, self._t, self._dispatch_s = info, layers, t, dispatch_s
    self._stats = None

  def resolve(self) -> dict:
    if self._stats is None:
      t0 = time.perf_counter()
      info = np.asarray(jax.device_get(self._info))
      n, wait = len(self._layers), time.perf_counter() - t0
      per_layer = [
        layer.account(row, t=self._t, wait_s=wait / n, dispatch_s=self._dispatch_s / n)
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
  the NOSA layers: :data:`~sparse_attention_jax.offload.layer.STAT_KEYS` and ``hit_rate``),
  ``total`` (the same over all steps), ``per_layer`` (totals of each NOSA layer), ``slots``
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
    model: a ``DecoderLM`` with at least one ``nosa`` layer (the other kinds decode
      device-resident as usual).
    batch, capacity: rows and most tokens per row.
    dtype: cache dtype (default: the layers' compute dtype).
    num_slots: device slots per (sequence, KV head) besides the current block (default
      :func:`offload_slots`); fewer than a selection needs is an error at the step that needs
      them.
    config: :class:`~sparse_attention_jax.offload.config.OffloadConfig` (default
      ``OffloadConfig()``).

  Attributes:
    traces: how often each jitted piece was traced (``prefill``: once per layer kind).
    copy: the copy in use (``config.copy``, or ``"xla"`` after the kernel failed to compile).
  """

  def __init__(self, model, *, batch: int, capacity: int, dtype=None, num_slots=None, config=None):
    dec.check_decodable(model)
    kinds = tuple(blk.kind for blk in model.layers)
    if "nosa" not in kinds:
      raise ValueError(
        f"offload: expected a model with at least one 'nosa' layer, got kinds {sorted(set(kinds))}"
      )
    check_positive(
      batch=batch, capacity=capacity, **({} if num_slots is None else {"num_slots": num_slots})
    )
    config = OffloadConfig() if config is None else config
    if not isinstance(config, OffloadConfig):
      raise ValueError(f"config: expected an OffloadConfig, got {type(config).__name__}")
    self.model, self.batch, self.capacity, self.dtype = model, batch, capacity, dtype
    self.config, self.copy = config, config.copy
    self.num_slots = num_slots or offload_slots(model.config, capacity)
    self.traces = {"embed": 0, "prefill": 0, "logits": 0, "step": 0}
    self._copy_checked = False  # a step ran with self.copy
    head_gd, head_st = nnx.split(_Head(model.embed, model.final_norm, model.lm_head))
    gds, sts = zip(*(nnx.split(blk) for blk in model.layers))
    # The parameters as one flat list, flattened once (nnx states flatten in Python).
    self._params, params_def = jax.tree.flatten((head_st, list(sts)))
    self._head_st = head_st
    scale = float(model.config.nsa.scale(model.config.head_dim))
    self._static = _Static(head_gd, gds, kinds, params_def, capacity, config.chunk, scale)
    donate = (6,) if jax.devices()[0].platform != "cpu" else ()  # the states
    self._embed = self._counted("embed", _embed, (0,))
    self._prefill = self._counted("prefill", _prefill_layer, (0, 2))
    self._logits = self._counted("logits", _last_logits, (0,))
    self._sts = sts
    self._step = self._counted("step", _step, (0, 1, 2), donate)
    self._pending = None  # the step not yet accounted

  def _counted(self, name, fn, static, donate=()):
    def wrapped(*args):
      self.traces[name] += 1
      return fn(*args)

    return jax.jit(wrapped, static_argnums=static, donate_argnums=donate)

  def _new_caches(self, dtype):
    """Per layer: ``[select state, OffloadedLayer]`` (NOSA) or the layer's decode cache."""
    c, caches = self.model.config, []
    for blk in self.model.layers:
      if blk.kind != "nosa":
        caches.append(blk.attn.init_cache(self.batch, self.capacity, dtype))
        continue
      dt = dtype or blk.attn.dtype
      sel = init_select_state(
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
    """``tokens [B, T]`` (one length for every row, ``T <= capacity``) -> ``(logits [B, V],
    caches)``; the NOSA layers' K/V/c go to the host stores."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if b != self.batch or not 1 <= t <= self.capacity:
      raise ValueError(
        f"tokens: expected shape [B, T] with B = {self.batch} and 1 <= T <= "
        f"capacity = {self.capacity}, got {tokens.shape}"
      )
    caches, static = self._new_caches(self.dtype), self._static
    lengths = jnp.full((b,), t, jnp.int32)
    x = self._embed(static.head_gd, self._head_st, tokens)
    for i, (gd, st, kind) in enumerate(zip(static.gds, self._sts, static.kinds)):
      state = caches[i][0] if kind == "nosa" else caches[i]
      x, state, kvc = self._prefill(gd, st, kind, x, lengths, state)
      if kind == "nosa":
        caches[i][0] = state
        caches[i][1].prefill(*kvc)
      else:
        caches[i] = state
    return self._logits(static.head_gd, self._head_st, x), caches

  def step(self, tokens, caches, pos: int):
    """Feeds ``tokens [B]`` at position ``pos`` (the caches' length, ``< capacity``); returns
    ``(logits [B, V], stats)`` (``caches`` are updated in place).

    Rolls completed tails over to the host stores, dispatches ONE jitted call, then reads back
    the PREVIOUS step's counts (the only wait for the device). ``stats`` (the step's transfer
    counts summed over the NOSA layers, and ``stats["per_layer"]``) reads this step's counts when
    first accessed, else at the next step, :meth:`flush` or :meth:`summarize`; a selection error
    (too many blocks for the slots) is raised there, one step late. If the kernel copy does not
    compile, logs it once and uses the XLA copy.
    """
    if not 0 <= pos < self.capacity:
      raise ValueError(f"pos: expected 0 <= pos < capacity = {self.capacity}, got {pos}")
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
      logits, states, info = self._step(self._static, host, self.copy, *args)
    except Exception as e:
      if self.copy != "kernel" or self._copy_checked:
        raise
      log.warning(
        "offload: the step with copy='kernel' does not compile on %s (%s); using copy='xla'",
        jax.devices()[0].platform,
        str(e).splitlines()[0],
      )
      self.copy = "xla"
      logits, states, info = self._step(self._static, host, self.copy, *args)
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
    """Reads back and accounts the last step's counts (waits for it); raises the errors of its
    selection (see :meth:`step`)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.resolve()

  def summarize(self, caches, per_step: list) -> OffloadStats:
    """:class:`OffloadStats` of a run (``per_step`` from :meth:`step`)."""
    self.flush()
    nosa = [c for c in caches if isinstance(c, list)]
    dev = sum(dec.cache_bytes((s, *x.state[:2], *x.state[3:5])) for s, x in nosa)
    steps = [{k: v for k, v in s.items() if k != "per_layer"} for s in per_step]
    return OffloadStats(
      steps,
      _sum_stats(steps),
      [_sum_stats([x.totals]) for _, x in nosa],
      self.num_slots,
      nosa[0][1].store.memory_kind,
      dev,
      sum(x.store.nbytes for _, x in nosa),
    )


def generate_offloaded(decoder: OffloadedDecoder, tokens, max_new_tokens: int, *, sample, keys):
  """Greedy/sampled generation with ``decoder``: ``tokens [B, T]`` prompts of one length,
  ``sample(logits, key) -> [B]`` (jitted), ``keys`` one PRNG key per new token. Returns
  ``(new tokens [B, N] numpy, prefill_s, decode_s, OffloadStats)`` (times include any
  compilation: warm the decoder up first to time steady state)."""
  t0 = time.perf_counter()
  logits, caches = decoder.prefill(tokens)
  logits.block_until_ready()
  prefill_s = time.perf_counter() - t0
  out, per_step, pos = [sample(logits, keys[0])], [], tokens.shape[1]
  t0 = time.perf_counter()
  for i in range(1, max_new_tokens):
    logits, stats = decoder.step(out[-1], caches, pos + i - 1)
    out.append(sample(logits, keys[i]))
    per_step.append(stats)
  jax.block_until_ready(out)
  decode_s = time.perf_counter() - t0
  new = np.stack([np.asarray(t) for t in out], axis=1)
  return new, prefill_s, decode_s, decoder.summarize(caches, per_step)


__all__ = ["OffloadStats", "OffloadedDecoder", "generate_offloaded", "offload_slots"]
