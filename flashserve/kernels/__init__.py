"""flashserve.kernels: Triton kernels (each with a pure-torch reference in ``reference``).

Modules (import them directly; this package imports nothing so that CPU-only installs without
Triton can still import ``flashserve``):

* ``cache_ops.store_kv``                    - scatter new K/V into the paged cache (quantizing 8-bit caches)
* ``kv_quant``                              - the int8 / fp8 KV cache format (torch only)
* ``prefill_attention.paged_prefill_attention`` - FlashAttention-2 over the paged cache
* ``decode_attention.paged_decode_attention``   - FlashDecoding split-KV (+ unified-max option)
* ``norm.rms_norm`` / ``norm.fused_add_rms_norm``, ``rotary.rotary_embedding``,
  ``activation.silu_and_mul``                - fused elementwise / row ops
* ``triton_backend.TritonAttentionBackend`` - the ``AttentionBackend`` built on the above
* ``reference``, ``testing`` (random paged batches, tolerances), ``timing`` (bench helpers)
"""
