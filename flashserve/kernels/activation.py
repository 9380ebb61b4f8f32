"""Gated activation: ``silu_and_mul(x[..., 2I]) = silu(x[..., :I]) * x[..., I:]``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [N, 2I]
    out_ptr,  # [N, I]
    stride_x, stride_o, inter,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> [..., I] = silu(x[..., :I]) * x[..., I:] (fp32 math, x's dtype out)."""
    two_i = x.shape[-1]
    assert two_i % 2 == 0
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](
        x2, out2, x2.stride(0), out2.stride(0), inter,
        BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl.launch_args(x2.device, early=True),
    )
    return out
