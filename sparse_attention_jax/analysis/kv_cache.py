"""KV-cache accounting: bytes a decoder keeps per context token, summed over the layers.

Each layer's elements per token come from its kind's registry entry
(``AttentionKind.kv_elements``, defined next to the layer in
:mod:`sparse_attention_jax.nn.attention`, whose module docstrings give the formulas): e.g. ``full``
keeps ``H * (Dk + Dv)`` (K and V), ``swa`` the same for its last ``w`` tokens only, ``nsa`` its
resident K/V pairs plus the compressed keys amortized over the stride ``d``. A kind registered
without ``kv_elements`` is an error naming it.

Offloaded (:func:`offloaded_kv_bytes`): kinds registering ``AttentionKind.offload_elements``
(``nosa``, NOSI's layout: K, V and ``c`` on the host; the compressed K and ``c`` per token plus a
fixed pool of block slots on the device, :func:`nosa_offload_elements`) count host and device
bytes apart.

"Per token" numbers count every layer as holding the whole sequence;
:func:`kv_cache_bytes` gives the bytes at a context length with window layers capped at ``w``.

Entry point: ``python -m sparse_attention_jax.analysis.kv_cache configs/asa_340m.yaml
configs/nsa_340m.yaml [--context 8192] [--dtype-bytes 2]`` prints one table per config.
"""

from __future__ import annotations

import argparse
import sys

from sparse_attention_jax.nn import load_model_config
from sparse_attention_jax.nn.attention.nosa import nosa_slots
from sparse_attention_jax.nn.config import ModelConfig
from sparse_attention_jax.nn.registry import get_attention_kind


def layer_kv_elements(config: ModelConfig, kind: str) -> dict:
  """Cache elements per token of one layer of ``kind`` (its registry entry's ``kv_elements``).

  Returns:
    ``{"kind", "elements_per_token" (float), "window" (int tokens or None), "note"}``.

  Raises:
    ValueError: naming the kind and the registered kinds when ``kind`` is unknown, or naming
      the kind when it registers no KV accounting.
  """
  e = get_attention_kind(kind).kv(config)
  return {
    "kind": kind,
    "elements_per_token": float(e.elements_per_token),
    "window": e.window,
    "note": e.note,
  }


def nosa_offload_elements(config: ModelConfig) -> dict:
  """Cache elements of one offloaded NOSA layer.

  Returns:
    ``{"device_per_token": H * (Dk + 1) / d (compressed K and c), "device_fixed": slots * l' *
    H * (Dk + Dv + 1) per sequence, "host_per_token": H * (Dk + Dv + 1), "slots"}``.
  """
  e = get_attention_kind("nosa").offload_elements(config)
  return {
    "device_per_token": e.device_per_token,
    "device_fixed": e.device_fixed,
    "host_per_token": e.host_per_token,
    "slots": nosa_slots(config),
  }


def offloaded_kv_bytes(config: ModelConfig, context: int, dtype_bytes: int = 2) -> dict:
  """Bytes per sequence at a ``context``-token context with every offloadable layer offloaded.

  Returns:
    ``{"device", "host"}``: layers whose kind registers ``offload_elements`` (``nosa``) count
    their per-token device elements and fixed pool (never more than the context) on the device
    and the rest on the host; the other layers stay resident as in :func:`kv_cache_bytes`
    (``windowed``: window layers capped at ``w``).
  """
  if not isinstance(context, int) or context < 1:
    raise ValueError(f"context: expected a positive int, got {context!r}")
  device = host = 0.0
  for r in kv_cache_bytes_per_token(config, dtype_bytes)["layers"]:
    offload = get_attention_kind(r["kind"]).offload_elements
    if offload is not None:
      e = offload(config)
      fixed = e.device_fixed * min(1.0, context / e.fixed_tokens)
      device += (e.device_per_token * context + fixed) * dtype_bytes
      host += e.host_per_token * context * dtype_bytes
    else:
      tokens = context if r["window"] is None else min(context, r["window"])
      device += r["bytes_per_token"] * tokens
  return {"device": device, "host": host}


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> dict:
  """Per-layer and total KV-cache bytes per context token.

  Args:
    config: the model config (its ``attention`` pattern over ``num_layers``).
    dtype_bytes: bytes per cached element (2 = bfloat16).

  Returns:
    ``{"dtype_bytes", "layers": [{"layer", "kind", "elements_per_token", "bytes_per_token",
    "window", "note"}, ...], "by_kind": {kind: bytes per token of one such layer},
    "total_bytes_per_token"}`` (floats: compressed tokens are amortized over ``d`` tokens).
  """
  if not isinstance(dtype_bytes, int) or dtype_bytes < 1:
    raise ValueError(f"dtype_bytes: expected a positive int, got {dtype_bytes!r}")
  layers = []
  for i, kind in enumerate(config.layer_kinds()):
    row = layer_kv_elements(config, kind)
    layers.append({"layer": i, **row, "bytes_per_token": row["elements_per_token"] * dtype_bytes})
  return {
    "dtype_bytes": dtype_bytes,
    "layers": layers,
    "by_kind": {r["kind"]: r["bytes_per_token"] for r in layers},
    "total_bytes_per_token": sum(r["bytes_per_token"] for r in layers),
  }


def kv_cache_bytes(config: ModelConfig, context: int, dtype_bytes: int = 2) -> dict:
  """Total cache bytes at a ``context``-token context: ``{"resident", "windowed"}``.

  ``resident`` holds every layer's per-token cache for all ``context`` tokens (compressed tokens
  counted exactly); ``windowed`` caps the layers that have a ``window`` (``swa``, ``asa_local``)
  at their last ``w`` tokens.
  """
  if not isinstance(context, int) or context < 1:
    raise ValueError(f"context: expected a positive int, got {context!r}")
  per = kv_cache_bytes_per_token(config, dtype_bytes)
  resident = windowed = 0.0
  for r in per["layers"]:
    total = r["bytes_per_token"] * context
    resident += total
    windowed += total if r["window"] is None else r["bytes_per_token"] * min(context, r["window"])
  return {"resident": resident, "windowed": windowed}


def describe_kv_cache(config: ModelConfig, dtype_bytes: int = 2, context: int | None = None) -> str:
  """A plain-text table: one row per layer kind (bytes per token per layer and over its layers),
  the total per token and, with ``context``, the totals at that context length."""
  per = kv_cache_bytes_per_token(config, dtype_bytes)
  counts: dict[str, int] = {}
  for r in per["layers"]:
    counts[r["kind"]] = counts.get(r["kind"], 0) + 1
  notes = {r["kind"]: r["note"] for r in per["layers"]}
  head = f"{'kind':<11} {'layers':>6} {'B/token/layer':>14} {'B/token':>10}  note"
  lines = [head, "-" * len(head)]
  for kind, n in counts.items():
    b = per["by_kind"][kind]
    lines.append(f"{kind:<11} {n:>6} {b:>14,.1f} {b * n:>10,.1f}  {notes[kind]}")
  lines.append(
    f"{'total':<11} {config.num_layers:>6} {'':>14} "
    f"{per['total_bytes_per_token']:>10,.1f}  ({dtype_bytes} bytes per element)"
  )
  if context is not None:
    tot = kv_cache_bytes(config, context, dtype_bytes)
    lines.append(
      f"at context {context:,}: resident {tot['resident'] / 2**20:,.1f} MiB, "
      f"window layers capped at w {tot['windowed'] / 2**20:,.1f} MiB per sequence"
    )
    offloadable = [k for k in per["by_kind"] if get_attention_kind(k).offload_elements]
    if offloadable:
      off = offloaded_kv_bytes(config, context, dtype_bytes)
      pools = ", ".join(
        f"{k} {get_attention_kind(k).offload_elements(config).fixed_tokens} tokens"
        for k in offloadable
      )
      lines.append(
        f"{', '.join(offloadable)} layers offloaded (device block pool per layer: {pools}): "
        f"device "
        f"{off['device'] / 2**20:,.1f} MiB, host {off['host'] / 2**20:,.1f} MiB per "
        f"sequence"
      )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m sparse_attention_jax.analysis.kv_cache",
    description="KV-cache bytes per token of model configs.",
  )
  p.add_argument("configs", nargs="+", help="YAML config files with a model: section")
  p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (default 2)")
  p.add_argument("--context", type=int, default=None, help="also report totals at this length")
  args = p.parse_args(argv)
  first = None
  for path in args.configs:
    cfg = load_model_config(path)
    total = kv_cache_bytes_per_token(cfg, args.dtype_bytes)["total_bytes_per_token"]
    first = total if first is None else first
    print(f"== {path}: {total:,.1f} bytes/token ({total / first:.1%} of {args.configs[0]})")
    print(describe_kv_cache(cfg, args.dtype_bytes, args.context))
    print()
  return 0


__all__ = [
  "describe_kv_cache",
  "kv_cache_bytes",
  "kv_cache_bytes_per_token",
  "layer_kv_elements",
  "nosa_offload_elements",
  "nosa_slots",
  "offloaded_kv_bytes",
]

if __name__ == "__main__":
  sys.exit(main())
