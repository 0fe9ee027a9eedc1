"""FLOPs accounting (``train.flops``) on a hand-computed tiny config."""

from __future__ import annotations

import pytest

from sparse_attention_jax.nn import ModelConfig
from train import flops

# One layer of each kind: full, swa, nsa (paper phi compressor, l=8, d=4, l'=8, n=3, w=8).
TINY = {
  "vocab_size": 256,
  "d_model": 16,
  "num_layers": 3,
  "num_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 8,
  "mlp_dim": 32,
  "attention": ["full", "swa", "nsa"],
  "window": 8,
  "nsa": {
    "preset": "paper",
    "cmp_window": 8,
    "cmp_stride": 4,
    "block_size": 8,
    "num_selected": 3,
    "window": 8,
  },
  "nsa_independent_kv": True,
}


def test_flops_per_token_by_hand():
  cfg = ModelConfig.from_dict(TINY)
  # Matmul parameters (the embedding table is a lookup): head 16x256, 3 SwiGLU MLPs 3x16x32,
  # full/swa layers q,o 16x2x8 + k,v 16x1x8, the nsa layer q,o + 3 K/V pairs + gates 16x2x3.
  head, mlp = 16 * 256, 3 * (3 * 16 * 32)
  dense_attn = 2 * (16 * 2 * 8) + 2 * (16 * 8)
  nsa_attn = 2 * (16 * 2 * 8) + 6 * (16 * 8) + 16 * 2 * 3
  n_matmul = head + mlp + 2 * dense_attn + nsa_attn
  # phi_k and phi_v: w1 [l=8, Dk=8, hidden=8] and w2 [8, 8] each.
  p_phi = 2 * (8 * 8 * 8 + 8 * 8)
  assert flops.param_split(cfg) == (n_matmul, p_phi)
  t = 64
  # 6 * HQ * keys * (Dk + Dv): full T/2 = 32 keys, swa 8, nsa cmp T/(2d) = 8 + slc n*l' = 24
  # + win 8.
  attn = 6 * 2 * 16 * (32 + 8 + (8 + 24 + 8))
  expected = 6 * n_matmul + 6 * p_phi / 4 + attn
  assert flops.flops_per_token(cfg, t) == pytest.approx(expected, rel=1e-12)
  # Short sequences clamp the selected/window keys to T/2.
  assert flops.attention_flops_per_token(cfg, "nsa", 16) == pytest.approx(
    6 * 2 * 16 * (16 / 8 + 8 + 8)
  )


def test_ssa_counts_both_paths_and_selection_scores():
  cfg = ModelConfig.from_dict(
    {**TINY, "attention": ["ssa"], "num_layers": 1, "ssa": {"branches": ["slc"]}}
  )
  # Full T/2 keys with q.k and p.v, plus compressed scores (q.k only) and the selected blocks.
  expected = 6 * 2 * (32 * 16 + 8 * 8 + 24 * 16)
  assert flops.attention_flops_per_token(cfg, "ssa", 64) == pytest.approx(expected)


def test_peak_flops_table_override_and_mfu():
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None and flops.mfu(1e12, None) is None
  assert flops.peak_flops("cpu", override=1e12) == 1e12
  assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="kind"):
    flops.attention_flops_per_token(ModelConfig.from_dict(TINY), "bogus", 64)


def test_asa_kinds_use_latent_head_dims():
  lat = {"kv_rank": 16, "q_rank": 24, "rope_dim": 4, "nope_dim": 8, "v_dim": 6, "groups": 2}
  cfg = ModelConfig.from_dict(
    {
      **TINY,
      "attention": ["asa_local", "asa_global"],
      "num_layers": 2,
      "latent": lat,
      "nsa": {**TINY["nsa"], "branches": ["cmp", "slc"]},
    }
  )
  # asa_local: expanded MLA, Dk = nope + rope = 12, Dv = 6, min(w=8, T/2) keys.
  assert flops.attention_flops_per_token(cfg, "asa_local", 64) == pytest.approx(
    6 * 2 * 8 * (12 + 6)
  )
  # asa_global: absorbed latents, dl = 16 / 2 = 8, Dk = 8 + 4, Dv = 8; cmp 8 keys + slc 24.
  assert flops.attention_flops_per_token(cfg, "asa_global", 64) == pytest.approx(
    6 * 2 * (8 + 24) * (12 + 8)
  )


def test_nosa_counts_scoring_and_its_selected_blocks():
  cfg = ModelConfig.from_dict(
    {
      **TINY,
      "attention": ["nosa"],
      "num_layers": 1,
      "nsa": {
        "preset": "infllm_v2",
        "cmp_window": 8,
        "cmp_stride": 4,
        "block_size": 8,
        "num_selected": 4,
        "num_init_blocks": 1,
        "num_local_blocks": 2,
      },
      "nosa": {"query_selected": 3},
    }
  )
  # Scores over T/(2d) = 8 compressed keys (Dk only: no compressed output), k*l' = 32 selected.
  assert flops.attention_flops_per_token(cfg, "nosa", 64) == pytest.approx(
    6 * 2 * (8 * 8 + 32 * 16)
  )
