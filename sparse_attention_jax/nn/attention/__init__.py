"""Attention layer kinds of the decoder: one module per kind, each registered in
:mod:`sparse_attention_jax.nn.registry` (a leaf module, so the config and the decode loop can read
it without importing the layers).

Every kind is an :class:`nnx.Module` built as ``Cls(config: ModelConfig, *, rngs: nnx.Rngs)`` and
called as ``layer(x [B, T, d_model], positions [B, T] int32, segment_ids [B, T] int32 | None)``
returning ``[B, T, d_model]`` in the compute dtype. Its :class:`AttentionKind` entry in
:data:`ATTENTION_KINDS` carries everything else the library knows about it: the decode protocol,
KV-cache elements per token, training FLOPs per token and the q/k the analysis tools read.

==============  ==========================  ===================================================
kind            module                      layer
==============  ==========================  ===================================================
``full``        :mod:`.full`                dense causal GQA (:class:`FullAttention`)
``swa``         :mod:`.sliding_window`      sliding window (:class:`SlidingWindowAttention`)
``nsa``         :mod:`.nsa`                 Native Sparse Attention (:class:`NSAAttention`)
``asa_local``   :mod:`.asa_local`           sliding-window MLA (:class:`MLALocalAttention`)
``asa_global``  :mod:`.asa_global`          NSA over GLA latents (:class:`GLAGlobalAttention`)
``ssa``         :mod:`.ssa`                 dual sparse/full training (:class:`SSAAttention`)
``nosa``        :mod:`.nosa`                NOSA eviction head (:class:`NOSAAttention`)
==============  ==========================  ===================================================

Shared pieces: :mod:`.common` (input checks, q/k/v/o projections), :mod:`.latent` (the MLA/GLA
projections of the two ASA kinds), :mod:`sparse_attention_jax.nn.registry` (:class:`AttentionKind`,
:func:`register_attention_kind`, :func:`get_attention_kind`).

Adding a kind = one file + one registration, no other file edited::

  # my_kind.py
  class MyAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs): ...
    def __call__(self, x, positions, segment_ids=None): ...       # [B, T, d_model]
    # optional decode protocol (nn/decode.py): init_cache, prefill, decode

  register_attention_kind(AttentionKind(
    name="my_kind",
    module=MyAttention,
    decode=LAYER_METHODS,                                       # or None: no cached decoding
    kv_elements=lambda config: KVElements(per_token, window, note),
    train_flops=lambda config, seq_len: ...,                    # attention FLOPs per token
    qk=lambda layer, x, positions: LayerQK(q, k),               # or None: analysis skips it
  ))

Then ``ModelConfig(attention=("my_kind", ...))`` validates, ``DecoderLM`` builds it, and the
analysis (:mod:`sparse_attention_jax.analysis`: KV cache, FLOPs, sparsity, locality) counts it.
A kind outside this package registers itself when its module is imported (before the config is
built). ``register_attention_kind(name, Cls)`` still registers a bare module class (decoding
through its methods when it has them, no accounting).
"""

from __future__ import annotations

from sparse_attention_jax.nn.attention.asa_global import GLAGlobalAttention
from sparse_attention_jax.nn.attention.asa_local import MLALocalAttention
from sparse_attention_jax.nn.attention.full import FullAttention
from sparse_attention_jax.nn.attention.nosa import NOSAAttention
from sparse_attention_jax.nn.attention.nsa import MLPCompressor, NSAAttention
from sparse_attention_jax.nn.attention.sliding_window import SlidingWindowAttention
from sparse_attention_jax.nn.attention.ssa import SSAAttention
from sparse_attention_jax.nn.registry import (
  ATTENTION_KINDS,
  LAYER_METHODS,
  AttentionKind,
  DecodeProtocol,
  KVElements,
  LayerQK,
  get_attention_kind,
  register_attention_kind,
)

__all__ = [
  "ATTENTION_KINDS",
  "LAYER_METHODS",
  "AttentionKind",
  "DecodeProtocol",
  "FullAttention",
  "GLAGlobalAttention",
  "KVElements",
  "LayerQK",
  "MLALocalAttention",
  "MLPCompressor",
  "NOSAAttention",
  "NSAAttention",
  "SSAAttention",
  "SlidingWindowAttention",
  "get_attention_kind",
  "register_attention_kind",
]
