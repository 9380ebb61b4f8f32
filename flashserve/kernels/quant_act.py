"""Per-token fp8 e4m3 quantization of activations, for W8A8 products (one Triton launch).

Each row of x [M, K] gets ``scale = max(amax, 1e-12) / 448`` and the values ``x / scale`` rounded
to e4m3, bit for bit what ``quant_reference.quantize_fp8`` computes with ~8 torch launches (each
reading or writing the whole fp32 row). One program per row holds the row in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.cache_ops import round_e4m3
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.quant_reference import FP8_MAX
from flashserve.kernels.utils import next_power_of_2

_FP8_MAX = tl.constexpr(FP8_MAX)

# the widest row a program holds (Llama-3.1-70B's MLP input is 28672)
MAX_K = 32768


@triton.jit
def _quantize_fp8_rows_kernel(
    x_ptr, q_ptr, scale_ptr,  # [M, K] any float; out [M, K] fp8 e4m3; out [M] fp32
    stride_xm, stride_qm, K,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(x_ptr + m * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-12), _FP8_MAX)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX), _FP8_MAX)
    tl.store(q_ptr + m * stride_qm + offs, round_e4m3(y).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + m, scale)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 e4m3 [M, K], fp32 scales [M]); the same bits as ``quant_reference.quantize_fp8``."""
    M, K = x.shape
    if K > MAX_K:
        raise ValueError(f"per-token fp8 quantization holds a row of at most {MAX_K} values, got {K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    block = max(16, next_power_of_2(K))
    _quantize_fp8_rows_kernel[(M,)](
        x, q, scale, x.stride(0), q.stride(0), K,
        BLOCK_K=block, num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4, **pdl.launch_args(x.device),
    )
    return q, scale
