"""Weight-only quantized MoE experts: int8 or fp8 e4m3 per output channel.

An MoE layer's experts (``flashserve.layers.moe.ExpertWeights``: ``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) load dense like any checkpoint tensor; ``OnlineExpertMethod.finalize``
then quantizes each expert's rows on the layer's device, one expert at a time, and replaces the
two parameters by buffers: ``w13`` int8 / float8_e4m3fn ``[E, 2I, H]`` with fp32 scales
``s13 [E, 2I]``, and ``w2 [E, H, I]`` with ``s2 [E, H]`` (``w = q * s``). Per-row scales make the
stacked quantization the same as quantizing each expert's gate, up and down matrices alone (the
``flashserve.quant.online`` rule). The fused MoE kernels read the 8-bit values and apply the
scales to their accumulators; the CPU path dequantizes the experts a step hits.

``quantization="fp8-w8a8"`` keeps the experts weight-only fp8 (activations are not quantized in
the MoE kernels); int4 experts are not implemented (refused when the model is built).
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.kernels import quant_reference as ref
from flashserve.quant.base import ExpertMethod

EXPERT_SCHEMES = ("int8", "fp8")


def quantize_experts(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``w [E, N, K]`` -> (``q [E, N, K]`` int8 / float8_e4m3fn, fp32 ``scale [E, N]``),
    one expert at a time (the fp32 temporaries stay one expert's size)."""
    if kind not in EXPERT_SCHEMES:
        raise ValueError(f"expert quantization must be one of {', '.join(EXPERT_SCHEMES)}, got {kind!r}")
    E, N, K = w.shape
    q = torch.empty(E, N, K, dtype=torch.int8 if kind == "int8" else torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(E, N, dtype=torch.float32, device=w.device)
    quantize = ref.quantize_int8 if kind == "int8" else ref.quantize_fp8
    for e in range(E):
        q[e], scale[e] = quantize(w[e])
    return q, scale


class OnlineExpertMethod(ExpertMethod):
    """Quantize the loaded dense experts in place (``finalize``)."""

    def __init__(self, kind: str) -> None:
        if kind not in EXPERT_SCHEMES:
            raise ValueError(f"{kind} experts are not implemented; MoE models take int8 or fp8 "
                             f"(or quantization='none')")
        self.kind = kind
        self.label = kind

    def finalize(self, layer: nn.Module) -> None:
        w13, s13 = quantize_experts(layer.gate_up_proj.data, self.kind)
        w2, s2 = quantize_experts(layer.down_proj.data, self.kind)
        del layer._parameters["gate_up_proj"], layer._parameters["down_proj"]
        for name, t in (("w13", w13), ("s13", s13), ("w2", w2), ("s2", s2)):
            layer.register_buffer(name, t, persistent=False)
