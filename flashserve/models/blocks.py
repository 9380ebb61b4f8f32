"""Layer parts a decoder layer is assembled from, by the names a ``LayerSpec`` gives.

``MLP_TYPES`` maps a ``LayerSpec.mlp`` name to a module class built as ``cls(config, prefix=...)``
(``prefix``: its checkpoint name, e.g. ``model.layers.0.mlp``) that maps ``[T, hidden] -> [T, hidden]``. New MLP kinds (GeGLU, mixture of experts) register here; the
decoder layer has no branch on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.config import ModelConfig
from flashserve.layers.activation import SiluAndMul
from flashserve.layers.linear import GateUpLinear, Linear
from flashserve.layers.moe import MoEMLP


class GatedSiluMLP(nn.Module):
    """SwiGLU MLP: fused gate_up projection, silu(gate) * up, down projection."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size, prefix=f"{prefix}.gate_up_proj")
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, prefix=f"{prefix}.down_proj",
                                parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GatedGeluTanhMLP(GatedSiluMLP):
    """GeGLU MLP (Gemma): gelu_tanh(gate) * up, with GELU's tanh approximation."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__(config, prefix)
        self.act_fn = GeluTanhAndMul()


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` where ``x = cat([gate, up], -1)``: [..., 2 * I] -> [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


MLP_TYPES: dict[str, type[nn.Module]] = {
    "gated_silu": GatedSiluMLP,
    "moe": MoEMLP,  # router + stacked experts (+ shared expert)
    "gated_gelu_tanh": GatedGeluTanhMLP,
}
