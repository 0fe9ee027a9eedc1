"""NOSA cached decoding: device-resident decode steps equal the full forward (op and model, block
and compression boundaries, prompts of different lengths, one compilation, reads O(C/d + k*l')
keys); offloaded decoding (host K/V/c blocks) gives the same tokens and counts its transfers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script
from flax import nnx

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, ModelConfig
from sparse_attention_jax.nn import decode as dec
from sparse_attention_jax.nn.generate import Generator
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.ops.nosa import nosa_attention
from sparse_attention_jax.ops.nosa.decode import (
  fill_nosa_cache,
  init_nosa_cache,
  nosa_decode_step,
)
from sparse_attention_jax.ops.nosa.selection import for_length

# l=8, d=4: a compressed token completes at 7, 11, 15, ...; blocks of 8 start at 8, 16, ...
# k = 5 blocks: 1 init + 1 local (the current block) forced, k_q = 3 query-aware, 2 agnostic.
CFG = NSAConfig.infllm_v2(
  local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=5, num_local_blocks=1
)
KQ = 3
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
def nosa_model(kinds=("nosa", "full"), seed=3, **kw) -> DecoderLM:
  base = {
    "vocab_size": 64,
    "d_model": 32,
    "num_layers": len(kinds),
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "v_head_dim": 6,
    "mlp_dim": 64,
    "attention": tuple(kinds),
    "nsa": CFG,
    "nosa": NOSAConfig(query_selected=KQ),
  }
  model = DecoderLM(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(seed))
  for i, blk in enumerate(model.layers):  # A = 0 at init would make c = 0: use both signs
    if blk.kind == "nosa":
      blk.attn.a[...] = jnp.array([1.5, -2.0]) * (1 + i)
  return model


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


# ------------------------------------------------------------------------------ offloaded
@pytest.mark.parametrize(
  "store,plan",
  [
    ("numpy", "host"),
    ("pinned_array", "host"),
    ("pinned_array", "device"),
    ("pinned_array", "fused"),
    ("pinned_array", "fused:xla"),
  ],
)
def test_offloaded_greedy_equals_device_resident_and_compiles_once(store, plan, monkeypatch):
  """Two rows, prompts of 26 tokens, 20 greedy tokens (blocks start at 32, 40): the offloaded
  decoder (K/V/c of the NOSA layer in a host NumPy store, or in one pinned_host jax array
  loaded by jitted gathers; slot assignment on the host, or on the device with only its counts
  read back; or the whole step as one jitted call, copying with the zero-copy Pallas kernel
  (interpreted) or with XLA's host gather in iterations of at most 4 blocks; the first step's 12
  loads go in scatters of at most 4 blocks) produces the
  device-resident tokens; each jitted piece is traced once (the embedding once per shape; the
  device plan once); a second call with the same prompt length traces nothing."""
  from sparse_attention_jax.nn import offload

  monkeypatch.setattr(offload, "MAX_SCATTER", 4)
  model = nosa_model()
  prompts = np.asarray(jax.random.randint(jax.random.key(4), (2, 26), 0, 64)).tolist()
  want = Generator(model, batch=2, capacity=48, prefill_bucket=8).generate(prompts, 20, greedy=True)
  plan, _, copy = plan.partition(":")
  gen = Generator(model, batch=2, capacity=48, offload=True, offload_store=store, offload_plan=plan)
  if plan == "fused":
    gen._offload.chunk, gen._offload.copy = 4, copy or "kernel"
  plans = offload.plan_slots_on_device._cache_size()
  out = gen.generate(prompts, 20, greedy=True)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  once = {
    **{name: 1 for name in gen._offload.traces},
    "embed": 2,  # prompt and step shapes
    "fused_step": 0,
  }
  if plan == "fused":  # the step's pieces are traced inside the fused step
    once = {
      **{name: 0 for name in once},
      "embed": 1,
      "logits": 1,
      "nosa_prefill": 1,
      "other_prefill": 1,
      "fused_step": 1,
    }
  assert gen._offload.traces == once and gen._offload.copy == (copy or "kernel")
  compiled_plans = offload.plan_slots_on_device._cache_size() - plans
  assert compiled_plans <= (plan != "host")  # (0 if an earlier test had the shape)
  st = out.offload
  kind = {"numpy": "numpy", "pinned_array": "pinned_host"}[store]  # CPU: pinned_host exists
  assert st.host_memory_kind == kind and st.slots == CFG.num_selected - 1
  assert len(st.per_step) == 19 and st.per_step[0]["transferred"] > 4
  assert st.total["transferred"] == sum(s["transferred"] for s in st.per_step)
  assert 0 < st.total["hit_rate"] < 1 and st.host_bytes > 0 and st.device_bytes > 0
  gen.generate([[1] * 26, [2] * 26], 5, greedy=True)
  assert gen._offload.traces == once
  assert offload.plan_slots_on_device._cache_size() - plans == compiled_plans


@pytest.mark.parametrize("plan", ["host", "fused"])
def test_offloaded_transfer_counts_follow_the_selection(plan, monkeypatch):
  """Layer 0's slots after every step hold exactly Gamma(t) minus the current block, with
  Gamma(t) from the full op on the whole sequence (independent of the decoder); transfers =
  newly selected blocks, hits = blocks kept, bytes = transfers x l' x ((Dk + Dv) * 4 + 4); with
  the fused step too (its stats read back lazily, the totals complete after ``flush``)."""
  from sparse_attention_jax.nn import offload
  from sparse_attention_jax.nn.offload_decode import OffloadedDecoder

  monkeypatch.setattr(offload, "MAX_SCATTER", 4)
  model = nosa_model()
  cfg = model.config
  dec_ = OffloadedDecoder(
    model,
    batch=2,
    capacity=48,
    **({"store": "pinned_array", "plan": "fused"} if plan == "fused" else {}),
  )
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 40), 0, 64))
  t0 = 33  # first step: 4 blocks x 2 rows x 2 heads, in scatters of 4
  _, caches = dec_.prefill(tokens[:, :t0])
  store = caches[0][1]
  blk = model.layers[0]
  pos_all = jnp.broadcast_to(jnp.arange(40), (2, 40))
  q, k, v, c = blk.attn.qkvc(blk.attn_norm(model.embed(jnp.asarray(tokens))), pos_all)
  op_cfg, kq = for_length(cfg.nsa, KQ, 40)
  gamma = np.asarray(
    nosa_attention(q, k, v, c, config=op_cfg, num_query_selected=kq, return_aux=True)[
      1
    ].block_indices
  )  # [B, T, H, k]
  prev = [[set() for _ in range(2)] for _ in range(2)]
  moved = []
  block_bytes = 8 * ((8 + 6) * 4 + 4)
  for pos in range(t0, 40):
    _, stats = dec_.step(tokens[:, pos], caches, pos)
    got = stats["per_layer"][0]
    exp = {"requested": 0, "hits": 0, "transferred": 0}
    for b in range(2):
      for h in range(2):
        want = {int(j) for j in gamma[b, pos, h] if j >= 0} - {pos // 8}
        assert {int(j) for j in store.slot_block[b, h] if j >= 0} == want, (pos, b, h)
        exp["requested"] += len(want)
        exp["hits"] += len(want & prev[b][h])
        exp["transferred"] += len(want - prev[b][h])
        prev[b][h] = want
    assert {key: got[key] for key in exp} == exp, pos
    assert got["bytes"] == exp["transferred"] * block_bytes
    moved.append(got["transferred"])
  dec_.flush()
  assert store.totals["steps"] == 40 - t0 and store.totals["transferred"] == sum(moved)


def test_offloaded_decoder_passes_the_transfer_to_every_layer():
  from sparse_attention_jax.nn.offload_decode import OffloadedDecoder

  model = nosa_model()
  caches = OffloadedDecoder(model, batch=2, capacity=16, transfer="staged")._new_caches(None)
  stores = [c[1] for c in caches if isinstance(c, list)]
  assert stores and all(s.transfer == "staged" for s in stores)
  with pytest.raises(
    ValueError,
    match=r"transfer: expected one of \('fresh', 'staged'\) "
    r"\('staged' with store='numpy' only\), got 'staged' "
    r"with store='pinned_host'",
  ):
    OffloadedDecoder(model, batch=2, capacity=16, store="pinned_host", transfer="staged")
  caches = OffloadedDecoder(
    model, batch=2, capacity=16, store="pinned_array", plan="device"
  )._new_caches(None)
  assert all(c[1].plan == "device" for c in caches if isinstance(c, list))
  with pytest.raises(
    ValueError,
    match=r"plan: expected one of \('host', 'device', 'fused'\) "
    r"\('device' and 'fused' with store='pinned_array' "
    r"only\), got 'fused' with store='numpy'",
  ):
    OffloadedDecoder(model, batch=2, capacity=16, plan="fused")
  with pytest.raises(ValueError, match=r"copy: expected one of \('kernel', 'xla'\), got 'dma'"):
    OffloadedDecoder(model, batch=2, capacity=16, store="pinned_array", plan="fused", copy="dma")
  with pytest.raises(ValueError, match=r"chunk: expected a positive int, got 0"):
    OffloadedDecoder(model, batch=2, capacity=16, store="pinned_array", plan="fused", chunk=0)


def test_fused_step_falls_back_to_the_xla_copy(monkeypatch, caplog):
  """When the kernel copy cannot be built (e.g. the Triton lowering refuses a block shape), the
  fused decoder logs it once, switches to ``copy="xla"`` and still gives the device-resident
  greedy tokens."""
  from sparse_attention_jax.nn import offload

  def refuse(*args, **kw):
    raise NotImplementedError("copy_blocks: refused for the test")

  monkeypatch.setattr(offload, "copy_blocks", refuse)
  model = nosa_model()
  prompts = np.asarray(jax.random.randint(jax.random.key(6), (2, 26), 0, 64)).tolist()
  want = Generator(model, batch=2, capacity=40, prefill_bucket=8).generate(prompts, 8, greedy=True)
  gen = Generator(
    model, batch=2, capacity=40, offload=True, offload_store="pinned_array", offload_plan="fused"
  )
  with caplog.at_level("WARNING"):
    out = gen.generate(prompts, 8, greedy=True)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  assert gen._offload.copy == "xla"
  assert sum("does not compile" in r.getMessage() for r in caplog.records) == 1


def test_offload_errors_name_the_values():
  model = nosa_model()
  gen = Generator(model, batch=2, capacity=16, offload=True)
  with pytest.raises(
    ValueError,
    match=r"prompts: expected prompts of one length with "
    r"offload=True .* got lengths \[3, 2\]",
  ):
    gen.generate([[1, 2, 3], [4, 5]], 3)
  with pytest.raises(
    ValueError,
    match=r"max_new_tokens: expected at most capacity - longest "
    r"prompt = 16 - 10 = 6, got 7",
  ):
    gen.generate([[1] * 10, [2] * 10], 7)
  with pytest.raises(
    ValueError,
    match=r"offload: expected a model with at least one 'nosa' "
    r"layer, got kinds \['full'\]",
  ):
    Generator(nosa_model(kinds=("full",)), batch=1, capacity=8, offload=True)
  for plan in ("host", "fused"):  # fused: raised after the step, from its counts
    small = Generator(
      model,
      batch=2,
      capacity=48,
      offload=True,
      num_slots=2,
      offload_store="pinned_array" if plan == "fused" else "numpy",
      offload_plan=plan,
    )
    with pytest.raises(ValueError, match=r"gamma: expected at most num_slots=2 selected blocks"):
      small.generate([[1] * 30, [2] * 30], 3, greedy=True)


def test_decode_benchmark_nosa_kinds_smoke(tmp_path, monkeypatch, capsys):
  """``benchmarks/decode.py --tiny --kinds nosa,nosa_offload --report-fit`` runs on CPU without
  grain: both rows decode, the offloaded row (loads through staging buffers,
  ``--offload-transfer staged``) reports its transfers, and the resident-cache bytes are those
  of the device-resident NOSA state; ``--offload-plan device`` runs with the pinned_array store
  and is refused with the numpy store."""
  import json
  import sys

  monkeypatch.setitem(sys.modules, "grain", None)
  bench = load_script("benchmarks/decode.py", "bench_decode_nosa")
  rc = bench.main(
    [
      "--tiny",
      "--kinds",
      "nosa,nosa_offload",
      "--batch",
      "2",
      "--context",
      "37",
      "--steps",
      "2",
      "--warmup",
      "1",
      "--report-fit",
      "--host-pool",
      "3",
      "--offload-transfer",
      "staged",
      "--out",
      str(tmp_path),
    ]
  )
  assert rc == 0
  rows = {r["kind"]: r for r in json.loads((tmp_path / "decode.json").read_text())["rows"]}
  assert set(rows) == {"nosa", "nosa_offload"}
  assert all(r["lengths_ok"] and r["tokens_per_s"] > 0 for r in rows.values())
  off = rows["nosa_offload"]
  assert off["host_memory_kind"] == "numpy" and off["slots"] == 4 and off["transfer"] == "staged"
  assert 0 <= off["hit_rate"] <= 1 and off["blocks_per_step"] >= 0  # steady state may hit all
  assert off["bytes_per_step"] == off["blocks_per_step"] * 8 * ((16 + 16) * 4 + 4)
  # Resident NOSA state of the tiny model (capacity 40, H=2, Dk=Dv=16, l=8, d=4, l'=8), 2 layers:
  # K, V (4 B) and c (f32) linear + rings of l keys and c + 9 compressed keys + 5 block scores.
  per_row = (40 * 2 * (16 + 16 + 1) + 8 * 2 * (16 + 1) + 9 * 2 * 16 + 2 * 5) * 4
  assert rows["nosa"]["resident_cache_bytes"] == 2 * 2 * per_row + 2 * 4 + 4
  assert off["resident_cache_bytes"] == rows["nosa"]["resident_cache_bytes"]
  assert off["state_bytes"] < rows["nosa"]["state_bytes"]
  with pytest.raises(SystemExit):
    bench.main(
      [
        "--tiny",
        "--kinds",
        "nosa_offload",
        "--offload-store",
        "pinned_host",
        "--offload-transfer",
        "staged",
        "--out",
        str(tmp_path),
      ]
    )
  assert "--offload-transfer: expected 'fresh' with --offload-store pinned_host" in (
    capsys.readouterr().err
  )
  with pytest.raises(SystemExit):
    bench.main(
      ["--tiny", "--kinds", "nosa_offload", "--offload-plan", "device", "--out", str(tmp_path)]
    )
  assert "--offload-plan: expected 'host' with --offload-store numpy" in capsys.readouterr().err
  assert (
    bench.main(
      [
        "--tiny",
        "--kinds",
        "nosa_offload",
        "--batch",
        "2",
        "--context",
        "37",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--offload-store",
        "pinned_array",
        "--offload-plan",
        "fused",
        "--offload-copy",
        "xla",
        "--offload-chunk",
        "8",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  row = json.loads((tmp_path / "decode.json").read_text())["rows"][0]
  assert row["plan"] == "fused" and row["chunk"] == 8 and row["copy"] == "xla" and row["lengths_ok"]
  assert (
    bench.main(
      [
        "--tiny",
        "--kinds",
        "nosa_offload",
        "--batch",
        "2",
        "--context",
        "37",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--offload-store",
        "pinned_array",
        "--offload-plan",
        "device",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  row = json.loads((tmp_path / "decode.json").read_text())["rows"][0]
  assert row["plan"] == "device" and row["lengths_ok"] and row["host_ms_per_step"]["gather"] == 0


def test_generate_cli_nosa_offload_matches_resident(capsys):
  """``python -m train.generate --config configs/nosa_tiny.yaml`` decodes a NOSA model, and with
  ``--offload`` (NumPy, pinned_host, or pinned_array with the fused step) prints the same text
  plus the transfer summary."""
  from train import generate as cli

  small = [
    "model.d_model=32",
    "model.mlp_dim=64",
    "model.num_heads=2",
    "model.head_dim=16",
    "model.num_layers=1",
  ]
  args = [
    "--config",
    "configs/nosa_tiny.yaml",
    "--prompt",
    "def f(x): return x",
    "--max-new-tokens",
    "20",
    "--greedy",
    "--batch",
    "2",
    *small,
  ]
  assert cli.main(args) == 0
  resident = capsys.readouterr().out
  assert cli.main(["--offload", *args]) == 0
  offloaded = capsys.readouterr().out
  text = [ln for ln in resident.splitlines() if ln.startswith("def f(x)")]
  assert len(text) == 2 and text == [
    ln for ln in offloaded.splitlines() if ln.startswith("def f(x)")
  ]
  assert "offload " not in resident
  assert "blocks transferred over 19 steps" in offloaded and "(numpy)" in offloaded
  assert cli.main(["--offload", "--offload-store", "pinned_host", *args]) == 0
  pinned = capsys.readouterr().out
  assert text == [ln for ln in pinned.splitlines() if ln.startswith("def f(x)")]
  assert "(pinned_host)" in pinned
  assert (
    cli.main(["--offload", "--offload-store", "pinned_array", "--offload-plan", "fused", *args])
    == 0
  )
  fused = capsys.readouterr().out
  assert text == [ln for ln in fused.splitlines() if ln.startswith("def f(x)")]
  assert "blocks transferred over 19 steps" in fused
