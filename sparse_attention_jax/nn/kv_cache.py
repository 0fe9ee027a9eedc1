"""KV-cache accounting per layer kind: bytes a decoder keeps per context token.

Per layer and token (``H`` KV heads, ``Dk``/``Dv`` head dims, ``d`` compression stride, latent
sizes from ``config.latent``: ``d_c``, ``d_R``, ``g`` latent heads of width ``dl = d_c / g``):

==============  ==========================================================================
``full``         K and V: ``H * (Dk + Dv)``.
``swa``          the same; only the last ``w`` tokens are needed (``window``).
``nsa``          ``pairs * H * (Dk + Dv)`` (``pairs`` = 3 with independent per-branch K/V and all
                 branches, 1 when shared) plus the compressed K (and V if the ``cmp`` branch is
                 output) amortized: ``H * (Dk + Dv) / d``. Reported as the *resident* cache, as
                 the NSA paper does: full K/V must stay resident for selection (the window pair
                 would need only ``w`` tokens and phi's raw input only the last ``l``).
``asa_local``    MLA latent ``d_c + d_R`` (one latent head); only the last ``w`` tokens are needed.
``asa_global``   GLA latent ``d_c + d_R`` plus the compressed latent amortized:
                 ``(g * (dl + d_R) + d_c) / d`` (keys per latent head, values if ``cmp`` is
                 output).
``nosa``         all device-resident: K, V and the eviction score ``c`` (``H * (Dk + Dv + 1)``)
                 plus the compressed K and compressed ``c`` amortized: ``H * (Dk + 1) / d``.
==============  ==========================================================================

NOSA offloaded (:func:`nosa_offload_elements`, :func:`offloaded_kv_bytes`; NOSI's layout,
ALGORITHMS.md §4.3): the host holds ``H * (Dk + Dv + 1)`` per token (K, V, ``c``); the device
holds the compressed K and ``c`` per token (``H * (Dk + 1) / d``, needed for the scores) plus a
fixed pool of ``k`` block slots per sequence (``num_selected * l' * H * (Dk + Dv + 1)``: the
``k - 1`` non-current selected blocks and the current block, when the local blocks include it;
``k + 1`` slots otherwise). ``c`` is counted in the cache dtype.

"Per token" numbers count every layer as holding the whole sequence;
:func:`kv_cache_bytes` gives the bytes at a context length with window layers capped at ``w``.

Entry point: ``python -m sparse_attention_jax.nn.kv_cache configs/asa_340m.yaml
configs/nsa_340m.yaml [--context 8192] [--dtype-bytes 2]`` prints one table per config.
"""

from __future__ import annotations

import argparse
import sys

from sparse_attention_jax.nn import load_model_config
from sparse_attention_jax.nn.config import ModelConfig

KNOWN_KINDS = ("full", "swa", "nsa", "asa_local", "asa_global", "nosa")


def _latent(config: ModelConfig, kind: str):
  if config.latent is None:
    raise ValueError(f"model.latent: expected a LatentConfig for attention kind {kind!r}, got None")
  return config.latent


def layer_kv_elements(config: ModelConfig, kind: str) -> dict:
  """Cache elements per token of one layer of ``kind``.

  Returns:
    ``{"kind", "elements_per_token" (float), "window" (int tokens or None), "note"}``.
  """
  c = config
  h, dk, dv = c.num_kv_heads, c.head_dim, c.dv
  if kind in ("full", "swa"):
    return {
      "kind": kind,
      "elements_per_token": float(h * (dk + dv)),
      "window": c.window if kind == "swa" else None,
      "note": "K+V" + (f"; only the last w={c.window} tokens needed" if kind == "swa" else ""),
    }
  if kind == "nsa":
    nsa = c.nsa
    pairs = 1 + (sum(b in nsa.branches for b in ("slc", "win")) if c.nsa_independent_kv else 0)
    cmp = h * (dk + (dv if "cmp" in nsa.branches else 0)) / nsa.cmp_stride
    return {
      "kind": kind,
      "elements_per_token": float(pairs * h * (dk + dv) + cmp),
      "window": None,
      "note": f"{pairs} K/V pair(s) resident + compressed 1/{nsa.cmp_stride}",
    }
  if kind == "asa_local":
    lat = _latent(c, kind)
    return {
      "kind": kind,
      "elements_per_token": float(lat.kv_rank + lat.rope_dim),
      "window": c.window,
      "note": f"MLA latent d_c+d_R; only the last w={c.window} tokens needed",
    }
  if kind == "asa_global":
    lat, nsa = _latent(c, kind), c.nsa
    cmp_k = lat.groups * (lat.group_rank + lat.rope_dim)
    cmp_v = lat.kv_rank if "cmp" in nsa.branches else 0
    return {
      "kind": kind,
      "elements_per_token": float(lat.kv_rank + lat.rope_dim + (cmp_k + cmp_v) / nsa.cmp_stride),
      "window": None,
      "note": f"GLA latent d_c+d_R (g={lat.groups}) + compressed 1/{nsa.cmp_stride}",
    }
  if kind == "nosa":
    nsa = c.nsa
    cmp = h * (dk + 1) / nsa.cmp_stride
    return {
      "kind": kind,
      "elements_per_token": float(h * (dk + dv + 1) + cmp),
      "window": None,
      "note": f"K+V+c resident + compressed K and c 1/{nsa.cmp_stride} (offloadable)",
    }
  raise ValueError(f"kind: expected one of {KNOWN_KINDS} for KV-cache accounting, got {kind!r}")


def nosa_slots(config: ModelConfig) -> int:
  """Device block slots per sequence of an offloaded NOSA layer, the current block included:
  ``k`` when the forced local blocks include the current block (it is always in the selection),
  else ``k + 1``."""
  return config.nsa.num_selected + (0 if config.nsa.num_local_blocks >= 1 else 1)


def nosa_offload_elements(config: ModelConfig) -> dict:
  """Cache elements of one offloaded NOSA layer.

  Returns:
    ``{"device_per_token": H * (Dk + 1) / d (compressed K and c), "device_fixed": slots * l' *
    H * (Dk + Dv + 1) per sequence, "host_per_token": H * (Dk + Dv + 1), "slots"}``.
  """
  c = config
  h, dk, dv, nsa = c.num_kv_heads, c.head_dim, c.dv, c.nsa
  slots = nosa_slots(c)
  return {
    "device_per_token": h * (dk + 1) / nsa.cmp_stride,
    "device_fixed": float(slots * nsa.block_size * h * (dk + dv + 1)),
    "host_per_token": float(h * (dk + dv + 1)),
    "slots": slots,
  }


def offloaded_kv_bytes(config: ModelConfig, context: int, dtype_bytes: int = 2) -> dict:
  """Bytes per sequence at a ``context``-token context with every NOSA layer offloaded.

  Returns:
    ``{"device", "host"}``: NOSA layers count their compressed K/c and slot pool on the device
    and K/V/c on the host; the other layers stay resident as in :func:`kv_cache_bytes`
    (``windowed``: window layers capped at ``w``).
  """
  if not isinstance(context, int) or context < 1:
    raise ValueError(f"context: expected a positive int, got {context!r}")
  device = host = 0.0
  for r in kv_cache_bytes_per_token(config, dtype_bytes)["layers"]:
    if r["kind"] == "nosa":
      e = nosa_offload_elements(config)
      slot_tokens = e["slots"] * config.nsa.block_size
      fixed = e["device_fixed"] * min(1.0, context / slot_tokens)  # never more than the context
      device += (e["device_per_token"] * context + fixed) * dtype_bytes
      host += e["host_per_token"] * context * dtype_bytes
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
    if "nosa" in per["by_kind"]:
      off = offloaded_kv_bytes(config, context, dtype_bytes)
      lines.append(
        f"NOSA layers offloaded ({nosa_slots(config)} block slots of "
        f"{config.nsa.block_size} tokens on the device): device "
        f"{off['device'] / 2**20:,.1f} MiB, host {off['host'] / 2**20:,.1f} MiB per "
        f"sequence"
      )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m sparse_attention_jax.nn.kv_cache",
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
