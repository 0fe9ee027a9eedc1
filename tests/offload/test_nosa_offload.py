"""Offloaded NOSA block cache (issue 7): attention over the slot pool equals attention over the
full device-resident cache for the same selection (both host stores: one NumPy array per layer,
per-block pinned_host arrays; both transfers: fresh gathers, reused staging buffers), slots hold
the true blocks (bit-identical between the transfers), transfers are counted exactly, the
vectorized slot assignment equals a per-row set-based oracle, the device plan (plan="device")
equals the host plan bit for bit, scatter size buckets, memory kinds, and clear capacity / budget
errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand_qkv

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn.offload import (
  OffloadedBlockCache,
  assign_slots,
  bucket,
  buckets,
  host_memory_kind,
  plan_slots_on_device,
)
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


def _cache(
  num_slots=CFG.num_selected - 1, max_len=T, store="numpy", load_workers=4, transfer="fresh"
):
  return OffloadedBlockCache(
    batch=B,
    num_kv_heads=H,
    k_dim=D,
    v_dim=DV,
    block_size=CFG.block_size,
    num_slots=num_slots,
    max_len=max_len,
    store=store,
    load_workers=load_workers,
    transfer=transfer,
  )


def _want(gamma_row, cur):
  """{(b, h): selected blocks except the current one}."""
  g = np.asarray(gamma_row)
  return {
    (bi, hi): {int(j) for j in g[bi, hi] if j >= 0} - {cur} for bi in range(B) for hi in range(H)
  }


@pytest.mark.parametrize(
  "store,workers,transfer",
  [
    ("numpy", 1, "fresh"),
    ("numpy", 4, "fresh"),
    ("pinned_host", 3, "fresh"),
    ("numpy", 1, "staged"),
    ("numpy", 3, "staged"),
    ("pinned_array", 1, "fresh"),
  ],
)
def test_slot_pool_attention_equals_full_cache_and_counts_transfers(
  store, workers, transfer, monkeypatch
):
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "MAX_SCATTER", 8)  # the first step loads 16 blocks
  monkeypatch.setattr(offload, "LOAD_CHUNK", 3)  # chunks smaller than a scatter
  q, k, v, c = _inputs(0)
  _, aux = jax.jit(
    lambda *a: nosa_attention(*a, config=CFG, num_query_selected=KQ, return_aux=True)
  )(q, k, v, c)
  gam = np.asarray(aux.block_indices)  # [B, T, H, k]
  ref = biased_selected_attention(q, k, v, c, aux.block_indices, block_size=CFG.block_size)
  kv_all, v_all, c_all = np.asarray(k), np.asarray(v), np.asarray(c)
  cache = _cache(store=store, load_workers=workers, transfer=transfer)
  # The CPU backend has pinned host memory.
  assert cache.host_memory_kind == {"pinned_array": "pinned_host"}.get(store, store)
  prompt = 21
  cache.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  prev = None
  changed = 0
  for t in range(prompt - 1, T):
    if t >= prompt:
      cache.append(k[:, t], v[:, t], c[:, t])
    cur = t // CFG.block_size
    want = _want(gam[:, t], cur)
    stats = cache.update(gam[:, t])
    # Expected loads: blocks selected now (besides the current one) that were not resident,
    # i.e. not selected at the previous step or then the tail (the previous step's current block).
    resident = {key: set() for key in want} if prev is None else prev
    exp = sum(len(want[key] - resident[key]) for key in want)
    assert stats["transferred"] == exp, t
    assert stats["requested"] == sum(len(w) for w in want.values())
    assert stats["hits"] == stats["requested"] - exp
    assert stats["bytes"] == exp * CFG.block_size * ((D + DV) * 4 + 4)
    # Host seconds of the step's parts: measured (>= 0); gathers/puts only when blocks move.
    assert all(stats[key] >= 0 for key in ("wait_s", "plan_s", "gather_s", "put_s", "load_s"))
    assert (stats["gather_s"] > 0 and stats["put_s"] > 0) == (exp > 0), t
    changed += prev is not None and exp > 0
    prev = want
    # The slots hold exactly the selection; attention matches the full-cache op.
    for (bi, hi), w in want.items():
      assert {int(j) for j in cache.slot_block[bi, hi] if j >= 0} == w
    # Every occupied slot holds its block's true K/V/c.
    bb, hh, ss = np.nonzero(cache.slot_block >= 0)
    rows = cache.slot_block[bb, hh, ss][:, None] * CFG.block_size + np.arange(CFG.block_size)
    slot_kv = np.asarray(cache.slot_kv)[bb, hh, ss]  # [N, l', D + DV]
    np.testing.assert_array_equal(slot_kv[..., :D], kv_all[bb[:, None], rows, hh[:, None]])
    np.testing.assert_array_equal(slot_kv[..., D:], v_all[bb[:, None], rows, hh[:, None]])
    np.testing.assert_array_equal(
      np.asarray(cache.slot_c)[bb, hh, ss], c_all[bb[:, None], rows, hh[:, None]]
    )
    o = cache.attend(q[:, t])
    np.testing.assert_allclose(o, ref[:, t], atol=2e-5, rtol=1e-4, err_msg=f"t={t}")
  assert changed >= 8  # the selection did change over steps
  assert cache.totals["steps"] == T - prompt + 1
  assert 0 < cache.totals["hits"] < cache.totals["requested"]
  # The host store holds the true K/V/c of every complete block (prompt blocks and tails
  # completed while decoding), in the memory it reports.
  if store == "numpy":
    assert isinstance(cache.store.kv, np.ndarray) and cache.store.kv.shape == (B, H, 9, 8, D + DV)
  elif store == "pinned_array":
    assert cache.store.kv.shape == (B, H, 9, 8, D + DV) and cache.store.c.shape == (B, H, 9, 8)
    assert {x.sharding.memory_kind for x in (cache.store.kv, cache.store.c)} == {"pinned_host"}
  else:
    assert all(
      x.sharding.memory_kind == "pinned_host" for blk in cache.store.blocks.values() for x in blk
    )
  for bi, hi, j in ((1, 0, 2), (0, 1, 1), (1, 1, 7)):
    kv, cc = cache.host_block(bi, hi, j)
    sl = slice(8 * j, 8 * j + 8)
    np.testing.assert_array_equal(kv[:, :D], np.asarray(k[bi, sl, hi]))
    np.testing.assert_array_equal(kv[:, D:], np.asarray(v[bi, sl, hi]))
    np.testing.assert_array_equal(cc, np.asarray(c[bi, sl, hi]))
  assert cache.slot_kv.sharding.memory_kind == "device"


@pytest.mark.parametrize("view", ["contiguous", "shared_rows", "no_row_view"])
def test_staged_transfer_fills_bit_identical_slots(view, monkeypatch):
  """transfer="staged" (reused staging buffers, refilled many times per step: chunks of 2,
  rings of 2) leaves the same slot bytes as the default path, step after step, for a
  contiguous store, a stride-0 view sharing rows (as benchmarks/decode.py builds) and a
  layout without a row view (fancy-index fallback)."""
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "LOAD_CHUNK", 2)
  rng = np.random.default_rng(7)
  nb, bs, d = 12, 4, 6
  caches = [
    OffloadedBlockCache(
      batch=2,
      num_kv_heads=2,
      k_dim=3,
      v_dim=3,
      block_size=bs,
      num_slots=5,
      max_len=(nb + 1) * bs,
      dtype=jnp.bfloat16,
      load_workers=w,
      transfer=tr,
    )
    for tr, w in (("fresh", 1), ("staged", 1), ("staged", 2))
  ]
  kv = rng.standard_normal((2, 2, nb + 1, bs, d)).astype(jnp.bfloat16)
  cc = rng.standard_normal((2, 2, nb + 1, bs)).astype(np.float32)
  if view == "shared_rows":
    kv = np.lib.stride_tricks.as_strided(kv[0, 0], kv.shape, (0, 0, *kv[0, 0].strides))
    cc = np.lib.stride_tricks.as_strided(cc[0, 0], cc.shape, (0, 0, *cc[0, 0].strides))
  elif view == "no_row_view":  # the same blocks through a negative stride
    kv = np.ascontiguousarray(kv[:, :, ::-1])[:, :, ::-1]
    cc = np.ascontiguousarray(cc[:, :, ::-1])[:, :, ::-1]
  from sparse_attention_jax.nn.offload_store import row_view

  assert (row_view(kv) is None) == (view == "no_row_view")
  for cache in caches:
    cache.store.kv, cache.store.c = kv, cc
    cache.length = nb * bs + 1  # the current block nb holds one token
  moved = 0
  for _ in range(6):
    gamma = np.stack([[rng.choice(nb, 5, replace=False) for _ in range(2)] for _ in range(2)])
    stats = [cache.update(gamma) for cache in caches]
    assert len({st["transferred"] for st in stats}) == 1
    moved += stats[0]["transferred"]
    ref = np.asarray(caches[0].slot_kv).view(np.uint16)
    for cache in caches[1:]:
      np.testing.assert_array_equal(cache.slot_block, caches[0].slot_block)
      np.testing.assert_array_equal(np.asarray(cache.slot_kv).view(np.uint16), ref)
      np.testing.assert_array_equal(np.asarray(cache.slot_c), np.asarray(caches[0].slot_c))
  assert moved > 20
  bb, hh, ss = np.nonzero(caches[1].slot_block >= 0)
  np.testing.assert_array_equal(
    np.asarray(caches[1].slot_kv)[bb, hh, ss].view(np.uint16),
    kv[bb, hh, caches[1].slot_block[bb, hh, ss]].view(np.uint16),
  )


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


def test_pinned_array_store_matches_numpy_store_bit_for_bit_and_compiles_once(monkeypatch):
  """store="pinned_array" (one pinned_host jax array per layer, loads = one jitted gather +
  slot scatter per chunk) against the default NumPy store, bf16: after a prefill, appends that
  complete two blocks (tails written to the host store) and updates with random selections
  (evictions, reloads, chunks of 3), both hold the same slot ids, slot bytes and attention
  outputs at every step, and the same host blocks; a later update of an already compiled size
  bucket compiles nothing."""
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "LOAD_CHUNK", 3)
  rng = np.random.default_rng(3)
  bsz, heads, dk, dv, bs, ns, total = 2, 2, 4, 3, 4, 5, 40
  caches = [
    OffloadedBlockCache(
      batch=bsz,
      num_kv_heads=heads,
      k_dim=dk,
      v_dim=dv,
      block_size=bs,
      num_slots=ns,
      max_len=total,
      dtype=jnp.bfloat16,
      store=store,
      load_workers=1,
    )
    for store in ("numpy", "pinned_array")
  ]
  k, v, c, q = _random_kvcq(rng, bsz, total, heads, dk, dv)
  prompt = 26
  for cache in caches:
    cache.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  moved = sizes_before = 0
  for t in range(prompt - 1, 36):  # blocks 6 and 7 complete on the way
    if t >= prompt:
      for cache in caches:
        cache.append(k[:, t], v[:, t], c[:, t])
    cur = t // bs
    gamma = np.stack(
      [
        [np.append(rng.choice(cur, min(cur, ns), replace=False), cur) for _ in range(heads)]
        for _ in range(bsz)
      ]
    )
    stats = [cache.update(gamma) for cache in caches]
    assert stats[0]["transferred"] == stats[1]["transferred"]
    assert stats[1]["gather_s"] >= 0 and stats[1]["put_s"] >= 0
    moved += stats[0]["transferred"]
    ref, got = caches
    np.testing.assert_array_equal(got.slot_block, ref.slot_block)
    bb, hh, ss = np.nonzero(ref.slot_block >= 0)
    np.testing.assert_array_equal(
      np.asarray(got.slot_kv)[bb, hh, ss].view(np.uint16),
      np.asarray(ref.slot_kv)[bb, hh, ss].view(np.uint16),
    )
    np.testing.assert_array_equal(
      np.asarray(got.slot_c)[bb, hh, ss], np.asarray(ref.slot_c)[bb, hh, ss]
    )
    np.testing.assert_array_equal(np.asarray(got.attend(q)), np.asarray(ref.attend(q)))
    if t == prompt:
      sizes_before = got._array_load._cache_size()
  assert moved > 30 and got._array_fused
  # The host stores agree on every complete block (prompt blocks and the completed tails).
  np.testing.assert_array_equal(
    np.asarray(got.store.kv)[:, :, :8].view(np.uint16), ref.store.kv[:, :, :8].view(np.uint16)
  )
  np.testing.assert_array_equal(np.asarray(got.store.c)[:, :, :8], ref.store.c[:, :, :8])
  kv7, c7 = got.host_block(1, 0, 7)
  np.testing.assert_array_equal(kv7.view(np.uint16), ref.store.kv[1, 0, 7].view(np.uint16))
  np.testing.assert_array_equal(c7, ref.store.c[1, 0, 7])
  # One-block loads: the second one (same bucket) compiles nothing. (The jitted load is shared
  # by every cache of the process, so its count includes other tests' shapes.)
  assert got._array_load._cache_size() >= sizes_before
  compiled = []
  for _ in range(2):
    gamma = got.slot_block.copy()
    gamma[0, 0, 0] = next(j for j in range(got.current_block) if j not in gamma[0, 0])
    assert got.update(gamma)["transferred"] == 1
    compiled.append(got._array_load._cache_size())
  assert compiled[1] == compiled[0]


def test_pinned_array_falls_back_to_a_separate_gather_and_scatter(caplog):
  """If the fused gather + scatter cannot be compiled, the pinned_array cache logs it and loads
  through a jitted gather and the jitted slot scatter, with the same slot bytes."""
  rng = np.random.default_rng(5)
  caches = [
    OffloadedBlockCache(
      batch=2,
      num_kv_heads=2,
      k_dim=3,
      v_dim=3,
      block_size=4,
      num_slots=4,
      max_len=40,
      store=store,
      load_workers=1,
    )
    for store in ("numpy", "pinned_array")
  ]
  k = jnp.asarray(rng.standard_normal((2, 33, 2, 3)), jnp.float32)
  for cache in caches:
    cache.prefill(k, -k, k[..., 0])  # current block 8

  def refuse(*args):
    raise RuntimeError("INTERNAL: Bitcast cannot have different memory spaces")

  caches[1]._array_load = refuse
  with caplog.at_level("WARNING", logger="sparse_attention_jax.nn.offload"):
    for _ in range(3):
      gamma = np.stack([[rng.choice(8, 4, replace=False) for _ in range(2)] for _ in range(2)])
      for cache in caches:
        cache.update(gamma)
      np.testing.assert_array_equal(caches[1].slot_block, caches[0].slot_block)
      bb, hh, ss = np.nonzero(caches[0].slot_block >= 0)
      for name in ("slot_kv", "slot_c"):
        np.testing.assert_array_equal(
          np.asarray(getattr(caches[1], name))[bb, hh, ss],
          np.asarray(getattr(caches[0], name))[bb, hh, ss],
        )
  assert not caches[1]._array_fused
  assert sum("fused pinned_array load does not compile" in r.message for r in caplog.records) == 1


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


def test_device_plan_matches_host_plan_bit_for_bit_and_compiles_once(monkeypatch):
  """plan="device" (slot assignment + compacted loads in one jitted call, only the counts read
  back, chunks sliced on the device) against plan="host", both on the pinned_array store, bf16,
  chunks of 3: over a prefill, appends that complete blocks 6 and 7 (the completed tail is
  then selected and loaded) and updates with evictions, duplicates, ``-1`` padding and the
  current block in or out, both hold the same slot ids, tail use, whole slot arrays (bytes) and
  attention outputs, and report the same counts; a repeated selection loads nothing and launches
  nothing; neither the plan nor the chunk load compiles after the first step / warm-up."""
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "LOAD_CHUNK", 3)
  rng = np.random.default_rng(7)
  bsz, heads, dk, dv, bs, ns, total, width = 2, 3, 4, 3, 4, 5, 44, 8
  caches = [
    OffloadedBlockCache(
      batch=bsz,
      num_kv_heads=heads,
      k_dim=dk,
      v_dim=dv,
      block_size=bs,
      num_slots=ns,
      max_len=total,
      dtype=jnp.bfloat16,
      store="pinned_array",
      load_workers=1,
      plan=plan,
    )
    for plan in ("host", "device")
  ]
  ref, got = caches
  got.warm_scatter()
  ref.warm_scatter()
  launches = []
  planned = got._planned_load

  def counted(*args, **kw):
    launches.append(kw["size"])
    return planned(*args, **kw)

  got._planned_load = counted
  k, v, c, q = _random_kvcq(rng, bsz, total, heads, dk, dv)
  prompt = 22
  for cache in caches:
    cache.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  warmed = planned._cache_size()
  moved, plans, counts = 0, None, set()
  for t in range(prompt - 1, 34):  # blocks 5, 6 and 7 complete on the way
    if t >= prompt:
      for cache in caches:
        cache.append(k[:, t], v[:, t], c[:, t])
    cur = t // bs
    gamma = _random_gamma(rng, ref.slot_block, cur, ns, width)
    if t in (25, 30):
      gamma = np.full((bsz, heads, width), -1, np.int32)  # the resident blocks: no load
      gamma[..., 1 : ns + 1] = np.asarray(got.slot_block)[..., ::-1]
    before = len(launches)
    st_ref = ref.update(gamma)
    st_got = got.update(jnp.asarray(gamma))
    for key in ("requested", "hits", "transferred", "hit_rate", "bytes"):
      assert st_got[key] == st_ref[key], (t, key)
    assert set(st_got) == set(st_ref) and st_got["gather_s"] == 0.0
    if st_ref["transferred"] == 0:
      assert len(launches) == before
    assert isinstance(got.slot_block, jax.Array) and isinstance(got.tail_use, jax.Array)
    np.testing.assert_array_equal(np.asarray(got.slot_block), ref.slot_block)
    np.testing.assert_array_equal(np.asarray(got.tail_use), ref.tail_use)
    np.testing.assert_array_equal(
      np.asarray(got.slot_kv).view(np.uint16), np.asarray(ref.slot_kv).view(np.uint16)
    )
    np.testing.assert_array_equal(np.asarray(got.slot_c), np.asarray(ref.slot_c))
    np.testing.assert_array_equal(np.asarray(got.attend(q)), np.asarray(ref.attend(q)))
    moved += st_ref["transferred"]
    counts.add(st_ref["transferred"])
    if plans is None:
      plans = plan_slots_on_device._cache_size()
  assert moved > 40 and len(counts) >= 4 and 0 in counts
  assert plan_slots_on_device._cache_size() == plans  # one plan compile for the shape
  assert planned._cache_size() == warmed  # every chunk size was warmed
  assert got._planned_fused and {
    k: got.totals[k] for k in ("requested", "hits", "transferred", "bytes")
  } == {k: ref.totals[k] for k in ("requested", "hits", "transferred", "bytes")}


@pytest.mark.parametrize("copy", ["kernel", "xla"])
def test_layer_step_matches_the_cache_methods_bit_for_bit(copy):
  """``layer_step`` (append + device plan + the block copy + attention as ONE jitted computation;
  the copy by the zero-copy Pallas kernel, interpreted here, or by the while/switch load loop in
  chunks of 3, so a load runs several iterations and several branch sizes) against
  the cache's own ``append`` / ``update`` / ``attend`` with ``plan="device"``, bf16: over appends
  that complete blocks (``roll_over`` between steps) and selections with evictions, duplicates,
  ``-1`` padding and the current block in or out (and one step selecting only resident blocks),
  the same slots (bytes), slot map, tail, attention output and counts; one compilation for
  every step."""
  from sparse_attention_jax.nn.offload import layer_step, step_sizes

  assert step_sizes(3) == (3,) and step_sizes(64) == (8, 12, 16, 24, 32, 48, 64)
  rng = np.random.default_rng(11)
  # Dk + Dv and l' powers of two: the kernel's Triton lowering needs them (it also runs on GPUs).
  bsz, heads, dk, dv, bs, ns, total, width = 2, 3, 5, 3, 4, 5, 44, 8
  caches = [
    OffloadedBlockCache(
      batch=bsz,
      num_kv_heads=heads,
      k_dim=dk,
      v_dim=dv,
      block_size=bs,
      num_slots=ns,
      max_len=total,
      dtype=jnp.bfloat16,
      store="pinned_array",
      load_workers=1,
      plan="device",
    )
    for _ in range(2)
  ]
  ref, got = caches
  k, v, c, q = _random_kvcq(rng, bsz, total, heads, dk, dv)
  prompt = 22
  for cache in caches:
    cache.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  step = jax.jit(functools.partial(layer_step, chunk=3, k_dim=dk, scale=0.5, host=True, copy=copy))
  loads, compiles = set(), []
  for t in range(prompt, 36):  # blocks 5 .. 8 complete on the way
    gamma = _random_gamma(rng, np.asarray(ref.slot_block), t // bs, ns, width)
    if t == 30:  # the resident blocks: no iteration
      gamma = np.full((bsz, heads, width), -1, np.int32)
      gamma[..., :ns] = np.asarray(ref.slot_block)
    ref.append(k[:, t], v[:, t], c[:, t])
    st_ref = ref.update(jnp.asarray(gamma))
    o_ref = ref.attend(q, softmax_scale=0.5)
    got.roll_over()
    kv_t = jnp.concatenate([k[:, t], v[:, t]], axis=-1)
    o, state, info = step(
      got.device_state(),
      got.store.kv,
      got.store.c,
      kv_t,
      c[:, t],
      jnp.asarray(gamma),
      q,
      jnp.int32(t),
    )
    st_got = got.commit(state, np.asarray(info))
    compiles.append(step._cache_size())
    for key in ("requested", "hits", "transferred", "bytes"):
      assert st_got[key] == st_ref[key], (t, key)
    loads.add(st_ref["transferred"])
    assert got.length == ref.length == t + 1
    for a, b in zip(got.device_state(), ref.device_state()):
      np.testing.assert_array_equal(
        np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
      )
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))
  assert max(loads) > 6 and 0 in loads and loads & {1, 2, 4, 5}, loads  # several iterations
  assert compiles[-1] == 1, compiles
  np.testing.assert_array_equal(
    np.asarray(got.store.kv.astype(jnp.float32)), np.asarray(ref.store.kv.astype(jnp.float32))
  )


@pytest.mark.parametrize("copy", ["kernel", "xla"])
def test_layer_step_copies_nothing_for_a_refused_selection(copy):
  """A selection with more blocks than slots (and one with a future block) is flagged in
  ``info`` and copies nothing (its load rows would name slot -1 or blocks past the store); the
  cache's ``commit`` then raises the plans' errors."""
  from sparse_attention_jax.nn.offload import (
    INFO_MAX_ID,
    INFO_OVERFULL_ROW,
    layer_step,
  )

  rng = np.random.default_rng(5)
  cache = OffloadedBlockCache(
    batch=1,
    num_kv_heads=1,
    k_dim=5,
    v_dim=3,
    block_size=4,
    num_slots=2,
    max_len=40,
    store="pinned_array",
    plan="device",
  )
  k, v, c, q = _random_kvcq(rng, 1, 40, 1, 5, 3)
  cache.prefill(k[:, :30], v[:, :30], c[:, :30])
  step = jax.jit(functools.partial(layer_step, chunk=8, k_dim=5, scale=0.5, host=True, copy=copy))
  kv_t = jnp.concatenate([k[:, 30], v[:, 30]], axis=-1)
  for gamma, flag, match in (
    ([[[0, 1, 2, 3]]], INFO_OVERFULL_ROW, "at most num_slots=2"),
    ([[[0, 9]]], INFO_MAX_ID, "block ids <= the current block 7"),
  ):
    before = [np.asarray(x) for x in cache.device_state()[:2]]
    _, state, info = step(
      cache.device_state(),
      cache.store.kv,
      cache.store.c,
      kv_t,
      c[:, 30],
      jnp.asarray(gamma, jnp.int32),
      q,
      jnp.int32(30),
    )
    assert int(info[flag]) == (0 if flag == INFO_OVERFULL_ROW else 9)
    for a, b in zip(state[:2], before):
      np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match=match):
      cache.account(np.asarray(info), t=30)


def test_device_plan_falls_back_to_sliced_rows_and_the_store_load(caplog):
  """If the fused sliced load cannot be compiled, plan="device" logs it once and slices the
  rows in a separate jitted call before the store's jitted load: same slots as plan="host"."""
  rng = np.random.default_rng(9)
  caches = [
    OffloadedBlockCache(
      batch=2,
      num_kv_heads=2,
      k_dim=3,
      v_dim=3,
      block_size=4,
      num_slots=4,
      max_len=40,
      store="pinned_array",
      load_workers=1,
      plan=plan,
    )
    for plan in ("host", "device")
  ]
  k = jnp.asarray(rng.standard_normal((2, 33, 2, 3)), jnp.float32)
  for cache in caches:
    cache.prefill(k, -k, k[..., 0])  # current block 8

  def refuse(*args, **kw):
    raise RuntimeError("INTERNAL: Bitcast cannot have different memory spaces")

  caches[1]._planned_load = refuse
  with caplog.at_level("WARNING", logger="sparse_attention_jax.nn.offload"):
    for _ in range(3):
      gamma = np.stack([[rng.choice(9, 4, replace=False) for _ in range(2)] for _ in range(2)])
      stats = [cache.update(gamma) for cache in caches]
      assert stats[0]["transferred"] == stats[1]["transferred"] > 0
      np.testing.assert_array_equal(np.asarray(caches[1].slot_block), caches[0].slot_block)
      for name in ("slot_kv", "slot_c"):
        np.testing.assert_array_equal(
          np.asarray(getattr(caches[1], name)), np.asarray(getattr(caches[0], name))
        )
  assert not caches[1]._planned_fused
  assert sum("fused plan='device' load does not compile" in r.message for r in caplog.records) == 1


def test_plan_argument_errors():
  with pytest.raises(ValueError, match=r"plan: expected one of \('host', 'device'\), got 'gpu'"):
    OffloadedBlockCache(
      batch=1,
      num_kv_heads=1,
      k_dim=2,
      v_dim=2,
      block_size=4,
      num_slots=2,
      max_len=8,
      store="pinned_array",
      plan="gpu",
    )
  for store in ("numpy", "pinned_host"):
    with pytest.raises(
      ValueError,
      match=rf"plan: expected 'host' with a store other than "
      rf"'pinned_array' .* got 'device' with store='{store}'",
    ):
      OffloadedBlockCache(
        batch=1,
        num_kv_heads=1,
        k_dim=2,
        v_dim=2,
        block_size=4,
        num_slots=2,
        max_len=8,
        store=store,
        plan="device",
      )


def test_device_plan_refuses_bad_selections_and_leaves_slots():
  """plan="device" raises the host plan's errors (too many blocks in a row, a future block, a
  bad shape) from its read-back counts, and keeps the slots unchanged."""
  _, k, v, c = _inputs(6)
  cache = OffloadedBlockCache(
    batch=B,
    num_kv_heads=H,
    k_dim=D,
    v_dim=DV,
    block_size=CFG.block_size,
    num_slots=2,
    max_len=T,
    store="pinned_array",
    plan="device",
  )
  with pytest.raises(ValueError, match="update: expected a cache holding tokens"):
    cache.update(np.zeros((B, H, 4), np.int32))
  cache.prefill(k[:, :40], v[:, :40], c[:, :40])  # current block 4
  assert cache.update(np.array([[[0, 1, 4, -1]] * H] * B))["transferred"] == 2 * B * H
  before = np.asarray(cache.slot_block).copy()
  gamma = np.array([[[0, 1, 4, -1]] * H] * B)
  gamma[1, 1] = [0, 1, 2, 3]
  with pytest.raises(
    ValueError,
    match=r"gamma: expected at most num_slots=2 selected blocks "
    r"besides the current block .* got 4 at \(b=1, h=1\)",
  ):
    cache.update(jnp.asarray(gamma))
  with pytest.raises(ValueError, match="gamma: expected block ids <= the current block 4"):
    cache.update(np.array([[[0, 5, -1, -1]] * H] * B))
  with pytest.raises(ValueError, match=r"gamma: expected shape \[B, H, n\]"):
    cache.update(np.zeros((B, 4), np.int32))
  np.testing.assert_array_equal(np.asarray(cache.slot_block), before)
  st = cache.update(np.zeros((B, H, 0), np.int32))  # empty selection: evicts everything
  assert (st["requested"], st["transferred"]) == (0, 0)
  assert (np.asarray(cache.slot_block) == -1).all() and not np.asarray(cache.tail_use).any()


def test_store_argument_error():
  with pytest.raises(
    ValueError,
    match=r"store: expected one of \('numpy', 'pinned_host', "
    r"'pinned_array'\), got 'pinned'",
  ):
    _cache(store="pinned")


def test_transfer_argument_errors():
  with pytest.raises(
    ValueError,
    match=r"transfer: expected one of \('fresh', 'staged'\), "
    r"got 'pinned'",
  ):
    _cache(transfer="pinned")
  with pytest.raises(
    ValueError,
    match=r"transfer: expected 'fresh' with a store other than "
    r"'numpy' .* got 'staged' with store='pinned_host'",
  ):
    _cache(store="pinned_host", transfer="staged")


def test_current_block_outside_the_selection_is_not_attended():
  q, k, v, c = _inputs(3)
  cache = _cache()
  cache.prefill(k[:, :30], v[:, :30], c[:, :30])  # t = 29, current block 3
  gamma = np.array([[[0, 2, -1, -1]] * H] * B)
  cache.update(gamma)
  idx = np.full((B, 30, H, 4), -1, np.int32)
  idx[:, 29] = gamma
  ref = biased_selected_attention(
    q[:, :30], k[:, :30], v[:, :30], c[:, :30], jnp.asarray(idx), block_size=8
  )
  np.testing.assert_allclose(cache.attend(q[:, 29]), ref[:, 29], atol=2e-5, rtol=1e-4)


def test_capacity_and_budget_errors():
  with pytest.raises(ValueError, match="load_workers: expected a positive int"):
    _cache(load_workers=0)
  from sparse_attention_jax.nn.offload import default_load_workers

  assert 1 <= default_load_workers() <= 4 and _cache(load_workers=None).load_workers >= 1
  _, k, v, c = _inputs(5)
  cache = _cache(num_slots=1, max_len=25)
  with pytest.raises(ValueError, match="update: expected a cache holding tokens"):
    cache.update(np.zeros((B, H, 4), np.int32))
  cache.prefill(k[:, :24], v[:, :24], c[:, :24])  # t = 23, current block 2
  with pytest.raises(
    ValueError,
    match=r"gamma: expected at most num_slots=1 selected blocks "
    r"besides the current block .* got 2 at \(b=0, h=0\)",
  ):
    cache.update(np.array([[[0, 1, 2, -1]] * H] * B))
  with pytest.raises(ValueError, match="gamma: expected block ids <= the current block 2"):
    cache.update(np.array([[[0, 3, -1, -1]] * H] * B))
  with pytest.raises(ValueError, match=r"gamma: expected shape \[B, H, n\]"):
    cache.update(np.zeros((B, 4), np.int32))
  cache.append(k[:, 24], v[:, 24], c[:, 24])
  with pytest.raises(ValueError, match="append: expected at most max_len=25 tokens"):
    cache.append(k[:, 24], v[:, 24], c[:, 24])
  with pytest.raises(ValueError, match="prefill: expected an empty cache"):
    cache.prefill(k[:, :8], v[:, :8], c[:, :8])
  with pytest.raises(ValueError, match="num_slots: expected a positive int"):
    _cache(num_slots=0)
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

  with caplog.at_level("WARNING", logger="sparse_attention_jax.nn.offload"):
    assert host_memory_kind(NoPinned()) == "device"
  assert "no pinned_host memory" in caplog.text
  assert host_memory_kind(Pinned()) == "pinned_host"
  # The CPU backend has pinned host memory, so the CPU tests run the real host placement.
  assert "pinned_host" in [m.kind for m in jax.devices()[0].addressable_memories()]


def _oracle_assign(gamma, slot_block, cur):
  """The earlier per-(b, h) set-based bookkeeping: the same slot map, loads and counts."""
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
        loads.append((bi, hi, int(s), j))
      requested += len(want)
      hits += len(want & resident)
  return loads, tail_use, requested, hits


def test_vectorized_slot_assignment_matches_set_oracle():
  """Random selections over 60 steps (padding, duplicates, the current block in or out, rows
  that keep, drop and add blocks): the vectorized assignment leaves exactly Gamma minus the
  current block resident, loads exactly the missing blocks, never puts a block in two slots,
  never moves a kept block, and equals the earlier per-row set-based bookkeeping."""
  rng = np.random.default_rng(0)
  bsz, heads, ns, n = 3, 2, 6, 8
  slots = np.full((bsz, heads, ns), -1, np.int32)
  oracle = slots.copy()
  total_loads = 0
  for step in range(60):
    cur = 3 + step // 4
    gamma = np.full((bsz, heads, n), -1, np.int64)
    for bi in range(bsz):
      for hi in range(heads):
        prev = [int(j) for j in slots[bi, hi] if j >= 0]
        fresh = rng.choice(cur, size=min(cur, ns), replace=False).tolist()
        pool = [j for j in prev if rng.random() < 0.7] + fresh  # mostly keep the old ones
        picked = list(dict.fromkeys(pool))[: rng.integers(0, ns + 1)]
        if rng.random() < 0.6:
          picked.append(cur)
        if picked and rng.random() < 0.3:
          picked.append(picked[0])  # a duplicate
        picked = picked[:n]
        gamma[bi, hi, : len(picked)] = rng.permutation(picked)
    before = slots.copy()
    (b, h, s, j), tail_use, requested, hits = assign_slots(gamma, slots, cur)
    want_loads, want_tail, want_req, want_hits = _oracle_assign(gamma, oracle, cur)
    np.testing.assert_array_equal(slots, oracle, err_msg=f"step {step}")
    assert sorted(zip(b.tolist(), h.tolist(), s.tolist(), j.tolist())) == sorted(want_loads)
    np.testing.assert_array_equal(tail_use, want_tail)
    assert (requested, hits) == (want_req, want_hits)
    for bi in range(bsz):
      for hi in range(heads):
        want = {int(x) for x in gamma[bi, hi] if x >= 0} - {cur}
        row = [int(x) for x in slots[bi, hi] if x >= 0]
        assert len(row) == len(set(row)) and set(row) == want
        old = {int(x): si for si, x in enumerate(before[bi, hi]) if x >= 0}
        for si, x in enumerate(slots[bi, hi]):
          if int(x) in old and int(x) in want:
            assert old[int(x)] == si  # kept blocks did not move
        loaded = {int(jj) for bb, hh, jj in zip(b, h, j) if (bb, hh) == (bi, hi)}
        assert loaded == want - set(old)
    assert len(b) == requested - hits
    total_loads += len(b)
  assert total_loads > 100


def test_assignment_refuses_too_many_blocks_and_leaves_slots():
  cache = _cache(num_slots=2)
  _, k, v, c = _inputs(6)
  cache.prefill(k[:, :40], v[:, :40], c[:, :40])  # current block 4
  cache.update(np.array([[[0, 1, 4, -1]] * H] * B))
  gamma = np.array([[[0, 1, 4, -1]] * H] * B)
  gamma[1, 1] = [0, 1, 2, 3]
  before = cache.slot_block.copy()
  with pytest.raises(ValueError, match=r"got 4 at \(b=1, h=1\)"):
    cache.update(gamma)
  np.testing.assert_array_equal(cache.slot_block, before)


def test_scatter_buckets_bound_padding_and_compiles():
  sizes = buckets(1024)
  assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 1024 and len(sizes) <= 4 + 4 * 7 + 1
  for n in range(1, 1025):
    got = bucket(n)
    assert got in sizes and n <= got and (n <= 8 or got <= 1.25 * n)
    assert bucket(got) == got


@pytest.mark.parametrize("store", ["numpy", "pinned_host", "pinned_array"])
def test_warm_scatter_covers_every_load_size(store, monkeypatch):
  """After ``warm_scatter`` no update compiles a scatter: random selections load 1 .. 36
  blocks per step (chunks of at most 16) and hit only warmed buckets."""
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "MAX_SCATTER", 16)
  cache = OffloadedBlockCache(
    batch=3, num_kv_heads=2, k_dim=4, v_dim=4, block_size=4, num_slots=6, max_len=120, store=store
  )
  if not hasattr(cache._scatter, "_cache_size"):
    pytest.skip("jax.jit(...)._cache_size is not available in this jax")
  load = cache._array_load if store == "pinned_array" else cache._scatter
  cache.warm_scatter()
  load = cache._array_load if store == "pinned_array" else cache._scatter
  warmed = load._cache_size()
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((3, 117, 2, 4)), jnp.float32)
  cache.prefill(k, k, k[..., 0])  # current block 29
  sizes = set()
  for _ in range(12):
    size = int(rng.integers(1, 7))
    gamma = np.stack([[rng.choice(29, size, replace=False) for _ in range(2)] for _ in range(3)])
    sizes.add(cache.update(gamma)["transferred"])
  assert load._cache_size() == warmed and len(sizes) >= 6
