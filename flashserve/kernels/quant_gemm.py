"""Weight-only quantized matrix products on the GPU: ``y = x @ dequant(W)^T``, dequantized in registers.

Formats (``flashserve.kernels.quant_reference`` defines them and holds the torch references):
int8 and fp8 e4m3 per output channel, int4 group-wise (``w = (u - 8) * scale + zero``, two
columns per byte, column 2j in the low nibble of byte j), and dense weights in the activations'
dtype (``FMT_DENSE``: the batch-invariant mode's products, ``invariant_config``).

One kernel serves every M. Each program computes a ``[BLOCK_M, BLOCK_N]`` tile of the output
over a slice of K: it loads a weight tile in its stored width (1 byte or half a byte per
weight, contiguous along K so the loads vectorise), turns it into the activation dtype in
registers and feeds ``tl.dot``. For int4 the low and high nibbles of a byte row are two
separate ``[BLOCK_N, BLOCK_K / 2]`` tiles multiplied with the even and the odd columns of x, so
no interleaving shuffle is needed. int8 / fp8 scales are applied once to the accumulator.

* M = 1 goes to ``quant_gemv`` (no tensor cores) wherever its fixed tiles divide the shape.
* Flat GEMM (M <= 16: batch-2 to batch-16 decode, speculative verification): M is padded to 16
  rows for the tensor cores (FlashDecoding++'s flat GEMM); K is split over ``SPLIT_K`` programs
  when N alone would not fill the GPU, the fp32 partial sums are added in split order by
  ``sum_splits`` (one launch, the same order for every M); Triton's
  software pipelining (``num_stages``) keeps several weight tiles in flight (multi-buffering).
* Tiled GEMM (M > 16): 64 or 128-row tiles, no split.
* ``dequantize`` writes the dense weight, for ``dequant + cuBLAS`` on large M (prefill) where
  that measures faster (``flashserve bench quant-kernels`` times both).

Kernel configurations are fixed per shape class (``matmul_config``), never autotuned at run time:
CUDA graphs capture whatever the first call launched. ``invariant_config`` is one configuration
for every M (the batch-invariant mode, ``flashserve.layers.batch_invariant``): a row's result then
does not depend on how many rows share the product, since the tile shapes, the K split and the
order of every addition are the same whatever M is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels.quant_gemv import FMT_FP8, FMT_INT4, FMT_INT8, wq_gemv
from flashserve.kernels.utils import cdiv, dot_ieee, next_power_of_2, num_sms

FMT_DENSE = 3
FORMAT_NAMES = {FMT_INT8: "int8", FMT_INT4: "int4", FMT_FP8: "fp8", FMT_DENSE: "dense"}


@triton.jit(do_not_specialize=["M", "stride_os"])  # row count unspecialised: engine/warm_up.py
def _wq_matmul_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # int8 / fp8 [N, K], uint8 [N, K / 2] (int4), or [N, K] in x's dtype (dense)
    s_ptr,  # fp32 [N] (per channel) or [N, NUM_GROUPS] (int4); unused (dense)
    z_ptr,  # fp32 [N, NUM_GROUPS] (int4 with zeros) or a dummy
    out_ptr,  # [SPLIT_K, M, N] fp32 partials, or [M, N] in x's dtype when SPLIT_K == 1
    M, N, K, NUM_GROUPS, k_per_split,
    stride_xm, stride_om, stride_os,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
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
    rows = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FMT == 1:  # int4: bytes j hold columns 2j (low nibble) and 2j + 1 (high nibble)
            HALF: tl.constexpr = BLOCK_K // 2
            offs_j = tl.arange(0, HALF)
            cols = k0 + 2 * offs_j  # even columns of this tile
            w_ptrs = w_ptr + rows[:, None] * (K // 2) + (k0 // 2 + offs_j)[None, :]
            if EVEN_K and EVEN_N:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=n_ok[:, None] & (cols < k_hi)[None, :], other=0)
            lo = (b & 15).to(tl.float32) - 8.0  # [BLOCK_N, HALF]
            hi = (b >> 4).to(tl.float32) - 8.0
            if GROUP >= BLOCK_K:  # the tile lies in one group: one scale per row
                g = k0 // GROUP
                s = tl.load(s_ptr + rows * NUM_GROUPS + g, mask=n_ok, other=0.0)[:, None]
                lo = lo * s
                hi = hi * s
                if HAS_ZERO:
                    z = tl.load(z_ptr + rows * NUM_GROUPS + g, mask=n_ok, other=0.0)[:, None]
                    lo = lo + z
                    hi = hi + z
            else:
                g_off = rows[:, None] * NUM_GROUPS + (cols // GROUP)[None, :]
                s = tl.load(s_ptr + g_off, mask=n_ok[:, None], other=0.0)
                lo = lo * s
                hi = hi * s
                if HAS_ZERO:
                    z = tl.load(z_ptr + g_off, mask=n_ok[:, None], other=0.0)
                    lo = lo + z
                    hi = hi + z
            x_mask = m_ok[:, None] & (cols < k_hi)[None, :]
            xe = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)  # [BLOCK_M, HALF]
            xo = tl.load(x_rows + cols[None, :] + 1, mask=x_mask, other=0.0)
            acc += tl.dot(xe, tl.trans(lo.to(xe.dtype)), input_precision=DOT_PREC)
            acc += tl.dot(xo, tl.trans(hi.to(xo.dtype)), input_precision=DOT_PREC)
        else:  # int8 / fp8: one byte per weight, scale after the loop; dense: as stored
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w_ptrs = w_ptr + rows[:, None] * K + offs_k[None, :]
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < k_hi)[None, :], other=0)
            if FMT == 2:  # fp8 arrives as its bytes (masked fp8 loads do not run in the interpreter)
                w = w.to(tl.float8e4nv, bitcast=True)
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(tl.float32).to(x.dtype)), input_precision=DOT_PREC)
    if FMT == 0 or FMT == 2:
        acc = acc * tl.load(s_ptr + rows, mask=n_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wq_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,  # out: [N, K] dense
    N, K, NUM_GROUPS,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_n.to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if FMT == 1:
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + (offs_k // 2)[None, :], mask=mask, other=0)
        u = (b >> ((offs_k % 2) * 4)[None, :].to(tl.uint8)) & 15
        g_off = rows[:, None] * NUM_GROUPS + (offs_k // GROUP)[None, :]
        w = (u.to(tl.float32) - 8.0) * tl.load(s_ptr + g_off, mask=mask, other=0.0)
        if HAS_ZERO:
            w += tl.load(z_ptr + g_off, mask=mask, other=0.0)
    else:
        q = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0)
        if FMT == 2:
            q = q.to(tl.float8e4nv, bitcast=True)
        w = q.to(tl.float32) * tl.load(s_ptr + rows, mask=offs_n < N, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


class MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


FLAT_MAX_M = 16  # rows handled by the flat-GEMM configuration
INVARIANT_BLOCK_M = 64  # rows per tile of the batch-invariant configuration (every M)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = ((part[0, i] + part[1, i]) + part[2, i]) + ... in fp32, then cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[S, M, N]`` fp32 split-K partial sums -> ``[M, N]`` in ``dtype``, added in split order
    (the same order for every element and every M; one launch, no separate cast)."""
    s, m, n = partials.shape
    out = torch.empty(m, n, dtype=dtype, device=partials.device)
    if m * n:
        block = 1024
        _sum_splits_kernel[(cdiv(m * n, block),)](partials, out, m * n, SPLIT=s, BLOCK=block, num_warps=4)
    return out


def flat_split(n: int, k: int, block_n: int, block_k: int, device: torch.device | None) -> int:
    """K slices for a flat product: about two programs per SM, at least four K tiles each, <= 16."""
    want = cdiv(2 * num_sms(device), cdiv(n, block_n))
    most = max(1, k // (4 * block_k))
    split = 1
    while split * 2 <= min(want, most) and split < 16:
        split *= 2
    return split


def matmul_config(m: int, n: int, k: int, fmt: int, group: int, device: torch.device | None = None) -> MatmulConfig:
    """The fixed launch configuration for one shape class (no run-time autotuning)."""
    block_k = 128
    if fmt == FMT_INT4 and group >= 64:  # a tile inside one group loads one scale per row
        while group % block_k:
            block_k //= 2
    # (int4 groups below 64 gather a scale per column pair in 128-column tiles)
    block_k = min(block_k, max(32, next_power_of_2(k)))
    if m <= FLAT_MAX_M:
        block_n = 128 if fmt == FMT_INT4 else 64  # 8 KiB weight tiles either way
        return MatmulConfig(16, block_n, block_k, flat_split(n, k, block_n, block_k, device), 4, 4)
    block_m = 64 if m <= 64 else 128
    return MatmulConfig(block_m, 128, min(block_k, 64), 1, 4 if block_m == 64 else 8, 3)


def invariant_config(n: int, k: int, fmt: int, group: int, device: torch.device | None = None,
                     act_bytes: int = 2) -> MatmulConfig:
    """One configuration for every M (the batch-invariant mode): 64-row tiles, the flat
    product's N tiles and K split, which depend on the weight's shape alone. ``act_bytes``: the
    activations' element size (fp32 tiles keep two stages in shared memory, not three)."""
    flat = matmul_config(1, n, k, fmt, group, device)
    block_n = 64 if fmt == FMT_INT4 else flat.block_n  # 64 x 64 accumulators for 64-row tiles
    split = flat_split(n, k, block_n, flat.block_k, device)
    return MatmulConfig(INVARIANT_BLOCK_M, block_n, flat.block_k, split, 4, 3 if act_bytes <= 2 else 2)


def wq_matmul(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: int,
    group: int = 0,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``x @ dequant(w)^T`` -> [M, N] in x's dtype. ``group`` (int4 only) divides K."""
    m, k = x.shape
    n = w.shape[0]
    if m == 1 and config is None:  # batch-1 decode: the GEMV without tensor cores, where its tiles fit
        y = wq_gemv(x, w, scales, zeros, fmt, group)
        if y is not None:
            return y
    if fmt == FMT_FP8:
        w = w.view(torch.uint8)
    if x.stride(1) != 1:
        x = x.contiguous()
    num_groups = k // group if fmt == FMT_INT4 else 1
    cfg = config or matmul_config(m, n, k, fmt, group, x.device)
    if fmt == FMT_INT4 and group % cfg.block_k and cfg.block_k % group:
        raise ValueError(f"block_k {cfg.block_k} and group {group} must divide one another")
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cdiv(k, k_per_split)
    if split > 1:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out[0].to(x.dtype)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), split)
    _wq_matmul_kernel[grid](
        x, w, scales, zeros if zeros is not None else scales, out,
        m, n, k, num_groups, k_per_split,
        x.stride(0), out.stride(1), out.stride(0),
        FMT=fmt, GROUP=max(group, 1), HAS_ZERO=zeros is not None,
        EVEN_K=k % cfg.block_k == 0 and k_per_split * split == k, EVEN_N=n % cfg.block_n == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PREC="ieee" if dot_ieee(x.dtype) else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return sum_splits(out, x.dtype) if split > 1 else out[0]


def wq_dequantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: int, k: int, group: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype``."""
    n = w.shape[0]
    if fmt == FMT_FP8:
        w = w.view(torch.uint8)
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    block_n, block_k = 32, 128
    _wq_dequant_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
        w, scales, zeros if zeros is not None else scales, out, n, k, k // group if fmt == FMT_INT4 else 1,
        FMT=fmt, GROUP=max(group, 1), HAS_ZERO=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
