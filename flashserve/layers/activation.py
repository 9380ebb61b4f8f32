"""Activation functions of the MLP block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import cpu_native


def _native_gate(x: torch.Tensor) -> bool:
    """fp32 rows on the CPU without autograd where the native kernel runs: the gates' native path."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and cpu_native.available())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = cat([gate, up], -1)``. fp32 on the CPU without autograd: the
    native kernel where it runs (``cpu_native.silu_mul``, the CPU decode layer's, one call).

    x: [..., 2 * d] -> [..., d]
    """
    if _native_gate(x):
        return cpu_native.silu_mul(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (GELU's tanh approximation) where ``x = cat([gate, up], -1)``. fp32
    on the CPU without autograd: the native kernel where it runs (``cpu_native.gelu_tanh_mul``, the
    CPU decode layer's, within a few ulp of torch's; computed as ``g / (1 + e^(-2y))``).

    x: [..., 2 * d] -> [..., d]
    """
    if _native_gate(x):
        return cpu_native.gelu_tanh_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class SiluAndMul(nn.Module):
    """SwiGLU gating applied to the fused gate_up projection output."""

    def __init__(self) -> None:
        super().__init__()
        self.triton = False  # set by flashserve.layers.fused.use_triton_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
        if self.triton:
            from flashserve.kernels.activation import silu_and_mul as triton_silu_and_mul

            return triton_silu_and_mul(x)
        return silu_and_mul(x)

    def into(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(self(x))``; with the Triton kernels, one launch where the linear layer's
        weights have a gated product for x (the batch-1 GEMVs, dense or quantized)."""
        if self.triton:
            y = linear.forward_silu_gated(x)
            if y is not None:
                return y
        return linear(self(x))
