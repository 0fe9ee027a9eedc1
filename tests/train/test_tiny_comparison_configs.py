"""The tiny full / NSA / ASA configs (docs/asa_tiny_experiment.md) differ only in attention.

``configs/full_tiny.yaml``, ``configs/tiny.yaml`` (NSA) and ``configs/asa_tiny.yaml`` are trained on
the same stream of batches and compared on loss; that comparison is only meaningful if everything
outside the attention section (sizes, optimizer, steps, seed, data) is the same, and if ASA's
sparse budgets (compression, selection, window) equal NSA's. YAML parsing and shape evaluation only.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from sparse_attention_jax.nn.model import param_count
from train.config import load_config

CONFIG_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
NAMES = {"full": "full_tiny", "nsa": "tiny", "asa": "asa_tiny"}
# ModelConfig fields that belong to the attention section: these may differ between the configs.
ATTENTION_FIELDS = {
  "attention",
  "window",
  "nsa",
  "nsa_independent_kv",
  "nsa_compressor_hidden",
  "latent",
  "ssa",
  "nosa",
}


def _load(kind):
  return load_config(os.path.join(CONFIG_DIR, f"{NAMES[kind]}.yaml"))


def test_tiny_configs_differ_only_in_the_attention_section():
  cfgs = {kind: _load(kind) for kind in NAMES}
  base = cfgs["nsa"]
  shared = [f.name for f in dataclasses.fields(base.model) if f.name not in ATTENTION_FIELDS]
  assert "d_model" in shared and "num_kv_heads" in shared and "mlp_dim" in shared
  for kind, cfg in cfgs.items():
    for name in shared:
      assert getattr(cfg.model, name) == getattr(base.model, name), (kind, name)
    # Same optimizer, steps, seed, batch shape and eval: everything but the output folder.
    train = dataclasses.replace(cfg.train, output_dir=base.train.output_dir)
    assert train == base.train, kind
    assert cfg.data == base.data, kind
    assert cfg.train.output_dir != base.train.output_dir or kind == "nsa", kind
  assert cfgs["full"].model.layer_kinds() == ("full", "full")
  assert cfgs["nsa"].model.layer_kinds() == ("nsa", "nsa")
  assert cfgs["asa"].model.layer_kinds() == ("asa_local", "asa_global")


def test_asa_tiny_sparse_budgets_equal_nsa_tiny():
  nsa, asa = _load("nsa").model, _load("asa").model
  for field in (
    "compression",
    "cmp_window",
    "cmp_stride",
    "block_size",
    "num_selected",
    "num_init_blocks",
    "num_local_blocks",
    "score_pooling",
    "selection_share",
  ):
    assert getattr(asa.nsa, field) == getattr(nsa.nsa, field), field
  assert set(asa.nsa.branches) == {"cmp", "slc"}
  assert "win" in nsa.nsa.branches
  # asa_local's sliding window has the width of NSA's window branch.
  assert asa.window == nsa.nsa.window


@pytest.mark.parametrize("kind", sorted(NAMES))
def test_tiny_param_counts_within_a_quarter_of_nsa(kind):
  """Parameter counts are reported in the write-up; they stay within 25% of the NSA model's."""
  n, ref = param_count(_load(kind).model), param_count(_load("nsa").model)
  print(f"{NAMES[kind]}: {n:,} parameters ({n / ref - 1:+.1%} vs tiny.yaml)")
  assert 0.75 * ref <= n <= 1.25 * ref, (kind, n, ref)
