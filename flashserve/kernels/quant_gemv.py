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
On products with N <= 8192 and unsplit rows (qkv, o) int8 bytes take one PRMT each instead (four
a word, after one xor flips their signs) and each thread keeps a 2-D tile of sums, one FMA a
weight, reduced across threads once after the loop; on every product, the long ones (gate/up,
the LM head, split rows) included, the pair was slower end to end. Batch-1 Llama-3.1-8B on an
H100: int8 292.9 -> 299.2 tok/s (with int8's 16 x 1024 tiles where N <= 4096), fp8 303.2 -> 304.9
(docs/benchmarks.md).
fp8 keeps Triton's conversion: a bit-level decoding measured slower. This kernel launches its
dependents (PDL) at its start (batch-1 int8 Llama-3.1-8B on an H100: 280.0 -> 285.4 tok/s) and
reads its first weight tile before it waits, Triton pipelining the rest (with the small kernels
launching early, ``pdl``: int8 284.9 -> 286.5, fp8 291.9 -> 293.8).

int4 group-wise is x-stationary. Program (p, s) of a ``(P, K / KS)`` grid loads slice s of x (KS
columns, 1024 where K allows) once, as eight register vectors (one per nibble position), and walks
row blocks p, p + P, ...: per block one ``[BLOCK_N, KS / 8]`` load of int32 words, 16 bytes per
thread, the next block's words in flight during this block's work. Its partial row sums go to
the workspace; the last slice to arrive per row block adds them in slice order (below). Nibbles
become floats in place: for 16-bit activations, the nibble at bits 16-19 OR-ed into the bits of
1.0 is the float ``1 + u / 128`` and the one at bits 12-15 is ``1 + u / 2048``, so four shifts
serve a word of eight and each nibble costs one LOP3 and one FMA; x is pre-scaled by 8 or 128,
which makes every product ``x' + u x / 16`` exactly, and ``sum(u x) = 16 (sum(f x') - sum(x'))``
per group. fp32 activations, whose products with ``1 + u / 2048`` would round away bits of
``u x``, shift every nibble to bits 19-22 instead (``1 + u / 16``). Against the previous int4
kernel (128 rows and one group per step, x reloaded every step, about seven instructions per
weight), on an H100 in a CUDA graph of eight Llama-3.1-8B layers' products: 0.643 -> 0.482 ms
(docs/quantization.md). Launching its dependents (PDL) at its start, after its first weight
load, gave 11% of that: the next kernel's programs take the SM slots this one's leave and read
their weights before they wait.

Both kernels can take an MLP's ``[gate | up]`` halves instead of x (``gated``) and compute
``silu(gate) * up`` as they read it, rounded to the activations' dtype as the activation kernel
stores it: the down projection then needs no activation launch, and its result is the same bits
(batch-1 Llama-3.1-8B int4 on an H100: 373.0 -> 378.0 tok/s; int8 unchanged).

Long byte rows (K >= 8192, e.g. the down projection) split K over programs. Each split writes its
fp32 partial sums to a workspace and counts itself in, per row block, with an atomic; the last one
to arrive adds the partials in split order, stores the output rows and resets the counter for the
next call. So a split product is one launch (no zero fill before it nor cast after it, which cost
two more small kernels per product) and its sums are deterministic (``utils.arrival_counters``: one
buffer per device, so split products must not run on two streams at once). Shapes the fixed tiles
do not divide return ``None`` and the caller uses the flat GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import arrival_counters, is_interpreter, num_sms

TWO_23 = tl.constexpr(8388608.0)  # the float whose low mantissa bits an OR-ed integer becomes


@triton.jit
def _store_rows(acc, rows, block, split, out_ptr, ws_ptr, count_ptr, N, SPLIT: tl.constexpr):
    """Store the sums of row block ``block`` over K-split ``split``; with a split K, the last split to
    arrive adds the partials."""
    if SPLIT == 1:
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(ws_ptr + split * N + rows, acc)
        tl.debug_barrier()  # every thread's partials are written before the count is released
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros_like(acc)
            for i in tl.static_range(SPLIT):
                total += tl.load(ws_ptr + i * N + rows, cache_modifier=".cg")
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr + block, 0, sem="relaxed")


@triton.jit
def _x_floats(x_ptr, offs, K, GATED: tl.constexpr):
    """x[offs] in fp32. With ``GATED``, x_ptr holds ``[gate | up]`` (2K values) and x is
    ``silu(gate) * up`` rounded to their dtype, as ``activation.silu_and_mul`` computes it."""
    if GATED:
        a = tl.load(x_ptr + offs).to(tl.float32)
        b = tl.load(x_ptr + K + offs).to(tl.float32)
        return (a / (1.0 + tl.exp(-a)) * b).to(x_ptr.dtype.element_ty).to(tl.float32)
    return tl.load(x_ptr + offs).to(tl.float32)


@triton.jit
def _tile_x(x_ptr, cols, rows, K, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A step's x in fp32 over the ``[BLOCK_N, BLOCK_K]`` tile of ``rows`` x ``cols``: the column
    offsets spelled over the rows (``rows * 0``, which the compiler cannot fold into a broadcast),
    so each thread reads its own columns (again per row, from L1) in the tile's layout and no step
    passes x through shared memory behind a barrier; the gated form computes ``silu(gate) * up``
    once per column and broadcasts it (through shared memory)."""
    if GATED:
        return tl.broadcast_to(_x_floats(x_ptr, cols, K, GATED)[None, :], (BLOCK_N, BLOCK_K))
    return _x_floats(x_ptr, cols[None, :] + (rows[:, None] * 0).to(tl.int32), K, GATED)


@triton.jit
def _byte_floats(w, FP8: tl.constexpr, ASM: tl.constexpr):
    """int8 or fp8 e4m3 bytes as fp32."""
    if FP8:
        return w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if ASM:  # four bytes a word: one xor flips their signs, one PRMT a byte places it under 2^23's bits
        b = tl.inline_asm_elementwise(
            "{.reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7540; "
            "prmt.b32 $1, t, 0x4B000000, 0x7541; prmt.b32 $2, t, 0x4B000000, 0x7542; "
            "prmt.b32 $3, t, 0x4B000000, 0x7543;}", "=r,=r,=r,=r,r", [w], dtype=tl.int32, is_pure=True, pack=4)
        return b.to(tl.float32, bitcast=True) - (TWO_23 + 128.0)
    return (w.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - (TWO_23 + 128.0)  # 2^23 + (q + 128), less


@triton.jit
def _step_sums(products, ACC2D: tl.constexpr):
    """One K step's ``[BLOCK_N, BLOCK_K]`` products as the accumulator takes them: the tile itself
    (``ACC2D``: one FMA a weight into a tile of sums, reduced across the threads once after the
    loop) or its row sums."""
    if ACC2D:
        sums = products
    else:
        sums = tl.sum(products, axis=1)
    return sums


@triton.jit
def _gemv_byte_kernel(
    x_ptr,  # [K] activations, or [2K] gate and up halves (GATED)
    w_ptr,  # uint8 view of int8 or fp8 e4m3 [N, K]
    s_ptr,  # fp32 [N] per-channel scales
    out_ptr,  # [N] in x's dtype
    ws_ptr,  # fp32 [SPLIT, N] partial sums (when SPLIT > 1)
    count_ptr,  # int32 [N / BLOCK_N] zeros: programs arrived per row block (when SPLIT > 1)
    N, K, k_per_split,
    FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, GATED: tl.constexpr,
    PDL: tl.constexpr, ASM: tl.constexpr, ACC2D: tl.constexpr,  # PRMT bytes (int8), a 2-D tile of sums
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    k_lo = tl.program_id(1) * k_per_split
    tiles = w_ptr + rows[:, None] * K + cols[None, :]
    w = tl.load(tiles + k_lo)  # the first tile before the wait: weights do not depend on earlier kernels
    if PDL:  # the next kernel's programs may take the SM slots this one's leave (docs/quantization.md)
        gdc_launch_dependents()
    wait_for_prior(PDL)
    acc = _step_sums(_byte_floats(w, FP8, ASM) * _tile_x(x_ptr, k_lo + cols, rows, K, GATED, BLOCK_N, BLOCK_K), ACC2D)
    for k0 in range(k_lo + BLOCK_K, k_lo + k_per_split, BLOCK_K):
        w = tl.load(tiles + k0)  # [BLOCK_N, BLOCK_K]
        acc += _step_sums(_byte_floats(w, FP8, ASM) * _tile_x(x_ptr, k0 + cols, rows, K, GATED, BLOCK_N, BLOCK_K), ACC2D)
    if ACC2D:
        acc = tl.sum(acc, axis=1)
    _store_rows(acc * tl.load(s_ptr + rows), rows, tl.program_id(0), tl.program_id(1), out_ptr, ws_ptr, count_ptr, N, SPLIT)


@triton.jit
def _x_columns(x_ptr, k0, K, KS: tl.constexpr, GATED: tl.constexpr):
    """Columns ``k0 .. k0 + KS`` of x in fp32 as eight ``[KS / 8]`` vectors: ``x_i[m] = x[k0 + 8 m + i]``."""
    x = tl.reshape(_x_floats(x_ptr, k0 + tl.arange(0, KS), K, GATED), [KS // 8, 2, 2, 2])
    even, odd = tl.split(x)  # bit 0 of i
    e0, e1 = tl.split(even)  # bit 1
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)  # bit 2
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _as_float(t, MASK: tl.constexpr, ASM: tl.constexpr):
    """``(t & MASK) | bits(1.0)`` as a float; one LOP3 with ``ASM`` (ptxas would split it in two)."""
    if ASM:
        if MASK == 0x000F0000:
            b = tl.inline_asm_elementwise("lop3.b32 $0, $1, 983040, 1065353216, 0xEA;", "=r,r", [t],
                                          dtype=tl.int32, is_pure=True, pack=1)
        elif MASK == 0x0000F000:
            b = tl.inline_asm_elementwise("lop3.b32 $0, $1, 61440, 1065353216, 0xEA;", "=r,r", [t],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            tl.static_assert(MASK == 0x00780000)
            b = tl.inline_asm_elementwise("lop3.b32 $0, $1, 7864320, 1065353216, 0xEA;", "=r,r", [t],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        b = (t & MASK) | 0x3F800000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_int4_kernel(
    x_ptr,  # [K] activations, or [2K] gate and up halves (GATED)
    w_ptr,  # int32 view of the uint8 [N, K / 2] nibbles: word m holds columns 8m..8m+7, column 8m + i in bits 4i..4i+3
    s_ptr,  # fp32 [N, NUM_GROUPS]
    z_ptr,  # fp32 [N, NUM_GROUPS] zeros, or a dummy
    out_ptr,  # [N] in x's dtype
    ws_ptr,  # fp32 [SPLIT, N] partial sums (when SPLIT > 1)
    count_ptr,  # int32 [NUM_BLOCKS] zeros: slices arrived per row block (when SPLIT > 1)
    N, stride_w, NUM_GROUPS, NUM_BLOCKS,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr,
    IN_PLACE: tl.constexpr, ASM: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):
    G: tl.constexpr = KS // GROUP  # groups per slice
    split = tl.program_id(1)
    k_lo = split * KS
    r = tl.arange(0, BLOCK_N)
    slice_words = w_ptr + k_lo // 8 + tl.arange(0, KS // 8)[None, :]
    w = tl.load(slice_words + (tl.program_id(0) * BLOCK_N + r).to(tl.int64)[:, None] * stride_w)
    if PDL:  # weights do not depend on earlier kernels: let the next one start loading its own
        gdc_launch_dependents()
    wait_for_prior(PDL)
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_columns(x_ptr, k_lo, stride_w * 8, KS, GATED)
    x_sum = tl.sum(tl.reshape(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), [G, GROUP // 8]), axis=1)
    if IN_PLACE:  # the floats 1 + u / 128 (bits 16-19) and 1 + u / 2048 (bits 12-15)
        x0, x2, x4, x6, x7 = x0 * 8.0, x2 * 8.0, x4 * 8.0, x6 * 8.0, x7 * 8.0
        x1, x3, x5 = x1 * 128.0, x3 * 128.0, x5 * 128.0
        x_scaled = tl.sum(tl.reshape(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), [G, GROUP // 8]), axis=1)
    else:
        x_scaled = x_sum
    # per group: sum((u - 8) s x) = s (16 sum(f x') - 16 sum(x') - 8 sum(x))
    offset = 16.0 * x_scaled + 8.0 * x_sum
    groups = k_lo // GROUP + tl.arange(0, G)
    num_progs = tl.num_programs(0)
    for block in range(tl.program_id(0), NUM_BLOCKS, num_progs):
        rows = (block * BLOCK_N + r).to(tl.int64)
        ahead = tl.minimum(block + num_progs, NUM_BLOCKS - 1)
        w_next = tl.load(slice_words + (ahead * BLOCK_N + r).to(tl.int64)[:, None] * stride_w)
        if IN_PLACE:
            w_l8 = w << 8
            w_r8 = w >> 8  # arithmetic shifts: the sign fills bits 24-31 only
            fx = _as_float(w, 0x000F0000, ASM) * x4[None, :]
            fx += _as_float(w, 0x0000F000, ASM) * x3[None, :]
            fx += _as_float(w_l8, 0x000F0000, ASM) * x2[None, :]
            fx += _as_float(w_l8, 0x0000F000, ASM) * x1[None, :]
            fx += _as_float(w << 16, 0x000F0000, ASM) * x0[None, :]
            fx += _as_float(w_r8, 0x000F0000, ASM) * x6[None, :]
            fx += _as_float(w_r8, 0x0000F000, ASM) * x5[None, :]
            fx += _as_float(w >> 12, 0x000F0000, ASM) * x7[None, :]
        else:  # nibble i to bits 19-22
            fx = _as_float(w << 19, 0x00780000, ASM) * x0[None, :]
            fx += _as_float(w << 15, 0x00780000, ASM) * x1[None, :]
            fx += _as_float(w << 11, 0x00780000, ASM) * x2[None, :]
            fx += _as_float(w << 7, 0x00780000, ASM) * x3[None, :]
            fx += _as_float(w << 3, 0x00780000, ASM) * x4[None, :]
            fx += _as_float(w >> 1, 0x00780000, ASM) * x5[None, :]
            fx += _as_float(w >> 5, 0x00780000, ASM) * x6[None, :]
            fx += _as_float(w >> 9, 0x00780000, ASM) * x7[None, :]
        fx_groups = tl.sum(tl.reshape(fx, [BLOCK_N, G, GROUP // 8]), axis=2)
        g_off = rows[:, None] * NUM_GROUPS + groups[None, :]
        part = tl.load(s_ptr + g_off) * (16.0 * fx_groups - offset[None, :])
        if HAS_ZERO:
            part += tl.load(z_ptr + g_off) * x_sum[None, :]
        _store_rows(tl.sum(part, axis=1), rows, block, split, out_ptr, ws_ptr, count_ptr, N, SPLIT)
        w = w_next


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int  # columns per step (byte formats) or per K slice (int4)
    split_k: int  # K slices: K / block_k for int4
    num_warps: int
    num_stages: int
    programs: int = 0  # int4: programs per K slice, each walking every programs-th row block (0: one per block)


FMT_INT8, FMT_INT4, FMT_FP8 = 0, 1, 2  # weight formats (``quant_gemm`` adds its dense one)
LONG_ROW = 8192  # K from which byte rows are split over several programs
BYTE_TILE_SUMS_MAX_N = 8192  # byte products up to this N (unsplit) keep a 2-D tile of sums (docs/benchmarks.md)
INT4_SLICE, INT4_ROWS = 1024, 32  # int4: the widest K slice, rows per block
INT4_MAX_SPLIT = 64  # int4: K slices at most (the last to arrive adds them all)
WIDE = 16384  # int8 / fp8 products at least this wide (gate/up, LM heads) stream in 4 warps, fp8 in 32-row tiles


def gemv_config(n: int, k: int, fmt: int, group: int, device: torch.device | None = None) -> GemvConfig | None:
    """The fixed tile for one shape and format (0 int8, 1 int4, 2 fp8), or None when the tiles do
    not divide it. Chosen on an H200 by batch-1 decode of Llama-3.1-8B (docs/quantization.md): int8
    / fp8 stream 16 rows x 512 columns per step (int8: 1024 where N <= 4096, on an H100,
    docs/benchmarks.md; from N = 16384 in 4 warps, fp8 in 32 rows, on an H100 by ``bench gemv``).
    Long rows (K >= LONG_ROW) take 32 x 256 tiles in 4 warps and are split until there are four
    programs per SM (8 slices at most): splitting took fp8 from 317 to 335 tok/s against no split
    on an H200 (with 64-row tiles then, two programs per SM), and the narrower tiles gave int8 / fp8
    another 0.8% / 0.4% on an H100 (docs/benchmarks.md). int4 (chosen on an H100 by a sweep over
    Llama-3.1-8B's products, docs/quantization.md) slices K by 1024 columns (or the widest power of
    two that divides K and holds whole groups), takes 32-row blocks (16 or 8 where 32 does not
    divide N) with 32 words per thread, and runs four programs per SM over all slices."""
    if fmt == FMT_INT4:
        if group < 8 or group & (group - 1):
            return None
        ks = next((c for c in (1024, 512, 256, 128, 64, 32, 16, 8) if group <= c <= INT4_SLICE and k % c == 0), 0)
        block_n = next((r for r in (INT4_ROWS, 16, 8) if n % r == 0), 0)
        if not ks or not block_n or k // ks > INT4_MAX_SPLIT:
            return None
        split = k // ks
        programs = max(1, min(n // block_n, 4 * num_sms(device) // split))
        return GemvConfig(block_n, ks, split, min(4, max(1, block_n * ks // 8192)), 1, programs)
    split = 1
    if k >= LONG_ROW:
        block_n, block_k, warps = 32, 256, 4
        while split < 8 and n // block_n * split < 4 * num_sms(device) and k % (2 * split * block_k) == 0:
            split *= 2
    else:
        wide = n >= WIDE
        block_n = 32 if wide and fmt == FMT_FP8 and n % 32 == 0 else 16
        block_k = 1024 if fmt == FMT_INT8 and n <= 4096 and k % 1024 == 0 else 512
        warps = 4 if wide else 8
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
    gated: bool = False,
) -> torch.Tensor | None:
    """``x @ dequant(w)^T`` -> [1, N] in x's dtype, or None when this shape needs the flat GEMM.
    ``fmt`` as in ``quant_gemm``: 0 int8, 1 int4, 2 fp8. ``gated``: x is ``[1, 2K]``, the gate and
    up halves, and the product is ``silu_and_mul(x) @ dequant(w)^T`` with the gating done as x is
    read (one launch less per MLP; the result equals the two calls' bit for bit)."""
    k = x.shape[1] // 2 if gated else x.shape[1]
    n = w.shape[0]
    if gated and x.shape[1] != 2 * k:
        raise ValueError(f"a gated GEMV takes [1, 2K] gate and up halves, got {x.shape[1]} columns")
    cfg = config or gemv_config(n, k, fmt, group, x.device)
    if cfg is None:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    split = cfg.split_k
    blocks = n // cfg.block_n
    ws = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else out
    count = arrival_counters(x.device, blocks) if split > 1 else out
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_args(x.device))
    if fmt == FMT_INT4:
        if split * cfg.block_k != k or cfg.programs > blocks:
            raise ValueError(f"int4 GEMV config {cfg} does not fit N = {n}, K = {k}: split_k * block_k must be K "
                             f"and programs at most N / block_n = {blocks}")
        _gemv_int4_kernel[(cfg.programs or blocks, split)](
            x, w.view(torch.int32), scales, zeros if zeros is not None else scales, out, ws, count,
            n, k // 8, k // group, blocks, GROUP=group, HAS_ZERO=zeros is not None, BLOCK_N=cfg.block_n,
            KS=cfg.block_k, SPLIT=split, IN_PLACE=x.element_size() == 2, ASM=not is_interpreter(), GATED=gated,
            **launch,
        )
    else:
        tile_sums = n <= BYTE_TILE_SUMS_MAX_N and split == 1
        _gemv_byte_kernel[(blocks, split)](
            x, w.view(torch.uint8), scales, out, ws, count, n, k, k // split,
            FP8=fmt == FMT_FP8, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split, GATED=gated,
            ASM=tile_sums and not is_interpreter(), ACC2D=tile_sums, **launch,
        )
    return out.view(1, n)
