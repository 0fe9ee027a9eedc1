"""One offloaded NOSA layer (:mod:`sparse_attention_jax.offload.layer`) on CPU: attention over
the slot pool equals attention over the full device-resident cache for the same selection, the
slots hold the true blocks, the kernel and XLA copies leave bit-identical slots and outputs,
transfers are counted exactly, the slot plan equals a per-row set-based oracle, a step compiles
once, refused selections copy nothing, and errors name their values. The CPU backend has
``pinned_host`` memory, so the store is really in host memory here."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.offload import OffloadConfig, OffloadedLayer, host_memory_kind, plan_slots
from sparse_attention_jax.offload.layer import layer_step
from sparse_attention_jax.offload.slot_plan import INFO_MAX_ID, INFO_OVERFULL_ROW
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention

B, T, HQ, H, D, DV = 2, 72, 4, 2, 8, 6
CFG = NSAConfig.infllm_v2(
  cmp_window=8, cmp_stride=4, block_size=8, num_selected=5, num_init_blocks=1, num_local_blocks=1
)
KQ = 3


def _inputs(seed):
  q, k, v = rand_qkv(jax.random.key(seed), B, T, HQ, H, D, DV)
  c = 1.5 * jax.random.normal(jax.random.key(seed + 1), (B, T, H))
  return q, k, v, c


def _layer(num_slots=CFG.num_selected - 1, max_len=T, **kw):
  return OffloadedLayer(
    batch=B,
    num_kv_heads=H,
    k_dim=D,
    v_dim=DV,
    block_size=CFG.block_size,
    num_slots=num_slots,
    max_len=max_len,
    **kw,
  )


def _want(gamma_row, cur):
  """{(b, h): selected blocks except the current one}."""
  g = np.asarray(gamma_row)
  return {
    (bi, hi): {int(j) for j in g[bi, hi] if j >= 0} - {cur} for bi in range(B) for hi in range(H)
  }


@pytest.mark.parametrize("copy,chunk", [("kernel", 1024), ("xla", 3)])
def test_slot_pool_attention_equals_full_cache_and_counts_transfers(copy, chunk):
  """Decode steps 21 .. 71 with the full op's selection: the slots hold exactly Gamma(t) minus
  the current block with its true K/V/c, attention equals the full-cache op, transfers = newly
  selected blocks (the XLA copy in iterations of at most 3 blocks), and the host store holds
  every complete block in pinned host memory."""
  q, k, v, c = _inputs(0)
  _, aux = jax.jit(
    lambda *a: nosa_attention(*a, config=CFG, num_query_selected=KQ, return_aux=True)
  )(q, k, v, c)
  gam = np.asarray(aux.block_indices)  # [B, T, H, k]
  ref = biased_selected_attention(q, k, v, c, aux.block_indices, block_size=CFG.block_size)
  kv_all, v_all, c_all = np.asarray(k), np.asarray(v), np.asarray(c)
  layer = _layer(config=OffloadConfig(copy=copy, chunk=chunk))
  assert layer.store.kind == "pinned_host" and layer.store.host
  prompt = 21
  layer.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  prev = None
  changed = 0
  for t in range(prompt, T):
    cur = t // CFG.block_size
    want = _want(gam[:, t], cur)
    o, stats = layer.step(k[:, t], v[:, t], c[:, t], gam[:, t], q[:, t])
    # Expected loads: blocks selected now (besides the current one) that were not resident,
    # i.e. not selected at the previous step or then the tail (the previous step's current block).
    resident = {key: set() for key in want} if prev is None else prev
    exp = sum(len(want[key] - resident[key]) for key in want)
    assert stats["transferred"] == exp, t
    assert stats["requested"] == sum(len(w) for w in want.values())
    assert stats["hits"] == stats["requested"] - exp
    assert stats["bytes"] == exp * CFG.block_size * ((D + DV) * 4 + 4)
    changed += prev is not None and exp > 0
    prev = want
    slot_block = np.asarray(layer.state.slot_block)
    for (bi, hi), w in want.items():
      assert {int(j) for j in slot_block[bi, hi] if j >= 0} == w
    # Every occupied slot holds its block's true K/V/c.
    bb, hh, ss = np.nonzero(slot_block >= 0)
    rows = slot_block[bb, hh, ss][:, None] * CFG.block_size + np.arange(CFG.block_size)
    slot_kv = np.asarray(layer.state.slot_kv)[bb, hh, ss]  # [N, l', D + DV]
    np.testing.assert_array_equal(slot_kv[..., :D], kv_all[bb[:, None], rows, hh[:, None]])
    np.testing.assert_array_equal(slot_kv[..., D:], v_all[bb[:, None], rows, hh[:, None]])
    np.testing.assert_array_equal(
      np.asarray(layer.state.slot_c)[bb, hh, ss], c_all[bb[:, None], rows, hh[:, None]]
    )
    np.testing.assert_allclose(o, ref[:, t], atol=2e-5, rtol=1e-4, err_msg=f"t={t}")
  assert changed >= 8  # the selection did change over steps
  assert layer.totals["steps"] == T - prompt
  assert 0 < layer.totals["hits"] < layer.totals["requested"]
  assert layer.store.kv.shape == (B, H, 9, 8, D + DV) and layer.store.c.shape == (B, H, 9, 8)
  assert {x.sharding.memory_kind for x in (layer.store.kv, layer.store.c)} == {"pinned_host"}
  for bi, hi, j in ((1, 0, 2), (0, 1, 1), (1, 1, 7)):
    kv, cc = np.asarray(layer.store.kv)[bi, hi, j], np.asarray(layer.store.c)[bi, hi, j]
    sl = slice(8 * j, 8 * j + 8)
    np.testing.assert_array_equal(kv[:, :D], np.asarray(k[bi, sl, hi]))
    np.testing.assert_array_equal(kv[:, D:], np.asarray(v[bi, sl, hi]))
    np.testing.assert_array_equal(cc, np.asarray(c[bi, sl, hi]))
  assert layer.state.slot_kv.sharding.memory_kind == "device"


def _random_kvcq(rng, bsz, total, heads, dk, dv):
  """Float32 ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``, ``c [B, T, H]`` and a query ``q [B, 2H,
  Dk]`` (G = 2), drawn in that order from ``rng``."""
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (
    draw(bsz, total, heads, dk),
    draw(bsz, total, heads, dv),
    draw(bsz, total, heads),
    draw(bsz, 2 * heads, dk),
  )


def _random_gamma(rng, slot_block, cur, num_slots, width):
  """``[B, H, width]`` selections: most resident blocks kept, some evicted, new ones added, the
  current block in or out, a duplicate, ``-1`` padding, shuffled."""
  bsz, heads = slot_block.shape[:2]
  gamma = np.full((bsz, heads, width), -1, np.int32)
  for bi in range(bsz):
    for hi in range(heads):
      kept = [int(j) for j in slot_block[bi, hi] if j >= 0 and rng.random() < 0.6]
      fresh = rng.choice(cur, size=min(cur, num_slots), replace=False).tolist()
      picked = list(dict.fromkeys(kept + fresh))[: rng.integers(0, num_slots + 1)]
      if rng.random() < 0.7:
        picked.append(cur)
      if picked and rng.random() < 0.4:
        picked.append(picked[0])  # a duplicate
      gamma[bi, hi, : len(picked)] = rng.permutation(picked[:width])
  return gamma


def test_kernel_and_xla_copies_are_bit_identical_and_compile_once():
  """bf16, Dk + Dv and l' powers of two (the kernel's Triton lowering needs them; it is
  interpreted here): the zero-copy kernel and the XLA copy (chunks of 3, so a load runs several
  iterations and several branch sizes) over appends that complete blocks and selections with
  evictions, duplicates, ``-1`` padding and the current block in or out (and one step selecting
  only resident blocks) leave the same slots (bytes), slot map, tail, attention output, counts
  and host blocks; one compilation of the step for every step."""
  from sparse_attention_jax.offload.block_copy import step_sizes

  assert step_sizes(3) == (3,) and step_sizes(64) == (8, 12, 16, 24, 32, 48, 64)
  rng = np.random.default_rng(11)
  bsz, heads, dk, dv, bs, ns, total, width = 2, 3, 5, 3, 4, 5, 44, 8
  layers = [
    OffloadedLayer(
      batch=bsz,
      num_kv_heads=heads,
      k_dim=dk,
      v_dim=dv,
      block_size=bs,
      num_slots=ns,
      max_len=total,
      dtype=jnp.bfloat16,
      config=OffloadConfig(copy=copy, chunk=3),
    )
    for copy in ("kernel", "xla")
  ]
  ref, got = layers
  k, v, c, q = _random_kvcq(rng, bsz, total, heads, dk, dv)
  prompt = 22
  for layer in layers:
    layer.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  steps = [
    jax.jit(functools.partial(layer_step, chunk=3, scale=0.5, host=True, copy=copy))
    for copy in ("kernel", "xla")
  ]
  loads, compiles = set(), []
  for t in range(prompt, 36):  # blocks 5 .. 8 complete on the way
    gamma = _random_gamma(rng, np.asarray(ref.state.slot_block), t // bs, ns, width)
    if t == 30:  # the resident blocks: no iteration
      gamma = np.full((bsz, heads, width), -1, np.int32)
      gamma[..., :ns] = np.asarray(ref.state.slot_block)
    outs = []
    for layer, step in zip(layers, steps):
      layer.roll_over()
      kv_t = jnp.concatenate([k[:, t], v[:, t]], axis=-1).astype(jnp.bfloat16)
      o, state, info = step(
        layer.state, layer.store.kv, layer.store.c, kv_t, c[:, t], jnp.asarray(gamma), q, t
      )
      outs.append((o, layer.account(np.asarray(info), t=layer.adopt(state))))
    compiles.append([s._cache_size() for s in steps])
    for key in ("requested", "hits", "transferred", "bytes"):
      assert outs[0][1][key] == outs[1][1][key], (t, key)
    loads.add(outs[0][1]["transferred"])
    assert got.length == ref.length == t + 1
    for a, b in zip(got.state, ref.state):
      np.testing.assert_array_equal(
        np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
      )
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
  assert max(loads) > 6 and 0 in loads and loads & {1, 2, 4, 5}, loads  # several iterations
  assert compiles[-1] == [1, 1], compiles
  np.testing.assert_array_equal(
    np.asarray(got.store.kv.astype(jnp.float32)), np.asarray(ref.store.kv.astype(jnp.float32))
  )


@pytest.mark.parametrize("copy", ["kernel", "xla"])
def test_refused_selection_copies_nothing_and_raises(copy):
  """A selection with more blocks than slots (and one with a future block) is flagged in
  ``info`` and copies nothing (its load rows would name slot -1 or blocks past the store);
  ``account`` raises the errors; ``step`` raises them and leaves the slots as they were."""
  rng = np.random.default_rng(5)
  layer = OffloadedLayer(
    batch=1,
    num_kv_heads=1,
    k_dim=5,
    v_dim=3,
    block_size=4,
    num_slots=2,
    max_len=40,
    config=OffloadConfig(copy=copy, chunk=8),
  )
  k, v, c, q = _random_kvcq(rng, 1, 40, 1, 5, 3)
  layer.prefill(k[:, :30], v[:, :30], c[:, :30])
  step = jax.jit(functools.partial(layer_step, chunk=8, scale=0.5, host=True, copy=copy))
  kv_t = jnp.concatenate([k[:, 30], v[:, 30]], axis=-1)
  for gamma, flag, match in (
    ([[[0, 1, 2, 3]]], INFO_OVERFULL_ROW, "at most num_slots=2"),
    ([[[0, 9]]], INFO_MAX_ID, "block ids <= the current block 7"),
  ):
    before = [np.asarray(x) for x in layer.state]
    _, state, info = step(
      layer.state, layer.store.kv, layer.store.c, kv_t, c[:, 30], jnp.asarray(gamma), q, 30
    )
    assert int(info[flag]) == (0 if flag == INFO_OVERFULL_ROW else 9)
    for a, b in zip(state[:2], before):
      np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match=match):
      layer.account(np.asarray(info), t=30)
    with pytest.raises(ValueError, match=match):
      layer.step(k[:, 30], v[:, 30], c[:, 30], np.asarray(gamma), q)
    for a, b in zip(layer.state, before):
      np.testing.assert_array_equal(np.asarray(a), b)
    assert layer.length == 30


def test_step_errors_leave_slots_and_empty_selection_evicts():
  """``step`` raises the plan's errors (too many blocks in a row, named by ``(b, h)``; a future
  block; a bad selection shape) and keeps the slots; an empty selection evicts everything."""
  q, k, v, c = _inputs(6)
  layer = _layer(num_slots=2)
  layer.prefill(k[:, :38], v[:, :38], c[:, :38])  # tokens 38, 39: current block 4
  _, st = layer.step(k[:, 38], v[:, 38], c[:, 38], np.array([[[0, 1, 4, -1]] * H] * B), q[:, 38])
  assert st["transferred"] == 2 * B * H
  before = np.asarray(layer.state.slot_block).copy()
  gamma = np.array([[[0, 1, 4, -1]] * H] * B)
  gamma[1, 1] = [0, 1, 2, 3]
  args = (k[:, 39], v[:, 39], c[:, 39])
  with pytest.raises(
    ValueError,
    match=r"gamma: expected at most num_slots=2 selected blocks "
    r"besides the current block .* got 4 at \(b=1, h=1\)",
  ):
    layer.step(*args, jnp.asarray(gamma), q[:, 39])
  with pytest.raises(ValueError, match="gamma: expected block ids <= the current block 4"):
    layer.step(*args, np.array([[[0, 5, -1, -1]] * H] * B), q[:, 39])
  with pytest.raises(ValueError, match=r"gamma: expected shape \[B, H, n\]"):
    layer.step(*args, np.zeros((B, 4), np.int32), q[:, 39])
  np.testing.assert_array_equal(np.asarray(layer.state.slot_block), before)
  _, st = layer.step(*args, np.zeros((B, H, 0), np.int32), q[:, 39])  # evicts everything
  assert (st["requested"], st["transferred"]) == (0, 0)
  assert (np.asarray(layer.state.slot_block) == -1).all() and not np.asarray(
    layer.state.tail_use
  ).any()


def test_current_block_outside_the_selection_is_not_attended():
  q, k, v, c = _inputs(3)
  layer = _layer()
  layer.prefill(k[:, :29], v[:, :29], c[:, :29])  # token 29, current block 3
  gamma = np.array([[[0, 2, -1, -1]] * H] * B)
  o, _ = layer.step(k[:, 29], v[:, 29], c[:, 29], gamma, q[:, 29])
  idx = np.full((B, 30, H, 4), -1, np.int32)
  idx[:, 29] = gamma
  ref = biased_selected_attention(
    q[:, :30], k[:, :30], v[:, :30], c[:, :30], jnp.asarray(idx), block_size=8
  )
  np.testing.assert_allclose(o, ref[:, 29], atol=2e-5, rtol=1e-4)


def test_capacity_and_argument_errors():
  _, k, v, c = _inputs(5)
  layer = _layer(num_slots=1, max_len=25)
  layer.prefill(k[:, :24], v[:, :24], c[:, :24])
  q = jnp.zeros((B, HQ, D))
  layer.step(k[:, 24], v[:, 24], c[:, 24], np.zeros((B, H, 1), np.int32), q)
  with pytest.raises(ValueError, match="step: expected at most max_len=25 tokens"):
    layer.step(k[:, 24], v[:, 24], c[:, 24], np.zeros((B, H, 1), np.int32), q)
  with pytest.raises(ValueError, match="prefill: expected an empty cache"):
    layer.prefill(k[:, :8], v[:, :8], c[:, :8])
  with pytest.raises(ValueError, match=r"k.shape: expected \[2, T, 2, Dk\], 1 <= T <= max_len=8"):
    _layer(max_len=8).prefill(k[:, :9], v[:, :9], c[:, :9])
  with pytest.raises(ValueError, match="num_slots: expected a positive int"):
    _layer(num_slots=0)
  with pytest.raises(ValueError, match=r"copy: expected one of \('kernel', 'xla'\), got 'dma'"):
    OffloadConfig(copy="dma")
  with pytest.raises(ValueError, match=r"chunk: expected a positive int, got 0"):
    OffloadConfig(chunk=0)
  assert host_memory_kind(jax.devices()[0]) in ("pinned_host", "device")


def test_host_memory_fallback_is_logged(caplog):
  class Mem:
    def __init__(self, kind):
      self.kind = kind

  class NoPinned:
    def addressable_memories(self):
      return [Mem("device")]

  class Pinned:
    def addressable_memories(self):
      return [Mem("device"), Mem("pinned_host")]

  with caplog.at_level("WARNING", logger="sparse_attention_jax.offload"):
    assert host_memory_kind(NoPinned()) == "device"
  assert "no pinned_host memory" in caplog.text
  assert host_memory_kind(Pinned()) == "pinned_host"
  # The CPU backend has pinned host memory, so the CPU tests run the real host placement.
  assert "pinned_host" in [m.kind for m in jax.devices()[0].addressable_memories()]


def _oracle_assign(gamma, slot_block, cur):
  """Per-(b, h) set-based bookkeeping: the slot map (updated in place), loads and counts."""
  loads, requested, hits = [], 0, 0
  tail_use = np.zeros(slot_block.shape[:2], bool)
  for bi in range(slot_block.shape[0]):
    for hi in range(slot_block.shape[1]):
      want = {int(j) for j in gamma[bi, hi] if j >= 0}
      tail_use[bi, hi] = cur in want
      want.discard(cur)
      row = slot_block[bi, hi]
      keep = np.isin(row, list(want)) & (row >= 0)
      row[~keep] = -1
      resident = {int(j) for j in row[keep]}
      missing = sorted(want - resident)
      for s, j in zip(np.flatnonzero(row < 0)[: len(missing)], missing):
        row[s] = j
        loads.append((bi, hi, j, int(s)))
      requested += len(want)
      hits += len(want & resident)
  return loads, tail_use, requested, hits


def test_slot_plan_matches_set_oracle():
  """Random selections over 60 steps (padding, duplicates, the current block in or out, rows
  that keep, drop and add blocks): the plan leaves exactly Gamma minus the current block
  resident, never moves a kept block, and lists exactly the missing blocks, in row-major order
  (ascending ids in a row), as the per-row set-based bookkeeping does; one compilation."""
  rng = np.random.default_rng(0)
  bsz, heads, ns, n = 3, 2, 6, 8
  slots = jnp.full((bsz, heads, ns), -1, jnp.int32)
  oracle = np.full((bsz, heads, ns), -1, np.int32)
  total_loads, compiled = 0, None
  for step in range(60):
    cur = 3 + step // 4
    gamma = np.full((bsz, heads, n), -1, np.int32)
    for bi in range(bsz):
      for hi in range(heads):
        prev = [int(j) for j in oracle[bi, hi] if j >= 0]
        fresh = rng.choice(cur, size=min(cur, ns), replace=False).tolist()
        pool = [j for j in prev if rng.random() < 0.7] + fresh  # mostly keep the old ones
        picked = list(dict.fromkeys(pool))[: rng.integers(0, ns + 1)]
        if rng.random() < 0.6:
          picked.append(cur)
        if picked and rng.random() < 0.3:
          picked.append(picked[0])  # a duplicate
        picked = picked[:n]
        gamma[bi, hi, : len(picked)] = rng.permutation(picked)
    slots, tail_use, loads, info = plan_slots(jnp.asarray(gamma), slots, jnp.int32(cur), pad=4)
    want_loads, want_tail, want_req, want_hits = _oracle_assign(gamma, oracle, cur)
    np.testing.assert_array_equal(np.asarray(slots), oracle, err_msg=f"step {step}")
    info, loads = np.asarray(info), np.asarray(loads)
    assert [tuple(r) for r in loads[: info[0]].tolist()] == want_loads
    assert not loads[info[0] :].any() and loads.shape == (bsz * heads * ns + 4, 4)
    np.testing.assert_array_equal(np.asarray(tail_use), want_tail)
    assert (info[1], info[1] - info[0]) == (want_req, want_hits)
    assert info[2] == gamma.max() and info[3] == -1
    total_loads += int(info[0])
    compiled = compiled or plan_slots._cache_size()
  assert total_loads > 100 and plan_slots._cache_size() == compiled
