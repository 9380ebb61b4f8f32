"""Activation functions of the MLP block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = cat([gate, up], -1)``.

    x: [..., 2 * d] -> [..., d]
    """
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    """SwiGLU gating applied to the fused gate_up projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
        return silu_and_mul(x)
