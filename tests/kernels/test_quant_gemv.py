"""The batch-1 quantized GEMV (int8, fp8, int4 group-wise with and without zero points) against
dequantize-then-matmul on random inputs: explicit small tiles, split K with atomics, int4's row
blocks walked by fewer programs than blocks, both of int4's nibble decodings (16-bit and fp32
activations), the fixed per-shape configuration, shapes it declines (the caller then uses the
flat GEMM), and the gated input (SiLU-and-mul done as x is read) equal to the two launches."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.activation import silu_and_mul
from flashserve.kernels.quant_gemm import FMT_FP8, FMT_INT4, FMT_INT8, wq_matmul
from flashserve.kernels.quant_gemv import WIDE, GemvConfig, gemv_config, wq_gemv
from test_quant_gemm import _weights

CASES = [  # (fmt, N, K, group, zero_point, config)
    (FMT_INT8, 64, 256, 0, False, GemvConfig(16, 64, 1, 4, 1)),
    (FMT_INT8, 32, 512, 0, False, GemvConfig(16, 128, 2, 4, 1)),  # split K, atomics
    (FMT_FP8, 48, 256, 0, False, GemvConfig(16, 128, 1, 4, 1)),
    (FMT_FP8, 64, 1024, 0, False, GemvConfig(32, 512, 1, 4, 3)),  # the wide fp8 tile
    (FMT_INT4, 32, 256, 32, False, GemvConfig(16, 256, 1, 4, 1)),  # one slice, a program per row block
    (FMT_INT4, 32, 512, 64, True, GemvConfig(16, 256, 2, 4, 1, 1)),  # zero points, split K, one program walks both blocks
    (FMT_INT4, 48, 512, 128, True, GemvConfig(8, 128, 4, 1, 1, 4)),  # 6 blocks over 4 programs
    (FMT_INT4, 32, 64, 8, False, GemvConfig(32, 64, 1, 4, 1)),  # one word per group
]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,n,k,group,zp,cfg", CASES)
def test_gemv_matches_dequantized_matmul(device, fmt, n, k, group, zp, cfg, x_dtype):
    torch.manual_seed(n + k + group)
    w = torch.randn(n, k) * 0.05
    q, s, z, dense = _weights(fmt, w, group, zp, device)
    x = torch.randn(1, k, device=device, dtype=x_dtype)
    out = wq_gemv(x, q, s, z, fmt, group, cfg)
    expect = x.float() @ dense.to(device).t()
    assert out.shape == (1, n) and out.dtype == x_dtype
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expect, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", [FMT_INT8, FMT_FP8])
def test_every_byte_code_converts_exactly(device, fmt):
    """Row r holds code r everywhere (fp8's two NaN codes excepted): int8's bit-level conversion and
    fp8's give each code's value exactly (fp8 subnormals and negative zero included)."""
    codes = torch.arange(256, dtype=torch.uint8)
    if fmt == FMT_FP8:
        codes[[0x7F, 0xFF]] = 0
        values = codes.view(torch.float8_e4m3fn).float()
        w = codes.view(torch.float8_e4m3fn)
    else:
        values = codes.view(torch.int8).float()
        w = codes.view(torch.int8)
    k = 64
    w = w[:, None].expand(256, k).contiguous().to(device)
    scales = torch.rand(256, device=device) + 0.5
    x = torch.randint(-64, 64, (1, k), device=device).float() / 16  # products and sums exact in fp32
    out = wq_gemv(x, w, scales, None, fmt, 0, GemvConfig(16, 32, 1, 4, 1))
    expect = values.to(device) * scales * x.sum()
    torch.testing.assert_close(out[0], expect, rtol=1e-6, atol=1e-30)


def test_fixed_config_and_flat_gemm_agree(device):
    """The chosen tiles equal the flat GEMM: int4 with K beyond one slice (split) and within one,
    int8 and fp8 with a long row (split K), fp8 and int8 (1024-column tiles) with a short one (not split)."""
    torch.manual_seed(0)
    assert gemv_config(32, 2048, FMT_INT8, 0).block_k == 1024 and gemv_config(32, 2048, FMT_FP8, 0).block_k == 512
    for fmt, n, k, group, split in ((FMT_INT4, 64, 2048, 128, True), (FMT_INT4, 48, 1024, 128, False),
                                    (FMT_INT8, 128, 8192, 0, True), (FMT_FP8, 128, 8192, 0, True),
                                    (FMT_FP8, 32, 2048, 0, False), (FMT_INT8, 32, 2048, 0, False)):
        q, s, z, _ = _weights(fmt, torch.randn(n, k) * 0.05, group, False, device)
        x = torch.randn(1, k, device=device)
        cfg = gemv_config(n, k, fmt, group, device)
        assert cfg is not None and (cfg.split_k > 1) == split
        torch.testing.assert_close(wq_gemv(x, q, s, z, fmt, group), wq_matmul(x, q, s, z, fmt, group), rtol=1e-4, atol=1e-4)


def test_split_k_resets_its_counters_and_sums_in_a_fixed_order(device):
    """A split product, called again and again on new inputs, stays right (the last program of each
    row block left its counter at zero) and gives the same bits for the same input."""
    from flashserve.kernels.utils import _COUNTERS
    torch.manual_seed(1)
    n, k, group = 64, 512, 64
    q, s, z, dense = _weights(FMT_INT4, torch.randn(n, k) * 0.05, group, True, device)
    cfg = GemvConfig(16, group, 8, 4, 1, 2)
    for _ in range(3):
        x = torch.randn(1, k, device=device)
        out = wq_gemv(x, q, s, z, FMT_INT4, group, cfg)
        torch.testing.assert_close(out, x @ dense.to(device).t(), rtol=1e-4, atol=1e-4)
        assert torch.equal(wq_gemv(x, q, s, z, FMT_INT4, group, cfg), out)
        assert int(_COUNTERS[x.device].abs().sum()) == 0


def test_wide_products_take_four_warps_and_fp8_thirty_two_rows():
    """From N = WIDE (gate/up, LM heads) int8 and fp8 stream in 4 warps, fp8 in 32-row tiles (16
    where 32 does not divide N); narrower products keep 16 rows in 8 warps."""
    assert tuple(gemv_config(WIDE, 4096, FMT_FP8, 0)) == (32, 512, 1, 4, 3, 0)
    assert tuple(gemv_config(WIDE + 16, 4096, FMT_FP8, 0)) == (16, 512, 1, 4, 3, 0)
    assert tuple(gemv_config(WIDE, 4096, FMT_INT8, 0)) == (16, 512, 1, 4, 3, 0)
    assert tuple(gemv_config(WIDE - 16, 4096, FMT_FP8, 0)) == (16, 512, 1, 8, 3, 0)


def test_long_rows_split_in_thirty_two_row_tiles_to_four_programs_per_sm():
    """K >= LONG_ROW: 32 x 256 tiles in 4 warps, split until there are four programs per SM (132
    off-GPU) or 8 slices: Llama-3.1-8B's down projection (4096 x 14336) takes 8 slices of 1792."""
    assert tuple(gemv_config(4096, 14336, FMT_INT8, 0)) == (32, 256, 8, 4, 3, 0)
    assert tuple(gemv_config(8192, 28672, FMT_FP8, 0)) == (32, 256, 4, 4, 3, 0)  # 256 blocks x 4 >= 528
    assert tuple(gemv_config(32768, 8192, FMT_FP8, 0)) == (32, 256, 1, 4, 3, 0)  # enough blocks unsplit
    assert gemv_config(4096, 8192 + 128, FMT_INT8, 0) is None  # a long row the 256-column tiles do not divide


def test_declines_shapes_the_tiles_do_not_divide():
    assert gemv_config(40, 512, FMT_INT8, 0) is None  # N not a multiple of the 16-row tile
    assert gemv_config(64, 300, FMT_INT8, 0) is None  # ragged K
    assert gemv_config(64, 768, FMT_INT4, 96) is None  # a group size that is not a power of two
    assert gemv_config(4096, 4096, FMT_INT4, 128) is not None


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_every_int4_nibble_decodes_exactly(device, x_dtype):
    """int4 with unit scales and x in {-1, 0, 1}: every sum is an integer below 2^11, so both nibble
    decodings (16-bit activations read nibbles in place, fp32 shifts each to bits 19-22) must give
    the exact products, for every nibble position and value."""
    torch.manual_seed(3)
    n, k, group = 32, 256, 32
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = ref.pack_int4(u).to(device)
    scales = torch.ones(n, k // group, device=device)
    x = torch.randint(-1, 2, (1, k)).to(device=device, dtype=x_dtype)
    out = wq_gemv(x, packed, scales, None, FMT_INT4, group, GemvConfig(16, 128, 2, 4, 1, 1))
    expect = x.double().cpu() @ (u.double() - 8).t()
    assert torch.equal(out.double().cpu(), expect)


def test_an_int4_config_that_does_not_fit_is_refused(device):
    q, s, z, _ = _weights(FMT_INT4, torch.randn(32, 256) * 0.05, 32, False, device)
    x = torch.randn(1, 256, device=device)
    with pytest.raises(ValueError, match="split_k \\* block_k must be K"):
        wq_gemv(x, q, s, z, FMT_INT4, 32, GemvConfig(16, 128, 1, 4, 1))  # one slice of 128 of 256 columns
    with pytest.raises(ValueError, match="at most N / block_n = 2"):
        wq_gemv(x, q, s, z, FMT_INT4, 32, GemvConfig(16, 256, 1, 4, 1, 3))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,n,k,group,zp,cfg", CASES)
def test_gated_input_equals_silu_and_mul_then_gemv(device, fmt, n, k, group, zp, cfg, x_dtype):
    """``gated=True`` on ``[gate | up]`` gives the bits of the activation kernel followed by the
    GEMV (the same rounding of silu(gate) * up to x's dtype), for every tile shape above."""
    torch.manual_seed(n + k + group + 1)
    q, s, z, _ = _weights(fmt, torch.randn(n, k) * 0.05, group, zp, device)
    h = torch.randn(1, 2 * k, device=device, dtype=x_dtype) * 2
    out = wq_gemv(h, q, s, z, fmt, group, cfg, gated=True)
    assert torch.equal(out, wq_gemv(silu_and_mul(h), q, s, z, fmt, group, cfg))


def test_gated_input_with_the_fixed_config_and_odd_widths(device):
    torch.manual_seed(4)
    for fmt, n, k, group in ((FMT_INT4, 64, 2048, 128), (FMT_INT8, 128, 8192, 0), (FMT_FP8, 32, 2048, 0)):
        q, s, z, _ = _weights(fmt, torch.randn(n, k) * 0.05, group, False, device)
        h = torch.randn(1, 2 * k, device=device, dtype=torch.bfloat16)
        assert torch.equal(wq_gemv(h, q, s, z, fmt, group, gated=True), wq_gemv(silu_and_mul(h), q, s, z, fmt, group))
    with pytest.raises(ValueError, match="gate and up halves"):
        wq_gemv(torch.randn(1, 2 * k + 1, device=device), q, s, z, fmt, group, gated=True)
