"""Triton weight-only quantized matmuls (int8, int4 group-wise with and without zero points, fp8)
against dequantize-then-matmul on random inputs, odd shapes, each group size, flat (M <= 16),
split-K and tiled configurations; and the dequantize kernel used for large M."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.quant_gemm import FMT_FP8, FMT_INT4, FMT_INT8, MatmulConfig, wq_dequantize, wq_matmul
from kernel_test_utils import ON_GPU, tol


def _weights(fmt: int, w: torch.Tensor, group: int, zero_point: bool, device: torch.device):
    """(stored tensors..., dequantized fp32 weight) of a random dense weight."""
    if fmt == FMT_INT8:
        q, s = ref.quantize_int8(w)
        return q.to(device), s.to(device), None, ref.dequantize_int8(q, s)
    if fmt == FMT_FP8:
        q, s = ref.quantize_fp8(w)
        return q.to(device), s.to(device), None, ref.dequantize_fp8(q, s)
    u, s, z = ref.quantize_int4(w, group, zero_point)
    packed = ref.pack_int4(u)
    z = z if zero_point else None
    return packed.to(device), s.to(device), None if z is None else z.to(device), ref.dequantize_int4(packed, s, z, group)


CASES = [  # (fmt, M, N, K, group, zero_point, config or None)
    (FMT_INT8, 1, 40, 96, 0, False, None),
    (FMT_INT8, 7, 72, 300, 0, False, MatmulConfig(16, 32, 64, 2, 4, 1)),  # split-K, ragged K and N
    (FMT_INT8, 19, 48, 160, 0, False, None),  # tiled (M > 16)
    (FMT_FP8, 3, 40, 96, 0, False, None),
    (FMT_FP8, 18, 56, 192, 0, False, MatmulConfig(32, 32, 64, 1, 4, 1)),
    (FMT_INT4, 1, 48, 256, 32, False, None),
    (FMT_INT4, 5, 40, 256, 64, True, None),
    (FMT_INT4, 2, 40, 512, 128, False, MatmulConfig(16, 32, 64, 4, 4, 1)),  # tile inside a group, split-K
    (FMT_INT4, 3, 24, 384, 128, True, MatmulConfig(16, 16, 128, 1, 4, 1)),
    (FMT_INT4, 20, 72, 384, 32, True, None),  # tiled, groups gathered per column pair
    (FMT_INT4, 4, 40, 192, 192, False, None),  # one group per row (per-channel GPTQ): block_k 64
]


@pytest.mark.parametrize("fmt,m,n,k,group,zp,config", CASES)
def test_wq_matmul_matches_dequantized_reference(device, dtype, fmt, m, n, k, group, zp, config):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g)
    q, s, z, dense = _weights(fmt, w, group, zp, device)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    y = wq_matmul(x, q, s, z, fmt, group, config)
    expect = x.float() @ dense.to(device).t()
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32: summation order only; half precisions: the dequantized tile is rounded to x's dtype
    atol, rtol = (2e-4, 1e-4) if dtype == torch.float32 else (tol(dtype)["atol"] * 50, tol(dtype)["rtol"] * 10)
    torch.testing.assert_close(y.float(), expect, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fmt,group,zp", [(FMT_INT8, 0, False), (FMT_FP8, 0, False), (FMT_INT4, 32, True),
                                          (FMT_INT4, 64, False)])
def test_wq_dequantize_is_exact(device, fmt, group, zp):
    w = torch.randn(36, 192, generator=torch.Generator().manual_seed(1))
    q, s, z, dense = _weights(fmt, w, group, zp, device)
    out = wq_dequantize(q, s, z, fmt, 192, group, torch.float32)
    torch.testing.assert_close(out.cpu(), dense, atol=1e-6, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="bf16 flat GEMM at a Llama-3.1-8B shape needs a GPU")
@pytest.mark.parametrize("fmt,group", [(FMT_INT8, 0), (FMT_INT4, 128), (FMT_FP8, 0)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_wq_matmul_llama_shape_gpu(fmt, group, m):
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    q, s, z, dense = _weights(fmt, w, group, False, torch.device("cuda"))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    y = wq_matmul(x, q, s, z, fmt, group)
    expect = x.float() @ dense.cuda().t()
    torch.testing.assert_close(y.float(), expect, atol=2e-2, rtol=2e-2)
