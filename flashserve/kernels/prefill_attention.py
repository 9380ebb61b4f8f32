"""Paged prefill attention (FlashAttention-2 style) over packed variable-length sequences.

Each program owns a tile of BLOCK_Q consecutive new tokens of one sequence and ALL query heads
of one KV group (GQA packing: the GROUP heads are folded into the M dimension of the matmuls,
so every K/V tile read from the cache serves the whole group; MQA is GROUP = Hq). Keys and
values are gathered from the paged cache through the block table (per key position by
default; page by page with ``PrefillConfig.paged``), so a chunk of new tokens attends to the
already-cached context plus itself; ``store_kv`` must have run first.

Grid: (num_kv_heads, num_seqs, cdiv(max_query_len, BLOCK_Q)). Query tiles are visited in
reverse (the last tile, which has the most keys under the causal mask, is launched first) so
that the short tiles fill the tail of the last wave. Programs past their sequence's query
length exit at once. The key loop has an unmasked phase (keys before the tile's first query
position: no causal or bounds mask, plain vector loads) and a masked phase (the diagonal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels._paged_common import (
    LOG2E, NEG_BIG, attend_tile, load_q_rows, paged_loads_ok, quant_args, quant_query, window_tiles,
)
from flashserve.kernels.utils import dot_ieee, is_interpreter, next_power_of_2


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    ks_ptr, vs_ptr,  # QUANT: fp16 scales [num_blocks, Hkv, BLOCK_SIZE]
    o_ptr,  # [T, Hq, D]
    qsl_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    qk_scale,  # scale * log2(e)
    win, dil, n_sink,  # WINDOW: sliding window (tokens), dilation, sink tokens
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_sb, stride_sh,
    stride_bt,
    head_dim,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = BLOCK_Q * GROUP_PAD rows
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    QUANT: tl.constexpr, KV_FP16: tl.constexpr, ALIGN: tl.constexpr,
    WINDOW: tl.constexpr,  # sliding window (+ dilation, sinks): visit only the tiles it reaches
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    pid_q = tl.num_programs(2) - 1 - tl.program_id(2)  # heaviest (last) query tiles first
    tok_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - tok_start
    q_tile = pid_q * BLOCK_Q
    if q_tile >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    qi = q_tile + offs_m // GROUP_PAD  # [BLOCK_M] query index within the chunk
    g = offs_m % GROUP_PAD  # [BLOCK_M] head within the KV group
    row_valid = (qi < q_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = load_q_rows(q_ptr, tok_start, qi, g, row_valid, kvh, offs_d, d_mask,
                    stride_qt, stride_qh, stride_qd, GROUP)  # [BLOCK_M, BLOCK_D]
    q = quant_query(q, QUANT, KV_FP16)
    q_pos = ctx_len + qi  # [BLOCK_M] absolute positions

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    # One past the last key any row of the tile can see.
    kv_end = ctx_len + tl.minimum(q_tile + BLOCK_Q, q_len)
    win_len = win * dil
    if WINDOW:
        sink_end, win_start, full_lo, full_hi = window_tiles(ctx_len + q_tile, kv_end - 1, win, dil, n_sink,
                                                             BLOCK_N)
        for start_n in range(0, sink_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, kv_end, q_pos,
                win_len, dil, n_sink, qk_scale, 0.0,
                kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                BLOCK_N, BLOCK_SIZE, True, True, PAGED, EVEN_D, 0, DOT_PREC, QUANT, KV_FP16, ALIGN)
        for start_n in range(win_start, kv_end, BLOCK_N):
            if (start_n >= full_lo) & (start_n + BLOCK_N <= full_hi):
                acc, m_i, l_i = attend_tile(
                    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, kv_end, q_pos,
                    win_len, dil, n_sink, qk_scale, 0.0,
                    kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                    BLOCK_N, BLOCK_SIZE, False, False, PAGED, EVEN_D, 0, DOT_PREC, QUANT, KV_FP16, ALIGN)
            else:
                acc, m_i, l_i = attend_tile(
                    acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, kv_end, q_pos,
                    win_len, dil, n_sink, qk_scale, 0.0,
                    kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                    BLOCK_N, BLOCK_SIZE, True, True, PAGED, EVEN_D, 0, DOT_PREC, QUANT, KV_FP16, ALIGN)
    else:
        # Keys [0, full_end) are visible to every row of the tile: no mask needed.
        full_end = ((ctx_len + q_tile + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, kv_end, q_pos,
                win_len, dil, n_sink, qk_scale, 0.0,
                kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                BLOCK_N, BLOCK_SIZE, False, False, PAGED, EVEN_D, 0, DOT_PREC, QUANT, KV_FP16, ALIGN)
        for start_n in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = attend_tile(
                acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, ks_ptr, vs_ptr, start_n, kv_end, q_pos,
                win_len, dil, n_sink, qk_scale, 0.0,
                kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh,
                BLOCK_N, BLOCK_SIZE, True, False, PAGED, EVEN_D, 0, DOT_PREC, QUANT, KV_FP16, ALIGN)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tok = (tok_start + qi).to(tl.int64)
    head = (kvh * GROUP + g).to(tl.int64)
    o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


class PrefillConfig(NamedTuple):
    """Launch parameters of the prefill kernel."""

    block_m: int  # rows per program (query tokens x padded group)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    paged: bool = False  # page-wise K/V addressing (see _paged_common; slower on H200)


def prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Fixed per-(head_dim, dtype) configuration (no autotuning: safe under CUDA-graph capture
    and deterministic). Tuned on an H200 (bf16, Hq32/Hkv8, causal 2k/8k prompts)."""
    if is_interpreter():
        return PrefillConfig(16, 16, 4, 1)
    bd = next_power_of_2(head_dim)
    if dtype == torch.float32 or bd >= 256:
        return PrefillConfig(64, 32, 4, 2)
    if bd >= 128:
        # 256 rows = 64 query tokens x 4 heads (GQA 4): 1.05-1.11x over 128 rows on the H200.
        return PrefillConfig(256, 64, 8, 2)
    return PrefillConfig(128, 128, 4, 3)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    max_query_len: int,  # host int (grid size)
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
    window: int | None = None,  # sliding window (tokens seen, itself included); None: full attention
    dilation: int = 1,
    num_sinks: int = 0,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of every sequence's new tokens over its cached context plus itself,
    optionally within a sliding window (+ dilation, sinks; ``reference.window_mask``).
    The cache may be 8-bit (``flashserve.kernels.kv_quant``): dequantized in registers."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    cfg = prefill_config(head_dim, q.dtype)
    block_m = max(cfg.block_m, group_pad)
    block_q = block_m // group_pad
    block_d = max(16, next_power_of_2(head_dim))
    qa = quant_args(q, k_cache, v_cache)
    grid = (num_kv_heads, num_seqs, triton.cdiv(max_query_len, block_q))
    _prefill_kernel[grid](
        q, k_cache, v_cache, qa.k_scales, qa.v_scales, out, query_start_loc, seq_lens, block_tables,
        scale * LOG2E,
        window or 1, dilation, num_sinks,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        qa.stride_sb, qa.stride_sh,
        block_tables.stride(0),
        head_dim,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        PAGED=cfg.paged and paged_loads_ok(cfg.block_n, block_size, k_cache), EVEN_D=block_d == head_dim,
        DOT_PREC="ieee" if dot_ieee(q.dtype) else "tf32",
        QUANT=qa.quant, KV_FP16=qa.kv_fp16, ALIGN=qa.align, WINDOW=window is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
