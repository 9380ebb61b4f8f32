"""Triton building blocks shared by the paged prefill and decode attention kernels.

Scores are kept in the log2 domain: ``s = (q . k) * scale * log2(e)``, so ``exp2`` replaces
``exp`` and every log-sum-exp these kernels write is a base-2 LSE.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) well defined (= 1)
# for padded rows whose scores are all -inf.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def kv_tile_offsets(
    bt_row_ptr,  # pointer to this sequence's block-table row ([max_blocks] int32)
    offs_n,  # [BLOCK_N] absolute key positions
    n_valid,  # [BLOCK_N] bool, positions that exist (loads past them are masked)
    kvh,  # kv head index
    stride_cb, stride_co, stride_ch,  # cache strides: block, offset-in-block, head
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (tokens per block)
):
    """Element offsets (int64, [BLOCK_N]) of key positions ``offs_n`` in the paged cache,
    read through the block table: position j lives in block table[j // BLOCK_SIZE]."""
    blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    return blk * stride_cb + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_co + kvh * stride_ch


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
def online_softmax_tile(
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32
    q,  # [BLOCK_M, BLOCK_D]
    k_cache_ptr, v_cache_ptr, bt_row_ptr,
    start_n, kv_end,  # this tile's first key position; keys >= kv_end are invalid
    q_pos,  # [BLOCK_M] absolute position of each query row (causal limit)
    qk_scale,  # scale * log2(e)
    kvh, offs_d, d_mask,
    stride_cb, stride_co, stride_ch, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr,  # apply causal + bounds masks (False: tile fully visible to all rows)
    DOT_PREC: tl.constexpr,
):
    """One FlashAttention-2 step: scores against a key tile, online-softmax rescale, P @ V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_end
    kv_off = kv_tile_offsets(bt_row_ptr, offs_n, n_valid, kvh, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
    if MASK:
        k_t = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None] * stride_cd,
                      mask=n_valid[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    else:
        k_t = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None] * stride_cd,
                      mask=d_mask[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASK:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd,
                    mask=n_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    else:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :] * stride_cd,
                    mask=d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i
