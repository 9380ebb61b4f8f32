"""flashserve.quant: quantized weights for the linear layers (and a packed GGUF embedding).

* ``base``: the interface (``QuantConfig`` -> ``LinearMethod`` per layer, ``quant_scope``,
  ``finalize_quantized``);
* ``config``: the ``quantization`` option -> a ``QuantConfig`` (all checks before allocation);
* ``online``: int8 / int4 / fp8 quantization of dense checkpoints at load;
* ``gguf``: GGUF tensors kept in their blocks; ``gptq``: GPTQ and AWQ checkpoints;
* ``packed``: the kernel-ready weights (Triton on CUDA, torch's int8 / int4 ops on the CPU);
* ``experts``: int8 / fp8 MoE experts (``QuantConfig.expert_method``; docs/moe.md).

Documentation and measured quality: docs/quantization.md.
"""

from flashserve.quant.base import QuantConfig, current_quant_config, finalize_quantized, quant_scope
from flashserve.quant.config import QUANTIZATION_MODES, make_quant_config

__all__ = [
    "QUANTIZATION_MODES",
    "QuantConfig",
    "current_quant_config",
    "finalize_quantized",
    "make_quant_config",
    "quant_scope",
    "stored_bytes",
    "weight_bytes",
]


def stored_bytes(model) -> int:
    """Bytes of every weight as stored (parameters and kernel buffers; not rotary caches)."""
    from flashserve.layers.rotary import RotaryEmbedding

    skip = {id(t) for m in model.modules() if isinstance(m, RotaryEmbedding) for t in m.buffers()}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter and kernel buffer of the layers
    that multiply (norms, linears, LM head), not the embedding table (one row per token is read)
    unless it is the LM head's own storage, nor rotary caches."""
    from flashserve.layers.embedding import VocabEmbedding
    from flashserve.layers.rotary import RotaryEmbedding

    seen: set[int] = set()
    total = 0
    lm_head = model.lm_head
    head_tensors = {id(t) for t in list(lm_head.parameters()) + list(lm_head.buffers())} if lm_head else set()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if id(t) in seen or t is None:
                continue
            seen.add(id(t))
            if isinstance(module, VocabEmbedding) and id(t) not in head_tensors:
                continue
            total += t.numel() * t.element_size()
    return total
