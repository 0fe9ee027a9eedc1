"""ASA shared selection (``NSAConfig.selection_share``) in the reference pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attention_jax as sa
from sparse_attention_jax.ops import share_selection

B, T, HQ, H, D = 2, 64, 4, 2, 8
CFG = sa.NSAConfig.fla(cmp_window=8, cmp_stride=8, block_size=8, num_selected=3, window=8)


def _qkv(seed):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (B, T, HQ, D)),
    jax.random.normal(ks[1], (B, T, H, D)),
    jax.random.normal(ks[2], (B, T, H, D)),
  )


def test_share_one_is_per_token_selection():
  q, k, v = _qkv(0)
  o1, a1 = sa.nsa_attention(q, k, v, config=CFG, return_aux=True)
  o2, a2 = sa.nsa_attention(q, k, v, config=CFG.replace(selection_share=1), return_aux=True)
  np.testing.assert_array_equal(np.asarray(a1.block_indices), np.asarray(a2.block_indices))
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))


@pytest.mark.parametrize("r", [2, 4])
def test_runs_use_their_first_tokens_selection(r):
  q, k, v = _qkv(1)
  _, per_token = sa.nsa_attention(q, k, v, config=CFG, return_aux=True)
  o, shared = sa.nsa_attention(q, k, v, config=CFG.replace(selection_share=r), return_aux=True)
  want = np.asarray(per_token.block_indices)[:, (np.arange(T) // r) * r]
  np.testing.assert_array_equal(np.asarray(shared.block_indices), want)
  np.testing.assert_array_equal(np.asarray(share_selection(per_token.block_indices, r)), want)
  # the output is the selected branch over the shared indices
  ref = sa.nsa_attention(q, k, v, config=CFG, block_indices=shared.block_indices)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=1e-6)
  # every token keeps its own (current) block: runs never cross a block boundary
  own = np.arange(T) // CFG.block_size
  assert (np.asarray(shared.block_indices) == own[None, :, None, None]).any(-1).all()


def test_share_must_divide_block_size():
  with pytest.raises(ValueError, match="selection_share"):
    CFG.replace(selection_share=3)
  with pytest.raises(ValueError, match="r"):
    share_selection(jnp.zeros((1, 4, 1, 2), jnp.int32), 0)
