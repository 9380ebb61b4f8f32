"""Per-token fp8 quantization of activations (one launch) against the torch reference, bit for bit."""

import pytest
import torch

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.quant_act import MAX_K, quantize_fp8_rows


def test_quantize_fp8_rows_matches_the_reference(device, dtype):
    """Random rows at several magnitudes (values down in e4m3's subnormal range after scaling,
    negative ones that round to -0, values on rounding ties), a strided view, widths that are and
    are not powers of two. Compared as bits: on the H200 the scales once differed in the last bit
    (torch divided by 448 as a reciprocal product) and the zeros in their sign."""
    g = torch.Generator().manual_seed(3)
    for K in (100, 4096) if device.type == "cpu" else (4096, 14336, 100):
        x = torch.randn(7, K, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 7.0, 300.0, 2e4, 1.0])[:, None]
        x[6, 0] = 448.0  # scale 1: values land on e4m3 points and halfway between them
        x[6, 1:17] = torch.arange(8, 24) / 8 + 1 / 16
        x[5, 3] = -x[5].abs().max() * 3  # the row's amax is negative
        if dtype == torch.float16:  # finite in fp16 (row 5 reaches ~1e5): an infinite amax has no scale
            x = x.clamp(-6e4, 6e4)
        x = x.to(dtype)
        wide = torch.cat([x, x], 1).to(device)[:, :K]  # row stride 2K
        for xin in (x.to(device), wide):
            q, s = quantize_fp8_rows(xin)
            rq, rs = ref.quantize_fp8(xin)
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert torch.equal(s, rs)
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_quantize_fp8_rows_edges(device):
    q, s = quantize_fp8_rows(torch.empty(0, 64, device=device))
    assert q.shape == (0, 64) and s.shape == (0,)
    with pytest.raises(ValueError, match=f"at most {MAX_K} values, got {MAX_K + 1}"):
        quantize_fp8_rows(torch.ones(1, MAX_K + 1, device=device))
