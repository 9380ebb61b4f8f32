"""Paged prefill attention (FlashAttention-2 style) over packed variable-length sequences.

Each program owns a tile of BLOCK_Q consecutive new tokens of one sequence and ALL query heads
of one KV group (GQA packing: the GROUP heads are folded into the M dimension of the matmuls,
so every K/V tile read from the cache serves the whole group; MQA is GROUP = Hq). Keys and
values are gathered from the paged cache through the block table, so a chunk of new tokens
attends to the already-cached context plus itself; ``store_kv`` must have run first.

Grid: (cdiv(max_query_len, BLOCK_Q), num_seqs, num_kv_heads). Programs past their sequence's
query length exit at once. The key loop has an unmasked phase (keys before the tile's first
query position) and a masked phase (the causal diagonal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels._paged_common import LOG2E, NEG_BIG, load_q_rows, online_softmax_tile
from flashserve.kernels.utils import dot_ieee, is_interpreter, next_power_of_2


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    o_ptr,  # [T, Hq, D]
    qsl_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    qk_scale,  # scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    head_dim,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = BLOCK_Q * GROUP_PAD rows
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
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
    q_pos = ctx_len + qi  # [BLOCK_M] absolute positions

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    # Keys [0, full_end) are visible to every row of the tile: no mask needed.
    full_end = ((ctx_len + q_tile + 1) // BLOCK_N) * BLOCK_N
    # The last key any row of the tile can see.
    kv_end = ctx_len + tl.minimum(q_tile + BLOCK_Q, q_len)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, start_n, kv_end, q_pos, qk_scale,
            kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd,
            BLOCK_N, BLOCK_SIZE, False, DOT_PREC)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, start_n, kv_end, q_pos, qk_scale,
            kvh, offs_d, d_mask, stride_cb, stride_co, stride_ch, stride_cd,
            BLOCK_N, BLOCK_SIZE, True, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tok = (tok_start + qi).to(tl.int64)
    head = (kvh * GROUP + g).to(tl.int64)
    o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) for a head size / dtype."""
    if is_interpreter():
        return 16, 16, 4, 1
    bd = next_power_of_2(head_dim)
    if dtype == torch.float32 or bd >= 256:
        return 64, 32, 4, 2
    # Tuned on an H200 (bf16, Hq32/Hkv8, 1x4096 and 8x1024 prompts).
    if bd >= 128:
        return 128, 64, 8, 2
    return 128, 128, 4, 3


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
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of every sequence's new tokens over its cached context plus itself."""
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
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype)
    block_m = max(block_m, group_pad)
    block_q = block_m // group_pad
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        block_tables.stride(0),
        head_dim,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        DOT_PREC="ieee" if dot_ieee(q.dtype) else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
