"""The dense-like attention path of the modules (full causal or sliding window), memory-lean.

Used by ``FullAttention`` (``full``), ``SlidingWindowAttention`` (``swa``), ``MLALocalAttention``
(``asa_local``) and SSA's ``o_full``. It is :func:`sparse_attention_jax.ops.causal_attention`, the
one routing the public ops and NSA's window branch share: cuDNN flash attention on GPU for
bf16/f16 (packed rows with a same-document mask up to a size limit), else the blocked plain-JAX op
(``O(T * C)`` memory, custom VJP); ``impl="reference"`` is the dense masked reference.
"""

from __future__ import annotations

from sparse_attention_jax.ops.causal import causal_attention

__all__ = ["causal_attention"]
