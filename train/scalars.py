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
import os
import socket
import struct
import time
from typing import Any

from train import flops as flops_lib


class ScalarLog:
  """TensorBoard scalar writer (a no-op when disabled or ``tensorboardX`` is missing).

  Writes the event file itself, synchronously, in the calling thread (tensorboardX's protos and
  record format, not its ``SummaryWriter``): no queue, no lock and no background thread, so an
  interrupt at any point can never make :meth:`close` (or the interpreter's exit) wait.

  Args:
    logdir: event file folder, or None = disabled.
    warn: where the "tensorboardX not installed" notice goes (default ``print``).
  """

  def __init__(self, logdir: str | None, warn=print):
    self.writer = None
    if logdir is None:
      return
    try:
      from tensorboardX.proto import event_pb2
      from tensorboardX.record_writer import masked_crc32c
      from tensorboardX.summary import scalar
    except ImportError:
      warn(
        "tensorboard: tensorboardX is not installed; writing metrics.jsonl only "
        "(pip install tensorboardX)"
      )
      return
    self._event, self._crc, self._scalar = event_pb2.Event, masked_crc32c, scalar
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self.writer = open(self.path, "ab")  # noqa: SIM115 (closed by close())
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  @property
  def enabled(self) -> bool:
    return self.writer is not None

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    record = (
      header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data))
    )
    self.writer.write(record)  # One write per record.

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
      summary = self._scalar(tag, float(v))
      self._write(self._event(wall_time=time.time(), step=step, summary=summary))
    self.writer.flush()

  def close(self) -> None:
    """Closes the file (returns at once: a plain file close)."""
    writer, self.writer = self.writer, None
    if writer is not None:
      writer.close()

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
