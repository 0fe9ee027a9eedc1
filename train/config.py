"""Run configuration: the ``model:``, ``train:`` and ``data:`` sections of a ``configs/*.yaml``
plus overrides.

Example::

  cfg = load_config("configs/tiny.yaml", ["train.steps=50", "model.nsa.num_selected=2"])
  cfg.train.steps          # 50
  save_config(cfg, "runs/tiny/config.yaml")

Every field is validated when the config is built, so a bad value fails before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

from sparse_attention_jax.config import NSAConfig
from sparse_attention_jax.nn._config_io import checked_mapping
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.latent_config import LatentConfig
from sparse_attention_jax.nn.nosa_config import NOSAConfig
from sparse_attention_jax.nn.ssa_config import SSAConfig
from train.data_config import DataConfig

# Byte-level text: token ids are 0..255.
BYTE_VOCAB = 256

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def validate_mesh_config(spec: dict[str, int] | None) -> dict[str, int]:
  """Checks a ``train.mesh`` mapping (without looking at devices) and fills in missing axes.

  A missing ``fsdp`` is -1 (all remaining devices) unless another axis is -1; other missing axes
  are 1, so ``{tensor: 2}`` means tensor 2 and FSDP over the rest.

  Raises:
    ValueError: unknown axis names, non-int sizes, sizes < 1 other than -1, or more than one -1.
  """
  if spec is None:
    return dict(DEFAULT_MESH)
  if not isinstance(spec, dict):
    raise ValueError(f"train.mesh: expected a mapping like {DEFAULT_MESH}, got {spec!r}")
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"train.mesh: unknown axes {unknown}; expected some of {list(MESH_AXES)}")
  free = any(n == -1 for n in spec.values())
  out = {a: spec.get(a, 1 if free or a != "fsdp" else -1) for a in MESH_AXES}
  for a, n in out.items():
    if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
      raise ValueError(
        f"train.mesh.{a}: expected a positive int or -1 (all remaining devices), got {n!r}"
      )
  if sum(n == -1 for n in out.values()) > 1:
    raise ValueError(f"train.mesh: expected at most one axis of size -1, got {out}")
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The ``train:`` section.

  Attributes:
    seq_len: tokens per packed row fed to the model (targets are the next bytes).
    batch_size: rows per step.
    steps: optimizer steps.
    lr: peak learning rate (AdamW), reached after ``warmup_steps`` of linear warmup, then cosine
      decay to ``lr * min_lr_ratio`` at ``steps``.
    warmup_steps: linear warmup steps (0 = start at the peak; more than ``steps`` is clamped to
      ``steps``, so ``train.steps=20`` alone is a valid override).
    weight_decay: decoupled AdamW weight decay, applied to matrices only (see ``train.loop``).
    grad_clip: global gradient norm clip (0 = no clipping).
    eval_every: evaluate the held-out loss every this many steps (0 = only at the end).
    eval_batches: held-out batches per evaluation (0 = no evaluation at all: no initial or final
      held-out loss, no eval program to compile).
    log_every: print a log line and append to ``metrics.jsonl`` every this many steps.
    seed: seed of the parameters and of the data order.
    output_dir: where the resolved config, ``metrics.jsonl`` and ``checkpoints/`` go.
    sample_bytes: bytes sampled from the trained model at the end (0 = no sampling).
    sample_prompt: prompt of the final sample.
    sample_temperature: sampling temperature (0 = greedy).
    min_lr_ratio: final learning rate as a fraction of ``lr``.
    adam_b1: AdamW beta1.
    adam_b2: AdamW beta2.
    corpus_max_bytes: cap on the embedded corpus (Python standard library sources) in bytes.
    heldout_fraction: fraction of the corpus files held out for evaluation (chosen by path hash).
    mesh: device mesh axis sizes ``{data, fsdp, tensor}``; one may be -1 = all remaining devices
      (see :mod:`train.mesh`). With one device in one process the run uses no mesh at all.
    distributed: call ``jax.distributed.initialize()`` at start (also done when
      ``JAX_COORDINATOR_ADDRESS`` is set).
    grad_accum_steps: microbatches per optimizer step (must divide the per-device rows); the
      update uses the gradient of the mean loss of the whole ``batch_size`` rows.
    checkpoint_every: save an (asynchronous) checkpoint every this many steps (0 = no step
      period); the last step is always saved.
    checkpoint_every_minutes: also save when this many minutes passed since the last save
      (0 = no time period), so a long step period never risks more than this much work.
    keep_checkpoints: keep only the newest this many checkpoints.
    tensorboard: also write the logged scalars as TensorBoard events under
      ``output_dir/tensorboard`` (needs ``tensorboardX``; skipped with a notice without it).
    peak_flops: peak FLOP/s of one device for the MFU (0 = from the table of
      :mod:`train.flops` by device kind; MFU is n/a on CPU).
  """

  seq_len: int = 256
  batch_size: int = 8
  steps: int = 300
  lr: float = 3e-3
  warmup_steps: int = 30
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10
  seed: int = 0
  output_dir: str = "runs/default"
  sample_bytes: int = 120
  sample_prompt: str = "def "
  sample_temperature: float = 0.8
  min_lr_ratio: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  corpus_max_bytes: int = 4_000_000
  heldout_fraction: float = 0.05
  mesh: dict[str, int] = dataclasses.field(
    default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1}
  )
  distributed: bool = False
  grad_accum_steps: int = 1
  checkpoint_every: int = 500
  checkpoint_every_minutes: float = 30.0
  keep_checkpoints: int = 3
  tensorboard: bool = True
  peak_flops: float = 0.0

  def __post_init__(self):
    def fail(name, expected):
      raise ValueError(f"train.{name}: expected {expected}, got {getattr(self, name)!r}")

    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v):
      return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    for name, lo in (
      ("seq_len", 2),
      ("batch_size", 1),
      ("steps", 1),
      ("eval_batches", 0),
      ("log_every", 1),
      ("corpus_max_bytes", 4096),
      ("grad_accum_steps", 1),
      ("keep_checkpoints", 1),
    ):
      if not is_int(getattr(self, name)) or getattr(self, name) < lo:
        fail(name, f"an int >= {lo}")
    for name in ("warmup_steps", "eval_every", "sample_bytes", "checkpoint_every"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 0:
        fail(name, "an int >= 0")
    if not is_int(self.seed):
      fail("seed", "an int")
    if not is_real(self.lr) or self.lr <= 0:
      fail("lr", "a positive number (write 3.0e-3, not 3e-3: YAML reads the latter as a string)")
    for name in ("weight_decay", "grad_clip", "sample_temperature", "checkpoint_every_minutes"):
      if not is_real(getattr(self, name)) or getattr(self, name) < 0:
        fail(name, "a number >= 0")
    for name in ("min_lr_ratio",):
      if not is_real(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
        fail(name, "a number in [0, 1]")
    for name in ("adam_b1", "adam_b2"):
      if not is_real(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
        fail(name, "a number in [0, 1)")
    if not is_real(self.heldout_fraction) or not 0 < self.heldout_fraction < 1:
      fail("heldout_fraction", "a number in (0, 1)")
    if not isinstance(self.output_dir, str) or not self.output_dir:
      fail("output_dir", "a non-empty path string")
    if not isinstance(self.sample_prompt, str) or not self.sample_prompt.encode("utf-8"):
      fail("sample_prompt", "a non-empty string")
    for name in ("distributed", "tensorboard"):
      if not isinstance(getattr(self, name), bool):
        fail(name, "true or false")
    if not is_real(self.peak_flops) or self.peak_flops < 0:
      fail("peak_flops", "a number >= 0 (FLOP/s, e.g. 989.0e12; 0 = by device kind)")
    object.__setattr__(self, "mesh", validate_mesh_config(self.mesh))
    if self.batch_size % self.grad_accum_steps:
      fail("grad_accum_steps", f"a divisor of train.batch_size={self.batch_size}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    """Builds a config from plain data (YAML); unknown keys are errors."""
    d = checked_mapping("train", d, cls)
    for f in dataclasses.fields(cls):
      # YAML 1.1 reads "3e-3" as a string; accept numeric strings for float fields.
      if f.type == "float" and isinstance(d.get(f.name), str):
        try:
          d[f.name] = float(d[f.name])
        except ValueError:
          raise ValueError(f"train.{f.name}: expected a number, got {d[f.name]!r}") from None
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A model, how to train it and on what data."""

  model: ModelConfig
  train: TrainConfig
  data: DataConfig = dataclasses.field(default_factory=DataConfig)

  def __post_init__(self):
    if not isinstance(self.model, ModelConfig):
      raise TypeError(f"model: expected a ModelConfig, got {type(self.model).__name__}")
    if not isinstance(self.train, TrainConfig):
      raise TypeError(f"train: expected a TrainConfig, got {type(self.train).__name__}")
    if not isinstance(self.data, DataConfig):
      raise TypeError(f"data: expected a DataConfig, got {type(self.data).__name__}")
    # Every listed kind, also one that the layer count leaves unused (a typo is never silent).
    from sparse_attention_jax.nn import ATTENTION_KINDS

    unknown = [k for k in self.model.attention if k not in ATTENTION_KINDS]
    if unknown:
      raise ValueError(
        f"model.attention: unknown kinds {unknown}; registered kinds are {sorted(ATTENTION_KINDS)}"
      )
    # With a tokenizer the vocabulary is checked when the tokenizer is loaded (train.sources).
    if self.data.tokenizer is None and self.model.vocab_size < BYTE_VOCAB:
      raise ValueError(
        f"model.vocab_size: expected >= {BYTE_VOCAB} for byte-level data "
        f"(data.source={self.data.source!r}, no data.tokenizer), got "
        f"{self.model.vocab_size}"
      )

  def to_dict(self) -> dict[str, Any]:
    return {
      "model": self.model.to_dict(),
      "train": self.train.to_dict(),
      "data": self.data.to_dict(),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunConfig:
    if not isinstance(d, dict):
      raise ValueError(
        f"config: expected a mapping with 'model' and 'train', got {type(d).__name__}"
      )
    unknown = sorted(set(d) - {"model", "train", "data"})
    if unknown:
      raise ValueError(
        f"config: unknown top-level keys {unknown}; expected 'model', 'train' and optionally 'data'"
      )
    if not isinstance(d.get("model"), dict):
      raise ValueError(f"model: expected a mapping, got {d.get('model')!r}")
    try:
      model = ModelConfig.from_dict(d["model"])
    except ValueError as e:
      # NSAConfig names its fields bare ("num_selected: ..."); say where they live.
      msg = str(e)
      field = msg.split(":", 1)[0]
      if field in _NSA_FIELDS:
        raise ValueError(f"model.nsa.{msg}") from None
      raise
    return cls(
      model=model,
      train=TrainConfig.from_dict(d.get("train") or {}),
      data=DataConfig.from_dict(d.get("data")),
    )


_NSA_FIELDS = frozenset(f.name for f in dataclasses.fields(NSAConfig))

# The dataclass behind each overridable section: `key=value` overrides are checked against these
# (not against the YAML file), so a field the file leaves at its default can still be overridden.
_SECTIONS: dict[tuple[str, ...], tuple[set[str], set[str]]] = {
  ("model",): ({f.name for f in dataclasses.fields(ModelConfig)}, {"nsa", "latent", "ssa", "nosa"}),
  ("model", "nsa"): ({f.name for f in dataclasses.fields(NSAConfig)} | {"preset"}, set()),
  ("model", "latent"): ({f.name for f in dataclasses.fields(LatentConfig)}, set()),
  ("model", "ssa"): ({f.name for f in dataclasses.fields(SSAConfig)}, set()),
  ("model", "nosa"): ({f.name for f in dataclasses.fields(NOSAConfig)}, set()),
  ("train",): ({f.name for f in dataclasses.fields(TrainConfig)}, {"mesh"}),
  ("train", "mesh"): ({"data", "fsdp", "tensor"}, set()),
  ("data",): ({f.name for f in dataclasses.fields(DataConfig)}, set()),
}


def apply_override(data: dict[str, Any], override: str) -> None:
  """Applies one ``section.key=value`` override to raw config data in place.

  Args:
    data: the parsed YAML mapping (``{"model": {...}, "train": {...}}``).
    override: e.g. ``train.steps=50``, ``model.d_model=64``, ``model.nsa.num_selected=2``,
      ``model.attention=[swa,nsa]``; the value is parsed with ``yaml.safe_load``.

  Raises:
    ValueError: malformed override or a key that no config section has.
  """
  if not isinstance(override, str) or "=" not in override:
    raise ValueError(
      f"override: expected 'section.key=value' (e.g. train.steps=50), got {override!r}"
    )
  key, raw = override.split("=", 1)
  parts = tuple(key.strip().split("."))
  if len(parts) < 2 or not all(parts):
    raise ValueError(
      f"override {override!r}: expected a dotted key like train.steps or "
      f"model.nsa.num_selected, got {key!r}"
    )
  section, name = parts[:-1], parts[-1]
  if section not in _SECTIONS:
    known = sorted(".".join(s) for s in _SECTIONS)
    raise ValueError(
      f"override {override!r}: unknown section {'.'.join(section)!r}; known sections are {known}"
    )
  fields, subsections = _SECTIONS[section]
  if name not in fields:
    raise ValueError(
      f"override {override!r}: unknown key {key!r}; {'.'.join(section)} has {sorted(fields)}"
    )
  try:
    value = yaml.safe_load(raw) if raw.strip() else None
  except yaml.YAMLError as e:
    raise ValueError(f"override {override!r}: value {raw!r} is not valid YAML ({e})") from None
  if name in subsections and not isinstance(value, dict):
    raise ValueError(
      f"override {override!r}: {key} is a section; set its fields one by one ({key}.FIELD=VALUE)"
    )
  node = data
  for p in section:
    child = node.get(p)
    if child is None:
      child = node[p] = {}
    elif not isinstance(child, dict):
      raise ValueError(
        f"override {override!r}: {p!r} in the config file is "
        f"{type(child).__name__}, expected a mapping"
      )
    node = child
  node[name] = value


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
  """Reads a YAML config file, applies ``key=value`` overrides and validates everything.

  Args:
    path: a YAML file with ``model:`` and ``train:`` sections.
    overrides: strings like ``train.steps=50`` or ``model.nsa.num_selected=2``.

  Returns:
    The validated :class:`RunConfig`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: malformed YAML, unknown keys or invalid values (the message names the field).
  """
  with open(path) as f:
    try:
      data = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ValueError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(
      f"{path}: expected a mapping with 'model' and 'train' sections, got {type(data).__name__}"
    )
  for o in overrides:
    apply_override(data, o)
  try:
    return RunConfig.from_dict(data)
  except TypeError as e:  # e.g. NSAConfig.paper() given an unexpected keyword.
    raise ValueError(f"{path}: {e}") from None


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
  """Writes the resolved config as YAML (loadable again by :func:`load_config`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    yaml.safe_dump(config.to_dict(), f, sort_keys=False)
