"""RMSNorm, with an optional fused residual add (the pre-norm decoder pattern)."""

from __future__ import annotations

import torch
from torch import nn

from flashserve.kernels import cpu_native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim in fp32, then scale by ``weight`` in the input dtype (as HF Llama).
    fp32 on the CPU without autograd: the native kernel where it runs (``cpu_native.rms_norm``).

    x: [..., d], weight: [d] -> [..., d]
    """
    dtype = x.dtype
    if dtype == torch.float32:  # the same formula in one call (fewer dispatches at batch-1 decode)
        if (x.device.type == "cpu" and weight.dtype == dtype and not torch.is_grad_enabled()
                and cpu_native.available()):
            return cpu_native.rms_norm(x, weight, eps)
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension.

    ``forward(x)`` returns the normalised x. ``forward(x, residual)`` first adds x to the
    residual stream and returns ``(norm(x + residual), x + residual)``, so one call does the
    residual update of the decoder layer (a fused kernel can replace it later).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.triton = False  # set by flashserve.layers.fused.use_triton_ops: fused GPU kernels
        self.early_dependents = False  # set there too: the kernel launches the next one at its start

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.triton:
            from flashserve.kernels import norm as triton_norm

            if residual is None:
                return triton_norm.rms_norm(x, self.weight, self.eps, self.early_dependents)
            return triton_norm.fused_add_rms_norm(x, residual, self.weight, self.eps, self.early_dependents)  # in place
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        residual = x + residual  # [T, d], in the activation dtype as in HF
        return rms_norm(residual, self.weight, self.eps), residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
