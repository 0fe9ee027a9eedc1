"""Selection locality: gamma on crafted selections, the per-layer comparison of NSA,
InfLLM-V2-style and NOSA selection, and the CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attention_jax.analysis.locality import layer_selections, model_selection_locality
from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn import DecoderLM, ModelConfig, NOSAConfig
from sparse_attention_jax.ops.locality import selection_locality
from train.locality import main as locality_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gamma_on_crafted_selections():
  sel = jnp.array(
    [[[[0, -1, -1]], [[0, 1, -1]], [[1, 2, 2]], [[0, 1, 2]], [[3, -1, -1]], [[-1, -1, -1]]]],
    jnp.int32,
  )  # [B=1, T=6, H=1, n=3]
  gamma, new = selection_locality(sel)
  # t=1: {0,1}∩{0} = 1 of 2; t=2: {1,2}∩{0,1} = 1 of 2 (duplicate 2 counts once);
  # t=3: {0,1,2}∩{1,2} = 2 of 3; t=4: {3}∩{0,1,2} = 0 of 1; t=5: empty -> 1.
  np.testing.assert_allclose(gamma[0, :, 0], [0.5, 0.5, 2 / 3, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(new[0, :, 0], [1, 1, 1, 1, 0])
  # Two heads / batch rows are independent.
  two = jnp.concatenate([sel, jnp.zeros_like(sel)], axis=2)
  g2, _ = selection_locality(jnp.concatenate([two, two[:, ::-1]], axis=0))
  np.testing.assert_allclose(g2[0, :, 1], 1.0)
  np.testing.assert_allclose(g2[1, :, 0], [0.0, 0.0, 1.0, 0.5, 1.0], rtol=1e-6)  # reversed
  with pytest.raises(ValueError, match="block_indices: expected a rank-4 array"):
    selection_locality(sel[0])


def test_layer_comparison_and_model_report():
  sel = NSAConfig.infllm_v2(
    cmp_window=8, cmp_stride=4, block_size=8, num_selected=5, num_init_blocks=1, num_local_blocks=1
  )
  cfg = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=("nosa", "full"),
    nsa=sel,
    nosa=NOSAConfig(query_selected=3),
  )
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  model.layers[0].attn.a[...] = jnp.array([1.0, -1.0])
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 64)
  seg = jnp.array([[1] * 40 + [2] * 24] * 2)
  rep = model_selection_locality(model, tokens, segment_ids=seg)
  assert (rep["k"], rep["k_q"]) == (5, 3) and rep["bound_static_steps"] == pytest.approx(0.4)
  assert [(l["kind"], l["eviction"]) for l in rep["layers"]] == [
    ("nosa", "layer"),
    ("full", "none"),
  ]
  for layer in rep["layers"]:
    for m in ("nsa", "infllm_v2", "nosa"):
      assert 0 <= layer[m]["min"] <= layer[m]["mean"] <= 1 and layer[m]["new_blocks_per_step"] >= 0
  # The per-method selections are the ops' selections: NOSA contains its InfLLM-V2 part of
  # size k_q, InfLLM-V2 with k = k_q is that part.
  q, k, v, c = model.layers[0].attn.qkvc(
    model.embed(tokens), jnp.broadcast_to(jnp.arange(64), (2, 64))
  )
  s = layer_selections(q, k, c, sel, 3)
  s3 = layer_selections(q, k, c, sel.replace(num_selected=3), 3)
  nosa_m = np.asarray(s["nosa"])
  for row, part in zip(nosa_m.reshape(-1, 5), np.asarray(s3["infllm_v2"]).reshape(-1, 3)):
    assert set(part[part >= 0]) <= set(row[row >= 0])
  assert not np.array_equal(np.asarray(s["nsa"]), np.asarray(s["infllm_v2"]))


def test_locality_cli(tmp_path, capsys):
  rc = locality_main(
    [
      "--config",
      os.path.join(ROOT, "configs", "nosa_tiny.yaml"),
      "--out",
      str(tmp_path),
      "train.corpus_max_bytes=200000",
      "train.batch_size=1",
      "train.seq_len=128",
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  assert "gamma nosa" in out and "1 - k_q/k = 0.375" in out
  stats = json.loads((tmp_path / "locality.json").read_text())
  assert len(stats["layers"]) == 2 and set(stats["layers"][0]) >= {"nsa", "infllm_v2", "nosa"}
  assert (
    locality_main(
      [
        "--config",
        os.path.join(ROOT, "configs", "nosa_tiny.yaml"),
        "--query-selected",
        "1",
        "--out",
        str(tmp_path),
        "train.corpus_max_bytes=200000",
        "train.batch_size=1",
        "train.seq_len=128",
      ]
    )
    == 2
  )
