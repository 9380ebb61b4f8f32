"""Quest's page scores in one pass over the per-page key bounds (Triton).

For each (sequence, KV head, page) of a decode step: ``max_g sum_d max(q_gd lo_d, q_gd hi_d)``
over the GROUP query heads g of the KV head, where lo / hi are the elementwise minimum / maximum
of the page's keys (``flashserve.layers.sparse_attention.SideState.bounds``). Written as two
matmuls, ``relu(q) . hi + min(q, 0) . lo``. Reading the bounds costs 2 rows per page, 1/16 of
the page's K and V at block size 16; nothing is materialised but the [B, Hkv, P] fp32 scores.
Grid ``(B, Hkv, cdiv(P, BLOCK_P))``, P = the block table's width (static under CUDA graphs);
pages past a sequence's end score -inf. Reference: ``sparse_attention.page_bounds``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels.utils import dot_ieee, is_interpreter, next_power_of_2


@triton.jit
def _quest_scores_kernel(
    q_ptr,  # [B, Hq, D] one query per sequence
    bounds_ptr,  # [num_blocks + 1, 2, Hkv, D]
    bt_ptr,  # [B, P] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hkv, P] fp32
    stride_qb, stride_qh,
    stride_xb, stride_xm, stride_xh,
    stride_bt,
    stride_ob, stride_oh,
    num_pages_max, head_dim,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    pt = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (kvh * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < GROUP)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
    p_ok = offs_p < num_pages
    blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_p, mask=p_ok, other=0).to(tl.int64)
    base = bounds_ptr + blk[:, None] * stride_xb + kvh * stride_xh + offs_d[None, :]
    lo = tl.load(base, mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [P, D]
    hi = tl.load(base + stride_xm, mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    s = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision=DOT_PREC)
    s += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision=DOT_PREC)  # [G, P]
    s = tl.where((offs_g < GROUP)[:, None], s, float("-inf"))
    best = tl.max(s, 0)  # [P]
    best = tl.where(p_ok, best, float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + kvh * stride_oh + offs_p, best, mask=offs_p < num_pages_max)


def quest_page_scores(
    q: torch.Tensor,  # [B, Hq, D]
    bounds: torch.Tensor,  # [num_blocks + 1, 2, Hkv, D]
    block_tables: torch.Tensor,  # [B, P] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_size: int,
) -> torch.Tensor:  # [B, Hkv, P] fp32
    """Quest's upper bound of q . k per page (max over each KV group's heads); -inf past the end."""
    B, Hq, D = q.shape
    Hkv = bounds.shape[2]
    P = block_tables.shape[1]
    assert bounds.stride(3) == 1 and q.stride(2) == 1 and block_tables.stride(1) == 1
    out = torch.empty(B, Hkv, P, dtype=torch.float32, device=q.device)
    if B == 0:
        return out
    group = Hq // Hkv
    block_p = 16 if is_interpreter() else 64
    _quest_scores_kernel[(B, Hkv, triton.cdiv(P, block_p))](
        q, bounds, block_tables, seq_lens, out,
        q.stride(0), q.stride(1),
        bounds.stride(0), bounds.stride(1), bounds.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        P, D,
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), BLOCK_SIZE=block_size,
        BLOCK_P=block_p, BLOCK_D=max(16, next_power_of_2(D)), DOT_PREC="ieee" if dot_ieee(q.dtype) else "tf32",
        num_warps=4,
    )
    return out
