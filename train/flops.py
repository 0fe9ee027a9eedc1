"""Training-run FLOPs: model FLOPs per trained token and MFU.

The model accounting (``flops_per_token``, ``attention_flops_per_token``, ``param_split``) lives
in :mod:`sparse_attention_jax.analysis.flops` (re-exported here); this module adds the device
peaks and MFU.

Example::

  cfg = load_model_config("configs/nsa_340m.yaml")
  f = flops_per_token(cfg, 8192)                     # FLOPs per trained token
  mfu(f * tokens_per_s_per_device, peak_flops("NVIDIA H200"))
"""

from __future__ import annotations

import jax

from sparse_attention_jax.analysis.flops import (
  attention_flops_per_token,
  flops_per_token,
  param_split,
)

# Dense bf16 peak FLOP/s per device by a substring of ``jax.Device.device_kind`` (first match).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("H200", 989e12),
  ("H100", 989e12),
  ("GH200", 989e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v4", 275e12),
  ("TPU v6", 918e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak dense bf16 FLOP/s of one device: ``override`` if > 0, else from :data:`PEAK_FLOPS`
  by ``device_kind`` (e.g. ``"NVIDIA H200"``); None when unknown (CPU: MFU is n/a)."""
  if override and override > 0:
    return float(override)
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def mfu(flops_per_s_per_device: float, peak: float | None) -> float | None:
  """Model FLOPs utilization in [0, 1] (None when the peak is unknown)."""
  if peak is None or peak <= 0:
    return None
  return flops_per_s_per_device / peak


def peak_memory_bytes(devices=None) -> int | None:
  """Largest ``peak_bytes_in_use`` over the local devices (None where the backend has no
  ``memory_stats``, e.g. CPU)."""
  best = None
  for d in devices if devices is not None else jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call raise various errors.
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      best = max(best or 0, int(stats["peak_bytes_in_use"]))
  return best


__all__ = [
  "PEAK_FLOPS",
  "attention_flops_per_token",
  "flops_per_token",
  "mfu",
  "param_split",
  "peak_flops",
  "peak_memory_bytes",
]
