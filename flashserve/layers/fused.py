"""Switch a model's elementwise layers (RMSNorm, rotary, SiLU-and-mul) and its MoE layers to fused
Triton kernels.

The layers keep their PyTorch code as the CPU path and the reference; a model built for the GPU
backend is switched once after loading, per module, so two models in one process can differ. Its
norms launch the next kernel at their start where the model's products prefer it
(``PackedWeight.early_inputs``, ``flashserve.kernels.pdl``).
"""

from __future__ import annotations

from torch import nn

from flashserve.layers.activation import SiluAndMul
from flashserve.layers.moe import MoEMLP
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RotaryEmbedding
from flashserve.quant.packed import PackedWeight

_FUSABLE = (RMSNorm, RotaryEmbedding, SiluAndMul, MoEMLP)


def use_triton_ops(model: nn.Module, enabled: bool = True) -> int:
    """Set every fusable layer of ``model`` to the Triton kernels; returns how many were switched."""
    early = enabled and any(isinstance(m, PackedWeight) and m.early_inputs for m in model.modules())
    n = 0
    for module in model.modules():
        if isinstance(module, _FUSABLE):
            module.triton = enabled
            n += 1
        if isinstance(module, RMSNorm):
            module.early_dependents = early
    return n
