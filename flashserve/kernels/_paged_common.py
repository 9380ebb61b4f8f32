"""Triton building blocks shared by the paged prefill and decode attention kernels.

Scores are kept in the log2 domain: ``s = (q . k) * scale * log2(e)``, so ``exp2`` replaces
``exp`` and every log-sum-exp these kernels write is a base-2 LSE. The scale is folded into
the exponent's fused multiply-add (``exp2(qk * qk_scale - m)``), never applied to the tile
separately.

Key/value tiles can be addressed page by page when the tile is a whole number of KV-cache
blocks (``PAGED``): the block-table entry is read once per page, and the ``BLOCK_SIZE``
tokens of a page are contiguous rows. Otherwise every key position reads its own table entry
(an L1 hit for all but the first token of a page). Measured on an H200: the page-wise form
WITHOUT an alignment hint was 1.5-2x slower (the reshape hides the 16-byte alignment, so the
K/V loads became 2-byte loads); with ``tl.multiple_of`` it is the fastest decode variant
(+7% at 64x4096) and about even with the per-token form in prefill.

8-bit caches (``QUANT``; layout in ``flashserve.kernels.kv_quant``): K/V tiles are loaded as
int8 / fp8 and converted in registers, exactly, to the matmul operand dtype; the per-key fp16
scales are applied to the [BLOCK_M, BLOCK_N] score and probability tiles, never to the K/V
tiles: ``q . (s_k k) = s_k (q . k)`` and ``sum_n p_n s_v,n v_n = (p * s_v) @ v``. Operands are
fp32 for fp32 queries and fp16 for 16-bit ones (``KV_FP16``): on Hopper e4m3 -> fp16 is one
``cvt`` per two values, e4m3 -> bf16 three, and the decode kernel must convert as fast as it
reads. A bf16 query is clamped to fp16's range once per program (fp16 also has the finer
mantissa); ``p * s_v`` is clamped likewise, except under the unified max, where P can reach
2^60 and the P @ V operands are bf16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels.kv_quant import is_quantized, kv_scales

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) well defined (= 1)
# for padded rows whose scores are all -inf.
NEG_BIG = tl.constexpr(-1.0e30)


def load_align(cache: torch.Tensor) -> int:
    """Elements per 16-byte vector for the alignment hint (8 for 16-bit caches, 16 for 8-bit)."""
    return 16 if cache.element_size() == 1 else 8


def paged_loads_ok(block_n: int, block_size: int, cache: torch.Tensor) -> bool:
    """Whether a BLOCK_N-key tile can be addressed page by page (host-side check). The
    page-wise offsets go through ``tl.reshape``, which loses the compiler's divisibility
    facts; the kernel restores them with ``tl.multiple_of(off, load_align(cache))``, so every
    cache stride must be a multiple of that many elements (16-byte vector loads)."""
    pow2 = block_size > 0 and block_size & (block_size - 1) == 0
    align = load_align(cache)
    aligned = all(st % align == 0 for st in cache.stride()[:3]) and cache.data_ptr() % 16 == 0
    return pow2 and block_n % block_size == 0 and aligned


@triton.jit
def kv_tile_offsets(
    bt_row_ptr,  # pointer to this sequence's block-table row ([max_blocks] int32)
    start_n,  # first key position of the tile (a multiple of BLOCK_SIZE when PAGED)
    kv_end,  # keys >= kv_end do not exist (their table entries are not read)
    kvh,  # kv head index
    stride_cb, stride_co, stride_ch,  # cache strides: block, offset-in-block, head
    stride_sb, stride_sh,  # scale strides (8-bit caches): block, head; offset stride 1
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (tokens per block)
    PAGED: tl.constexpr,  # BLOCK_N % BLOCK_SIZE == 0 and BLOCK_SIZE a power of two
    ALIGN: tl.constexpr,  # elements per 16 bytes (PAGED alignment hint)
):
    """Element offsets (int64, [BLOCK_N]) of key positions start_n + [0, BLOCK_N) in the
    paged cache: position j lives in block table[j // BLOCK_SIZE] at offset j % BLOCK_SIZE;
    and the offsets of their scales (meaningful for 8-bit caches only; unused ones are
    dead code)."""
    if PAGED:
        page = start_n // BLOCK_SIZE + tl.arange(0, BLOCK_N // BLOCK_SIZE)  # [PAGES]
        blk = tl.load(bt_row_ptr + page, mask=page * BLOCK_SIZE < kv_end, other=0).to(tl.int64)
        in_page = tl.arange(0, BLOCK_SIZE).to(tl.int64)  # [BLOCK_SIZE]
        off = tl.multiple_of(tl.reshape(blk[:, None] * stride_cb + (in_page * stride_co)[None, :], [BLOCK_N]), ALIGN)
        s_off = tl.reshape(blk[:, None] * stride_sb + in_page[None, :], [BLOCK_N])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=offs_n < kv_end, other=0).to(tl.int64)
        in_blk = (offs_n % BLOCK_SIZE).to(tl.int64)
        off = blk * stride_cb + in_blk * stride_co
        s_off = blk * stride_sb + in_blk
    return off + kvh * stride_ch, s_off + kvh * stride_sh


@triton.jit
def load_kv_tile(
    base_ptr, kv_off, offs_d,  # [BLOCK_N] int64 row offsets, [BLOCK_D] feature index
    n_ok, d_mask,  # [BLOCK_N] keys that exist, [BLOCK_D] features < head_dim
    stride_cd,
    MASK_N: tl.constexpr,  # tile may contain non-existent keys
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no feature mask
):
    """A [BLOCK_N, BLOCK_D] K or V tile (0 where masked). Unmasked loads when the tile is
    known full so that the copies are plain 16-byte vector loads."""
    ptrs = base_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd
    if MASK_N:
        if EVEN_D:
            x = tl.load(ptrs, mask=n_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=n_ok[:, None] & d_mask[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return x


@triton.jit
def load_q_rows(
    q_ptr, tok_start, qi, g, row_valid, kvh, offs_d, d_mask,
    stride_qt, stride_qh, stride_qd,
    GROUP: tl.constexpr,
):
    """Query tile [BLOCK_M, BLOCK_D]: row r holds query token ``qi[r]`` of head
    ``kvh * GROUP + g[r]`` (the heads of one KV group are packed into the M dimension)."""
    tok = (tok_start + qi).to(tl.int64)
    head = (kvh * GROUP + g).to(tl.int64)
    ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    return tl.load(ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def load_scales(s_ptr, s_off, n_ok, MASK_N: tl.constexpr):
    """fp32 [BLOCK_N] per-key scales of an 8-bit K or V tile (0 for keys that do not exist)."""
    if MASK_N:
        s = tl.load(s_ptr + s_off, mask=n_ok, other=0.0)
    else:
        s = tl.load(s_ptr + s_off)
    return s.to(tl.float32)


@triton.jit
def quant_query(q, QUANT: tl.constexpr, KV_FP16: tl.constexpr):
    """The query tile as the operand of an 8-bit cache's scores (fp16 for 16-bit queries)."""
    if QUANT and KV_FP16:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


@triton.jit
def p_times_v(
    p,  # [BLOCK_M, BLOCK_N] fp32 probabilities (unnormalised)
    v,  # [BLOCK_N, BLOCK_D] V tile as loaded (8-bit when QUANT)
    vs_ptr, s_off, n_ok,
    MASK: tl.constexpr, QUANT: tl.constexpr, KV_FP16: tl.constexpr, MODE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """P @ V [BLOCK_M, BLOCK_D] fp32; for an 8-bit V tile the scales go into P's columns."""
    if QUANT:
        pw = p * load_scales(vs_ptr, s_off, n_ok, MASK)[None, :]
        if not KV_FP16:
            out = tl.dot(pw, v.to(tl.float32), input_precision=DOT_PREC)
        elif MODE == 1:  # unified max: P up to 2^HI_MARGIN, beyond fp16
            out = tl.dot(pw.to(tl.bfloat16), v.to(tl.bfloat16), input_precision=DOT_PREC)
        else:  # P <= 1
            out = tl.dot(tl.minimum(pw, 65504.0).to(tl.float16), v.to(tl.float16), input_precision=DOT_PREC)
    else:
        out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return out


@triton.jit
def attend_tile(
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32
    q,  # [BLOCK_M, BLOCK_D]
    k_cache_ptr, v_cache_ptr, bt_row_ptr,
    ks_ptr, vs_ptr,  # QUANT: fp16 scales [num_blocks, Hkv, BLOCK_SIZE] (else unused)
    start_n, kv_end,  # this tile's first key position; keys >= kv_end do not exist
    q_pos,  # [BLOCK_M] absolute position of each query row (causal limit)
    win_len, dil, n_sink,  # WINDOW: key k is seen when p - k < win_len with (p - k) % dil == 0, or k < n_sink
    qk_scale,  # scale * log2(e)
    phi,  # unified max, log2 units (MODE 1 only)
    kvh, offs_d, d_mask,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_sb, stride_sh,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr,  # apply causal + bounds masks (False: tile fully visible to all rows)
    WINDOW: tl.constexpr,  # MASK also applies the sliding window (+ dilation, sinks)
    PAGED: tl.constexpr, EVEN_D: tl.constexpr,
    MODE: tl.constexpr,  # 0/2: online softmax; 1: unified max phi (no rescaling)
    DOT_PREC: tl.constexpr,
    QUANT: tl.constexpr,  # 8-bit cache with per-(token, head) scales; q from quant_query
    KV_FP16: tl.constexpr,  # QUANT: fp16 operands (16-bit queries), else fp32
    ALIGN: tl.constexpr,
):
    """One FlashAttention-2 step over keys [start_n, start_n + BLOCK_N): scores, online
    softmax update (or FlashDecoding++'s unified max), P @ V. A row that sees no key of the tile
    keeps its state (its probabilities are exp2(-inf) = 0 against a finite running max).

    Online: m_i is the running max and acc/l_i are relative to it. Unified (MODE 1): acc/l_i
    are relative to phi and m_i only records the observed max (for the overflow check)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_end
    kv_off, s_off = kv_tile_offsets(bt_row_ptr, start_n, kv_end, kvh, stride_cb, stride_co, stride_ch,
                                    stride_sb, stride_sh, BLOCK_N, BLOCK_SIZE, PAGED, ALIGN)
    k = load_kv_tile(k_cache_ptr, kv_off, offs_d, n_ok, d_mask, stride_cd, MASK, EVEN_D)  # [BLOCK_N, BLOCK_D]
    if QUANT:
        k = k.to(q.dtype)  # exact: int8 and e4m3 values fit fp16 and fp32
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] unscaled
    if QUANT:
        qk = qk * load_scales(ks_ptr, s_off, n_ok, MASK)[None, :]
    if MASK:
        dist = q_pos[:, None] - offs_n[None, :]  # [BLOCK_M, BLOCK_N]
        visible = (dist >= 0) & n_ok[None, :]
        if WINDOW:
            in_window = (dist < win_len) & (dist % dil == 0)
            visible = visible & (in_window | (offs_n < n_sink)[None, :])
        qk = tl.where(visible, qk, float("-inf"))
    v = load_kv_tile(v_cache_ptr, kv_off, offs_d, n_ok, d_mask, stride_cd, MASK, EVEN_D)  # [BLOCK_N, BLOCK_D]
    if MODE == 1:
        m_i = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - phi)
        l_i += tl.sum(p, 1)
        acc += p_times_v(p, v, vs_ptr, s_off, n_ok, MASK, QUANT, KV_FP16, MODE, DOT_PREC)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + p_times_v(p, v, vs_ptr, s_off, n_ok, MASK, QUANT, KV_FP16, MODE, DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def window_tiles(
    p_first, p_last,  # positions of the program's first and last query rows
    win, dil, n_sink,
    BLOCK_N: tl.constexpr,
):
    """Key tiles a block of windowed queries needs: the sink tiles [0, sink_tiles_end) and the
    window tiles from ``win_start`` on (no tile twice); and the tile-aligned range
    [full_lo, full_hi) of window tiles every row sees whole (empty with dilation)."""
    span = (win - 1) * dil + 1
    lo = tl.maximum(p_first - span + 1, 0)  # oldest key the first row sees in its window
    sink_tiles_end = tl.cdiv(tl.minimum(n_sink, lo), BLOCK_N) * BLOCK_N
    win_start = tl.maximum((lo // BLOCK_N) * BLOCK_N, sink_tiles_end)
    full_lo = tl.cdiv(tl.maximum(p_last - span + 1, 0), BLOCK_N) * BLOCK_N
    full_hi = ((p_first + 1) // BLOCK_N) * BLOCK_N
    full_hi = tl.where(dil == 1, full_hi, 0)
    return sink_tiles_end, win_start, full_lo, full_hi


@triton.jit
def split_range(n_virtual, split, num_splits, BLOCK_N: tl.constexpr):
    """Slice ``split`` of ``[0, n_virtual)`` cut into ``num_splits`` equal tile-aligned slices
    (split-KV decode and tree kernels): its (start, end); empty past the last key."""
    chunk = tl.cdiv(tl.cdiv(n_virtual, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, n_virtual)


class QuantArgs(NamedTuple):
    """Kernel arguments describing the cache's element format (see ``quant_args``)."""

    k_scales: torch.Tensor  # fp16 [num_blocks, Hkv, block_size] (the cache itself when unused)
    v_scales: torch.Tensor
    stride_sb: int
    stride_sh: int
    quant: bool
    kv_fp16: bool  # fp16 matmul operands (16-bit queries), else fp32
    align: int


def quant_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> QuantArgs:
    """Scale views and flags for an 8-bit cache; dummies (cache pointers, zero strides) otherwise."""
    align = load_align(k_cache)
    if not is_quantized(k_cache):
        assert k_cache.dtype == v_cache.dtype
        return QuantArgs(k_cache, v_cache, 0, 0, False, False, align)
    ks, vs = kv_scales(k_cache), kv_scales(v_cache)
    assert v_cache.dtype == k_cache.dtype and ks.stride() == vs.stride() and ks.stride(2) == 1
    return QuantArgs(ks, vs, ks.stride(0), ks.stride(1), True, q.dtype != torch.float32, align)
