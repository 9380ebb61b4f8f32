"""Random weights for a ModelConfig (benchmarks and tests without a checkpoint).

Weights ~ N(0, 0.02) from a seeded generator on the target device (no host round trip);
RMSNorm weights are 1. On the meta device nothing is initialised.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.layers.norm import RMSNorm


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place: norms with 1, everything else with N(0, std)."""
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generator: torch.Generator | None = None
    for _, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        if id(param) in norm_params:
            param.fill_(1.0)
            continue
        if generator is None:
            generator = torch.Generator(device=param.device)
            generator.manual_seed(seed)
        param.normal_(0.0, std, generator=generator)
