"""NOSA cached decoding: device-resident decode steps equal the full forward (op and model, block
and compression boundaries, prompts of different lengths, one compilation, reads O(C/d + k*l')
keys). Offloaded decoding is tested in tests/offload."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from nosa_models import CFG, KQ, nosa_model

from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.ops.nosa import nosa_attention
from sparse_attention_jax.ops.nosa.decode import (
  fill_nosa_cache,
  init_nosa_cache,
  nosa_decode_step,
)
from sparse_attention_jax.ops.nosa.selection import for_length

# l=8, d=4: a compressed token completes at 7, 11, 15, ...; blocks of 8 start at 8, 16, ...
B, T, CAP = 2, 56, 60
LENGTHS = (6, 13)


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
  )


# ------------------------------------------------------------------------------ op level
def test_nosa_decode_step_equals_op_at_every_position():
  """Prefill 6 tokens of row 0 and 13 of row 1 (right-padded), then decode to T=56 (GQA G=2,
  Dk != Dv, eviction scores of both signs): every step equals the full op at that position."""
  hq, h, dk, dv = 4, 2, 8, 6
  ks = jax.random.split(jax.random.key(11), 4)
  q = jax.random.normal(ks[0], (B, T, hq, dk))
  k = jax.random.normal(ks[1], (B, T, h, dk))
  v = jax.random.normal(ks[2], (B, T, h, dv))
  c = 2.0 * jax.random.normal(ks[3], (B, T, h))
  cfg_t, kq_t = for_length(CFG, KQ, T)
  full = nosa_attention(q, k, v, c, config=cfg_t, num_query_selected=kq_t)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  tp = max(LENGTHS)
  cache = init_nosa_cache(B, CAP, config=CFG, num_kv_heads=h, dk=dk, dv=dv, dtype=jnp.float32)
  cache = fill_nosa_cache(cache, config=CFG, lengths=lengths, k=k[:, :tp], v=v[:, :tp], c=c[:, :tp])
  step = jax.jit(
    lambda cache, q, k, v, c, pos: nosa_decode_step(
      cache, q, config=CFG, num_query_selected=KQ, pos=pos, k=k, v=v, c=c
    )
  )
  pos = lengths
  rows = jnp.arange(B)
  while int(pos.min()) < T:
    p = jnp.minimum(pos, T - 1)
    o, cache = step(cache, q[rows, p], k[rows, p], v[rows, p], c[rows, p], pos)
    for r in range(B):
      if int(pos[r]) < T:
        close(o[r], full[r, int(pos[r])])
    pos = pos + 1


# --------------------------------------------------------------------------- model level


def test_model_decode_equals_full_forward():
  """Prompts of 6 and 13 tokens, then cached steps to T=56: the logits of every step equal the
  full forward's, through compression completions and block starts; decoding traces once."""
  model = nosa_model()
  graphdef, params = nnx.split(model)
  traces = []

  @jax.jit
  def pre(params, tokens, lengths):
    m = nnx.merge(graphdef, params)
    return dec.prefill(m, tokens, lengths, dec.init_decode_state(m, B, CAP))

  @jax.jit
  def step(params, tokens, state):
    traces.append(1)
    return dec.decode_step(nnx.merge(graphdef, params), tokens, state)

  tokens = jax.random.randint(jax.random.key(7), (B, T), 0, 64)
  full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  logits, state = pre(params, tokens[:, : max(LENGTHS)], lengths)
  for r in range(B):
    close(logits[r], full[r, LENGTHS[r] - 1])
  while int(state.lengths.min()) < T:
    pos = np.asarray(state.lengths)
    logits, state = step(params, tokens[jnp.arange(B), jnp.minimum(state.lengths, T - 1)], state)
    for r in range(B):
      if pos[r] < T:
        close(logits[r], full[r, pos[r]])
  assert len(traces) == 1


def _dot_operand_dims(jaxpr) -> set[int]:
  dims = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      for v in eqn.invars:
        dims.update(v.aval.shape)
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None:
        dims |= _dot_operand_dims(getattr(inner, "jaxpr", inner))
  return dims


def test_decode_step_never_attends_over_the_capacity():
  """Capacity 4099: no matmul of a NOSA decode step spans the cache; the compressed keys
  ((4099 - 8) // 4 + 1 = 1023) and the k*l' = 40 selected keys are what it reads."""
  cap = 4099
  model = nosa_model(kinds=("nosa",))
  graphdef, params = nnx.split(model)

  def step(params, tokens, state):
    return dec.decode_step(nnx.merge(graphdef, params), tokens, state)

  state = jax.eval_shape(lambda: dec.init_decode_state(model, 1, cap))
  dims = _dot_operand_dims(jax.make_jaxpr(step)(params, jnp.zeros((1,), jnp.int32), state).jaxpr)
  assert cap not in dims and 1023 in dims and 40 in dims
