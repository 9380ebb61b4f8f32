"""Random weights for a ModelConfig (benchmarks and tests without a checkpoint).

Weights ~ N(0, 0.02) from a seeded generator on the target device (no host round trip);
RMSNorm weights are 1. On the meta device nothing is initialised. A parameter built off the
target device (a decoder layer offloading keeps in host memory) gets the values it would have
had on the device: drawn there, one tensor at a time, and copied.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.layers.norm import RMSNorm


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02,
                       device: torch.device | str | None = None) -> None:
    """Fill every parameter in place: norms with 1, everything else with N(0, std) drawn on
    ``device`` (default: the first parameter's)."""
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generator: torch.Generator | None = None
    for _, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        if id(param) in norm_params:
            param.fill_(1.0)
            continue
        if generator is None:
            draw = torch.device(device) if device is not None and torch.device(device).type != "meta" else param.device
            generator = torch.Generator(device=draw)
            generator.manual_seed(seed)
        if param.device.type == generator.device.type:
            param.normal_(0.0, std, generator=generator)
        else:
            param.copy_(torch.empty(param.shape, dtype=param.dtype, device=generator.device).normal_(
                0.0, std, generator=generator))
