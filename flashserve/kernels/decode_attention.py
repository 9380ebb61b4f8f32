"""Paged decode attention, FlashDecoding style (split-KV + reduction).

Stage 1 (``_decode_split_kernel``), grid ``(num_seqs, num_kv_heads, num_splits)``: each program
takes one sequence, one KV group and one contiguous slice of the context, and writes for every
(query token, head) row a partial output ``o_s`` (normalised within the slice) and the slice's
base-2 log-sum-exp ``lse_s``. The GROUP query heads of a KV group (times the sequence's query
tokens) form the M dimension of ``tl.dot`` (padded to >= 16), so each K/V tile is loaded once
for the whole group.

Stage 2 (``_decode_reduce_kernel``), grid ``(T, Hq)``: ``o = sum_s 2^(lse_s - M) o_s /
sum_s 2^(lse_s - M)`` with ``M = max_s lse_s``. With a single split (large batches already fill
the machine) stage 1 writes the final output directly and stage 2 is not launched.

Within a slice, whole key tiles that every query row sees run without masks (plain vector
loads, no causal ``where``); only the slice's ragged end and, for several query tokens, the
causal diagonal take the masked path.

Several query tokens per sequence (speculative verification, small chunks) are handled IN the
decode kernel: token i of a sequence with q_len new tokens sits at position
seq_len - q_len + i and is causally masked against the others. The launcher takes the padded
query count ``BLOCK_Q = next_pow2(max_query_len)`` from the host; ``TritonAttentionBackend``
routes batches with larger query lengths to the prefill kernel.

Slice length: ``chunk = cdiv(cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N`` is computed per
sequence inside the kernel, so the grid depends only on host numbers (num_seqs, num_splits) and
is CUDA-graph safe; splits past a short sequence's end write ``lse = -inf`` and are ignored.

Asynchronised softmax with a unified max (FlashDecoding++): with ``unified_max=phi`` the split
kernel uses the fixed value phi (natural-log units of ``scale * q.k``) in place of the running
max, so no rescaling happens inside a split; the reduction is unchanged since each slice still
reports ``lse_s = phi*log2(e) + log2(l_s)``. If a row's scores in a slice rise more than
HI_MARGIN (log2 units) above phi (risk of overflow in the P @ V operand) or all stay more than
LO_MARGIN below it (underflow), the program raises a per-(seq, kv head, split) flag; a second
launch of the split kernel in FALLBACK mode recomputes exactly the flagged programs with the
synchronous online softmax (unflagged programs exit immediately). No host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels._paged_common import (
    LOG2E, NEG_BIG, attend_tile, load_q_rows, paged_loads_ok, quant_args, quant_query, split_range, window_tiles,
)
from flashserve.kernels.utils import cdiv, dot_ieee, is_interpreter, next_power_of_2, num_sms

MODE_ONLINE = 0  # synchronous online softmax
MODE_UNIFIED = 1  # asynchronised softmax with unified max phi, flags risky programs
MODE_FALLBACK = 2  # online softmax, only for programs flagged by MODE_UNIFIED

# Largest M (= BLOCK_Q * GROUP_PAD) the decode kernel accepts; beyond it use the prefill kernel.
MAX_DECODE_ROWS = 128
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    ks_ptr, vs_ptr,  # QUANT: fp16 scales [num_blocks, Hkv, BLOCK_SIZE]
    mid_o_ptr,  # [T, Hq, num_splits, D] fp32 partial outputs; or o [T, Hq, D] (DIRECT_OUT)
    mid_lse_ptr,  # [T, Hq, num_splits] fp32 partial base-2 LSEs (unused with DIRECT_OUT)
    flag_ptr,  # [B, Hkv, num_splits] int32 fallback flags (unified-max modes only)
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale,  # scale * log2(e)
    phi,  # unified max in log2 units (MODE_UNIFIED)
    win, dil, n_sink,  # WINDOW: sliding window (tokens), dilation, sink tokens
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_sb, stride_sh,
    stride_bt, stride_bth,  # block table: sequence, KV head (0: one table per sequence)
    stride_mot, stride_moh, stride_mos,  # with DIRECT_OUT: o's token / head / feature strides
    stride_mlt, stride_mlh,
    head_dim, num_kv_heads, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= BLOCK_Q * GROUP_PAD, >= 16
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr, EVEN_D: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output, no reduction pass
    DOT_PREC: tl.constexpr,
    QUANT: tl.constexpr, KV_FP16: tl.constexpr, ALIGN: tl.constexpr,
    MODE: tl.constexpr,
    HI_MARGIN: tl.constexpr, LO_MARGIN: tl.constexpr,
    WINDOW: tl.constexpr,  # sliding window (+ dilation, sinks): visit only the tiles it reaches
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    flag_off = (b * num_kv_heads + kvh) * num_splits + split
    if MODE == 2:
        if tl.load(flag_ptr + flag_off) == 0:
            return
    tok_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - tok_start
    if q_len <= 0:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len
    # Keys are visited in a virtual order that the splits cut into equal slices: all of them, or
    # with a window the sink tiles [0, sink_end) followed by the window tiles [win_start, seq_len).
    sink_end = 0
    win_start = 0
    full_lo = 0
    full_hi = 0
    if WINDOW:
        sink_end, win_start, full_lo, full_hi = window_tiles(ctx_len, seq_len - 1, win, dil, n_sink, BLOCK_N)
    n_virtual = sink_end + tl.maximum(seq_len - win_start, 0)
    n_start, n_end = split_range(n_virtual, split, num_splits, BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    qi = offs_m // GROUP_PAD  # [BLOCK_M] query token within the sequence's new tokens
    g = offs_m % GROUP_PAD  # [BLOCK_M] head within the KV group
    row_valid = (qi < q_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = load_q_rows(q_ptr, tok_start, qi, g, row_valid, kvh, offs_d, d_mask,
                    stride_qt, stride_qh, stride_qd, GROUP)  # [BLOCK_M, BLOCK_D]
    q = quant_query(q, QUANT, KV_FP16)
    q_pos = ctx_len + qi  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)  # running max (online) / observed max (unified)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt + kvh * stride_bth
    win_len = win * dil

    if WINDOW:
        for v in range(n_start, n_end, BLOCK_N):
            start_n = tl.where(v < sink_end, v, win_start + (v - sink_end))
            if (start_n >= full_lo) & (start_n + BLOCK_N <= full_hi):
                acc, m_i, l_i = attend_tile(
                    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, seq_len, q_pos,
                    win_len, dil, n_sink, qk_scale, phi,
                    kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                    BLOCK_N, BLOCK_SIZE, False, False, PAGED, EVEN_D, MODE, DOT_PREC, QUANT, KV_FP16, ALIGN)
            else:
                acc, m_i, l_i = attend_tile(
                    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, seq_len, q_pos,
                    win_len, dil, n_sink, qk_scale, phi,
                    kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                    BLOCK_N, BLOCK_SIZE, True, True, PAGED, EVEN_D, MODE, DOT_PREC, QUANT, KV_FP16, ALIGN)
    else:
        # Keys <= ctx_len are visible to every query row: whole tiles of them need no mask.
        n_full = tl.maximum(tl.minimum(n_end, ctx_len + 1) - n_start, 0)
        full_end = n_start + (n_full // BLOCK_N) * BLOCK_N
        for start_n in range(n_start, full_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, n_end, q_pos,
                win_len, dil, n_sink, qk_scale, phi,
                kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                BLOCK_N, BLOCK_SIZE, False, False, PAGED, EVEN_D, MODE, DOT_PREC, QUANT, KV_FP16, ALIGN)
        for start_n in range(full_end, n_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, n_end, q_pos,
                win_len, dil, n_sink, qk_scale, phi,
                kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                BLOCK_N, BLOCK_SIZE, True, False, PAGED, EVEN_D, MODE, DOT_PREC, QUANT, KV_FP16, ALIGN)

    if MODE == 1:
        seen = row_valid & (m_i > NEG_BIG)  # rows with at least one visible key in this slice
        risky = seen & ((m_i > phi + HI_MARGIN) | (m_i < phi - LO_MARGIN))
        tl.store(flag_ptr + flag_off, tl.max(risky.to(tl.int32), 0))
        base = phi
    else:
        base = m_i
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]

    tok = (tok_start + qi).to(tl.int64)
    head = (kvh * GROUP + g).to(tl.int64)
    if DIRECT_OUT:
        o_ptrs = (mid_o_ptr + tok[:, None] * stride_mot + head[:, None] * stride_moh
                  + offs_d[None, :] * stride_mos)
        tl.store(o_ptrs, out.to(mid_o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    else:
        lse = tl.where(l_i > 0.0, base + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        mo_ptrs = (mid_o_ptr + tok[:, None] * stride_mot + head[:, None] * stride_moh
                   + split * stride_mos + offs_d[None, :])
        tl.store(mo_ptrs, out, mask=row_valid[:, None] & d_mask[None, :])
        tl.store(mid_lse_ptr + tok * stride_mlt + head * stride_mlh + split, lse, mask=row_valid)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,  # [T, Hq, num_splits, D] fp32
    mid_lse_ptr,  # [T, Hq, num_splits] fp32
    o_ptr,  # [T, Hq, D]
    stride_mot, stride_moh, stride_mos,
    stride_mlt, stride_mlh,
    stride_ot, stride_oh, stride_od,
    head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    lse = tl.load(mid_lse_ptr + t * stride_mlt + h * stride_mlh + offs_s, mask=s_mask,
                  other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [BLOCK_S], 0 for empty slices
    live = s_mask & (w > 0.0)
    parts = tl.load(mid_o_ptr + t * stride_mot + h * stride_moh + offs_s[:, None] * stride_mos
                    + offs_d[None, :], mask=live[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=d_mask)


def reduce_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> None:
    """``out [T, Hq, D]`` from the slices' normalised partial outputs ``mid_o [T, Hq, S, D]``
    (fp32) and base-2 log-sum-exps ``mid_lse [T, Hq, S]`` (-inf for a slice that saw no key)."""
    num_tokens, num_heads, num_splits, head_dim = mid_o.shape
    block_d = max(16, next_power_of_2(head_dim))
    _decode_reduce_kernel[(num_tokens, num_heads)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        head_dim, num_splits,
        BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d,
        num_warps=4 if block_d >= 128 else 1, **pdl.launch_args(out.device, early=True),
    )


class DecodeConfig(NamedTuple):
    """Launch parameters of the split kernel."""

    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    paged: bool = False  # page-wise K/V addressing (see _paged_common; slower on H200)


def decode_config(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """Fixed per-(head_dim, dtype, cache dtype) configuration (no autotuning: nothing is
    benchmarked during CUDA-graph capture). Tuned on an H200 (bf16, Hq32/Hkv8, d128, block 16);
    the 8-bit-cache entry is a first guess with the same bytes per tile as bf16 (128 keys of
    1 byte; ``flashserve bench kernels --kv-decode-configs`` compares alternatives)."""
    if is_interpreter():
        return DecodeConfig(16, 4, 1)
    if next_power_of_2(head_dim) >= 256 or dtype == torch.float32:
        return DecodeConfig(32, 4, 2)
    if kv_dtype is not None and kv_dtype.itemsize == 1:
        return DecodeConfig(128, 4, 3, paged=True)
    # Page-wise addressing (with the alignment hint): 4.06 vs 3.77 TB/s at 64x4096 on the H200.
    return DecodeConfig(64, 4, 3, paged=True)


def decode_block_n(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> int:
    return decode_config(head_dim, dtype, kv_dtype).block_n


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    sm_count: int,
    block_n: int = 64,
    min_blocks_per_split: int = 4,
    waves: int = 4,
    max_splits: int = MAX_SPLITS,
) -> int:
    """How many KV slices each (sequence, KV head) gets (FlashDecoding++-style heuristic).

    Aim for about ``waves * sm_count`` split programs (several resident per SM, so the
    machine is filled even for batch 1), but never slices shorter than
    ``min_blocks_per_split * block_n`` tokens (each program would then be dominated by its
    fixed cost and the reduction) and never more than ``max_splits``. Rounded down to a power
    of two so that nearby shapes share compiled grids and CUDA graphs.
    """
    base = max(1, num_seqs * num_kv_heads)
    want = cdiv(waves * sm_count, base)
    by_len = max(1, max_seq_len // (min_blocks_per_split * block_n))
    n = max(1, min(want, by_len, max_splits))
    return 1 << (n.bit_length() - 1)


def _margins(dtype: torch.dtype) -> tuple[float, float]:
    """(HI, LO) safety margins in log2 units around phi for the unified-max path.
    fp16: P is cast to fp16 for P @ V (max 65504 = 2^16, min normal 2^-14).
    bf16/fp32: fp32 exponent range; keep acc well inside it."""
    if dtype == torch.float16:
        return 15.0, 10.0
    return 60.0, 60.0


def paged_decode_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32, or [B, Hkv, max_blocks]: one per KV head
    max_query_len: int,  # host int: largest new-token count of any sequence (1 for decode)
    max_seq_len: int,  # host int: largest context (or a cap: it only sizes num_splits)
    scale: float,
    num_splits: int | None = None,  # None: choose_num_splits(...)
    unified_max: float | None = None,  # phi for the asynchronised softmax; None: online softmax
    out: torch.Tensor | None = None,  # [T, Hq, D]
    return_fallback_flags: bool = False,
    config: DecodeConfig | None = None,  # None: decode_config(...) (benchmarks compare others)
    window: int | None = None,  # sliding window (tokens seen, itself included); None: full attention
    dilation: int = 1,
    num_sinks: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Split-KV attention for sequences with few new tokens each (decode / spec verify).
    The cache may be 8-bit (``flashserve.kernels.kv_quant``): dequantized in registers. With a
    ``window`` the splits share only the tiles the window (and the sinks) reach.

    Returns ``out`` [T, Hq, D]; with ``return_fallback_flags`` also the int32 flags
    [B, Hkv, num_splits] raised by the unified-max path (None without ``unified_max``).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and block_tables.stride(-1) == 1
    stride_bth = block_tables.stride(1) if block_tables.dim() == 3 else 0
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_q = next_power_of_2(max(1, max_query_len))
    block_m = max(16, block_q * group_pad)
    if block_q * group_pad > MAX_DECODE_ROWS:
        raise ValueError(f"decode kernel: {max_query_len} query tokens x group {group} exceed "
                         f"{MAX_DECODE_ROWS} rows; use paged_prefill_attention")
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    cfg = config or decode_config(head_dim, q.dtype, k_cache.dtype)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(q.device), cfg.block_n)
    if num_tokens == 0 or num_seqs == 0:
        return (out, None) if return_fallback_flags else out
    block_d = max(16, next_power_of_2(head_dim))
    direct = num_splits == 1  # one slice per sequence: the split kernel writes `out` itself
    if direct:
        mid_o, mid_lse = out, out  # mid_lse: dummy pointer
        mo_strides = (out.stride(0), out.stride(1), out.stride(2))
    else:
        mid_o = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        mo_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2))
    use_unified = unified_max is not None
    flags = (torch.empty(num_seqs, num_kv_heads, num_splits, dtype=torch.int32, device=q.device)
             if use_unified else q)  # dummy pointer when unused
    hi, lo = _margins(q.dtype)
    qa = quant_args(q, k_cache, v_cache)
    grid = (num_seqs, num_kv_heads, num_splits)

    def launch(mode: int) -> None:
        _decode_split_kernel[grid](
            q, k_cache, v_cache, qa.k_scales, qa.v_scales, mid_o, mid_lse, flags,
            query_start_loc, seq_lens, block_tables,
            scale * LOG2E, float(unified_max or 0.0) * LOG2E,
            window or 1, dilation, num_sinks,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
            qa.stride_sb, qa.stride_sh,
            block_tables.stride(0), stride_bth,
            *mo_strides,
            mid_lse.stride(0), mid_lse.stride(1),
            head_dim, num_kv_heads, num_splits,
            GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m,
            BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_SIZE=block_size,
            PAGED=cfg.paged and paged_loads_ok(cfg.block_n, block_size, k_cache), EVEN_D=block_d == head_dim,
            DIRECT_OUT=direct,
            DOT_PREC="ieee" if dot_ieee(q.dtype) else "tf32",
            QUANT=qa.quant, KV_FP16=qa.kv_fp16, ALIGN=qa.align,
            MODE=mode, HI_MARGIN=hi, LO_MARGIN=lo, WINDOW=window is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_args(q.device, early=True),
        )

    if use_unified:
        launch(MODE_UNIFIED)
        launch(MODE_FALLBACK)
    else:
        launch(MODE_ONLINE)

    if not direct:
        reduce_splits(mid_o, mid_lse, out)
    if return_fallback_flags:
        return out, (flags if use_unified else None)
    return out
