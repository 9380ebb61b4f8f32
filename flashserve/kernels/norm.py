"""RMSNorm kernels: ``rms_norm`` and the residual-fused ``fused_add_rms_norm``.

One program normalises one row (the hidden dim fits in one tile). Math in fp32; the stored
residual is rounded to its dtype before the norm, exactly like the unfused
``residual = x + residual; x = rms_norm(residual)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, H] input (row stride stride_x)
    res_ptr,  # [N, H] residual (read and overwritten) when HAS_RESIDUAL
    w_ptr,  # [H]
    out_ptr,  # [N, H] normalised output (may alias x_ptr)
    stride_x, stride_r, stride_o,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_ptr.dtype.element_ty)  # rounded like the unfused add
        tl.store(res_ptr + row * stride_r + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, 0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] view (t must have a unit-stride last dim and viewable leading dims)."""
    return t.view(-1, t.shape[-1])


def _launch(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, out2: torch.Tensor,
            eps: float, early: bool) -> None:
    n, hidden = x2.shape
    if n == 0:
        return
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(n,)](
        x2, res2 if res2 is not None else x2, weight, out2,
        x2.stride(0), (res2 if res2 is not None else x2).stride(0), out2.stride(0),
        hidden, eps,
        HAS_RESIDUAL=res2 is not None, BLOCK_H=block,
        num_warps=min(16, max(1, block // 512)), **pdl.launch_args(x2.device, early),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, early: bool = False) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight``; x [..., H], weight [H]; new tensor. ``early``:
    launch the next kernel at this one's start (``pdl.launch_args``)."""
    assert x.shape[-1] == weight.shape[0] and weight.is_contiguous()
    xc = x if x.stride(-1) == 1 else x.contiguous()
    try:
        x2 = _rows(xc)
    except RuntimeError:
        x2 = _rows(xc.contiguous())
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, None, weight, out, eps, early)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    early: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x; x = rms_norm(residual) * weight``, both IN PLACE; returns (x, residual).
    ``early`` as in ``rms_norm``."""
    assert x.shape == residual.shape and x.shape[-1] == weight.shape[0] and weight.is_contiguous()
    try:
        x2, r2 = _rows(x), _rows(residual)
        if x2.stride(1) != 1 or r2.stride(1) != 1:
            raise RuntimeError("non unit-stride hidden dim")
    except RuntimeError:
        # Awkward layouts: work on contiguous copies and write back.
        xc, rc = x.contiguous(), residual.contiguous()
        _launch(_rows(xc), _rows(rc), weight, _rows(xc), eps, early)
        x.copy_(xc)
        residual.copy_(rc)
        return x, residual
    _launch(x2, r2, weight, x2, eps, early)
    return x, residual
