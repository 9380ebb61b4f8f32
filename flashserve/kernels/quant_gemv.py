"""Batch-1 weight-only quantized GEMV: ``y[1, N] = x[1, K] @ dequant(W)^T`` without tensor cores.

At M = 1 the flat GEMM of ``quant_gemm`` pads x to 16 rows for ``tl.dot`` and dequantizes every
weight tile into a full ``[BLOCK_N, BLOCK_K]`` operand; that arithmetic, not the memory system,
bounds it (measured on an H200: 0.3-1.3 TB/s for int4). Here each program streams a
``[BLOCK_N, BLOCK_K]`` weight tile, multiplies it with the x slice in fp32 registers and reduces
along K, so the per-weight work is the conversion and one multiply-add:

* int8 / fp8 e4m3 per channel: the channel scale is applied once to the finished row sum.
* int4 group-wise (``w = (u - 8) * s + z``): per group ``sum(w * x) = s * sum(u * x) + (z - 8 s) *
  sum(x)``, so the unsigned nibbles are used as they are and the scale, zero and offset cost one
  multiply-add per group and row instead of three operations per weight.

Integers become floats without conversion instructions (which run at a fraction of the fp32
rate). int8: an integer ``u < 2^23`` OR-ed into the bits of the float ``2^23`` is the float
``2^23 + u``, so ``byte ^ 0x80 = q + 128`` becomes ``q`` with one bitwise operation and one
subtraction (batch-1 Llama-3.1-8B on an H200: int8 278.4 -> 318.1 tok/s, docs/quantization.md).
fp8 keeps Triton's conversion: a bit-level decoding measured slower.

int4 is bound by this per-weight work, not by its bytes (a kernel that only loads and adds the
bytes ran 2.3x faster on the H200), so it does the least per nibble: weights are read as int32
words of 8 nibbles, and nibble i is shifted to mantissa bits 19-22 and OR-ed into the bits of 1.0,
which makes the float ``1 + u / 16`` exactly (a shift and a bitwise operation). Its product with a
bf16 x is exact in fp32 and no subtraction is needed: ``sum(u * x) = 16 * (sum((1 + u / 16) * x) -
sum(x))``, once per group. One group per step, the next group's words loaded before this one's
work. Llama-3.1-8B batch-1 int4 g128: 271.3 -> 298.0 tok/s against the byte-wise kernel (two
nibbles per byte, each as ``2^23 + u`` less ``2^23``) in the same job.

Long rows (K >= 8192, e.g. the down projection) and, for int4, rows too few to give every SM
several programs split K over programs. Each writes its fp32 partial sums to a workspace and counts
itself in, per row block, with an atomic; the last one to arrive adds the partials in split order,
stores the output rows and resets the counter for the next call. So a split product is one launch
(no zero fill before it nor cast after it, which cost two more small kernels per product) and its
sums are deterministic (``utils.arrival_counters``: one buffer per device, so split products must
not run on two streams at once). Shapes the fixed tiles do not
divide return ``None`` and the caller uses the flat GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import arrival_counters, num_sms

TWO_23 = tl.constexpr(8388608.0)  # the float whose low mantissa bits an OR-ed integer becomes


@triton.jit
def _store_rows(acc, rows, out_ptr, ws_ptr, count_ptr, N, SPLIT: tl.constexpr):
    """Store the rows' sums; with a split K, the last program of the row block adds the partials."""
    if SPLIT == 1:
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(ws_ptr + tl.program_id(1) * N + rows, acc)
        tl.debug_barrier()  # every thread's partials are written before the count is released
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros_like(acc)
            for i in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + i * N + rows, cache_modifier=".cg")
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed")


@triton.jit
def _gemv_byte_kernel(
    x_ptr,  # [K] activations
    w_ptr,  # uint8 view of int8 or fp8 e4m3 [N, K]
    s_ptr,  # fp32 [N] per-channel scales
    out_ptr,  # [N] in x's dtype
    ws_ptr,  # fp32 [SPLIT, N] partial sums (when SPLIT > 1)
    count_ptr,  # int32 [N / BLOCK_N] zeros: programs arrived per row block (when SPLIT > 1)
    N, K, k_per_split,
    FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    k_lo = tl.program_id(1) * k_per_split
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        w = tl.load(w_ptr + rows[:, None] * K + (k0 + cols)[None, :])  # [BLOCK_N, BLOCK_K]
        if FP8:
            w = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:  # the float 2^23 + (q + 128), less 2^23 + 128
            w = (w.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - (TWO_23 + 128.0)
        x = tl.load(x_ptr + k0 + cols).to(tl.float32)  # [BLOCK_K]
        acc += tl.sum(w * x[None, :], axis=1)
    _store_rows(acc * tl.load(s_ptr + rows), rows, out_ptr, ws_ptr, count_ptr, N, SPLIT)


@triton.jit
def _gemv_int4_kernel(
    x_ptr,  # [K] activations
    w_ptr,  # int32 view of the uint8 [N, K / 2] nibbles: word m holds columns 8m..8m+7, column 8m + i in bits 4i..4i+3
    s_ptr,  # fp32 [N, NUM_GROUPS]
    z_ptr,  # fp32 [N, NUM_GROUPS] zeros, or a dummy
    out_ptr,  # [N] in x's dtype
    ws_ptr,  # fp32 [SPLIT, N] partial sums (when SPLIT > 1)
    count_ptr,  # int32 [N / BLOCK_N] zeros: programs arrived per row block (when SPLIT > 1)
    N, K, NUM_GROUPS, k_per_split,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    WORDS: tl.constexpr = GROUP // 8  # one group per step
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m = tl.arange(0, WORDS)
    k_lo = tl.program_id(1) * k_per_split
    k_last = k_lo + k_per_split - GROUP
    words = w_ptr + rows[:, None] * (K // 8) + m[None, :]
    w = tl.load(words + k_lo // 8)  # [BLOCK_N, WORDS]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, GROUP):
        w_next = tl.load(words + tl.minimum(k0 + GROUP, k_last) // 8)  # in flight during this group's work
        fx = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        xs = tl.zeros([WORDS], dtype=tl.float32)
        for i in tl.static_range(8):  # nibble i to mantissa bits 19-22 of 1.0: the float 1 + u / 16
            if 4 * i >= 19:
                t = w >> (4 * i - 19)
            else:
                t = w << (19 - 4 * i)
            f = ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
            x = tl.load(x_ptr + k0 + 8 * m + i).to(tl.float32)
            fx += f * x[None, :]
            xs += x
        x_sum = tl.sum(xs, axis=0)
        ux = 16.0 * (tl.sum(fx, axis=1) - x_sum)  # sum(u * x) over the group
        g_off = rows * NUM_GROUPS + k0 // GROUP
        s = tl.load(s_ptr + g_off)
        off = -8.0 * s
        if HAS_ZERO:
            off += tl.load(z_ptr + g_off)
        acc += s * ux + off * x_sum
        w = w_next
    _store_rows(acc, rows, out_ptr, ws_ptr, count_ptr, N, SPLIT)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


LONG_ROW = 8192  # K from which byte rows are split over several programs
INT4_ROWS, INT4_WARPS = 128, 8  # int4 programs: rows (and one group of columns per step), warps


def gemv_config(n: int, k: int, int4: bool, group: int, device: torch.device | None = None) -> GemvConfig | None:
    """The fixed tile for one shape, or None when the tiles do not divide it. Chosen on an H200 by
    batch-1 decode of Llama-3.1-8B (docs/quantization.md): int8 / fp8 stream 16 rows x 512 columns
    per step and split long rows (64 x 256 tiles) until there are two programs per SM, which
    took fp8 from 317 to 335 tok/s against no split and moved int8 by 1-2% only; int4 takes 128
    rows x one group per step (8 warps) and splits K (up to 8 ways) until there are four programs
    per SM (see the int4 kernel for its measurements); rows that 128 does not divide take 64, 32 or
    16 per program."""
    split = 1
    if int4:
        if group < 8 or group & (group - 1):
            return None
        block_n = next((r for r in (INT4_ROWS, 64, 32, 16) if n % r == 0), INT4_ROWS)
        block_k, warps = group, INT4_WARPS if block_n == INT4_ROWS else 4
        while split < 8 and n // block_n * split < 4 * num_sms(device) and k % (2 * split * block_k) == 0:
            split *= 2
    elif k >= LONG_ROW:
        block_n, block_k, warps = 64, 256, 8
        while split < 8 and n // block_n * split < 2 * num_sms(device) and k % (2 * split * block_k) == 0:
            split *= 2
    else:
        block_n, block_k, warps = 16, 512, 8
    if n % block_n or k % (split * block_k):
        return None
    return GemvConfig(block_n, block_k, split, warps, 3)


def wq_gemv(
    x: torch.Tensor,  # [1, K]
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: int,
    group: int = 0,
    config: GemvConfig | None = None,
) -> torch.Tensor | None:
    """``x @ dequant(w)^T`` -> [1, N] in x's dtype, or None when this shape needs the flat GEMM.
    ``fmt`` as in ``quant_gemm``: 0 int8, 1 int4, 2 fp8."""
    k = x.shape[1]
    n = w.shape[0]
    cfg = config or gemv_config(n, k, fmt == 1, group, x.device)
    if cfg is None:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    split = cfg.split_k
    ws = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else out
    count = arrival_counters(x.device, n // cfg.block_n) if split > 1 else out
    grid = (n // cfg.block_n, split)
    k_per_split = k // split
    if fmt == 1:
        _gemv_int4_kernel[grid](
            x, w.view(torch.int32), scales, zeros if zeros is not None else scales, out, ws, count, n, k, k // group,
            k_per_split, GROUP=group, HAS_ZERO=zeros is not None, BLOCK_N=cfg.block_n, SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_args(x.device),
        )
    else:
        _gemv_byte_kernel[grid](
            x, w.view(torch.uint8), scales, out, ws, count, n, k, k_per_split,
            FP8=fmt == 2, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_args(x.device),
        )
    return out.view(1, n)
