"""Offloaded NOSA decoding: every NOSA layer's K/V/c in pinned host memory, the selected blocks
in device slots, one jitted call per decode step (``docs/nosa.md``, "Offloaded decoding")."""

from sparse_attention_jax.offload.decoder import OffloadedDecoder, OffloadStats, generate_offloaded
from sparse_attention_jax.offload.layer import (
  COPIES,
  OffloadConfig,
  OffloadedLayer,
  host_memory_kind,
  layer_step,
)
from sparse_attention_jax.offload.slot_plan import plan_slots

__all__ = [
  "COPIES",
  "OffloadConfig",
  "OffloadStats",
  "OffloadedDecoder",
  "OffloadedLayer",
  "generate_offloaded",
  "host_memory_kind",
  "layer_step",
  "plan_slots",
]
