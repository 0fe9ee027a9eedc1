"""Tile iteration lists, membership bits and the inverse map, against brute-force NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selection_tiles import (
  inverse_tile_map,
  inverse_tile_map_padded,
  tile_iteration_lists,
)
from sparse_attention_jax.ops.selection import share_selection


def rand_indices(rng, b, t, h, n, nb, pad_frac=0.2):
  """Random ids in [-1, NB + 1] with some -1 padding, out-of-range ids and duplicates."""
  x = rng.integers(0, nb, size=(b, t, h, n))
  x = np.where(rng.random(x.shape) < pad_frac, -1, x)
  x = np.where(rng.random(x.shape) < 0.05, nb + 1, x)  # out of range
  x[..., -1] = x[..., 0]  # duplicates
  return x.astype(np.int32)


def np_lists(bi, r, bs, shared):
  """Brute force: ``{(b, h, tile): (sorted ids, {id: set of member tokens})}``."""
  b, t, h, _ = bi.shape
  nb = -(-t // bs)
  nt = -(-t // r)
  out = {}
  for bb in range(b):
    for hh in range(h):
      for tile in range(nt):
        t0 = tile * r
        members = {}
        for i in range(r):
          tt = t0 + i
          if tt >= t:
            continue
          src = t0 if shared else tt
          for x in bi[bb, src, hh]:
            if 0 <= x < nb and x * bs <= tt:
              members.setdefault(int(x), set()).add(i)
        out[bb, hh, tile] = (sorted(members), members)
  return out


@pytest.mark.parametrize(
  "b,t,h,n,r,bs,shared",
  [
    (1, 40, 2, 3, 4, 8, False),
    (2, 37, 1, 4, 8, 8, False),
    (1, 64, 2, 5, 64, 16, False),
    (1, 70, 1, 4, 40, 8, False),
    (1, 33, 2, 3, 5, 8, False),
    (2, 40, 2, 3, 4, 8, True),
    (1, 50, 1, 4, 7, 16, True),
    (1, 9, 1, 2, 1, 4, False),
  ],
)
def test_tile_lists_match_brute_force(b, t, h, n, r, bs, shared):
  rng = np.random.default_rng(t * 7 + r)
  nb = -(-t // bs)
  bi = rand_indices(rng, b, t, h, n, nb)
  got = tile_iteration_lists(jnp.asarray(bi), tokens_per_tile=r, block_size=bs, shared=shared)
  ids, counts = np.asarray(got.ids), np.asarray(got.counts)
  lo = np.asarray(got.member_lo).view(np.uint32).astype(np.uint64)
  hi = np.asarray(got.member_hi).view(np.uint32).astype(np.uint64)
  nt = -(-t // r)
  length = min(n if shared else r * n, nb)
  assert ids.shape == lo.shape == hi.shape == (b, h, nt, length)
  assert counts.shape == (b, h, nt)
  want = np_lists(bi, r, bs, shared)
  for (bb, hh, tile), (lst, members) in want.items():
    c = counts[bb, hh, tile]
    assert c == len(lst), (bb, hh, tile)
    np.testing.assert_array_equal(ids[bb, hh, tile, :c], lst)
    pad = lst[-1] if lst else 0
    np.testing.assert_array_equal(ids[bb, hh, tile, c:], pad)  # repeat last valid
    for j, x in enumerate(lst):
      word = int(lo[bb, hh, tile, j]) | (int(hi[bb, hh, tile, j]) << 32)
      got_tokens = {i for i in range(64) if word >> i & 1}
      want_tokens = set(range(r)) if shared else members[x]
      if shared:
        assert got_tokens >= want_tokens
      else:
        assert got_tokens == want_tokens, (bb, hh, tile, x)
    assert np.all(lo[bb, hh, tile, c:] == 0) and np.all(hi[bb, hh, tile, c:] == 0)


def test_shared_lists_equal_exact_lists_of_shared_selection():
  rng = np.random.default_rng(3)
  b, t, h, n, r, bs = 1, 48, 2, 4, 4, 8
  bi = jnp.asarray(rand_indices(rng, b, t, h, n, -(-t // bs)))
  shared = tile_iteration_lists(bi, tokens_per_tile=r, block_size=bs, shared=True, max_len=6)
  exact = tile_iteration_lists(share_selection(bi, r), tokens_per_tile=r, block_size=bs, max_len=6)
  np.testing.assert_array_equal(shared.counts, exact.counts)
  np.testing.assert_array_equal(shared.ids, exact.ids)


def test_share_selection():
  bi = jnp.arange(2 * 7 * 1 * 2).reshape(2, 7, 1, 2)
  got = np.asarray(share_selection(bi, 3))
  want = np.asarray(bi)[:, [0, 0, 0, 3, 3, 3, 6]]
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="r"):
    share_selection(bi, 0)


def test_max_len_truncates_and_errors_name_argument():
  bi = jnp.asarray(np.tile(np.arange(4, dtype=np.int32), (1, 8, 1, 1)))  # [1, 8, 1, 4]
  got = tile_iteration_lists(bi, tokens_per_tile=8, block_size=2, max_len=2)
  np.testing.assert_array_equal(got.counts, [[[2]]])
  np.testing.assert_array_equal(got.ids, [[[[0, 1]]]])
  with pytest.raises(ValueError, match="tokens_per_tile"):
    tile_iteration_lists(bi, tokens_per_tile=65, block_size=2)
  with pytest.raises(ValueError, match="block_size"):
    tile_iteration_lists(bi, tokens_per_tile=4, block_size=0)
  with pytest.raises(ValueError, match="block_indices"):
    tile_iteration_lists(bi[0], tokens_per_tile=4, block_size=2)


@pytest.mark.parametrize("shared", [False, True])
def test_inverse_map_matches_brute_force(shared):
  rng = np.random.default_rng(11)
  b, t, h, n, r, bs = 2, 45, 2, 3, 4, 8
  nb = -(-t // bs)
  bi = rand_indices(rng, b, t, h, n, nb)
  lists = tile_iteration_lists(jnp.asarray(bi), tokens_per_tile=r, block_size=bs, shared=shared)
  inv = inverse_tile_map(lists, nb)
  tiles, offsets = np.asarray(inv.tiles), np.asarray(inv.offsets)
  ids, counts = np.asarray(lists.ids), np.asarray(lists.counts)
  nt = ids.shape[2]
  cap = nt
  dense, dcounts = (np.asarray(x) for x in inverse_tile_map_padded(inv, cap))
  for bb in range(b):
    for hh in range(h):
      total = 0
      for k in range(nb):
        want = [tile for tile in range(nt) if k in ids[bb, hh, tile, : counts[bb, hh, tile]]]
        got = tiles[bb, hh, offsets[bb, hh, k] : offsets[bb, hh, k + 1]]
        np.testing.assert_array_equal(got, want)
        assert dcounts[bb, hh, k] == len(want)
        row = dense[bb, hh, k]
        np.testing.assert_array_equal(row[: len(want)], want)
        np.testing.assert_array_equal(row[len(want) :], want[-1] if want else 0)
        total += len(want)
      assert offsets[bb, hh, nb] == total
      if total:
        assert np.all(tiles[bb, hh, total:] == tiles[bb, hh, total - 1])


@pytest.mark.parametrize("r", [1, 4, 7])
def test_kernels_share_selection_equals_the_library(r):
  from pallas_kernels import selected_attention_common as common

  bi = jnp.asarray(rand_indices(np.random.default_rng(r), 2, 45, 3, 5, 8))
  np.testing.assert_array_equal(common.share_selection(bi, r), share_selection(bi, r))


def test_kernels_document_starts_equal_the_library():
  from pallas_kernels import selected_attention_common as common
  from sparse_attention_jax.ops.documents import document_starts

  seg = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 5, 5], [3, 3, 3, 3, 3, 3, 3, 3, 3, 4]], jnp.int32)
  np.testing.assert_array_equal(common.document_starts(seg, 2, 10), document_starts(seg, 2, 10))
  np.testing.assert_array_equal(common.document_starts(None, 2, 10), jnp.zeros((2, 10), jnp.int32))


def test_pallas_kernels_is_a_leaf_package():
  """Importing every kernel module loads nothing of the library."""
  import os
  import subprocess
  import sys

  code = (
    "import sys, pallas_kernels, pallas_kernels.selected_attention_mgpu, "
    "pallas_kernels.selected_attention_vjp_kernel_sm90, pallas_kernels.selection_tiles, "
    "pallas_kernels.selected_attention_vjp_common, pallas_kernels.selected_attention_dims\n"
    "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'sparse_attention_jax')\n"
    "assert not bad, bad\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
