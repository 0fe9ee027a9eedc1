"""The options of offloaded NOSA decoding (:mod:`sparse_attention_jax.offload`)."""

from __future__ import annotations

import dataclasses

# How a step's missing blocks move host -> device slots: "kernel" (a Pallas kernel reading the
# pinned host store where it is, :mod:`sparse_attention_jax.offload.block_copy`) or "xla" (XLA's
# gather on the host store, run as host compute, in a while loop of chunks).
COPIES = ("kernel", "xla")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """Options of :class:`~sparse_attention_jax.offload.decoder.OffloadedDecoder`.

  Attributes:
    copy: one of :data:`COPIES`. ``"kernel"`` (default) falls back to ``"xla"`` (logged once)
      where the kernel cannot serve a call (a block shape its Triton lowering refuses, or a
      compile failure).
    chunk: with the XLA copy, most blocks one load iteration gathers per layer (the last
      iteration of a step is padded to the next of
      :func:`~sparse_attention_jax.offload.block_copy.step_sizes`).
  """

  copy: str = "kernel"
  chunk: int = 1024

  def __post_init__(self):
    if self.copy not in COPIES:
      raise ValueError(f"copy: expected one of {COPIES}, got {self.copy!r}")
    check_positive(chunk=self.chunk)


def check_positive(**values) -> None:
  """Raises ``ValueError`` naming the first of ``values`` that is not a positive int."""
  for name, val in values.items():
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
      raise ValueError(f"{name}: expected a positive int, got {val!r}")


__all__ = ["COPIES", "OffloadConfig", "check_positive"]
