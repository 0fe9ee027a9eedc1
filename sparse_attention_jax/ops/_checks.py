"""Input validation shared by the ops: errors name the argument, what was expected and what came.

Checks run at trace time on static shapes and dtypes, so they cost nothing inside ``jax.jit``.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_attention_jax.config import NSAConfig

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def fail(name: str, expected: str, got) -> None:
  raise ValueError(f"{name}: expected {expected}, got {got}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
  if not hasattr(x, "shape") or x.ndim != rank:
    fail(name, f"a rank-{rank} array {layout}", f"shape {getattr(x, 'shape', type(x).__name__)}")


def check_config(config, name: str = "config") -> None:
  """``config`` must be an :class:`NSAConfig` (not None, a dict or a module config)."""
  if not isinstance(config, NSAConfig):
    fail(name, "an NSAConfig", type(config).__name__)


def check_batch_len(name: str, x) -> None:
  """``x [B, T, ...]`` must hold at least one sequence (B >= 1) of at least one token (T >= 1)."""
  if x.shape[0] < 1:
    fail(f"{name}.shape[0]", "a batch size B >= 1", x.shape[0])
  if x.shape[1] < 1:
    fail(f"{name}.shape[1]", "a length T >= 1", x.shape[1])


def check_float(name: str, x) -> None:
  if x.dtype not in FLOAT_DTYPES:
    fail(name, "dtype float32, bfloat16 or float16", x.dtype)


def check_qkv(
  q, k, v, *, k_name: str = "k", v_name: str = "v"
) -> tuple[int, int, int, int, int, int]:
  """Validates ``q [B,T,HQ,Dk]``, ``k [B,S,H,Dk]``, ``v [B,S,H,Dv]``.

  Returns:
    ``(B, T, S, HQ, H, Dv)``.
  """
  check_rank("q", q, 4, "[B, T, HQ, Dk]")
  check_rank(k_name, k, 4, "[B, T, H, Dk]")
  check_rank(v_name, v, 4, "[B, T, H, Dv]")
  for name, x in (("q", q), (k_name, k), (v_name, v)):
    check_float(name, x)
  if k.dtype != q.dtype or v.dtype != q.dtype:
    fail(
      f"{k_name}/{v_name}",
      f"the dtype of q ({q.dtype})",
      f"{k_name}.dtype={k.dtype}, {v_name}.dtype={v.dtype}",
    )
  check_batch_len("q", q)
  b, t, hq, dk = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    fail(f"{k_name}/{v_name}", f"batch size {b} (from q)", f"{k.shape[0]} and {v.shape[0]}")
  if k.shape[3] != dk:
    fail(k_name, f"key head dim {dk} (from q.shape[3])", k.shape[3])
  if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
    fail(v_name, f"the length and head count of {k_name} {k.shape[1:3]}", v.shape[1:3])
  h = k.shape[2]
  if h < 1 or hq % h != 0:
    fail(f"{k_name}.shape[2]", f"a number of KV heads dividing HQ={hq}", h)
  return b, t, k.shape[1], hq, h, v.shape[3]


def check_segment_ids(segment_ids, batch: int, seq_len: int, name: str = "segment_ids") -> None:
  if segment_ids is None:
    return
  check_rank(name, segment_ids, 2, "[B, T]")
  if segment_ids.shape != (batch, seq_len):
    fail(name, f"shape {(batch, seq_len)}", segment_ids.shape)
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    fail(name, "an integer dtype", segment_ids.dtype)


def check_gates(gates, batch: int, seq_len: int, num_heads: int) -> None:
  if gates is None:
    return
  check_rank("gates", gates, 4, "[B, T, HQ, 3]")
  if gates.shape != (batch, seq_len, num_heads, 3):
    fail(
      "gates",
      f"shape {(batch, seq_len, num_heads, 3)} (sigmoid-activated, order cmp, slc, win)",
      gates.shape,
    )
  check_float("gates", gates)


def check_block_indices(block_indices, batch: int, seq_len: int, num_kv_heads: int) -> None:
  check_rank("block_indices", block_indices, 4, "[B, T, H, n]")
  if block_indices.shape[:3] != (batch, seq_len, num_kv_heads):
    fail(
      "block_indices",
      f"leading shape {(batch, seq_len, num_kv_heads)} ([B, T, H])",
      block_indices.shape[:3],
    )
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    fail("block_indices", "an integer dtype (int32, -1 = padding)", block_indices.dtype)
