"""Offloaded NOSA decoding: every NOSA layer's K/V/c in pinned host memory, the selected blocks
in device slots, one jitted call per decode step (``docs/nosa.md``, "Offloaded decoding")."""

from sparse_attention_jax.offload.config import COPIES, OffloadConfig
from sparse_attention_jax.offload.decoder import (
  OffloadedDecoder,
  OffloadStats,
  generate_offloaded,
  offload_slots,
)
from sparse_attention_jax.offload.layer import STAT_KEYS, LayerState, OffloadedLayer, layer_step
from sparse_attention_jax.offload.slot_plan import plan_slots
from sparse_attention_jax.offload.store import BlockStore, host_memory_kind

__all__ = [
  "COPIES",
  "STAT_KEYS",
  "BlockStore",
  "LayerState",
  "OffloadConfig",
  "OffloadStats",
  "OffloadedDecoder",
  "OffloadedLayer",
  "generate_offloaded",
  "host_memory_kind",
  "layer_step",
  "offload_slots",
  "plan_slots",
]
