"""Model FLOPs accounting (per trained token) and MFU.

Training FLOPs per token of a :class:`ModelConfig` at sequence length ``T``::

  flops_per_token = 6 * N_matmul  +  6 * P_phi / d  +  sum over layers of attn(kind)

* ``N_matmul``: parameters used in a matmul once per token: every >= 2-D parameter except the
  embedding table (a lookup) and the NSA compressors phi; with tied embeddings the table is the
  output head and counts once. 6 = 2 (multiply-add) x 3 (forward + backward).
* ``P_phi``: weights (``w1``, ``w2``) of the learnable compressors phi_k, phi_v: applied once per
  compressed token (every ``d = cmp_stride`` tokens), hence ``/ d``.
* ``attn(kind) = 6 * HQ * sum_branches keys_b * (Dk + Dv_b)``: per query head, a visited key costs
  ``2 * Dk`` (q.k) + ``2 * Dv`` (p.v) forward, x 3 for training. Average keys a query visits
  (causal, queries spread uniformly over ``0..T-1``):

  ========================= ==========================================================
  kind / branch              keys per query
  ========================= ==========================================================
  ``full``                   ``T / 2``
  ``swa`` / ``asa_local``    ``min(w, T / 2)`` (``w = model.window``)
  nsa ``cmp``                ``T / (2 d)`` (compressed tokens)
  nsa ``slc``                ``min(n * l', T / 2)``
  nsa ``win``                ``min(w, T / 2)`` (``w = model.nsa.window``)
  ========================= ==========================================================

  ``nsa`` and ``asa_global`` sum their ``model.nsa.branches``; the selection needs the
  compressed scores, so without a ``cmp`` branch the ``q.k`` part of it is still counted
  (``Dv = 0``). ``asa_global`` attends in the absorbed latent space (``Dk = kv_rank / groups +
  rope_dim``, ``Dv = kv_rank / groups``), ``asa_local`` in the expanded one (``Dk = nope_dim +
  rope_dim``, ``Dv = v_dim``). ``ssa`` computes both paths in training: ``full`` plus the NSA
  branches of ``model.ssa.branches``.

Element-wise work (norms, softmax, RoPE, gates) is not counted, as in the usual 6N convention.

Example::

  cfg = load_model_config("configs/nsa_340m.yaml")
  f = flops_per_token(cfg, 8192)                     # FLOPs per trained token
  mfu(f * tokens_per_s_per_device, peak_flops("NVIDIA H200"))
"""

from __future__ import annotations

import jax
from flax import nnx

from sparse_attention_jax.nn import DecoderLM
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.ssa_config import SSAConfig

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

_COMPRESSOR_WEIGHTS = frozenset({"w1", "w2"})


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_split(config: ModelConfig) -> tuple[int, int]:
  """``(N_matmul, P_phi)`` of ``DecoderLM(config)`` from its abstract parameters (no memory)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  n_matmul, p_phi = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
    names = _names(path)
    size = 1
    for s in leaf.shape:
      size *= s
    if any(n.startswith("phi_") for n in names):
      p_phi += size if _COMPRESSOR_WEIGHTS & set(names) else 0  # Not `pos`, `b1`, `b2`.
      continue
    if "embed" in names and not config.tie_embeddings:
      continue  # A lookup, not a matmul (the untied head is `lm_head`).
    if len(leaf.shape) >= 2:
      n_matmul += size
  return n_matmul, p_phi


def _nsa_branch_terms(config: ModelConfig, t: int, branches, dk: int, dv: int) -> float:
  """``sum_b keys_b * (Dk + Dv_b)`` of an NSA-style layer (see the module docstring)."""
  nsa = config.nsa
  half = t / 2
  total = 0.0
  cmp_keys = t / (2 * nsa.cmp_stride)
  total += cmp_keys * (dk + (dv if "cmp" in branches else 0))  # Scores are always needed.
  if "slc" in branches:
    total += min(nsa.num_selected * nsa.block_size, half) * (dk + dv)
  if "win" in branches:
    total += min(nsa.window, half) * (dk + dv)
  return total


def attention_flops_per_token(config: ModelConfig, kind: str, seq_len: int) -> float:
  """Training FLOPs per token of one attention layer of ``kind`` (the ``attn`` term above)."""
  t, hq, half = seq_len, config.num_heads, seq_len / 2
  dk, dv = config.head_dim, config.dv
  if kind == "full":
    keys_dims = half * (dk + dv)
  elif kind == "swa":
    keys_dims = min(config.window, half) * (dk + dv)
  elif kind in ("nsa", "nosa"):  # NOSA: InfLLM-V2 scoring + its k selected blocks
    keys_dims = _nsa_branch_terms(config, t, config.nsa.branches, dk, dv)
  elif kind == "ssa":
    ssa = config.ssa or SSAConfig()
    keys_dims = half * (dk + dv) + _nsa_branch_terms(config, t, ssa.branches, dk, dv)
  elif kind == "asa_local":
    lat = config.latent
    keys_dims = min(config.window, half) * (lat.nope_dim + lat.rope_dim + lat.v_dim)
  elif kind == "asa_global":
    lat = config.latent
    dl = lat.kv_rank // lat.groups
    keys_dims = _nsa_branch_terms(config, t, config.nsa.branches, dl + lat.rope_dim, dl)
  else:
    raise ValueError(
      f"kind: expected one of full, swa, nsa, nosa, ssa, asa_local, asa_global, got {kind!r}"
    )
  return 6.0 * hq * keys_dims


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model training FLOPs per token (forward + backward) at ``seq_len``; see the module doc."""
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
  n_matmul, p_phi = param_split(config)
  total = 6.0 * n_matmul + 6.0 * p_phi / config.nsa.cmp_stride
  for kind in config.layer_kinds():
    total += attention_flops_per_token(config, kind, seq_len)
  return total


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
