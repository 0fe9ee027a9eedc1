"""Run scalars: TensorBoard event files next to ``metrics.jsonl`` and throughput/MFU fields.

:class:`ScalarLog` writes every numeric field of a metrics event as a TensorBoard scalar
(``tensorboardX``; tag ``train/<field>`` for step events, ``eval/<field>`` for events that carry
``eval_*`` fields) under ``<output_dir>/tensorboard``. Without ``tensorboardX`` installed it
says so once and writes nothing (the JSONL log is always written by the loop).

:func:`throughput_fields` turns a measured token rate into the logged throughput fields:
``tokens_per_s_per_device``, ``tflops_per_device`` (model FLOPs, :mod:`train.flops`), ``mfu``
(None when the peak is unknown, e.g. CPU) and ``peak_memory_gib`` (None without
``memory_stats``).

Example::

  with ScalarLog("runs/tiny/tensorboard") as tb:
    tb.write({"step": 10, "loss": 3.2, "tokens_per_s": 1e4})
  # tensorboard --logdir runs/
"""

from __future__ import annotations

import math
from typing import Any

from train import flops as flops_lib


class ScalarLog:
  """TensorBoard scalar writer (a no-op when disabled or ``tensorboardX`` is missing).

  Args:
    logdir: event file folder, or None = disabled.
    warn: where the "tensorboardX not installed" notice goes (default ``print``).
  """

  def __init__(self, logdir: str | None, warn=print):
    self.writer = None
    if logdir is None:
      return
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      warn(
        "tensorboard: tensorboardX is not installed; writing metrics.jsonl only "
        "(pip install tensorboardX)"
      )
      return
    self.writer = SummaryWriter(logdir=logdir)

  @property
  def enabled(self) -> bool:
    return self.writer is not None

  def write(self, event: dict[str, Any]) -> None:
    """Adds the numeric, finite fields of ``event`` (except ``step``) at ``event["step"]``."""
    if self.writer is None or "step" not in event:
      return
    step = int(event["step"])
    is_eval = any(k.startswith("eval_") for k in event)
    for k, v in event.items():
      if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      if not math.isfinite(v):
        continue
      tag = f"eval/{k.removeprefix('eval_')}" if is_eval else f"train/{k}"
      self.writer.add_scalar(tag, float(v), step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def __enter__(self) -> ScalarLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def throughput_fields(
  tokens_per_s: float, flops_per_token: float, num_devices: int, peak_flops: float | None
) -> dict[str, float | None]:
  """Per-device throughput, model TFLOP/s, MFU (None if ``peak_flops`` is None) and peak memory.

  Args:
    tokens_per_s: trained tokens per second of the whole job.
    flops_per_token: model training FLOPs per token (0 = unknown: no TFLOP/s or MFU).
    num_devices: devices the job runs on.
    peak_flops: peak FLOP/s of one device, or None.
  """
  per_dev = tokens_per_s / max(num_devices, 1)
  out: dict[str, float | None] = {"tokens_per_s_per_device": per_dev}
  if flops_per_token > 0:
    flops_dev = flops_per_token * per_dev
    out["tflops_per_device"] = flops_dev / 1e12
    out["mfu"] = flops_lib.mfu(flops_dev, peak_flops)
  mem = flops_lib.peak_memory_bytes()
  out["peak_memory_gib"] = None if mem is None else mem / 2**30
  return out


def describe_throughput(fields: dict[str, float | None]) -> str:
  """`` | MFU 41.2% | mem 12.3 GiB`` (``MFU n/a`` without a peak; no memory part without it)."""
  text = ""
  if "mfu" in fields:
    mfu = fields["mfu"]
    text += " | MFU n/a" if mfu is None else f" | MFU {100 * mfu:.1f}%"
  if fields.get("peak_memory_gib") is not None:
    text += f" | mem {fields['peak_memory_gib']:.2f} GiB"
  return text
