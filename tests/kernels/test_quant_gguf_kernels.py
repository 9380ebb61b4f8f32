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
@pytest.mark.parametrize("m,tile", [(1, None), (3, GemvTile(4, 8, 64)), (8, GemvTile(8, 16, 32)), (2, GemvTile(2, 1, 1024)),
                                    (13, None)])
def test_gguf_gemv_matches_block_decoder(device, dtype, qtype, m, tile):
    """The few-row GEMV: K walked in several tiles (ragged last one) or one, rows tiles that do
    not divide N, x rows fewer than the tile's."""
    k = 768 if qtype.endswith("_K") else 160
    _check_product(lambda x, raw: gguf_gemv(x, raw, qtype, tile), qtype, m, 27, k, m + 10, device, dtype)


def test_gguf_gemv_tiles_and_dispatch(device):
    """Small matrices spread over many programs; gguf_matmul sends up to 16 rows to the GEMV."""
    assert gemv_tile(1, 576, 576) == GemvTile(1, 1, 1024)  # 576 programs, K in one step
    assert gemv_tile(1, 3072, 576) == GemvTile(1, 4, 1024)
    assert gemv_tile(1, 49152, 576) == GemvTile(1, 8, 256)  # eight weight rows: shorter K steps
    assert gemv_tile(5, 3072, 576) == GemvTile(8, 2, 1024)  # 8 x 2 x 1024 products a step at most
    assert gemv_tile(5, 192, 576).rows == 8 and gemv_tile(5, 192, 576).block_n == 1
    raw = random_gguf_blocks("Q4_1", 8, 64).to(device)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gguf_gemv(torch.randn(5, 64, device=device), raw, "Q4_1", GemvTile(4, 8, 64))
    for m in (8, 13):
        x = torch.randn(m, 64, device=device)
        assert torch.equal(gguf_matmul(x, raw, "Q4_1"), gguf_gemv(x, raw, "Q4_1"))
    assert gemv_tile(13, 2048, 640) == GemvTile(16, 1, 1024)  # 9-16 rows: one weight row a program


def test_tree_rows_of_wide_32_element_weights_take_the_flat_gemm(device):
    """9-16 rows of a Q8_0 / Q4_x / Q5_0 weight of 768+ rows go to the flat GEMM with K in
    slices; 8 rows, narrower weights and the K-quants keep the GEMV."""
    from flashserve.kernels.quant_gguf import tree_rows_config, tree_rows_flat

    assert tree_rows_flat(9, 768, "Q5_0") and tree_rows_flat(16, 4096, "Q8_0") and tree_rows_flat(13, 960, "Q4_1")
    assert not tree_rows_flat(8, 4096, "Q5_0") and not tree_rows_flat(16, 767, "Q5_0")
    assert not tree_rows_flat(16, 4096, "Q4_K") and not tree_rows_flat(16, 4096, "Q6_K")
    assert tree_rows_config(4096, 640) == MatmulConfig(16, 32, 128, 4, 4, 2)  # Gemma 3 270M's gate/up
    assert tree_rows_config(1280, 640).split_k == 4 and tree_rows_config(1040, 256).split_k == 2
    raw = random_gguf_blocks("Q5_0", 1040, 256, seed=4).to(device)
    x = torch.randn(13, 256, device=device)
    assert torch.equal(gguf_matmul(x, raw, "Q5_0"), gguf_matmul(x, raw, "Q5_0", tree_rows_config(1040, 256, device)))
    for qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):  # ragged N, K in two slices, against the block decoder
        _check_product(lambda x, raw: gguf_matmul(x, raw, qtype), qtype, 13, 1040, 256, 5, device, torch.float32)


def test_17_to_64_rows_take_one_tile_with_k_in_slices(device):
    """17-64 rows (a decode batch, a tree of 17+ nodes padded to a 32-token graph) get one tile of
    32 or 64 rows and K cut into slices like the flat GEMM, against the block decoder."""
    from flashserve.kernels.quant_gguf import SLICED_MAX_M, gguf_config, sliced_split

    assert gguf_config(17, 4096, 640).block_m == 32 and gguf_config(33, 4096, 640).block_m == 64
    assert gguf_config(SLICED_MAX_M + 1, 4096, 640) == MatmulConfig(64, 64, 64, 1, 4, 2)
    # the H200 sweep's best slices (132 SMs) at Gemma 3 270M's q/k, gate/up, o, down and LM head
    assert [sliced_split(n, k) for n, k in [(1280, 640), (4096, 640), (640, 1024), (640, 2048), (262144, 640)]] \
        == [4, 2, 8, 8, 1]
    assert gguf_config(20, 64, 1024, device).split_k == 8  # two weight tiles: K in 8 slices (the most)
    for qtype in ("Q4_1", "Q4_K"):
        _check_product(lambda x, raw: gguf_matmul(x, raw, qtype), qtype, 40, 64, 1024, 7, device, torch.float32)


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



@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernels (the interpreter compiles none)")
def test_row_count_needs_no_new_compile():
    """A 9-15-token verification step reuses the GEMV (and, for a weight past
    ``GEMV_MAX_WEIGHTS`` or a wide 32-element one, the flat GEMM) the 16-token graph compiled, and
    a 3-row GEMV the 4-row one (engine/warm_up.py): the row count is not specialised on."""
    from flashserve.kernels.quant_gemm import FMT_INT8, _wq_matmul_kernel, wq_matmul
    from flashserve.kernels.quant_gguf import GEMV_MAX_WEIGHTS, _gguf_gemv_kernel, _gguf_matmul_kernel

    dev = torch.device("cuda")
    raw = random_gguf_blocks("Q5_0", 256, 640, seed=1).to(dev)
    big = random_gguf_blocks("Q5_0", 8192, 640, seed=2).to(dev)  # an LM head's size
    assert 8192 * 640 > GEMV_MAX_WEIGHTS
    q, s = ref.quantize_int8(torch.randn(256, 640))
    q, s = q.to(dev), s.to(dev)

    def compiled(kernel) -> int:
        return sum(len(caches[0]) for caches in kernel.device_caches.values())

    wide = random_gguf_blocks("Q5_0", 4096, 640, seed=3).to(dev)  # tree_rows_flat: flat GEMM at 9-16 rows
    for kernel, product, rows in ((_gguf_matmul_kernel, lambda x: gguf_matmul(x, big, "Q5_0"), (16, 11, 9, 13)),
                                  (_gguf_matmul_kernel, lambda x: gguf_matmul(x, wide, "Q5_0"), (16, 11, 9, 13)),
                                  (_gguf_gemv_kernel, lambda x: gguf_matmul(x, raw, "Q5_0"), (16, 11, 9, 13)),
                                  (_gguf_gemv_kernel, lambda x: gguf_matmul(x, raw, "Q5_0"), (4, 3)),
                                  (_wq_matmul_kernel, lambda x: wq_matmul(x, q, s, None, FMT_INT8), (16, 11, 9))):
        counts = []
        for m in rows:
            product(torch.randn(m, 640, device=dev, dtype=torch.bfloat16))
            torch.cuda.synchronize()
            counts.append(compiled(kernel))
        assert counts == [counts[0]] * len(rows), (kernel, rows, counts)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
@pytest.mark.parametrize("n,k", [(1024, 96), (1040, 640), (16384, 64)])
def test_gguf_blocks_gemv_matches_block_decoder(device, dtype, qtype, n, k):
    """One row of Q8_0 / Q5_0 with N >= 1024 takes the block-wise GEMV (ragged N, a K of 20 blocks
    in one 32-block step, the heads' 16-row tiles)."""
    from flashserve.kernels.quant_gguf import BLOCKS_GEMV_MIN_N, blocks_gemv_tile

    assert n >= BLOCKS_GEMV_MIN_N
    assert blocks_gemv_tile(n, k) == {(1024, 96): (4, 4, 4), (1040, 640): (4, 32, 4), (16384, 64): (16, 4, 2)}[n, k]
    _check_product(lambda x, raw: gguf_gemv(x, raw, qtype), qtype, 1, n, k, n + k, device, dtype)
