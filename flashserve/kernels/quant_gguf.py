"""GGUF weights on the GPU, read in llama.cpp's own block layout (no repacking, no dense copy).

A GGUF matrix ``[N, K]`` is N rows of ``K / block_elems`` blocks of ``block_bytes`` each, exactly
as in the file (``flashserve.kernels.quant_reference.GGUF_BLOCKS``). The kernels receive three
views of the same bytes (uint8, int8 and fp16: every fp16 field of every type sits at an even
offset of an even-sized row) and decode each weight in registers from its block: the scale
field(s) of the block or sub-block, the low nibble / high bits of its quant, then ``tl.dot``.
Types: Q8_0, Q4_0, Q4_1, Q5_0 (32-element blocks) and Q4_K, Q5_K, Q6_K (256-element blocks).

``gguf_matmul`` uses one program per ``[BLOCK_M, BLOCK_N]`` output tile and K slice, like
``quant_gemm`` (flat GEMM with split-K for M <= 64, tiles beyond); ``gguf_dequantize`` writes a
dense copy for dequant + cuBLAS on large M. These kernels favour exactness and coverage over
speed (byte-granular loads); the tuned batch-1 targets are the int8 / int4 / fp8 kernels.

Up to ``GEMV_MAX_M`` rows (batch-1 decode, a short speculative chain) go to ``gguf_gemv``
instead: no tensor cores and no padding of x to 16 rows; each program decodes a few weight rows
over a wide K tile and multiplies them with every row of x in fp32 registers, so a small matrix is
spread over many programs. On the H200 the flat GEMM took 21.8 us per product of SmolLM2-135M
(N = 192-1536 with 6-48 programs, each walking K in dependent steps: a latency chain, not a
bandwidth limit), 2.75 of the 3.19 ms of a decode step's kernels. Except: 9-16 rows of a wide
32-element-type weight (a token tree's verification) take the flat GEMM, with K cut into slices
(``tree_rows_flat``).

The 32-element types are decoded block-wise, as ``[rows, blocks, 32]``: a block's scale, min and
high bits are loaded once, not once per weight. The flat GEMM does so for all four, the GEMV for one
row of Q8_0 / Q5_0 (``_gguf_gemv_blocks_kernel``). H200, weights rotated past L2, against the
weight-wise decoding (docs/quantization.md): Gemma 3 270M's Q8_0 head (262144 x 640) 267 -> 171 us
at one row and 528 -> 238 us at 5-16 rows, gate/up (Q5_0) 11.8 -> 7.1 us at one row, SmolLM2's
Q4_1 down projection 29 -> 7 us at 12-16 rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.quant_gemm import FLAT_MAX_M, INVARIANT_BLOCK_M, MatmulConfig, flat_split, sum_splits
from flashserve.kernels.quant_reference import GGUF_BLOCKS
from flashserve.kernels.utils import cdiv, dot_ieee, next_power_of_2, num_sms

GGUF_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q5_0": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


@triton.jit
def _k_scale_min(u8_ptr, base, sub):
    """The 6-bit scale and min of sub-block ``sub`` (0..7) of a Q4_K / Q5_K super-block."""
    lo4 = sub % 4
    b_d = tl.load(u8_ptr + base + 4 + lo4).to(tl.int32)  # bytes 0..3 of the scale field
    b_m = tl.load(u8_ptr + base + 8 + lo4).to(tl.int32)  # bytes 4..7
    b_md = tl.load(u8_ptr + base + 12 + lo4).to(tl.int32)  # bytes 8..11
    first = sub < 4
    sc = tl.where(first, b_d & 63, (b_md & 15) | ((b_d >> 6) << 4))
    mn = tl.where(first, b_m & 63, (b_md >> 4) | ((b_m >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _gguf_tile(u8_ptr, i8_ptr, f16_ptr, rows, cols, mask, row_bytes, QTYPE: tl.constexpr):
    """fp32 weights ``[len(rows), len(cols)]`` decoded from their blocks (0 where ``mask`` is off)."""
    row_base = rows.to(tl.int64)[:, None] * row_bytes
    if QTYPE <= 3:  # 32-element blocks
        j = (cols % 32)[None, :]
        if QTYPE == 0:
            base = row_base + (cols // 32 * 34)[None, :]
            d = tl.load(f16_ptr + base // 2, mask=mask, other=0.0).to(tl.float32)
            q = tl.load(i8_ptr + base + 2 + j, mask=mask, other=0).to(tl.float32)
            w = d * q
        elif QTYPE == 1:
            base = row_base + (cols // 32 * 18)[None, :]
            d = tl.load(f16_ptr + base // 2, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(u8_ptr + base + 2 + j % 16, mask=mask, other=0).to(tl.int32)
            w = d * (((b >> (j // 16 * 4)) & 15).to(tl.float32) - 8.0)
        elif QTYPE == 2:
            base = row_base + (cols // 32 * 20)[None, :]
            d = tl.load(f16_ptr + base // 2, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(f16_ptr + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(u8_ptr + base + 4 + j % 16, mask=mask, other=0).to(tl.int32)
            w = d * ((b >> (j // 16 * 4)) & 15).to(tl.float32) + m
        else:
            base = row_base + (cols // 32 * 22)[None, :]
            d = tl.load(f16_ptr + base // 2, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(u8_ptr + base + 2 + j // 8, mask=mask, other=0).to(tl.int32)
            b = tl.load(u8_ptr + base + 6 + j % 16, mask=mask, other=0).to(tl.int32)
            u = ((b >> (j // 16 * 4)) & 15) | (((h >> (j % 8)) & 1) << 4)
            w = d * (u.to(tl.float32) - 16.0)
    else:  # 256-element super-blocks
        j = (cols % 256)[None, :]
        l = j % 32
        if QTYPE == 6:
            base = row_base + (cols // 256 * 210)[None, :]
            half = j // 128
            r = (j % 128) // 32
            lo = tl.load(u8_ptr + base + half * 64 + (r % 2) * 32 + l, mask=mask, other=0).to(tl.int32)
            hi = tl.load(u8_ptr + base + 128 + half * 32 + l, mask=mask, other=0).to(tl.int32)
            q = ((lo >> (r // 2 * 4)) & 15) | (((hi >> (2 * r)) & 3) << 4)
            sc = tl.load(i8_ptr + base + 192 + j // 16, mask=mask, other=0).to(tl.float32)
            d = tl.load(f16_ptr + (base + 208) // 2, mask=mask, other=0.0).to(tl.float32)
            w = d * sc * (q.to(tl.float32) - 32.0)
        else:
            nbytes = 144 if QTYPE == 4 else 176
            qs_off = 16 if QTYPE == 4 else 48
            base = row_base + (cols // 256 * nbytes)[None, :]
            sub = j // 32
            d = tl.load(f16_ptr + base // 2, mask=mask, other=0.0).to(tl.float32)
            dmin = tl.load(f16_ptr + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
            sc, mn = _k_scale_min(u8_ptr, base, sub)
            b = tl.load(u8_ptr + base + qs_off + (sub // 2) * 32 + l, mask=mask, other=0).to(tl.int32)
            u = (b >> ((sub % 2) * 4)) & 15
            if QTYPE == 5:
                h = tl.load(u8_ptr + base + 16 + l, mask=mask, other=0).to(tl.int32)
                u = u | (((h >> sub) & 1) << 4)
            w = d * sc * u.to(tl.float32) - dmin * mn
    return tl.where(mask, w, 0.0)


@triton.jit
def _block_weights(u8_ptr, i8_ptr, f16_ptr, row_base, blk, ok, QTYPE: tl.constexpr):
    """fp32 weights ``[rows, blocks, 32]`` of a 32-element type: ``row_base`` [rows, 1, 1] byte
    offsets of the rows, ``blk`` the block indices, ``ok`` [rows, blocks, 1] the blocks to read (0
    elsewhere). A block's scale, min and high bits are loaded once for its 32 weights."""
    j = tl.arange(0, 32)[None, None, :]
    if QTYPE == 0:  # Q8_0: fp16 scale, 32 int8
        base = row_base + (blk * 34)[None, :, None]
        d = tl.load(f16_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
        w = d * tl.load(i8_ptr + base + 2 + j, mask=ok, other=0).to(tl.float32)
    elif QTYPE == 1:  # Q4_0: fp16 scale, 16 bytes of nibbles
        base = row_base + (blk * 18)[None, :, None]
        d = tl.load(f16_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(u8_ptr + base + 2 + j % 16, mask=ok, other=0).to(tl.int32)
        w = d * (((b >> (j // 16 * 4)) & 15).to(tl.float32) - 8.0)
    elif QTYPE == 2:  # Q4_1: fp16 scale and min, 16 bytes of nibbles
        base = row_base + (blk * 20)[None, :, None]
        d = tl.load(f16_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(f16_ptr + base // 2 + 1, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(u8_ptr + base + 4 + j % 16, mask=ok, other=0).to(tl.int32)
        w = d * ((b >> (j // 16 * 4)) & 15).to(tl.float32) + m
    else:  # Q5_0: fp16 scale, 32 high bits, 16 bytes of low nibbles
        base = row_base + (blk * 22)[None, :, None]
        d = tl.load(f16_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
        qh = tl.load(u8_ptr + base + 2, mask=ok, other=0).to(tl.int32)
        qh |= tl.load(u8_ptr + base + 3, mask=ok, other=0).to(tl.int32) << 8
        qh |= tl.load(u8_ptr + base + 4, mask=ok, other=0).to(tl.int32) << 16
        qh |= tl.load(u8_ptr + base + 5, mask=ok, other=0).to(tl.int32) << 24
        b = tl.load(u8_ptr + base + 6 + j % 16, mask=ok, other=0).to(tl.int32)
        u = ((b >> (j // 16 * 4)) & 15) | (((qh >> j) & 1) << 4)
        w = d * (u.to(tl.float32) - 16.0)
    return w


@triton.jit
def _gguf_tile_blocks(u8_ptr, i8_ptr, f16_ptr, rows, row_ok, k0, k_hi, row_bytes, QTYPE: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """fp32 weights ``[len(rows), BLOCK_K]`` of columns ``k0 ..`` for the 32-element types, decoded
    as ``[rows, blocks, 32]`` (``_block_weights``) and flattened; columns from ``k_hi`` on are 0.
    ``k0`` and ``k_hi`` are multiples of 32."""
    NB: tl.constexpr = BLOCK_K // 32
    blk = k0 // 32 + tl.arange(0, NB)
    ok = row_ok[:, None, None] & (blk * 32 < k_hi)[None, :, None]
    w = _block_weights(u8_ptr, i8_ptr, f16_ptr, rows.to(tl.int64)[:, None, None] * row_bytes, blk, ok, QTYPE)
    return tl.reshape(tl.where(ok, w, 0.0), [rows.shape[0], BLOCK_K])


@triton.jit(do_not_specialize=["M", "stride_os"])  # row count unspecialised: engine/warm_up.py
def _gguf_matmul_kernel(
    x_ptr, u8_ptr, i8_ptr, f16_ptr, out_ptr,
    M, N, K, row_bytes, k_per_split,
    stride_xm, stride_om, stride_os,
    QTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < k_hi
        if QTYPE <= 3:
            w = _gguf_tile_blocks(u8_ptr, i8_ptr, f16_ptr, offs_n, n_ok, k0, k_hi, row_bytes, QTYPE, BLOCK_K)
        else:
            w = _gguf_tile(u8_ptr, i8_ptr, f16_ptr, offs_n, cols, n_ok[:, None] & k_ok[None, :], row_bytes, QTYPE)
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PREC)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])  # row count unspecialised: engine/warm_up.py
def _gguf_gemv_kernel(
    x_ptr, u8_ptr, i8_ptr, f16_ptr, out_ptr,
    M, N, K, row_bytes, stride_xm, stride_om,
    QTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """``out[:M, tile] = x[:M] @ w[tile]^T`` for one ``BLOCK_N`` tile of weight rows (M <= ROWS)."""
    wait_for_prior(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    n_ok = offs_n < N
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        w = _gguf_tile(u8_ptr, i8_ptr, f16_ptr, offs_n, cols, n_ok[:, None] & k_ok[None, :], row_bytes, QTYPE)
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gguf_gemv_blocks_kernel(
    x_ptr, u8_ptr, i8_ptr, f16_ptr, out_ptr, N, K, row_bytes,
    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr,
):
    """``out[0, tile] = x[0] @ w[tile]^T`` for Q8_0 / Q5_0, one row of x: the tile is ``[BLOCK_N,
    NB, 32]`` (rows, blocks, a block's weights), so a block's scale and high bits are loaded once
    for its 32 weights instead of once per weight."""
    wait_for_prior(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.arange(0, 32)
    row_base = offs_n.to(tl.int64)[:, None, None] * row_bytes
    n_ok = (offs_n < N)[:, None, None]
    num_blocks = K // 32
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, num_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        ok = n_ok & (blk < num_blocks)[None, :, None]
        w = _block_weights(u8_ptr, i8_ptr, f16_ptr, row_base, blk, ok, QTYPE)
        x = tl.load(x_ptr + (blk * 32)[:, None] + col[None, :], mask=(blk < num_blocks)[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gguf_dequant_kernel(u8_ptr, i8_ptr, f16_ptr, out_ptr, N, K, row_bytes, QTYPE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = _gguf_tile(u8_ptr, i8_ptr, f16_ptr, offs_n, offs_k, mask, row_bytes, QTYPE)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _views(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qtype not in GGUF_CODES:
        raise ValueError(f"GGUF type {qtype} has no GPU kernel; supported: {', '.join(GGUF_CODES)}")
    if raw.dtype != torch.uint8 or raw.dim() != 2 or not raw.is_contiguous():
        raise ValueError("GGUF weights must be a contiguous uint8 [N, row_bytes] tensor")
    return raw, raw.view(torch.int8), raw.view(torch.float16)


# rows up to which the GEMV runs (beyond, the flat GEMM on tensor cores). 16 covers a token tree of
# 8 drafts: on the H200, Gemma 3 270M's n-gram trees on summarization went from 1.19x to 1.76x plain
# decoding with this (from 8) and the decode kernel's 16 query tokens (docs/decoding.md)
GEMV_MAX_M = 16
GEMV_MAX_WEIGHTS = 1 << 22  # beyond, 3 to 16 rows take the flat GEMM too (H200: a 49152 x 576 Q8_0 head, 5 rows: 128 us against 49)
GEMV_TILE = 16384  # x rows x weight rows x K columns one GEMV program multiplies per step


class GemvTile(NamedTuple):
    rows: int  # x rows per program (M padded to a power of two)
    block_n: int
    block_k: int
    num_warps: int = 4


def gemv_tile(m: int, n: int, k: int, device: torch.device | None = None) -> GemvTile:
    """Weight rows per program: 8, halved while that leaves fewer than three programs per SM or
    a step's products (``rows x block_n x block_k``) exceed ``GEMV_TILE``; then K in as few
    steps as possible, up to 1024 columns for one or two weight rows, 256 for eight. These
    products are latency-bound: many programs, each walking K in one or two steps, beat fewer,
    longer ones. Fitted to an H200 sweep over SmolLM2-135M's and Gemma-3-270M-shaped products at
    1, 2 and 5 rows (docs/quantization.md): within 5% of the best tile at most shapes; 9-16 rows
    (one weight row per program) were timed end to end only."""
    rows = next_power_of_2(m)
    block_k = min(next_power_of_2(k), 1024)
    block_n = 8
    while block_n > 1 and (cdiv(n, block_n) < 3 * num_sms(device) or rows * block_n * block_k > GEMV_TILE):
        block_n //= 2
    block_k = min(block_k, max(256, GEMV_TILE // (block_n * block_n)))
    while rows * block_n * block_k > GEMV_TILE:
        block_k //= 2
    return GemvTile(rows, block_n, block_k)


BLOCKS_GEMV_TYPES = ("Q8_0", "Q5_0")
BLOCKS_32 = tuple(t for t in GGUF_CODES if GGUF_BLOCKS[t][0] == 32)  # decoded block-wise by the flat GEMM
FLAT_TREE_MIN_N = 768  # tree_rows_flat: narrower products keep the GEMV
BLOCKS_GEMV_MIN_N = 1024  # below, too few programs: the weight-wise GEMV is as fast (H200: 256 x 640 Q8_0, 1.8 us)


def blocks_gemv_tile(n: int, k: int) -> tuple[int, int, int]:
    """(weight rows, 32-weight blocks, warps) per program of the block-wise GEMV: 16 rows of 4
    blocks for heads of 16k+ rows, else 4 rows over K in one step (up to 32 blocks). From an H200
    sweep of Gemma-3-270M's and SmolLM2's Q8_0 / Q5_0 products (docs/quantization.md)."""
    if n >= 16384:
        return 16, 4, 2
    return 4, min(next_power_of_2(cdiv(k, 32)), 32), 4


def gguf_gemv(x: torch.Tensor, raw: torch.Tensor, qtype: str, tile: GemvTile | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(raw)^T`` -> [M, N] for M <= ``GEMV_MAX_M`` (one launch, no split). One
    row of Q8_0 / Q5_0 (N >= ``BLOCKS_GEMV_MIN_N``, no tile given) takes the block-wise kernel."""
    x, (u8, i8, f16), row_bytes = _operands(x, raw, qtype)
    (m, k), n = x.shape, raw.shape[0]
    if m == 1 and tile is None and qtype in BLOCKS_GEMV_TYPES and n >= BLOCKS_GEMV_MIN_N:
        block_n, nb, warps = blocks_gemv_tile(n, k)
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
        _gguf_gemv_blocks_kernel[(cdiv(n, block_n),)](
            x, u8, i8, f16, out, n, k, row_bytes, QTYPE=GGUF_CODES[qtype], BLOCK_N=block_n, NB=nb,
            num_warps=warps, **pdl.launch_args(x.device),
        )
        return out
    t = tile or gemv_tile(m, n, k, x.device)
    if m > t.rows:
        raise ValueError(f"gguf_gemv takes at most {t.rows} rows with this tile, got {m}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _gguf_gemv_kernel[(cdiv(n, t.block_n),)](
        x, u8, i8, f16, out, m, n, k, row_bytes, x.stride(0), out.stride(0),
        QTYPE=GGUF_CODES[qtype], ROWS=t.rows, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
        **pdl.launch_args(x.device),
    )
    return out


def _operands(x: torch.Tensor, raw: torch.Tensor, qtype: str):
    """x with unit column stride, the three views of ``raw``, its row bytes (checked against x's K)."""
    views = _views(raw, qtype)
    elems, nbytes = GGUF_BLOCKS[qtype]
    k, row_bytes = x.shape[1], raw.shape[1]
    if row_bytes * elems != k * nbytes:
        raise ValueError(f"{qtype} rows of {row_bytes} bytes do not hold {k} columns")
    return (x if x.stride(1) == 1 else x.contiguous()), views, row_bytes


SLICED_MAX_M = 64  # up to here the rows fit one narrow tile and K is cut into slices (gguf_config)


def sliced_split(n: int, k: int, device: torch.device | None = None) -> int:
    """K slices for ``SLICED_MAX_M`` rows over 32-row weight tiles: the largest power of two up to 8
    within two programs per SM, one 128-column tile per slice at least. H200, Gemma 3 270M's
    products at 17-64 rows (weights past L2): the best of 1, 2, 4, 8 slices in each case."""
    want = min(cdiv(2 * num_sms(device), cdiv(n, 32)), k // 128, 8)
    split = 1
    while split * 2 <= want:
        split *= 2
    return split


def gguf_config(m: int, n: int, k: int, device: torch.device | None = None) -> MatmulConfig:
    """Fixed launch configuration per shape class. Up to ``SLICED_MAX_M`` rows (a decode batch, a
    token tree of more than 16 nodes: CUDA graphs pad 17 tokens to 32) one tile holds every row
    and K is cut into slices, so a narrow weight still spreads over the GPU; beyond, 64 x 64 tiles."""
    if m <= FLAT_MAX_M:
        return MatmulConfig(16, 32, 128, flat_split(n, k, 32, 128, device), 4, 3)
    if m <= SLICED_MAX_M:
        return MatmulConfig(32 if m <= 32 else 64, 32, 128, sliced_split(n, k, device), 4, 2)
    return MatmulConfig(64, 64, 64, 1, 4, 2)


def gguf_invariant_config(n: int, k: int, device: torch.device | None = None) -> MatmulConfig:
    """One configuration for every M (the batch-invariant mode; ``quant_gemm.invariant_config``)."""
    return MatmulConfig(INVARIANT_BLOCK_M, 32, 128, flat_split(n, k, 32, 128, device), 4, 3)


def tree_rows_flat(m: int, n: int, qtype: str) -> bool:
    """Whether 9-16 rows (a token tree's verification) of a 32-element type take the flat GEMM
    although the GEMV could: its tiles give such rows one weight row per program, each re-reading
    all 16 rows of x, while the flat GEMM decodes the weights block-wise onto tensor cores. H200,
    at 9 rows, weights past L2: Gemma 3 270M's gate/up (Q5_0, 4096 x 640) 26.7 -> 8.9 us, q/k
    (Q5_0, 1280 x 640) 9.6 -> 6.5, SmolLM2's qkv (Q4_1, 960 x 576) 7.7 -> 5.4; below
    ``FLAT_TREE_MIN_N`` rows of weights the GEMV is as fast or faster (SmolLM2's o, 576 x 576: 5.3
    both; Gemma's v, 256 x 640: 3.2 against 5.2), and so are the K-quants at every size
    (weight-wise decoding on both paths: Q4_K 640 x 2048 12.2 against 59.7). Not below 9 rows:
    there the flat GEMM won in isolation (Gemma gate/up at 5 rows 15.8 -> 8.7 us) but lost end
    to end (n-gram chains on Gemma 1.63x -> 1.42x plain decoding on summaries, docs/quantization.md)."""
    return m > GEMV_MAX_M // 2 and n >= FLAT_TREE_MIN_N and qtype in BLOCKS_32


def tree_rows_config(n: int, k: int, device: torch.device | None = None) -> MatmulConfig:
    """The flat GEMM's tiles for ``tree_rows_flat``: 16 x 32 outputs, K in 128-column tiles cut into
    up to four slices, so the few programs of a narrow product still fill the GPU."""
    split = min(4, max(1, k // 128), max(1, cdiv(4 * num_sms(device), cdiv(n, 32))))
    return MatmulConfig(16, 32, 128, split, 4, 2)


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(raw)^T`` -> [M, N] in x's dtype; ``raw`` uint8 [N, row_bytes]."""
    x, (u8, i8, f16), row_bytes = _operands(x, raw, qtype)
    (m, k), n = x.shape, raw.shape[0]
    if config is None and tree_rows_flat(m, n, qtype) and n * k <= GEMV_MAX_WEIGHTS:
        config = tree_rows_config(n, k, x.device)
    if config is None and (m <= 2 or (m <= GEMV_MAX_M and n * k <= GEMV_MAX_WEIGHTS)):
        return gguf_gemv(x, raw, qtype)
    cfg = config or gguf_config(m, n, k, x.device)
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cdiv(k, k_per_split)
    out = torch.empty(split, m, n, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if m == 0:
        return out[0].to(x.dtype)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), split)
    _gguf_matmul_kernel[grid](
        x, u8, i8, f16, out, m, n, k, row_bytes, k_per_split,
        x.stride(0), out.stride(1), out.stride(0),
        QTYPE=GGUF_CODES[qtype], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PREC="ieee" if dot_ieee(x.dtype) else "tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return sum_splits(out, x.dtype) if split > 1 else out[0]


def gguf_dequantize(raw: torch.Tensor, qtype: str, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense ``[N, K]`` copy in ``dtype`` (for dequant + cuBLAS)."""
    u8, i8, f16 = _views(raw, qtype)
    n, row_bytes = raw.shape
    out = torch.empty(n, k, dtype=dtype, device=raw.device)
    block_n, block_k = 16, 256
    _gguf_dequant_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
        u8, i8, f16, out, n, k, row_bytes, QTYPE=GGUF_CODES[qtype], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
