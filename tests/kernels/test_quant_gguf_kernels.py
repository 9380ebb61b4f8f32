"""Triton GGUF kernels, reading llama.cpp's blocks directly, against the torch block decoder
(itself equal to ``gguf.quants.dequantize``: tests/test_quant_formats.py) for every type."""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import quant_reference as ref
from flashserve.kernels.quant_gemm import MatmulConfig
from flashserve.kernels.quant_gguf import GGUF_CODES, GemvTile, gemv_tile, gguf_dequantize, gguf_gemv, gguf_matmul
from flashserve.kernels.quant_reference import random_gguf_blocks


@pytest.mark.parametrize("qtype", list(GGUF_CODES))
@pytest.mark.parametrize("m,config", [(3, None), (5, MatmulConfig(16, 16, 64, 2, 4, 1)), (18, None)])
def test_gguf_matmul_matches_block_decoder(device, dtype, qtype, m, config):
    k = 512 if qtype.endswith("_K") else 96  # 96: ragged last K tile of the 32-element types
    _check_product(lambda x, raw: gguf_matmul(x, raw, qtype, config), qtype, m, 24, k, m, device, dtype)


def _check_product(product, qtype: str, m: int, n: int, k: int, seed: int, device, dtype) -> None:
    """``product(x, raw)`` for random blocks against x @ the block decoder's weights."""
    raw = random_gguf_blocks(qtype, n, k, seed=seed).to(device)
    w = ref.gguf_dequantize(raw.cpu(), qtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    y = product(x, raw)
    expect = x.float() @ w.to(device).t()
    scale = expect.abs().max().item()
    err = (y.float() - expect).abs().max().item()
    assert y.shape == (m, n) and y.dtype == dtype
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2) * max(scale, 1.0), (qtype, err, scale)


@pytest.mark.parametrize("qtype", list(GGUF_CODES))
@pytest.mark.parametrize("m,tile", [(1, None), (3, GemvTile(4, 8, 64)), (8, GemvTile(8, 16, 32)), (2, GemvTile(2, 1, 1024))])
def test_gguf_gemv_matches_block_decoder(device, dtype, qtype, m, tile):
    """The few-row GEMV: K walked in several tiles (ragged last one) or one, rows tiles that do
    not divide N, x rows fewer than the tile's."""
    k = 768 if qtype.endswith("_K") else 160
    _check_product(lambda x, raw: gguf_gemv(x, raw, qtype, tile), qtype, m, 27, k, m + 10, device, dtype)


def test_gguf_gemv_tiles_and_dispatch(device):
    """Small matrices spread over many programs; gguf_matmul sends up to 8 rows to the GEMV."""
    assert gemv_tile(1, 576, 576) == GemvTile(1, 1, 1024)  # 576 programs, K in one step
    assert gemv_tile(1, 3072, 576) == GemvTile(1, 4, 1024)
    assert gemv_tile(1, 49152, 576) == GemvTile(1, 8, 256)  # eight weight rows: shorter K steps
    assert gemv_tile(5, 3072, 576) == GemvTile(8, 2, 1024)  # 8 x 2 x 1024 products a step at most
    assert gemv_tile(5, 192, 576).rows == 8 and gemv_tile(5, 192, 576).block_n == 1
    raw = random_gguf_blocks("Q4_1", 8, 64).to(device)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gguf_gemv(torch.randn(5, 64, device=device), raw, "Q4_1", GemvTile(4, 8, 64))
    x = torch.randn(8, 64, device=device)
    assert torch.equal(gguf_matmul(x, raw, "Q4_1"), gguf_gemv(x, raw, "Q4_1"))


@pytest.mark.parametrize("qtype", list(GGUF_CODES))
def test_gguf_dequantize_kernel_is_exact(device, qtype):
    k = 256 if qtype.endswith("_K") else 64
    raw = random_gguf_blocks(qtype, 8, k, seed=3).to(device)
    out = gguf_dequantize(raw, qtype, k, torch.float32)
    assert torch.equal(out.cpu(), ref.gguf_dequantize(raw.cpu(), qtype))


def test_gguf_matmul_rejects_unknown_type_and_bad_rows(device):
    raw = random_gguf_blocks("Q4_0", 4, 64).to(device)
    x = torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="Q2_K has no GPU kernel"):
        gguf_matmul(x, raw, "Q2_K")
    with pytest.raises(ValueError, match="do not hold 96 columns"):
        gguf_matmul(torch.randn(1, 96, device=device), raw, "Q4_0")
