"""NSA configuration: one frozen, hashable dataclass that fixes every semantic choice.

Notation follows docs/algorithms.md §1: ``l`` compression window (``cmp_window``), ``d`` compression
stride (``cmp_stride``), ``l'`` selection block (``block_size``), ``n`` selected blocks
(``num_selected``), ``w`` sliding window (``window``).

Presets (docs/algorithms.md §3):

* :meth:`NSAConfig.paper` -- the NSA paper: learnable compressor phi with intra-block position
  encoding, l=32, d=16, l'=64, n=16 incl. 1 initial + 2 local blocks, overlap-weighted scores
  (0-based eq. 9), w=512, three gated branches.
* :meth:`NSAConfig.fla` -- the common open-source simplification (fla-org): mean pooling with
  l = d = l' = 64, forced blocks {first, current, previous}, window w.
* :meth:`NSAConfig.infllm_v2` -- InfLLM-V2: mean pooling l=32/d=16, max-pooled block scores, no
  compressed-output branch, the window expressed as forced local blocks, no gates.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Branch = Literal["cmp", "slc", "win"]
BRANCHES: tuple[Branch, ...] = ("cmp", "slc", "win")
"""Canonical branch order; gates are ``[..., 3]`` in this order."""


def _require(cond: bool, name: str, expected: str, got) -> None:
  if not cond:
    raise ValueError(f"{name}: expected {expected}, got {got!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NSAConfig:
  """Semantics of one NSA attention op.

  Attributes:
    cmp_window: l, tokens summarized by one compressed token.
    cmp_stride: d, distance between consecutive compressed tokens (``d`` must divide ``l`` and
      ``block_size``); compressed token ``i`` covers tokens ``[i*d, i*d + l)`` and is visible to
      query ``t`` iff ``i*d + l - 1 <= t``.
    compression: ``"mean"`` (mean pooling, no parameters) or ``"mlp"`` (the paper's learnable
      compressor phi: an MLP over the ``l`` keys of a window plus an intra-block position encoding;
      its parameters are passed to the op).
    block_size: l', tokens per selection block.
    num_selected: n, blocks selected per query and KV head, *including* the forced ones.
    num_init_blocks: blocks forced at the start of the query's document.
    num_local_blocks: blocks forced ending at the query's own block (1 = the current block only,
      2 = current + previous, as in the paper's "2 local blocks").
    score_pooling: how block importance pools the compressed tokens overlapping a selection
      block: ``"sum"`` (overlap-weighted sum, NSA eq. 9 in its 0-based form) or ``"max"``
      (InfLLM-V2).
    window: w, keys of the sliding-window branch including the query itself.
    branches: which branches contribute to the output (a subset of ``("cmp", "slc", "win")``).
      Selection always runs the compressed scoring pass; ``"cmp"`` controls only whether the
      compressed branch's *output* is mixed in.
    softmax_scale: logit scale; ``None`` means ``Dk ** -0.5``.
    selection_share: r; 1 = exact per-token selection. With r > 1 (ASA's kernel trick, r = 4 in
      the ASA paper) aligned runs of r tokens use the selection of their first token, so a kernel
      tile of r tokens x G heads iterates over one block list. Must divide ``block_size`` so a run
      never crosses a block boundary (every token's own block stays selected).
  """

  cmp_window: int = 32
  cmp_stride: int = 16
  compression: Literal["mean", "mlp"] = "mlp"
  block_size: int = 64
  num_selected: int = 16
  num_init_blocks: int = 1
  num_local_blocks: int = 2
  score_pooling: Literal["sum", "max"] = "sum"
  window: int = 512
  branches: tuple[Branch, ...] = BRANCHES
  softmax_scale: float | None = None
  selection_share: int = 1

  def __post_init__(self):
    for name in ("cmp_window", "cmp_stride", "block_size", "num_selected", "selection_share"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 1, name, "a positive int", v)
    for name in ("num_init_blocks", "num_local_blocks", "window"):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, name, "a non-negative int", v)
    _require(
      self.cmp_window % self.cmp_stride == 0,
      "cmp_stride",
      f"a divisor of cmp_window={self.cmp_window}",
      self.cmp_stride,
    )
    _require(
      self.block_size % self.cmp_stride == 0,
      "cmp_stride",
      f"a divisor of block_size={self.block_size}",
      self.cmp_stride,
    )
    _require(
      self.block_size % self.selection_share == 0,
      "selection_share",
      f"a divisor of block_size={self.block_size}",
      self.selection_share,
    )
    _require(
      self.compression in ("mean", "mlp"), "compression", "'mean' or 'mlp'", self.compression
    )
    _require(
      self.score_pooling in ("sum", "max"), "score_pooling", "'sum' or 'max'", self.score_pooling
    )
    _require(
      isinstance(self.branches, tuple)
      and len(self.branches) > 0
      and all(b in BRANCHES for b in self.branches)
      and len(set(self.branches)) == len(self.branches),
      "branches",
      f"a non-empty tuple of distinct names from {BRANCHES}",
      self.branches,
    )
    forced = self.num_init_blocks + self.num_local_blocks
    _require(
      forced <= self.num_selected,
      "num_selected",
      f">= num_init_blocks + num_local_blocks = {forced}",
      self.num_selected,
    )
    if "win" in self.branches:
      _require(self.window >= 1, "window", ">= 1 when the 'win' branch is enabled", self.window)
    if self.softmax_scale is not None:
      _require(
        self.softmax_scale > 0, "softmax_scale", "a positive float or None", self.softmax_scale
      )

  # ----------------------------------------------------------------------------- derived sizes
  def num_cmp_tokens(self, seq_len: int) -> int:
    """Compressed tokens of a length-``seq_len`` sequence: ``floor((T - l)/d) + 1`` (0 if T < l)."""
    if seq_len < self.cmp_window:
      return 0
    return (seq_len - self.cmp_window) // self.cmp_stride + 1

  def num_blocks(self, seq_len: int) -> int:
    """Selection blocks covering ``seq_len`` tokens (the last one may be partial)."""
    return -(-seq_len // self.block_size)

  def scale(self, head_dim: int) -> float:
    return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5

  def for_length(self, seq_len: int) -> NSAConfig:
    """The same config with ``num_selected`` clamped to the blocks a ``seq_len`` sequence has.

    Selecting at least as many blocks as exist selects every candidate block, so the clamped
    config computes the same outputs (minus the ``-1`` padding columns); modules use it so one
    model config serves short and long sequences alike.
    """
    nb = self.num_blocks(seq_len)
    if self.num_selected <= nb:
      return self
    # n >= nb selects every candidate block whatever is forced, so the forced counts may shrink
    # with n (they must stay <= n for the config to validate).
    init = min(self.num_init_blocks, nb)
    local = min(self.num_local_blocks, nb - init)
    return dataclasses.replace(self, num_selected=nb, num_init_blocks=init, num_local_blocks=local)

  def replace(self, **kw) -> NSAConfig:
    return dataclasses.replace(self, **kw)

  # ----------------------------------------------------------------------------------- presets
  @classmethod
  def paper(cls, **kw) -> NSAConfig:
    """NSA paper (arXiv 2502.11089 sec. 4.1): phi-MLP l=32 d=16, l'=64, n=16 (1+2 forced), w=512."""
    base = dict(
      cmp_window=32,
      cmp_stride=16,
      compression="mlp",
      block_size=64,
      num_selected=16,
      num_init_blocks=1,
      num_local_blocks=2,
      score_pooling="sum",
      window=512,
      branches=BRANCHES,
    )
    return cls(**{**base, **kw})

  @classmethod
  def fla(cls, *, window: int = 512, **kw) -> NSAConfig:
    """Open-source simplification (fla-org >= 0.3.2): mean pooling l=d=l'=64, {0, cur, cur-1}."""
    base = dict(
      cmp_window=64,
      cmp_stride=64,
      compression="mean",
      block_size=64,
      num_selected=16,
      num_init_blocks=1,
      num_local_blocks=2,
      score_pooling="sum",
      window=window,
      branches=BRANCHES,
    )
    return cls(**{**base, **kw})

  @classmethod
  def infllm_v2(cls, *, local_window: int = 1024, **kw) -> NSAConfig:
    """InfLLM-V2 (MiniCPM4): mean l=32/d=16, max pooling, top-64 incl. 1 init + window/64+1 local.

    No compressed-output branch and no separate sliding window: the window is the forced local
    blocks. Call the op with ``gates=None`` (InfLLM-V2 has no gates).
    """
    block = kw.get("block_size", 64)
    base = dict(
      cmp_window=32,
      cmp_stride=16,
      compression="mean",
      block_size=block,
      num_selected=64,
      num_init_blocks=1,
      num_local_blocks=local_window // block + 1,
      score_pooling="max",
      window=0,
      branches=("slc",),
    )
    return cls(**{**base, **kw})
