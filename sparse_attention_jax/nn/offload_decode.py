"""Offloaded NOSA decoding: every NOSA layer's K/V/c lives in host memory
(:class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache`: one NumPy array per layer,
per-block ``pinned_host`` arrays with ``store="pinned_host"``, or one ``pinned_host`` array per
layer with ``store="pinned_array"``); the device keeps
per layer the selection state (a ring of the last ``l`` keys, the compressed keys and the
query-agnostic block scores, :class:`~sparse_attention_jax.ops.nosa.decode.NOSASelectState`), the
``k - 1`` block slots and the current block of every (sequence, KV head).

A decode step runs the model layer by layer from a host-side Python loop, because the block
bookkeeping between a NOSA layer's selection and its attention runs in NumPy on the host (with
``plan="device"`` it runs on the device and the host reads back only its counts)::

  x = embed(token)                                            # jitted
  for each layer:
    NOSA:   q, k, v, c, Gamma, sel = pre(x, pos, sel)          # jitted: q/k/v/c, compressed state,
                                                               #   InfLLM-V2 + agnostic selection
            cache.append(k, v, c); stats = cache.update(Gamma)  # host: copy ONLY missing blocks
            o = cache.attend(q)                                 # jitted: biased attention, slots
            x = post(x, o)                                      # jitted: o_proj, residual, MLP
    other:  x, cache = step(x, pos, cache)                      # jitted: the kind's decode
  next token = sample(logits(x))                               # jitted

Every piece is compiled once per layer kind/shape (not per layer, not per step); ``traces``
counts them. The slot scatter of the block cache compiles once per size bucket of copied blocks
(:func:`~sparse_attention_jax.nn.offload.bucket`); the decoder compiles every bucket up to a full
refill when it builds its first caches, so no timed step compiles. The tokens equal the
device-resident decode's (same selection code, same biased attention), which the tests check.
Per step the decoder reports, summed over the NOSA layers,
``requested`` (selected blocks besides the current one), ``hits`` (already resident),
``transferred`` (blocks copied host -> device), ``hit_rate``, ``bytes`` and the host seconds of
the block bookkeeping (``wait_s`` for the selection's read-back, ``plan_s``, ``gather_s``,
``put_s``; see :meth:`~sparse_attention_jax.nn.offload.OffloadedBlockCache.update`).

With ``plan="fused"`` (``store="pinned_array"``) the whole step is ONE jitted call: every NOSA
layer's selection, slot plan (:func:`~sparse_attention_jax.nn.offload.plan_slots_on_device`),
block copy (a Pallas kernel reading the missing blocks straight from the pinned host store,
:mod:`pallas_kernels.block_copy`, or XLA's host gather) and attention run inside it
(:func:`~sparse_attention_jax.nn.offload.layer_step`); the host only rolls completed tail
blocks over to the store (every ``l'`` tokens) and reads the step's counts back one step later.

Limits: the rows of a batch share one length (the block cache's bookkeeping), so prompts must
have equal lengths; one document per sequence; with plans ``"host"`` and ``"device"`` the
per-layer host round trip (``Gamma`` or the counts read back, the copies issued from Python)
costs latency that the fused plan avoids.
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
from sparse_attention_jax.nn.offload import (
  COPIES,
  MAX_SCATTER,
  PLANS,
  STAT_KEYS,
  TRANSFERS,
  OffloadedBlockCache,
  layer_step,
)
from sparse_attention_jax.nn.offload_store import STORES
from sparse_attention_jax.ops.nosa.decode import (
  decode_budgets,
  fill_select_state,
  init_select_state,
  select_at,
  update_select_state,
)

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------- jitted per-layer pieces
def _nosa_prefill(gd, st, x, lengths, sel):
  blk = nnx.merge(gd, st)
  y, k, v, c = blk.attn.prefill_outputs(blk.attn_norm(x))
  sel = fill_select_state(sel, config=blk.attn.config.nsa, lengths=lengths, k=k, c=c)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), k, v, c, sel


def _nosa_pre(gd, st, x, pos, sel, capacity):
  blk = nnx.merge(gd, st)
  attn = blk.attn
  q, k, v, c = attn.qkvc(blk.attn_norm(x), pos[:, None])
  cfg, kq = decode_budgets(attn.config.nsa, attn.query_selected, capacity)
  sel = update_select_state(sel, config=cfg, pos=pos, k=k[:, 0], c=c[:, 0])
  gamma = select_at(sel, q[:, 0], config=cfg, num_query_selected=kq, pos=pos, capacity=capacity)
  return q[:, 0], k[:, 0], v[:, 0], c[:, 0], gamma, sel


def _nosa_post(gd, st, x, o):
  blk = nnx.merge(gd, st)
  x = x + blk.attn.o_proj(o[:, None]).astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype)


def _other_prefill(gd, st, x, lengths, cache):
  blk = nnx.merge(gd, st)
  y, cache = blk.attn.prefill(blk.attn_norm(x), lengths, cache)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), cache


def _other_step(gd, st, x, pos, cache):
  blk = nnx.merge(gd, st)
  y, cache = blk.attn.decode(blk.attn_norm(x), pos, cache)
  x = x + y.astype(x.dtype)
  return x + blk.mlp(blk.mlp_norm(x)).astype(x.dtype), cache


# Plans of the decoder: the cache's (per-layer host loop) and "fused" (one jitted call per token).
DECODER_PLANS = (*PLANS, "fused")


class _Structure:
  """The graph definitions of the head and the layers and the tree of the flat parameters, one
  static argument of the fused step. Hashed and compared by identity (the default), so jit's key
  costs nothing per call: hashing 16 nnx GraphDefs took ~1.3 ms per step on the CPU machine."""

  def __init__(self, head_gd, gds, params_def):
    self.head_gd, self.gds, self.params_def = head_gd, gds, params_def


def _fused_step(structure, capacity, chunk, scale, host, copy, params, tokens, t, states, stores):
  """One decode step of the whole model as ONE traced computation (``plan="fused"``): every NOSA
  layer runs :func:`~sparse_attention_jax.nn.offload.layer_step` (selection, device plan, the
  host-memory gathers of its missing blocks, attention) between its projections. ``states[i]``
  is ``(select state, LayerState)`` for a NOSA layer (``stores[i] = (kv, c)`` host arrays), else
  the layer's cache (``stores[i] = None``). ``params``: the leaves of the head's and the layers'
  parameter states (``structure.params_def`` their tree). Returns ``(logits [B, V], states, info
  [L_nosa, 5])``."""
  head_gd, gds = structure.head_gd, structure.gds
  head_st, sts = jax.tree.unflatten(structure.params_def, params)
  posv = jnp.full(tokens.shape, t, jnp.int32)
  x = _embed(head_gd, head_st, tokens[:, None])
  out, infos = [], []
  for gd, st, state, store in zip(gds, sts, states, stores):
    if store is None:
      x, state = _other_step(gd, st, x, posv, state)
    else:
      sel, layer = state
      q, k, v, c, gamma, sel = _nosa_pre(gd, st, x, posv, sel, capacity)
      kv_t = jnp.concatenate([k, v.astype(k.dtype)], axis=-1)
      o, layer, info = layer_step(
        layer,
        *store,
        kv_t,
        c,
        gamma,
        q,
        t,
        chunk=chunk,
        k_dim=k.shape[-1],
        scale=scale,
        host=host,
        copy=copy,
      )
      x = _nosa_post(gd, st, x, o)
      state = (sel, layer)
      infos.append(info)
    out.append(state)
  return _logits(head_gd, head_st, x)[:, 0], out, jnp.stack(infos)


class _PendingStats(Mapping):
  """The stats :meth:`OffloadedDecoder.step` returns with ``plan="fused"``: the step's counts
  stay on the device until read (any access, the next step or ``flush``), then every NOSA
  layer's cache accounts them (``OffloadedBlockCache.account``, which raises the selection's
  errors) and this mapping holds what the other plans return."""

  def __init__(self, info, caches, t: int, *, dispatch_s: float):
    self._info, self._caches, self._t, self._dispatch_s = info, caches, t, dispatch_s
    self._stats = None

  def resolve(self) -> dict:
    if self._stats is None:
      t0 = time.perf_counter()
      info = np.asarray(jax.device_get(self._info))
      wait = (time.perf_counter() - t0) / len(self._caches)
      per_layer = [
        cache.account(row, t=self._t, wait_s=wait, plan_s=self._dispatch_s / len(self._caches))
        for cache, row in zip(self._caches, info)
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
  the NOSA layers: requested, hits, transferred, hit_rate, bytes), ``total`` (the same over all
  steps), ``per_layer`` (totals of each NOSA layer, in order), ``slots`` (device slots per
  sequence and KV head), ``host_memory_kind``, ``device_bytes`` / ``host_bytes`` (buffers of
  the NOSA layers' slot pools and select states / host block stores after the run; the NumPy
  store counts its whole ``capacity``)."""

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
    num_slots: device slots per (sequence, KV head) (default :func:`offload_slots`); fewer than
      a selection needs is an error at the first step that needs them.
    store: host block store of every NOSA layer, ``"numpy"`` (one contiguous array per layer),
      ``"pinned_host"`` (one pinned host array per block) or ``"pinned_array"`` (one pinned
      host array per layer, loaded by jitted gathers); see
      :class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache`.
    load_workers: threads fetching (gather + ``device_put``) a step's blocks side by side, per
      :class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache` (1 = none; None = a quarter
      of the CPUs, 1 to 4).
    transfer: ``"fresh"`` (a fresh host array per chunk) or ``"staged"`` (reused,
      DMA-registered staging buffers; NumPy store only); see
      :class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache`.
    plan: ``"host"`` (slot assignment in NumPy after reading the selection back),
      ``"device"`` (one jitted plan per layer and step, the host reads back only the counts;
      ``store="pinned_array"`` only; see
      :class:`~sparse_attention_jax.nn.offload.OffloadedBlockCache`) or ``"fused"``
      (``store="pinned_array"`` only): the whole token step, every layer with its selection,
      slot plan, host-memory gathers and attention, is ONE jitted call
      (:func:`~sparse_attention_jax.nn.offload.layer_step`); the host rolls completed tail
      blocks over to the store before a step that starts a block and reads back one int32
      ``[L, 5]`` of counts after it (the stats, and the errors of the other plans, raised after
      the step).
    copy: ``plan="fused"``: how the missing blocks move, ``"kernel"`` (default: a Pallas kernel
      reads them straight from the pinned host store into the slots,
      :mod:`pallas_kernels.block_copy`; if it does not compile, logged, then ``"xla"``) or
      ``"xla"`` (XLA's gather on the host store, run as host compute, in iterations of
      ``chunk`` blocks; see :func:`~sparse_attention_jax.nn.offload.layer_step`).
    chunk: ``plan="fused"``, ``copy="xla"``: most blocks one load iteration gathers per layer
      (the last one of a step is padded to the next of
      :func:`~sparse_attention_jax.nn.offload.step_sizes`).
  """

  def __init__(
    self,
    model,
    *,
    batch: int,
    capacity: int,
    dtype=None,
    num_slots: int | None = None,
    store: str = "numpy",
    load_workers: int | None = None,
    transfer: str = "fresh",
    plan: str = "host",
    copy: str = "kernel",
    chunk: int = MAX_SCATTER,
  ):
    dec.check_decodable(model)
    kinds = [blk.kind for blk in model.layers]
    if "nosa" not in kinds:
      raise ValueError(
        f"offload: expected a model with at least one 'nosa' layer, got kinds {sorted(set(kinds))}"
      )
    for name, val in (
      ("batch", batch),
      ("capacity", capacity),
      ("chunk", chunk),
      *((("load_workers", load_workers),) if load_workers is not None else ()),
    ):
      if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name}: expected a positive int, got {val!r}")
    if store not in STORES:
      raise ValueError(f"store: expected one of {STORES}, got {store!r}")
    if transfer not in TRANSFERS or (transfer == "staged" and store != "numpy"):
      raise ValueError(
        f"transfer: expected one of {TRANSFERS} ('staged' with store='numpy' "
        f"only), got {transfer!r} with store={store!r}"
      )
    if copy not in COPIES:
      raise ValueError(f"copy: expected one of {COPIES}, got {copy!r}")
    if plan not in DECODER_PLANS or (plan != "host" and store != "pinned_array"):
      raise ValueError(
        f"plan: expected one of {DECODER_PLANS} ('device' and 'fused' with "
        f"store='pinned_array' only), got {plan!r} with store={store!r}"
      )
    self.model, self.batch, self.capacity, self.dtype = model, batch, capacity, dtype
    self.store, self.load_workers, self.transfer = store, load_workers, transfer
    self.plan, self.chunk, self.copy = plan, chunk, copy
    self.config = model.config
    self.num_slots = offload_slots(self.config, capacity) if num_slots is None else num_slots
    self.traces = {
      "embed": 0,
      "logits": 0,
      "nosa_prefill": 0,
      "nosa_pre": 0,
      "nosa_post": 0,
      "other_prefill": 0,
      "other_step": 0,
      "fused_step": 0,
    }
    self._blocks = [nnx.split(blk) for blk in model.layers]
    self._copy_checked = False  # the fused step ran once with self.copy
    self._scatter_warm = False
    self._head_gd, self._head_st = nnx.split(_Head(model.embed, model.final_norm, model.lm_head))
    self._fns = {
      name: self._counted(name, fn, static)
      for name, fn, static in (
        ("nosa_prefill", _nosa_prefill, (0,)),
        ("nosa_pre", _nosa_pre, (0, 5)),
        ("nosa_post", _nosa_post, (0,)),
        ("other_prefill", _other_prefill, (0,)),
        ("other_step", _other_step, (0,)),
        ("embed", _embed, (0,)),
        ("logits", _logits, (0,)),
      )
    }
    if plan == "fused":  # states donated on accelerators
      donate = (9,) if jax.devices()[0].platform != "cpu" else ()
      self._fns["fused_step"] = self._counted("fused_step", _fused_step, tuple(range(6)), donate)
      # The parameters as one flat list, flattened once (nnx states flatten in Python).
      self._params, params_def = jax.tree.flatten((self._head_st, [st for _, st in self._blocks]))
      self._structure = _Structure(self._head_gd, tuple(gd for gd, _ in self._blocks), params_def)
    self._pending = None  # plan="fused": the step not yet accounted

  def _counted(self, name, fn, static, donate=()):
    def wrapped(*args):
      self.traces[name] += 1
      return fn(*args)

    return jax.jit(wrapped, static_argnums=static, donate_argnums=donate)

  # ---------------------------------------------------------------------------- state
  def _new_caches(self, dtype):
    caches = []
    for blk in self.model.layers:
      a, c = blk.attn, self.config
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
        store = OffloadedBlockCache(
          batch=self.batch,
          num_kv_heads=c.num_kv_heads,
          k_dim=c.head_dim,
          v_dim=c.dv,
          block_size=c.nsa.block_size,
          num_slots=self.num_slots,
          max_len=self.capacity,
          dtype=dt,
          store=self.store,
          load_workers=self.load_workers,
          transfer=self.transfer,
          plan="device" if self.plan == "fused" else self.plan,
        )
        if not self._scatter_warm and self.plan != "fused":
          store.warm_scatter()
          self._scatter_warm = True
        caches.append([sel, store])
      else:
        caches.append(a.init_cache(self.batch, self.capacity, dtype))
    return caches

  def prefill(self, tokens):
    """``tokens [B, T]`` (one length for every row, ``T <= capacity``) -> ``(logits [B, V],
    caches)``; the NOSA layers' K/V/c go to the host store."""
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
    """Feeds ``tokens [B]`` at position ``pos`` (host int, ``< capacity``); returns ``(logits
    [B, V], stats)`` (``caches`` are updated in place) with the step's transfer counts summed over
    the NOSA layers and ``stats["per_layer"]``. With ``plan="fused"`` nothing waits for the
    device: ``stats`` is a mapping that reads the counts back when first read, else at the next
    step (after that step is dispatched, so the host's dispatch overlaps the device's work) or at
    :meth:`flush` / :meth:`summarize`; a selection error (too many blocks for the slots) is then
    raised there, one step late."""
    if not 0 <= pos < self.capacity:
      raise ValueError(f"pos: expected 0 <= pos < capacity = {self.capacity}, got {pos}")
    if self.plan == "fused":
      return self._fused(tokens, caches, pos)
    posv = jnp.full((self.batch,), pos, jnp.int32)
    x = self._fns["embed"](self._head_gd, self._head_st, jnp.asarray(tokens, jnp.int32)[:, None])
    per_layer = []
    for i, (gd, st) in enumerate(self._blocks):
      if isinstance(caches[i], list):
        sel, store = caches[i]
        q, k, v, c, gamma, caches[i][0] = self._fns["nosa_pre"](gd, st, x, posv, sel, self.capacity)
        store.append(k, v, c)
        per_layer.append(store.update(gamma))
        scale = self.config.nsa.scale(self.config.head_dim)
        x = self._fns["nosa_post"](gd, st, x, store.attend(q, softmax_scale=scale))
      else:
        x, caches[i] = self._fns["other_step"](gd, st, x, posv, caches[i])
    stats = _sum_stats(per_layer)
    stats["per_layer"] = per_layer
    return self._fns["logits"](self._head_gd, self._head_st, x)[:, 0], stats

  def _fused(self, tokens, caches, pos: int):
    """:meth:`step` with ``plan="fused"``: roll completed tails over to the host stores, ONE
    jitted call for the token; then the PREVIOUS step's counts are read back (the only wait for
    the device, overlapping this step's dispatch with the previous step's execution) and
    accounted. The returned stats fill in when read (or at the next step / :meth:`flush`)."""
    nosa = [c[1] for c in caches if isinstance(c, list)]
    if any(cache.length != pos for cache in nosa):
      raise ValueError(f"pos: expected the caches' length {nosa[0].length}, got {pos}")
    t0 = time.perf_counter()
    for cache in nosa:
      cache.roll_over()
    states = [(c[0], c[1].device_state()) if isinstance(c, list) else c for c in caches]
    stores = [(c[1].store.kv, c[1].store.c) if isinstance(c, list) else None for c in caches]
    scale = self.config.nsa.scale(self.config.head_dim)

    def call():
      return self._fns["fused_step"](
        self._structure,
        self.capacity,
        self.chunk,
        float(scale),
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
        "offload: the fused step with copy='kernel' does not compile on %s (%s); using copy='xla'",
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
    """``plan="fused"``: reads back and accounts the last step's counts (waits for it); raises
    the errors of its selection (see :meth:`step`). A no-op otherwise."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.resolve()

  def summarize(self, caches, per_step: list[dict]) -> OffloadStats:
    """:class:`OffloadStats` of a run (``per_step`` from :meth:`step`)."""
    self.flush()
    stores = [c[1] for c in caches if isinstance(c, list)]
    dev = sum(
      dec.cache_bytes((c[0], s.slot_kv, s.slot_c, s.tail_kv, s.tail_c))
      for c, s in zip([c for c in caches if isinstance(c, list)], stores)
    )
    host = sum(s.host_bytes for s in stores)
    per_layer = [
      {
        **{k: s.totals[k] for k in STAT_KEYS},
        "hit_rate": s.totals["hits"] / s.totals["requested"] if s.totals["requested"] else 1.0,
      }
      for s in stores
    ]
    steps = [{k: v for k, v in s.items() if k != "per_layer"} for s in per_step]
    return OffloadStats(
      steps,
      _sum_stats(steps) if steps else _sum_stats([]),
      per_layer,
      self.num_slots,
      stores[0].host_memory_kind,
      dev,
      host,
    )


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


__all__ = [
  "DECODER_PLANS",
  "OffloadStats",
  "OffloadedDecoder",
  "generate_offloaded",
  "offload_slots",
]
