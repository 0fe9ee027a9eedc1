"""Model configuration: a frozen dataclass built from the ``model:`` section of a config YAML."""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn._config_io import checked_mapping
from sparse_attention_jax.nn.latent_config import LatentConfig
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.nn.ssa_config import SSAConfig


def _registered_kinds():
  """The registered attention kinds. The built-in kinds register when
  :mod:`sparse_attention_jax.nn.attention` is imported, which ``sparse_attention_jax.nn`` does
  before any of its modules is used."""
  from sparse_attention_jax.nn.registry import ATTENTION_KINDS

  return ATTENTION_KINDS


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A Llama-like decoder whose attention kind is chosen per layer.

  Attributes:
    vocab_size: token vocabulary (256 for byte-level text).
    d_model: residual width.
    num_layers: decoder blocks.
    num_heads: query heads HQ.
    num_kv_heads: KV heads H (HQ % H == 0).
    head_dim: query/key head dim Dk.
    v_head_dim: value head dim Dv (None = head_dim).
    mlp_dim: SwiGLU hidden width.
    attention: per-layer attention kinds, repeated cyclically over the layers (``("nsa",)`` = all
      NSA; ``("swa", "full")`` = alternating). Kinds are registered in
      :mod:`sparse_attention_jax.nn.attention` (``full``, ``swa``, ``nsa``, ``asa_local``,
      ``asa_global``, ``ssa``, ``nosa`` and any kind registered at run time); an unknown name
      is an error here.
    window: window of ``swa`` layers.
    nsa: the NSA op's config for ``nsa`` layers.
    nsa_independent_kv: separate K/V projections per NSA branch (the paper) instead of shared ones.
    nsa_compressor_hidden: hidden width of the learnable compressor phi (None = head_dim).
    rope_theta: RoPE base.
    tie_embeddings: share the input embedding with the output projection.
    norm_eps: RMSNorm epsilon.
    dtype: compute dtype of activations (``float32`` or ``bfloat16``); parameters stay float32.
    attn_impl: ``impl=`` passed to the attention ops (``auto``, ``reference``, ...).
    remat: rematerialization of each decoder block in the backward pass: ``none`` (keep all
      activations), ``full`` (keep only the block inputs, recompute the rest) or ``dots`` (keep
      matmul outputs without batch dims:
      ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).
    scan_layers: apply each run of consecutive layers of the same kind (and only parameter
      state) with one ``lax.scan`` over their stacked parameters, so the block compiles once per
      run instead of once per layer (compile time of deep models); parameters and checkpoints
      keep their per-layer layout.
      Step-time cost: a scanned layer materializes every residual its backward needs as a
      stacked loop output, where the unrolled program lets XLA fuse cheap ones into their
      consumers, so steps can be slower without remat (measured figures:
      ``benchmarks/RESULTS.md``, compile time).
    scan_unroll: layers per iteration of those scans (``lax.scan``'s ``unroll``; 1 = one layer
      per loop iteration); a larger value trades compile time for fewer loop iterations.
    latent: MLA/GLA sizes of the ``asa_*`` kinds.
    ssa: settings of ``ssa`` layers (:class:`SSAConfig`; None = its defaults).
    nosa: settings of ``nosa`` layers (:class:`NOSAConfig`; None = its defaults).
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 32
  v_head_dim: int | None = None
  mlp_dim: int = 384
  attention: tuple[str, ...] = ("nsa",)
  window: int = 512
  nsa: NSAConfig = dataclasses.field(default_factory=NSAConfig.paper)
  nsa_independent_kv: bool = True
  nsa_compressor_hidden: int | None = None
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"
  attn_impl: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  scan_unroll: int = 1
  latent: LatentConfig | None = None  # MLA/GLA sizes of the asa_* kinds
  ssa: SSAConfig | None = None  # settings of the ssa kind (None = SSAConfig())
  nosa: NOSAConfig | None = None  # settings of the nosa kind (None = NOSAConfig())

  def __post_init__(self):
    def need(cond, name, expected):
      if not cond:
        raise ValueError(f"model.{name}: expected {expected}, got {getattr(self, name)!r}")

    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "window",
    ):
      need(
        isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive int"
      )
    need(
      self.num_heads % self.num_kv_heads == 0,
      "num_kv_heads",
      f"a divisor of num_heads={self.num_heads}",
    )
    need(
      self.v_head_dim is None or (isinstance(self.v_head_dim, int) and self.v_head_dim >= 1),
      "v_head_dim",
      "None or a positive int",
    )
    need(
      isinstance(self.attention, tuple)
      and len(self.attention) >= 1
      and all(isinstance(a, str) for a in self.attention),
      "attention",
      "a non-empty tuple of attention kind names",
    )
    unknown = sorted(set(self.attention) - set(_registered_kinds()))
    if unknown:
      raise ValueError(
        f"model.attention: expected kinds from the registered {sorted(_registered_kinds())}, "
        f"got unknown {unknown}"
      )
    need(
      self.dtype in ("float32", "bfloat16", "float16"),
      "dtype",
      "'float32', 'bfloat16' or 'float16'",
    )
    need(isinstance(self.nsa, NSAConfig), "nsa", "an NSAConfig")
    need(self.remat in ("none", "full", "dots"), "remat", "'none', 'full' or 'dots'")
    need(isinstance(self.scan_layers, bool), "scan_layers", "a bool")
    need(
      isinstance(self.scan_unroll, int)
      and not isinstance(self.scan_unroll, bool)
      and self.scan_unroll >= 1,
      "scan_unroll",
      "a positive int",
    )
    need(self.ssa is None or isinstance(self.ssa, SSAConfig), "ssa", "None or an SSAConfig")
    need(self.nosa is None or isinstance(self.nosa, NOSAConfig), "nosa", "None or a NOSAConfig")

  @property
  def dv(self) -> int:
    return self.head_dim if self.v_head_dim is None else self.v_head_dim

  def layer_kinds(self) -> tuple[str, ...]:
    """The attention kind of every layer (the pattern repeated cyclically)."""
    return tuple(self.attention[i % len(self.attention)] for i in range(self.num_layers))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    d = checked_mapping("model", d, cls)
    if "attention" in d:
      a = d["attention"]
      d["attention"] = (a,) if isinstance(a, str) else tuple(a)
    if "nsa" in d and isinstance(d["nsa"], dict):
      nsa = dict(d["nsa"])
      preset = nsa.pop("preset", "paper")
      if "branches" in nsa:
        nsa["branches"] = tuple(nsa["branches"])
      factories = {"paper": NSAConfig.paper, "fla": NSAConfig.fla, "infllm_v2": NSAConfig.infllm_v2}
      if preset not in factories:
        raise ValueError(f"model.nsa.preset: expected one of {sorted(factories)}, got {preset!r}")
      d["nsa"] = factories[preset](**nsa)
    if isinstance(d.get("latent"), dict):
      d["latent"] = LatentConfig.from_dict(d["latent"])
    if isinstance(d.get("ssa"), dict):
      d["ssa"] = SSAConfig.from_dict(d["ssa"])
    if isinstance(d.get("nosa"), dict):
      d["nosa"] = NOSAConfig.from_dict(d["nosa"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["attention"] = list(self.attention)
    out["nsa"] = {**dataclasses.asdict(self.nsa), "branches": list(self.nsa.branches)}
    if self.ssa is not None:
      out["ssa"] = self.ssa.to_dict()
    if self.nosa is not None:
      out["nosa"] = self.nosa.to_dict()
    return out
