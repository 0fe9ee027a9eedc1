"""Offloaded NOSA block cache (issue 7): attention over the slot pool equals attention over the
full device-resident cache for the same selection, transfers are counted exactly, memory kinds,
and clear capacity / budget errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rand_qkv
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn.offload import OffloadedBlockCache, host_memory_kind
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention

B, T, HQ, H, D, DV = 2, 72, 4, 2, 8, 6
CFG = NSAConfig.infllm_v2(cmp_window=8, cmp_stride=4, block_size=8, num_selected=5,
                          num_init_blocks=1, num_local_blocks=1)
KQ = 3


def _inputs(seed):
  q, k, v = rand_qkv(jax.random.key(seed), B, T, HQ, H, D, DV)
  c = 1.5 * jax.random.normal(jax.random.key(seed + 1), (B, T, H))
  return q, k, v, c


def _cache(num_slots=CFG.num_selected - 1, max_len=T):
  return OffloadedBlockCache(batch=B, num_kv_heads=H, k_dim=D, v_dim=DV,
                             block_size=CFG.block_size, num_slots=num_slots, max_len=max_len)


def _want(gamma_row, cur):
  """{(b, h): selected blocks except the current one}."""
  g = np.asarray(gamma_row)
  return {(bi, hi): set(int(j) for j in g[bi, hi] if j >= 0) - {cur}
          for bi in range(B) for hi in range(H)}


def test_slot_pool_attention_equals_full_cache_and_counts_transfers():
  q, k, v, c = _inputs(0)
  _, aux = jax.jit(lambda *a: nosa_attention(*a, config=CFG, num_query_selected=KQ,
                                             return_aux=True))(q, k, v, c)
  gam = np.asarray(aux.block_indices)                                   # [B, T, H, k]
  ref = biased_selected_attention(q, k, v, c, aux.block_indices, block_size=CFG.block_size)
  cache = _cache()
  assert cache.host_memory_kind in ("pinned_host", "device")
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
    changed += prev is not None and exp > 0
    prev = want
    # The slots hold exactly the selection; attention matches the full-cache op.
    for (bi, hi), w in want.items():
      assert set(int(j) for j in cache.slot_block[bi, hi] if j >= 0) == w
    o = cache.attend(q[:, t])
    np.testing.assert_allclose(o, ref[:, t], atol=2e-5, rtol=1e-4, err_msg=f"t={t}")
  assert changed >= 8                                    # the selection did change over steps
  assert cache.totals["steps"] == T - prompt + 1
  assert 0 < cache.totals["hits"] < cache.totals["requested"]
  # Every block of the host store is a host-memory array holding the true K/V/c.
  kv, cc = cache.host_blocks[(1, 0, 2)]
  assert kv.sharding.memory_kind == cache.host_memory_kind
  np.testing.assert_array_equal(np.asarray(kv)[:, :D], np.asarray(k[1, 16:24, 0]))
  np.testing.assert_array_equal(np.asarray(cc), np.asarray(c[1, 16:24, 0]))
  assert cache.slot_kv.sharding.memory_kind == "device"


def test_current_block_outside_the_selection_is_not_attended():
  q, k, v, c = _inputs(3)
  cache = _cache()
  cache.prefill(k[:, :30], v[:, :30], c[:, :30])        # t = 29, current block 3
  gamma = np.array([[[0, 2, -1, -1]] * H] * B)
  cache.update(gamma)
  idx = np.full((B, 30, H, 4), -1, np.int32)
  idx[:, 29] = gamma
  ref = biased_selected_attention(q[:, :30], k[:, :30], v[:, :30], c[:, :30], jnp.asarray(idx),
                                  block_size=8)
  np.testing.assert_allclose(cache.attend(q[:, 29]), ref[:, 29], atol=2e-5, rtol=1e-4)


def test_capacity_and_budget_errors():
  _, k, v, c = _inputs(5)
  cache = _cache(num_slots=1, max_len=25)
  with pytest.raises(ValueError, match="update: expected a cache holding tokens"):
    cache.update(np.zeros((B, H, 4), np.int32))
  cache.prefill(k[:, :24], v[:, :24], c[:, :24])        # t = 23, current block 2
  with pytest.raises(ValueError, match=r"gamma: expected at most num_slots=1 selected blocks "
                                       r"besides the current block .* got 2 at \(b=0, h=0\)"):
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
