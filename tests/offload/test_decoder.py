"""Offloaded NOSA decoding (:class:`sparse_attention_jax.offload.OffloadedDecoder`): greedy tokens
equal the device-resident decoder's (both block copies), the step compiles once, the slots follow
the selection of the full op and transfers are counted exactly, the kernel copy falls back to
XLA's when it cannot compile, errors name their values; ``train.generate --offload`` prints the
resident text. Cases marked ``gpu`` (sizes of the former GPU check scripts) run only on a Hopper
GPU; their ``tiny`` twins run on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nosa_models import CFG, KQ, nosa_model

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.generation.generator import Generator
from sparse_attention_jax.nn import DecoderLM, ModelConfig
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.offload import OffloadConfig, OffloadedDecoder, OffloadedLayer, plan_slots
from sparse_attention_jax.ops.nosa import biased_selected_attention, nosa_attention
from sparse_attention_jax.ops.nosa.selection import for_length

# l=8, d=4: a compressed token completes at 7, 11, 15, ...; blocks of 8 start at 8, 16, ...


@pytest.mark.parametrize("copy", ["kernel", "xla"])
def test_offloaded_greedy_equals_device_resident_and_compiles_once(copy):
  """Two rows, prompts of 26 tokens, 20 greedy tokens (blocks start at 32, 40): the offloaded
  decoder (K/V/c of the NOSA layer in one pinned_host array, the whole step as one jitted call,
  copying with the zero-copy kernel (interpreted) or with XLA's host gather in iterations of at
  most 4 blocks; the first step loads 12 blocks) produces the device-resident tokens; each jitted
  piece is traced once; a second call with the same prompt length traces nothing."""
  model = nosa_model()
  prompts = np.asarray(jax.random.randint(jax.random.key(4), (2, 26), 0, 64)).tolist()
  want = Generator(model, batch=2, capacity=48, prefill_bucket=8).generate(prompts, 20, greedy=True)
  gen = Generator(model, batch=2, capacity=48, offload=OffloadConfig(copy=copy, chunk=4))
  plans = plan_slots._cache_size()
  out = gen.generate(prompts, 20, greedy=True)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  once = {"embed": 1, "prefill": 2, "logits": 1, "step": 1}  # prefill: per layer kind
  assert gen._offload.traces == once and gen._offload.copy == copy
  assert plan_slots._cache_size() == plans  # traced inside the step, never called alone
  st = out.offload
  assert st.host_memory_kind == "pinned_host" and st.slots == CFG.num_selected - 1
  assert len(st.per_step) == 19 and st.per_step[0]["transferred"] > 4
  assert st.total["transferred"] == sum(s["transferred"] for s in st.per_step)
  assert 0 < st.total["hit_rate"] < 1 and st.host_bytes > 0 and st.device_bytes > 0
  gen.generate([[1] * 26, [2] * 26], 5, greedy=True)
  assert gen._offload.traces == once


def test_offloaded_transfer_counts_follow_the_selection():
  """Layer 0's slots after every step hold exactly Gamma(t) minus the current block, with
  Gamma(t) from the full op on the whole sequence (independent of the decoder); transfers =
  newly selected blocks, hits = blocks kept, bytes = transfers x l' x ((Dk + Dv) * 4 + 4); the
  stats are read back lazily, the totals complete after ``flush``."""
  model = nosa_model()
  cfg = model.config
  dec_ = OffloadedDecoder(model, batch=2, capacity=48)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 40), 0, 64))
  t0 = 33  # first step: 4 blocks x 2 rows x 2 heads
  _, caches = dec_.prefill(tokens[:, :t0])
  layer = caches[0][1]
  blk = model.layers[0]
  pos_all = jnp.broadcast_to(jnp.arange(40), (2, 40))
  q, k, v, c = blk.attn.qkvc(blk.attn_norm(model.embed(jnp.asarray(tokens))), pos_all)
  op_cfg, kq = for_length(cfg.nsa, KQ, 40)
  _, aux = nosa_attention(q, k, v, c, config=op_cfg, num_query_selected=kq, return_aux=True)
  gamma = np.asarray(aux.block_indices)  # [B, T, H, k]
  prev = [[set() for _ in range(2)] for _ in range(2)]
  moved = []
  block_bytes = 8 * ((8 + 6) * 4 + 4)
  for pos in range(t0, 40):
    _, stats = dec_.step(tokens[:, pos], caches, pos)
    got = stats["per_layer"][0]
    exp = {"requested": 0, "hits": 0, "transferred": 0}
    slot_block = np.asarray(layer.state.slot_block)
    for b in range(2):
      for h in range(2):
        want = {int(j) for j in gamma[b, pos, h] if j >= 0} - {pos // 8}
        assert {int(j) for j in slot_block[b, h] if j >= 0} == want, (pos, b, h)
        exp["requested"] += len(want)
        exp["hits"] += len(want & prev[b][h])
        exp["transferred"] += len(want - prev[b][h])
        prev[b][h] = want
    assert {key: got[key] for key in exp} == exp, pos
    assert got["bytes"] == exp["transferred"] * block_bytes
    moved.append(got["transferred"])
  dec_.flush()
  assert layer.totals["steps"] == 40 - t0 and layer.totals["transferred"] == sum(moved)


def test_step_falls_back_to_the_xla_copy(monkeypatch, caplog):
  """When the kernel copy cannot be built (e.g. the Triton lowering refuses a block shape), the
  decoder logs it once, switches to the XLA copy and still gives the device-resident greedy
  tokens."""
  from sparse_attention_jax.offload import block_copy

  def refuse(*args, **kw):
    raise NotImplementedError("copy_blocks: refused for the test")

  monkeypatch.setattr(block_copy, "copy_blocks", refuse)
  model = nosa_model()
  prompts = np.asarray(jax.random.randint(jax.random.key(6), (2, 26), 0, 64)).tolist()
  want = Generator(model, batch=2, capacity=40, prefill_bucket=8).generate(prompts, 8, greedy=True)
  gen = Generator(model, batch=2, capacity=40, offload=True)
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
    match=r"prompts: expected prompts of one length with offload=True .* got lengths \[3, 2\]",
  ):
    gen.generate([[1, 2, 3], [4, 5]], 3)
  with pytest.raises(
    ValueError,
    match=r"max_new_tokens: expected at most capacity - longest prompt = 16 - 10 = 6, got 7",
  ):
    gen.generate([[1] * 10, [2] * 10], 7)
  with pytest.raises(
    ValueError,
    match=r"offload: expected a model with at least one 'nosa' layer, got kinds \['full'\]",
  ):
    Generator(nosa_model(kinds=("full",)), batch=1, capacity=8, offload=True)
  with pytest.raises(ValueError, match=r"offload: expected True, False or an OffloadConfig"):
    Generator(model, batch=1, capacity=8, offload="fused")
  with pytest.raises(ValueError, match=r"config: expected an OffloadConfig, got dict"):
    OffloadedDecoder(model, batch=2, capacity=16, config={"copy": "xla"})
  with pytest.raises(ValueError, match=r"num_slots: expected a positive int, got 0"):
    OffloadedDecoder(model, batch=2, capacity=16, num_slots=0)
  # Raised after the step, from its counts.
  small = Generator(model, batch=2, capacity=48, offload=True, num_slots=2)
  with pytest.raises(ValueError, match=r"gamma: expected at most num_slots=2 selected blocks"):
    small.generate([[1] * 30, [2] * 30], 3, greedy=True)


def test_generate_cli_nosa_offload_matches_resident(capsys):
  """``python -m train.generate --config configs/nosa_tiny.yaml`` decodes a NOSA model, and with
  ``--offload`` (either copy) prints the same text plus the transfer summary."""
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
  text = [ln for ln in resident.splitlines() if ln.startswith("def f(x)")]
  assert len(text) == 2 and "offload " not in resident
  for flags in (["--offload"], ["--offload", "--offload-copy", "xla"]):
    assert cli.main([*flags, *args]) == 0
    offloaded = capsys.readouterr().out
    assert text == [ln for ln in offloaded.splitlines() if ln.startswith("def f(x)")]
    assert "blocks transferred over 19 steps" in offloaded and "(pinned_host)" in offloaded
  assert cli.main(["--offload", "--offload-store", "numpy", *args]) == 2  # a retired flag
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "--offload-store" in err[0], err


# ------------------------------------------------------- the former GPU check scripts
@pytest.mark.parametrize(
  "b,t,hq,h,d,steps,k_total,kq",
  [
    pytest.param(1, 640, 4, 2, 32, 12, 8, 7, id="tiny"),
    pytest.param(2, 2048, 8, 2, 64, 24, 16, 9, id="gpu-2k", marks=pytest.mark.gpu),
    pytest.param(2, 4096, 16, 2, 128, 32, 32, 17, id="gpu-4k", marks=pytest.mark.gpu),
  ],
)
def test_layer_attends_like_the_full_cache_reference(b, t, hq, h, d, steps, k_total, kq):
  """A decode simulation at ``l' = 64`` (1 init + 4 local blocks forced): prefill, then one token
  per step with the full op's selection; the store is in ``pinned_host`` memory and the slots in
  device memory, attention over the slots equals the float32 full-cache reference
  (``biased_selected_attention``) and exactly the non-resident blocks move."""
  cfg = NSAConfig.infllm_v2(local_window=256, num_selected=k_total)
  keys = jax.random.split(jax.random.key(t), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, h, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, h, d), jnp.float32)
  c = 1.5 * jax.random.normal(keys[3], (b, t, h), jnp.float32)
  _, aux = jax.jit(
    lambda *a: nosa_attention(*a, config=cfg, num_query_selected=kq, return_aux=True)
  )(q, k, v, c)
  ref = jax.jit(lambda *a: biased_selected_attention(*a, block_size=cfg.block_size))(
    q, k, v, c, aux.block_indices
  )
  gam = np.asarray(aux.block_indices)
  layer = OffloadedLayer(
    batch=b,
    num_kv_heads=h,
    k_dim=d,
    v_dim=d,
    block_size=cfg.block_size,
    num_slots=k_total - 1,
    max_len=t,
  )
  prompt = t - steps
  layer.prefill(k[:, :prompt], v[:, :prompt], c[:, :prompt])
  assert {x.sharding.memory_kind for x in (layer.store.kv, layer.store.c)} == {"pinned_host"}
  assert layer.state.slot_kv.sharding.memory_kind == "device"
  prev = {}
  for s in range(prompt, t):
    want = {
      (bi, hi): {int(j) for j in gam[bi, s, hi] if j >= 0} - {s // cfg.block_size}
      for bi in range(b)
      for hi in range(h)
    }
    o, stats = layer.step(k[:, s], v[:, s], c[:, s], gam[:, s], q[:, s])
    assert stats["transferred"] == sum(len(w - prev.get(key, set())) for key, w in want.items())
    prev = want
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref[:, s]), atol=1e-4, rtol=1e-4)


def _check_model(tiny: bool):
  """The model of the former decode check: ``tiny`` (2 NOSA layers, l' = 8) or the GPU size
  (4 NOSA layers, d_model 256, l' = 64); prompt and new tokens."""
  if tiny:
    nsa = NSAConfig.infllm_v2(
      local_window=8, block_size=8, cmp_window=8, cmp_stride=4, num_selected=5, num_local_blocks=1
    )
    dims = {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4, "head_dim": 8}
    dims.update(mlp_dim=64, nosa=NOSAConfig(query_selected=3))
    prompt, new = 30, 24
  else:
    nsa = NSAConfig.infllm_v2(
      local_window=128,
      block_size=64,
      cmp_window=32,
      cmp_stride=16,
      num_selected=16,
      num_local_blocks=2,
    )
    dims = {"vocab_size": 512, "d_model": 256, "num_layers": 4, "num_heads": 8, "head_dim": 64}
    dims.update(mlp_dim=512, nosa=NOSAConfig(query_selected=8))
    prompt, new = 2000, 200
  cfg = ModelConfig(num_kv_heads=2, attention=("nosa",), nsa=nsa, **dims)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  for i, blk in enumerate(model.layers):
    blk.attn.a[...] = jnp.array([1.0, -1.5]) * (1 + i % 2)
  return model, prompt, new


@pytest.mark.parametrize(
  "tiny,copy",
  [
    pytest.param(True, "kernel", id="tiny"),
    pytest.param(False, "kernel", id="gpu-kernel", marks=pytest.mark.gpu),
    pytest.param(False, "xla", id="gpu-xla", marks=pytest.mark.gpu),
  ],
)
def test_offloaded_model_greedy_equals_resident(tiny, copy):
  """Every layer NOSA, float32, batch 4: greedy tokens of the offloaded decoder equal the
  device-resident ones; the stores hold their blocks in ``pinned_host`` memory; the transfer
  totals add up over the steps (bytes = blocks x block bytes); the copy stays the one asked
  for (no fallback on a Hopper GPU)."""
  model, plen, new = _check_model(tiny)
  prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, plen)).tolist()
  cap = plen + new
  a = Generator(model, batch=4, capacity=cap, prefill_bucket=plen).generate(
    prompts, new, greedy=True
  )
  gen = Generator(model, batch=4, capacity=cap, offload=OffloadConfig(copy=copy))
  b = gen.generate(prompts, new, greedy=True)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  st = b.offload
  block_bytes = model.config.nsa.block_size * ((model.config.head_dim + model.config.dv) * 4 + 4)
  assert st.host_memory_kind == "pinned_host" and gen._offload.copy == copy
  assert st.total["transferred"] == sum(s["transferred"] for s in st.per_step)
  assert st.total["bytes"] == st.total["transferred"] * block_bytes
