"""Packed documents with document-relative block ids: the reference semantics, random packed
rows, and an emulation of the masks the kernels apply (shared by the CPU and GPU tests).

Semantics: with ``segment_ids``, key ``s`` is visible to query ``t`` through KV head ``h`` iff
``ds(t) <= s <= t`` and ``(s - ds(t)) // bs`` is in ``block_indices[b, t, h, :]`` (``-1`` and
out-of-range entries match nothing, duplicates count once); ``ds(t)`` is the first position of
``t``'s document (documents are maximal runs of equal ids).

Everything here is self-contained (numpy and plain ``jax.numpy``), independent of the library's
own reference; :func:`reference` is jittable (the GPU tests run it on the device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.selected_attention_common import document_starts


def doc_starts(segment_ids):
  """``[B, T]`` int64 numpy: first position of each token's document."""
  seg = np.asarray(segment_ids)
  b, t = seg.shape
  out = np.zeros((b, t), np.int64)
  for i in range(1, t):
    out[:, i] = np.where(seg[:, i] != seg[:, i - 1], i, out[:, i - 1])
  return out


def packed_segments(rng, b, t, num_docs, *, tiny=0):
  """``[B, T]`` int32 ids of ``num_docs`` documents of random lengths per row (``tiny`` of them
  of length 1 to 3); equal neighbouring ids never occur across a boundary."""
  rows = []
  for _ in range(b):
    cuts = set()
    while len(cuts) < num_docs - 1:
      c = int(rng.integers(1, t))
      cuts.add(c)
      if tiny and len(cuts) < num_docs - 1 and len(cuts) < 2 * tiny:
        w = int(rng.integers(1, 4))
        if c + w < t:
          cuts.add(c + w)
    ids = np.zeros(t, np.int32)
    for c in sorted(cuts)[: num_docs - 1]:
      ids[c:] += 1
    rows.append(ids * 3 + 1)
  return jnp.asarray(np.stack(rows))


def relative_selection(rng, segment_ids, h, n, *, block_size, pad_frac=0.15):
  """``[B, T, H, n]`` int32 document-relative ids, NSA-like: slot 0 the query's own block
  ``(t - ds) // bs``, slot 1 the document's first block 0, random earlier blocks, ``-1``
  padding, a duplicate and a few out-of-range ids (past the query's block, and negative)."""
  ds = doc_starts(segment_ids)
  b, t = ds.shape
  cur = ((np.arange(t)[None, :] - ds) // block_size)[:, :, None, None]  # [B, T, 1, 1]
  ids = np.floor(rng.random((b, t, h, n)) * (cur + 1)).astype(np.int64)
  ids = np.where(rng.random(ids.shape) < pad_frac, -1, ids)
  ids = np.where(rng.random(ids.shape) < 0.03, cur + 1 + rng.integers(0, 3, ids.shape), ids)
  ids = np.where(rng.random(ids.shape) < 0.01, -2, ids)
  ids[..., 0] = cur[..., 0]
  if n > 2:
    ids[..., 1] = 0
    ids[..., -1] = ids[..., 2]
  return jnp.asarray(ids.astype(np.int32))


def reference_mask(block_indices, segment_ids, *, block_size):
  """``[B, H, T, T]`` bool: the semantics above (``segment_ids=None``: one document). Plain
  ``jax.numpy``, jittable; memory ``B*T*H*T``."""
  bi = jnp.asarray(block_indices, jnp.int32)
  b, t, h, _ = bi.shape
  nb = -(-t // block_size)
  pos = jnp.arange(t, dtype=jnp.int32)
  if segment_ids is None:
    ds = jnp.zeros((b, t), jnp.int32)
  else:
    seg = jnp.asarray(segment_ids)
    new = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    ds = jax.lax.cummax(jnp.where(new, pos, 0), axis=1)
  sel = (bi[..., None] == jnp.arange(nb, dtype=jnp.int32)).any(axis=3)  # [B, T, H, NB]
  s = pos[None, None, :]
  inside = (s >= ds[..., None]) & (s <= pos[None, :, None])  # [B, T, S]
  rel = jnp.clip((s - ds[..., None]) // block_size, 0, nb - 1)  # [B, T, S]
  hit = jnp.take_along_axis(sel, rel[:, :, None, :], axis=3)  # [B, T, H, S]
  return (hit & inside[:, :, None, :]).transpose(0, 2, 1, 3)


def attention(q, k, v, mask, scale):
  """float32 ``(o [B, T, HQ, Dv], lse [B, T, HQ])`` of softmax attention under ``mask [B, H, T,
  S]`` (KV head ``h`` serves query heads ``h*G .. h*G + G - 1``); rows that see no key give
  ``o = 0`` and ``lse = -inf``."""
  b, t, hq, _ = q.shape
  h = k.shape[2]
  g = hq // h
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  qg = f32(q).reshape(b, t, h, g, -1)
  s = jnp.einsum("bthgd,bshd->bhgts", qg, f32(k)) * scale
  m = jnp.asarray(mask)[:, :, None]  # [B, H, 1, T, S]
  s = jnp.where(m, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, G, T]
  p = jnp.where(m, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("bhgts,bshd->bthgd", p, f32(v)).reshape(b, t, hq, -1)
  return o, lse.transpose(0, 3, 1, 2).reshape(b, t, hq)


def reference(q, k, v, block_indices, segment_ids, *, block_size, scale, shared_run=None):
  """float32 ``(o, lse)`` of the semantics above (``shared_run``: a token at document position
  ``u`` uses the list of its document's token ``u - u % shared_run``)."""
  bi = jnp.asarray(block_indices)
  if shared_run is not None:
    b, t = bi.shape[:2]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    start = document_starts(None if segment_ids is None else jnp.asarray(segment_ids), b, t)
    lead = pos - (pos - start) % shared_run  # [B, T]
    bi = jnp.take_along_axis(bi, lead[:, :, None, None], axis=1)
  mask = reference_mask(bi, segment_ids, block_size=block_size)
  return attention(q, k, v, mask, scale)


def _member(lo, hi, i):
  word = (int(lo) & 0xFFFFFFFF) | ((int(hi) & 0xFFFFFFFF) << 32)
  return (word >> i) & 1 == 1


def forward_mask(lists, shift, *, t, tokens_per_group, groups, block_size, num_keys):
  """``[B, H, T, num_keys]`` bool numpy: what the forward (and dQ) kernels let each query row
  see, in padded key coordinates, emulated from their operands: per tile of ``groups`` 64-row
  groups of ``tokens_per_group`` tokens and per listed block, the group's no-mask test (every
  token a member and the block wholly at or before ``t_base + min shift``) or the row mask
  (member and ``key <= t + shift``)."""
  ids, counts = np.asarray(lists.ids), np.asarray(lists.counts)
  lo, hi = np.asarray(lists.member_lo), np.asarray(lists.member_hi)
  sh = np.asarray(shift)
  b, h, nt, _ = ids.shape
  r = tokens_per_group
  r_tile = groups * r
  bs = block_size
  out = np.zeros((b, h, t, num_keys), bool)
  for bb in range(b):
    for hh in range(h):
      for tile in range(nt):
        for w in range(groups):
          tok0 = w * r  # within the tile
          t_base = tile * r_tile + tok0
          toks = [t_base + i for i in range(r)]
          smin = min(int(sh[bb, x]) if x < t else 0 for x in toks)
          for j in range(counts[bb, hh, tile]):
            blk = int(ids[bb, hh, tile, j])
            keys = np.arange(blk * bs, blk * bs + bs)
            members = [
              _member(lo[bb, hh, tile, j], hi[bb, hh, tile, j], tok0 + i) for i in range(r)
            ]
            full = blk * bs + bs - 1 <= t_base + smin and all(members)
            for i, x in enumerate(toks):
              if x >= t:
                continue
              if full:
                out[bb, hh, x, keys] = True
              elif members[i]:
                out[bb, hh, x, keys[keys <= x + sh[bb, x]]] = True
  return out


def dkv_mask(work, shift, *, t, tokens_per_tile, block_size, num_keys, smin=None):
  """``([B, H, T, num_keys] bool, [B, H, T, num_keys] int)``: what the dK/dV kernel lets each
  (query, padded key) pair contribute, emulated from its work items (64-key tiles, the no-mask
  test on ``t_base + smin[tile]``), and how many (item, key tile) CTAs cover each pair."""
  tiles, wlo, whi, wblk, wstart, wcnt = (np.asarray(x) for x in work)
  sh = np.asarray(shift)
  b, h, _ = tiles.shape
  r = tokens_per_tile
  bs, kt = block_size, 64
  nb = num_keys // bs
  cover = np.zeros((b, h, t, num_keys + kt), np.int64)
  for bb in range(b):
    for hh in range(h):
      for it in range(wblk.shape[-1]):
        blk = min(int(wblk[bb, hh, it]), nb - 1)
        for half in range(max(1, bs // kt)):
          key0 = blk * bs + half * kt
          keys = key0 + np.arange(kt)
          for p in range(wstart[bb, hh, it], wstart[bb, hh, it] + wcnt[bb, hh, it]):
            tile = int(tiles[bb, hh, p])
            t_base = tile * r
            members = [_member(wlo[bb, hh, p], whi[bb, hh, p], i) for i in range(r)]
            tmin = min(int(sh[bb, x]) if x < t else 0 for x in range(t_base, t_base + r))
            if smin is not None:
              tmin = int(np.asarray(smin)[bb, tile])
            full = bs >= kt and key0 + kt - 1 <= t_base + tmin and all(members)
            for i in range(r):
              x = t_base + i
              if x >= t:
                continue
              if full:
                vis = np.ones(kt, bool)
              elif members[i]:
                vis = keys <= x + sh[bb, x]
              else:
                continue
              if bs < kt:
                vis &= np.arange(kt) < bs
              cover[bb, hh, x, keys[vis]] += 1
  cover = cover[..., :num_keys]
  return cover > 0, cover


def to_rows(mask_padded, source, t):
  """Padded key coordinates -> row coordinates: ``[B, H, T, R] -> [B, H, T, T]`` (padding
  positions, ``source == T``, must be invisible: asserted)."""
  src = np.asarray(source)
  m = np.asarray(mask_padded)
  b, h = m.shape[:2]
  out = np.zeros((b, h, m.shape[2], t), bool)
  for bb in range(b):
    pad = src[bb] >= t
    assert not m[bb][..., pad].any(), "a padding key position is visible"
    out[bb][..., src[bb][~pad]] = m[bb][..., ~pad]
  return out
