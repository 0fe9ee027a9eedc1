"""KV-cache decoding: decode steps equal the full forward at every position (op and
model level, every layer kind, selection-block and compression-window boundaries, GQA, prompts of
different lengths in one batch), one compilation for many steps, capacity errors, sampling."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script
from flax import nnx

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.generation.generator import Generator, greedy_by_reforward, sample_logits
from sparse_attention_jax.nn import (
  ATTENTION_KINDS,
  DecoderLM,
  LatentConfig,
  ModelConfig,
  SSAConfig,
  register_attention_kind,
)
from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.nn.attention import FullAttention
from sparse_attention_jax.ops import CompressorParams, init_mlp_compressor, nsa_attention
from sparse_attention_jax.ops.nsa_decode import fill_nsa_cache, init_nsa_cache, nsa_decode_step

# l=8, d=4: a compressed token completes at positions 7, 11, 15, ...; blocks of 8 start at 8, 16.
NSA = NSAConfig.paper(cmp_window=8, cmp_stride=4, block_size=8, num_selected=3, window=10)
LATENT = LatentConfig(kv_rank=16, q_rank=24, rope_dim=4, nope_dim=8, v_dim=6, groups=2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, T, CAP = 2, 40, 44
LENGTHS = (5, 11)  # one batch, two prompt lengths: rows decode at different positions


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
  )


# ------------------------------------------------------------------------------ op level
def _op_case(cfg: NSAConfig, mlp: bool, independent: bool, seed: int):
  b, t, hq, h, dk, dv = 2, 37, 4, 2, 8, 6
  ks = jax.random.split(jax.random.key(seed), 9)
  q = jax.random.normal(ks[0], (b, t, hq, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk))
  v = jax.random.normal(ks[2], (b, t, h, dv))
  gates = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, hq, 3)))
  extra = {}
  if independent:
    extra = dict(
      k_slc=jax.random.normal(ks[4], (b, t, h, dk)),
      v_slc=jax.random.normal(ks[5], (b, t, h, dv)),
      k_win=jax.random.normal(ks[6], (b, t, h, dk)),
      v_win=jax.random.normal(ks[7], (b, t, h, dv)),
    )
  params = None
  if mlp:
    kk, kv = jax.random.split(ks[8])
    params = CompressorParams(
      k=init_mlp_compressor(kk, num_kv_heads=h, window=cfg.cmp_window, in_dim=dk, hidden=16),
      v=init_mlp_compressor(kv, num_kv_heads=h, window=cfg.cmp_window, in_dim=dv, hidden=16),
    )
  return q, k, v, gates, extra, params


@pytest.mark.parametrize(
  "name,cfg,mlp,independent",
  [
    ("paper_mlp_independent", NSA, True, True),
    (
      "fla_mean_shared",
      NSAConfig.fla(window=12, cmp_window=8, cmp_stride=8, block_size=8, num_selected=3),
      False,
      False,
    ),
    (
      "infllm_v2_selection_only",
      NSAConfig.infllm_v2(local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=4),
      False,
      False,
    ),
    (
      "asa_shared_selection_r4",
      NSA.replace(selection_share=4, branches=("cmp", "slc")),
      True,
      False,
    ),
  ],
)
def test_nsa_decode_step_equals_op_at_every_position(name, cfg, mlp, independent):
  """Prefill 6 tokens of row 0 and 13 of row 1, then decode to T=37 (GQA G=2, Dk != Dv): every
  step equals the full op's output at that position (f32)."""
  q, k, v, gates, extra, params = _op_case(cfg, mlp, independent, seed=len(name))
  if cfg.branches == ("slc",):
    gates = None
  b, t = q.shape[:2]
  lengths = jnp.asarray([6, 13], jnp.int32)
  t0 = int(lengths.max())

  @functools.partial(jax.jit, static_argnums=0)
  def op(n, q, k, v, gates, extra):
    return nsa_attention(
      q[:, :n],
      k[:, :n],
      v[:, :n],
      None if gates is None else gates[:, :n],
      config=cfg.for_length(n),
      compress_params=params,
      impl="reference",
      return_aux=True,
      **{m: x[:, :n] for m, x in extra.items()},
    )

  ref = op(t, q, k, v, gates, extra)[0]
  pre, aux = op(t0, q, k, v, gates, extra)
  cache = init_nsa_cache(
    b,
    40,
    config=cfg,
    num_kv_heads=2,
    dk=8,
    dv=6,
    dtype=jnp.float32,
    independent_slc="k_slc" in extra,
    independent_win="k_win" in extra,
  )
  cache = fill_nsa_cache(
    cache,
    config=cfg,
    lengths=lengths,
    k=k[:, :t0],
    v=v[:, :t0],
    compress_params=params,
    block_indices=aux.block_indices,
    **{n: x[:, :t0] for n, x in extra.items()},
  )
  close(pre, ref[:, :t0])

  @jax.jit
  def step(cache, pos):
    rows = jnp.arange(b)

    def at(x):
      return None if x is None else x[rows, pos]

    return nsa_decode_step(
      cache,
      at(q),
      config=cfg,
      pos=pos,
      k=at(k),
      v=at(v),
      gates=at(gates),
      compress_params=params,
      **{n: at(x) for n, x in extra.items()},
    )

  pos = lengths
  while int(pos.min()) < t:
    o, cache = step(cache, jnp.minimum(pos, t - 1))
    for r in range(b):
      if int(pos[r]) < t:
        close(o[r], ref[r, int(pos[r])])
    pos = pos + 1


# --------------------------------------------------------------------------- model level
def _model(kinds, **kw) -> DecoderLM:
  base = dict(
    vocab_size=64,
    d_model=32,
    num_layers=len(kinds),
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=tuple(kinds),
    window=12,
    nsa=NSA,
    latent=LATENT,
  )
  return DecoderLM(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(3))


SSA_NSA = NSA.replace(
  compression="mean",
  cmp_window=8,
  cmp_stride=8,
  branches=("slc",),
  num_init_blocks=0,
  num_local_blocks=1,
)
MODELS = {
  "full_swa": lambda: _model(["full", "swa"]),
  "nsa_paper_independent_kv": lambda: _model(["nsa"]),
  "nsa_mean_shared_kv_dk_ne_dv": lambda: _model(
    ["nsa", "swa"], v_head_dim=6, nsa_independent_kv=False, nsa=NSA.replace(compression="mean")
  ),
  "asa_mlp": lambda: _model(["asa_local", "asa_global"]),
  "ssa_sparse": lambda: _model(["ssa"], nsa=SSA_NSA, ssa=SSAConfig(inference_mode="sparse")),
  "ssa_full": lambda: _model(["ssa"], nsa=SSA_NSA, ssa=SSAConfig(inference_mode="full")),
}


def _jitted(model):
  graphdef, params = nnx.split(model)

  @jax.jit
  def pre(params, tokens, lengths):
    m = nnx.merge(graphdef, params)
    return dec.prefill(m, tokens, lengths, dec.init_decode_state(m, B, CAP))

  @jax.jit
  def step(params, tokens, state):
    return dec.decode_step(nnx.merge(graphdef, params), tokens, state)

  @jax.jit
  def forward(params, tokens):
    return nnx.merge(graphdef, params)(tokens)

  return params, pre, step, forward


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_decode_equals_full_forward(name):
  """Right-padded prompts of 5 and 11 tokens, then cached steps to T=40: the logits of every
  step equal the full forward's (through compression completions at 7, 11, ..., 39 and block
  starts at 8, 16, 24, 32), and at position 16 also the forward of the bare prefix."""
  model = MODELS[name]()
  tokens = jax.random.randint(jax.random.key(7), (B, T), 0, 64)
  params, pre, step, forward = _jitted(model)
  full = forward(params, tokens)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  logits, state = pre(params, tokens[:, : max(LENGTHS)], lengths)
  for r in range(B):
    close(logits[r], full[r, LENGTHS[r] - 1])
  prefix = forward(params, tokens[:1, :17])[0, -1]
  while int(state.lengths.min()) < T:
    pos = np.asarray(state.lengths)
    logits, state = step(params, tokens[jnp.arange(B), jnp.minimum(state.lengths, T - 1)], state)
    for r in range(B):
      if pos[r] < T:
        close(logits[r], full[r, pos[r]])
      if r == 0 and pos[r] == 16:
        close(logits[r], prefix)


def test_decode_step_compiles_once_and_generation_matches_reforward():
  """Greedy cached generation (prompts of 3 and 9 tokens in one batch) equals greedy generation
  by full re-forward; 24 decode steps trace the step once, and a second call too."""
  model = _model(["swa", "nsa"])
  gen = Generator(model, batch=2, capacity=40, prefill_bucket=8)
  prompts = [[5, 9, 1], [3, 3, 8, 60, 2, 7, 7, 1, 0]]
  out = gen.generate(prompts, 24, greedy=True)
  assert out.tokens.shape == (2, 24)
  for r, p in enumerate(prompts):
    np.testing.assert_array_equal(out.tokens[r], greedy_by_reforward(model, p, 24))
  assert gen.traces == {"prefill": 1, "decode": 1}
  gen.generate([[1, 2], [4] * 12], 12, greedy=True)  # same prefill bucket, other lengths
  assert gen.traces == {"prefill": 1, "decode": 1}
  assert out.decode_tokens_per_s > 0 and out.prefill_tokens_per_s > 0


def test_capacity_errors_name_the_values():
  model = _model(["full"])
  gen = Generator(model, batch=2, capacity=16, prefill_bucket=8)
  with pytest.raises(
    ValueError,
    match=r"max_new_tokens: expected at most capacity - longest "
    r"prompt = 16 - 10 = 6, got 7",
  ):
    gen.generate([[1] * 10, [2]], 7)
  with pytest.raises(ValueError, match="prompts: expected 2 prompts"):
    gen.generate([[1]], 3)
  with pytest.raises(ValueError, match="at least one token"):
    gen.generate([[1], []], 3)
  state = dec.init_decode_state(model, 1, 4)
  with pytest.raises(
    ValueError, match="tokens: expected a prompt of at most the cache capacity 4 tokens, got 5"
  ):
    dec.prefill(model, jnp.ones((1, 5), jnp.int32), jnp.asarray([5]), state)
  # A raw step at the capacity does not fail silently: its logits are NaN.
  _, state = dec.prefill(model, jnp.ones((1, 4), jnp.int32), jnp.asarray([4]), state)
  logits, _ = dec.decode_step(model, jnp.ones((1,), jnp.int32), state)
  assert bool(jnp.all(jnp.isnan(logits)))


class _NoDecode(FullAttention):
  """A kind without the decode protocol (its methods hidden)."""

  init_cache = prefill = decode = None


def test_kind_without_protocol_is_named():
  register_attention_kind("test_no_decode", _NoDecode)
  try:
    model = _model(["full", "test_no_decode"])
    with pytest.raises(NotImplementedError, match=r"got \['test_no_decode'\] without them"):
      dec.init_decode_state(model, 1, 8)
  finally:
    ATTENTION_KINDS.pop("test_no_decode", None)


def test_sample_logits_greedy_temperature_and_nucleus():
  logits = jnp.log(jnp.asarray([[0.05, 0.6, 0.3, 0.05], [0.4, 0.1, 0.2, 0.3]]))
  key = jax.random.key(0)
  np.testing.assert_array_equal(
    sample_logits(logits, key, temperature=1.0, top_p=1.0, greedy=True), [1, 0]
  )
  draws = np.stack(
    [
      np.asarray(sample_logits(logits, k, temperature=1.0, top_p=0.5, greedy=False))
      for k in jax.random.split(key, 64)
    ]
  )
  np.testing.assert_array_equal(draws[:, 0], 1)  # 0.6 >= 0.5: the top token only
  assert set(draws[:, 1]) == {0, 3}  # 0.4 + 0.3 reach 0.5
  draws = np.stack(
    [
      np.asarray(sample_logits(logits, k, temperature=1.0, top_p=1.0, greedy=False))
      for k in jax.random.split(key, 200)
    ]
  )
  assert set(draws[:, 1]) == {0, 1, 2, 3}


# -------------------------------------------------------------------------- CLI and demo
SMALL = [
  "model.d_model=32",
  "model.mlp_dim=64",
  "model.num_heads=2",
  "model.head_dim=16",
  "model.num_layers=2",
]


def test_generate_cli_restores_checkpoint_and_matches_reforward(tmp_path, capsys):
  """``python -m train.generate`` with a checkpoint (saved from seed 5; the CLI inits with seed 0
  first) prints the greedy continuation of the restored model and both throughputs."""
  from train import checkpoint
  from train import generate as cli
  from train.config import load_config

  cfg = load_config("configs/tiny.yaml", SMALL)
  model = DecoderLM(cfg.model, rngs=nnx.Rngs(5))
  path = checkpoint.save(tmp_path / "ckpt", model, None, 7)
  rc = cli.main(
    [
      "--config",
      "configs/tiny.yaml",
      "--checkpoint",
      path,
      "--prompt",
      "def f",
      "--max-new-tokens",
      "12",
      "--greedy",
      "--batch",
      "2",
      *SMALL,
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0, out
  want = greedy_by_reforward(model, list(b"def f"), 12)
  text = "def f" + bytes(want.tolist()).decode("utf-8", errors="replace")
  assert out.count(text + "\n") == 2, out
  assert "(step 7)" in out and "prefill " in out and "decode " in out and "tokens/s" in out
  rc = cli.main(["--config", "configs/tiny.yaml", "--prompt", "x", "--max-new-tokens", "0", *SMALL])
  assert rc == 2 and "--max-new-tokens: expected a positive int, got 0" in capsys.readouterr().err


def test_demo_sampler_uses_cached_path():
  """``train.sample.sample`` (what ``make demo`` prints) decodes with the cache when the text fits
  in ``max_len``: its greedy bytes equal greedy re-forward generation."""
  from train.sample import sample

  model = _model(["nsa"], vocab_size=256)
  got = sample(model, "def ", 10, temperature=0.0, max_len=64)
  np.testing.assert_array_equal(got, greedy_by_reforward(model, list(b"def "), 10))


def test_decode_benchmark_smoke(tmp_path, monkeypatch):
  """``benchmarks/decode.py --tiny`` runs every kind on CPU without grain and writes its JSON."""
  import json
  import sys

  monkeypatch.setitem(sys.modules, "grain", None)  # any `import grain` would fail
  bench = load_script("benchmarks/decode.py", "bench_decode")
  rc = bench.main(
    [
      "--tiny",
      "--batch",
      "2",
      "--context",
      "37",
      "--steps",
      "2",
      "--warmup",
      "1",
      "--out",
      str(tmp_path),
    ]
  )
  assert rc == 0
  rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
  assert {(r["kind"], r["batch"]) for r in rows} == {(k, 2) for k in ("full", "nsa", "infllm_v2")}
  assert all(r["lengths_ok"] and r["tokens_per_s"] > 0 and r["state_bytes"] > 0 for r in rows)
  # Full attention: 2 layers x (K, V) x B x capacity 40 x 2 heads x 16 x 4 bytes, + lengths and
  # the capacity scalar.
  full = {r["batch"]: r["state_bytes"] for r in rows if r["kind"] == "full"}
  assert full == {2: 2 * 2 * 2 * 40 * 2 * 16 * 4 + 4 * 2 + 4}


def _dot_operand_dims(jaxpr) -> set[int]:
  """Every dimension size of every dot_general operand in ``jaxpr`` (sub-jaxprs included)."""
  dims = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      for v in eqn.invars:
        dims.update(v.aval.shape)
    for sub in (
      jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else ()
    ):
      dims |= _dot_operand_dims(sub)
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None:
        dims |= _dot_operand_dims(getattr(inner, "jaxpr", inner))
  return dims


@pytest.mark.parametrize(
  "kinds,reads_all", [(["nsa"], False), (["asa_local", "asa_global"], False), (["full"], True)]
)
def test_sparse_decode_step_never_attends_over_the_capacity(kinds, reads_all):
  """With capacity 4099 (a size no other axis has), no matmul of an NSA / ASA decode step has an
  operand spanning the cache: it reads C/d compressed tokens, n*l' selected and w window keys.
  Full attention does (the check can fail)."""
  cap = 4099
  model = _model(kinds)
  graphdef, params = nnx.split(model)

  def step(params, tokens, state):
    return dec.decode_step(nnx.merge(graphdef, params), tokens, state)

  state = jax.eval_shape(lambda: dec.init_decode_state(model, 1, cap))
  jaxpr = jax.make_jaxpr(step)(params, jnp.zeros((1,), jnp.int32), state)
  dims = _dot_operand_dims(jaxpr.jaxpr)
  assert (cap in dims) == reads_all
  if not reads_all:  # the compressed branch: (4099 - 8) // 4 + 1 tokens
    assert NSA.num_cmp_tokens(cap) == 1023 and 1023 in dims


def test_prefill_length_errors_on_concrete_lengths():
  """Concrete lengths outside ``[1, T]`` (a length of 0 used to return garbage), empty or too
  long prompts and out-of-vocabulary ids are rejected; under jit lengths are not read."""
  model = _model(["full"])
  state = dec.init_decode_state(model, 2, 8)
  tokens = jnp.ones((2, 4), jnp.int32)
  cases = [
    (
      tokens,
      jnp.asarray([0, 4]),
      r"^lengths: expected values in \[1, T=4\], got values in \[0, 4\]$",
    ),
    (
      tokens,
      jnp.asarray([2, 5]),
      r"^lengths: expected values in \[1, T=4\], got values in \[2, 5\]$",
    ),
    (tokens, np.asarray([3]), r"^lengths: expected shape \[B\] = \(2,\), got shape \(1,\)$"),
    (tokens, jnp.asarray([1.0, 2.0]), r"^lengths: expected an integer dtype, got float32$"),
    (tokens[:, :0], jnp.asarray([1, 1]), r"^tokens\.shape\[1\]: expected a length T >= 1, got 0$"),
    (tokens.at[0, 0].set(64), jnp.asarray([1, 1]), r"^tokens: expected token ids in \[0, vocab"),
  ]
  for toks, lengths, msg in cases:
    with pytest.raises(ValueError, match=msg):
      dec.prefill(model, toks, lengths, state)
  logits, _ = dec.prefill(model, tokens, jnp.asarray([1, 4]), state)
  assert logits.shape == (2, 64) and bool(jnp.all(jnp.isfinite(logits)))
  graphdef, params = nnx.split(model)
  jitted = jax.jit(lambda p, t, n, s: dec.prefill(nnx.merge(graphdef, p), t, n, s)[0])
  assert jitted(params, tokens, jnp.asarray([0, 4]), state).shape == (2, 64)  # caller's contract
