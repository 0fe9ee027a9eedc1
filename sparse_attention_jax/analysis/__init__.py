"""Analysis of models built from registered attention kinds: KV-cache bytes, training FLOPs,
attention sparsity and selection locality.

Every tool loops over the layers of a config or model and asks each layer's kind entry in the
registry (:mod:`sparse_attention_jax.nn.attention`) for its numbers, so a newly registered kind
is counted without editing this package; an unknown kind is an error naming it and the
registered kinds.

Modules: :mod:`.kv_cache` (``python -m sparse_attention_jax.analysis.kv_cache CONFIG...``),
:mod:`.flops`, :mod:`.sparsity`, :mod:`.locality`.
"""

from __future__ import annotations

# Submodules are imported by name (``from sparse_attention_jax.analysis import kv_cache``), not
# here, so ``python -m sparse_attention_jax.analysis.kv_cache`` runs the module only once.
__all__ = ["flops", "kv_cache", "locality", "sparsity"]
