"""Pallas kernels for trainable sparse attention: a leaf package (it imports nothing from
``sparse_attention_jax``; the library's dispatch table, :mod:`sparse_attention_jax.ops.dispatch`,
calls into it lazily).

Selected-block attention on NVIDIA Hopper (Mosaic GPU, sm90):

* :mod:`.selected_attention_mgpu`: the public entry (``selected_attention_mgpu``,
  ``selected_attention_op``) with its ``custom_vjp`` and the frozen ``TuningConfig``;
* :mod:`.selected_attention_common`: shared pieces (tiling, masks, online softmax, static checks);
* :mod:`.selected_attention_kernel_sm90`, :mod:`.selected_attention_persistent_kernel_sm90`: the
  per-tile (64- and 128-row) and persistent forward kernels;
* :mod:`.selected_attention_vjp_common`, :mod:`.selected_attention_vjp_kernel_sm90`: the
  backward's XLA preparation and its dQ and dK/dV kernels;
* :mod:`.selected_attention_dims`: head dims, padding and the shared-memory budget;
* :mod:`.selection_tiles`: per-tile iteration lists and membership words;
* :mod:`.packed_layout`: packed documents (document-relative block ids): the document-aligned
  padded K/V layout, padded ids and shifted query positions.

Selection scores of the compressed branch on GPUs (Pallas Triton): :mod:`.cmp_scores_triton`
(log-sum-exp, pooled block importance and an in-kernel exact top-``n``, without the
``[B, T, HQ, NC]`` probabilities).

Selected-block attention on TPU (Pallas Mosaic TPU; ``docs/tpu.md``):

* :mod:`.selected_attention_tpu`: the public entry (``selected_attention_tpu``,
  ``selected_attention_op``) with its ``custom_vjp`` and the frozen ``TpuConfig``;
* :mod:`.selected_attention_tpu_kernels`: the forward, dQ and dK/dV kernels;
* :mod:`.selected_attention_tpu_prep`: their XLA side (tile layout, lists, per-row data, inverse
  map).

Nothing here is imported by ``import pallas_kernels``; the kernel modules load on first use.
"""
