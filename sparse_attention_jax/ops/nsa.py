"""The whole NSA op: compression -> compressed attention -> selection -> selected and window
attention -> gated sum (NSA eq. 5)."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sparse_attention_jax.config import BRANCHES, NSAConfig
from sparse_attention_jax.ops import _checks, dispatch
from sparse_attention_jax.ops.causal import sliding_window_attention
from sparse_attention_jax.ops.cmp_selection import compressed_selection
from sparse_attention_jax.ops.compression import CompressorParams, compress
from sparse_attention_jax.ops.selected import selected_attention
from sparse_attention_jax.ops.selection import share_selection


class NSAAux(NamedTuple):
  """What ``nsa_attention(..., return_aux=True)`` also returns.

  Attributes:
    block_indices: ``[B, T, H, n]`` int32 selected blocks (``-1`` padding).
    cmp_lse: ``[B, T, HQ]`` float32 log-sum-exp of the compressed branch.
    branch_outputs: dict branch name -> ``[B, T, HQ, Dv]`` ungated output of each enabled branch.
  """

  block_indices: jax.Array
  cmp_lse: jax.Array
  branch_outputs: dict


def combine_branches(outputs: dict, gates):
  """``o = sum_c g_c * o_c`` over the enabled branches.

  Args:
    outputs: branch name (``"cmp"``, ``"slc"``, ``"win"``) -> ``[B, T, HQ, Dv]``.
    gates: ``[B, T, HQ, 3]`` sigmoid-activated gates in the order (cmp, slc, win), or None
      (ungated sum).

  Returns:
    ``[B, T, HQ, Dv]`` in the branch outputs' dtype (mixed in float32).
  """
  total = None
  for name, o in outputs.items():
    term = o.astype(jnp.float32)
    if gates is not None:
      term = term * gates[..., BRANCHES.index(name), None].astype(jnp.float32)
    total = term if total is None else total + term
  return total.astype(next(iter(outputs.values())).dtype)


def nsa_pipeline(
  q,
  k,
  v,
  gates,
  *,
  config,
  segment_ids,
  compress_params,
  k_slc,
  v_slc,
  k_win,
  v_win,
  block_indices,
  return_aux,
  impl: str,
):
  """The composite ``"reference"`` entry of ``nsa_attention``: the branch ops in sequence.

  ``impl`` (the name asked for) goes to the selected branch, which must then be served by it; the
  compressed branch with the selection and the window branch take it where their op has an entry
  of that name, else ``"auto"``.
  """
  win_impl = impl if dispatch.implements("causal_attention", impl) else "auto"
  cmp_impl = impl if dispatch.implements("compressed_selection", impl) else "auto"
  pk, pv = (None, None) if compress_params is None else compress_params
  k_cmp = compress(k, config, pk, segment_ids=segment_ids, name="k")
  v_cmp = compress(v, config, pv, segment_ids=segment_ids, name="v")
  cmp = compressed_selection(
    q,
    k_cmp,
    v_cmp,
    config,
    segment_ids=segment_ids,
    select=block_indices is None,
    impl=cmp_impl,
  )
  if block_indices is None:
    block_indices = cmp.block_indices
    if config.selection_share > 1:
      block_indices = share_selection(
        block_indices, config.selection_share, segment_ids=segment_ids
      )
  scale = config.scale(q.shape[-1])
  outputs = {}
  if "cmp" in config.branches:
    outputs["cmp"] = cmp.out
  if "slc" in config.branches:
    outputs["slc"] = selected_attention(
      q,
      k_slc,
      v_slc,
      block_indices,
      block_size=config.block_size,
      segment_ids=segment_ids,
      softmax_scale=scale,
      impl=impl,
    )
  if "win" in config.branches:
    outputs["win"] = sliding_window_attention(
      q,
      k_win,
      v_win,
      window=config.window,
      segment_ids=segment_ids,
      softmax_scale=scale,
      impl=win_impl,
    )
  ordered = {name: outputs[name] for name in BRANCHES if name in outputs}
  o = combine_branches(ordered, gates)
  chex.assert_shape(o, q.shape[:3] + (v_slc.shape[3],))
  if return_aux:
    return o, NSAAux(block_indices, cmp.lse, ordered)
  return o


def nsa_attention(
  q,
  k,
  v,
  gates=None,
  *,
  config: NSAConfig,
  segment_ids=None,
  compress_params: CompressorParams | None = None,
  k_slc=None,
  v_slc=None,
  k_win=None,
  v_win=None,
  block_indices=None,
  impl: str = "auto",
  return_aux: bool = False,
):
  """Native Sparse Attention over ``[B, T, H, D]`` inputs.

  Args:
    q: ``[B, T, HQ, Dk]`` queries (RoPE already applied, if any).
    k: ``[B, T, H, Dk]`` keys, ``HQ % H == 0``. Compressed into block tokens for the compressed
      branch and the selection scores; also used by the other branches unless overridden.
    v: ``[B, T, H, Dv]`` values (``Dv`` may differ from ``Dk``).
    gates: ``[B, T, HQ, 3]`` per-head branch gates, already sigmoid-activated, order
      (cmp, slc, win); None sums the enabled branches ungated.
    config: the :class:`NSAConfig` (static).
    segment_ids: optional ``[B, T]`` integer document ids for packed sequences: no branch
      attends across documents and every block structure restarts at each document, so a
      document's result does not depend on where it sits in the row
      (:mod:`sparse_attention_jax.ops.documents`).
    compress_params: phi's parameters (:class:`CompressorParams`) when
      ``config.compression == "mlp"``.
    k_slc, v_slc, k_win, v_win: independent keys/values for the selected and window branches (the
      paper's per-branch K/V); default to ``k``/``v``.
    block_indices: optional precomputed ``[B, T, H, n]`` selection (document-relative with
      ``segment_ids``; skips scoring, top-n and ``config.selection_share``).
    impl: ``"auto"``, ``"reference"`` or another name of :mod:`sparse_attention_jax.ops.dispatch`:
      an implementation of the whole op if one has that name, else the pipeline of branch ops
      with ``impl`` passed on (:func:`nsa_pipeline`).
    return_aux: also return :class:`NSAAux`.

  Returns:
    ``[B, T, HQ, Dv]`` in ``q.dtype`` (and :class:`NSAAux` if ``return_aux``).
  """
  _checks.check_config(config)
  b, t, s, hq, h, dv = _checks.check_qkv(q, k, v)
  if s != t:
    _checks.fail("k", f"the query length T={t} (self-attention)", s)
  k_slc = k if k_slc is None else k_slc
  v_slc = v if v_slc is None else v_slc
  k_win = k if k_win is None else k_win
  v_win = v if v_win is None else v_win
  for kn, vn, kx, vx in (("k_slc", "v_slc", k_slc, v_slc), ("k_win", "v_win", k_win, v_win)):
    _checks.check_qkv(q, kx, vx, k_name=kn, v_name=vn)
    if kx.shape[1:3] != (t, h):
      _checks.fail(kn, f"[B, T, H] = {(b, t, h)} like k", kx.shape[:3])
    if vx.shape[3] != dv:
      _checks.fail(vn, f"value head dim {dv} like v", vx.shape[3])
  _checks.check_gates(gates, b, t, hq)
  _checks.check_segment_ids(segment_ids, b, t)
  if block_indices is None:
    n, nb = config.num_selected, config.num_blocks(t)
    if n > nb:
      _checks.fail(
        "config.num_selected",
        f"at most the {nb} blocks of a T={t} sequence "
        f"(block_size={config.block_size}); use config.for_length(T)",
        n,
      )
  else:
    _checks.check_block_indices(block_indices, b, t, h)
  if config.compression == "mlp" and not isinstance(compress_params, CompressorParams):
    _checks.fail(
      "compress_params",
      "CompressorParams(k=..., v=...) for compression='mlp'",
      type(compress_params).__name__,
    )
  # A backend may implement the whole op or only some branches: the pipeline (the composite
  # entry) passes ``impl`` on to the branch ops, which dispatch on their own.
  return dispatch.run(
    "nsa_attention",
    impl,
    q,
    k,
    v,
    gates,
    config=config,
    segment_ids=segment_ids,
    compress_params=compress_params,
    k_slc=k_slc,
    v_slc=v_slc,
    k_win=k_win,
    v_win=v_win,
    block_indices=block_indices,
    return_aux=return_aux,
  )
