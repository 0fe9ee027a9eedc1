"""Text generation over a :class:`~sparse_attention_jax.nn.DecoderLM`: prefill, then one compiled
step per token, with the KV caches on the device or, for NOSA layers, in pinned host memory
(:mod:`sparse_attention_jax.offload`). It sits above ``nn`` and ``offload`` and imports both."""

from sparse_attention_jax.generation.generator import Generator

__all__ = ["Generator"]
