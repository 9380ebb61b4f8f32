"""The batch-1 GEMV over 16-bit dense weights against an fp32 matmul on random inputs: explicit
small tiles and the fixed one, a bias, the gated input (SiLU-and-mul done as x is read) equal to
the two launches, the shapes / dtypes / layouts it declines and the tiles it refuses."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.dense_gemv import dense_gemv, dense_gemv_config
from flashserve.kernels.quant_gemv import GemvConfig

CASES = [  # (N, K, config)
    (32, 256, GemvConfig(16, 64, 1, 4, 1)),
    (48, 512, GemvConfig(16, 128, 1, 4, 1)),
    (64, 1024, None),  # the chosen tile: 4 rows x 1024 columns, one step
    (64, 4096, None),  # 2 rows x 2048 columns, two steps (4 rows gated)
    (64, 8192, None),  # 8 rows x 2048 columns, four steps
]


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("n,k,cfg", CASES)
def test_gemv_matches_fp32_matmul(device, n, k, cfg, bias, w_dtype):
    torch.manual_seed(n + k)
    w = (torch.randn(n, k, device=device) * 0.05).to(w_dtype)
    b = torch.randn(n, device=device).to(w_dtype) if bias else None
    x = torch.randn(1, k, device=device, dtype=w_dtype)
    out = dense_gemv(x, w, b, config=cfg)
    expect = x.float() @ w.float().t() + (b.float() if bias else 0)
    assert out.shape == (1, n) and out.dtype == w_dtype
    torch.testing.assert_close(out.float(), expect, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n,k,cfg", CASES)
def test_gated_input_equals_silu_and_mul_then_gemv(device, n, k, cfg):
    torch.manual_seed(n + k + 1)
    w = (torch.randn(n, k, device=device) * 0.05).bfloat16()
    h = torch.randn(1, 2 * k, device=device, dtype=torch.bfloat16) * 2
    cfg = cfg or dense_gemv_config(n, k, device, gated=True)  # the same tile both ways
    out = dense_gemv(h, w, gated=True, config=cfg)
    assert torch.equal(out, dense_gemv(silu_and_mul(h), w, config=cfg))


def test_fixed_tiles_and_what_is_declined(device):
    assert tuple(dense_gemv_config(5120, 2048, device))[:2] == (16, 512)  # many row blocks, short K
    assert tuple(dense_gemv_config(4096, 14336, device))[:2] == (8, 2048)  # K of 8192 and more
    assert tuple(dense_gemv_config(4096, 4096, device))[:3] == (2, 2048, 1)  # few rows at K >= 4096
    assert tuple(dense_gemv_config(4096, 4096, device, gated=True))[:2] == (4, 2048)
    assert tuple(dense_gemv_config(6144, 4096, device))[:2] == (4, 2048)  # K of 4096 and more: long rows
    assert tuple(dense_gemv_config(1024, 2048, device))[:2] == (4, 2048)  # few row blocks: narrow tiles
    assert tuple(dense_gemv_config(1024, 3072, device))[:2] == (4, 1024)
    assert tuple(dense_gemv_config(1024, 1536, device))[:2] == (4, 512)
    assert dense_gemv_config(4098, 4096) is None  # N not a multiple of the row tile
    assert dense_gemv_config(4096, 300) is None  # ragged K
    w = torch.randn(32, 256, device=device).bfloat16()
    x = torch.randn(1, 256, device=device).bfloat16()
    assert dense_gemv(x.float(), w.float()) is None  # fp32: F.linear
    assert dense_gemv(x, w.half()) is None  # dtypes differ
    assert dense_gemv(torch.cat([x, x]), w) is None  # two rows
    assert dense_gemv(x[None], w) is None  # not [1, K]
    assert dense_gemv(x[:, :128], w.t().contiguous().t()[:, :128]) is None  # a strided weight
    with pytest.raises(ValueError, match="gate and up halves"):
        dense_gemv(torch.randn(1, 255, device=device).bfloat16(), w, gated=True)
    with pytest.raises(ValueError, match="split_k must be 1"):
        dense_gemv(x, w, config=GemvConfig(16, 128, 2, 4, 1))
    with pytest.raises(ValueError, match="block_n must divide N"):
        dense_gemv(x, w, config=GemvConfig(64, 128, 1, 4, 1))
