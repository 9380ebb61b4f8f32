"""Quest's page scores in one pass over the per-page key bounds, and the top pages in one more (Triton).

For each (sequence, KV head, page) of a decode step: ``max_g sum_d max(q_gd lo_d, q_gd hi_d)``
over the GROUP query heads g of the KV head, where lo / hi are the elementwise minimum / maximum
of the page's keys (``flashserve.layers.sparse_attention.SideState.bounds``). Written as two
matmuls, ``relu(q) . hi + min(q, 0) . lo``. Reading the bounds costs 2 rows per page, 1/16 of
the page's K and V at block size 16; nothing is materialised but the [B, Hkv, P] fp32 scores.
Grid ``(B, Hkv, cdiv(P, BLOCK_P))``, P = the block table's width (static under CUDA graphs);
pages past a sequence's end score -inf. Reference: ``sparse_attention.page_bounds``.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from flashserve.kernels.cache_ops import StoreArgs, store_token
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


# The selection's radix search: bits of the scores' keys resolved per pass (a histogram of
# 2**SELECT_DIGIT_BITS bins; 2, 4 or 8, dividing 32), and the program's warps. On an H100 at 2048
# pages (batch 1, 20%, a CUDA graph of 20 calls): 4-bit digits 7.0 / 7.1 / 7.8 us in 16 / 8 / 32
# warps; 8-bit 10.2 / 9.4 in 16 / 8; 2-bit 7.2 / 7.7 in 16 / 8, before one packed reduction per
# pass replaced three sums (16 warps, 4-bit: 7.30 -> 7.04 us on another H100; docs/attention.md).
SELECT_DIGIT_BITS = 4
SELECT_WARPS = 16


@triton.jit
def _above(key, shift, DIGIT_BITS: tl.constexpr):
    """``key >> shift`` for uint32 keys and a multiple of DIGIT_BITS in [0, 32] (a shift by 32 is
    undefined, so two shifts)."""
    return tl.where(shift == 0, key, (key >> tl.maximum(shift - DIGIT_BITS, 0).to(tl.uint32)) >> DIGIT_BITS)


@triton.jit
def _select_row(s_row_ptr, bt_row_ptr, out_ptr, num_pages, num_pages_max, want, max_pages, sink_pages,
                ROW: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """One (sequence, KV head)'s chosen pages, its row of scores held in ROW (>= num_pages) lanes."""
    offs = tl.arange(0, ROW)
    valid = offs < num_pages
    s = tl.load(s_row_ptr + offs, mask=offs < num_pages_max, other=float("-inf"))
    s = tl.where(valid, s, float("-inf"))
    # the own page and the sinks' pages are always read; the rest of `want` goes to the best others
    forced = valid & ((offs == num_pages - 1) | (offs < sink_pages))
    cand = valid & ~forced
    num_forced = tl.minimum(sink_pages, num_pages) + (num_pages - 1 >= sink_pages).to(tl.int32)
    # the rem-th largest candidate, exactly: its order-preserving uint32 key found DIGIT_BITS at a
    # time from the top, each pass a histogram of the next digit over the keys that share the
    # digits found so far. The search starts below the bits every candidate shares and stops as
    # soon as the keys sharing the found digits are exactly the ones still wanted (rem), so at 2048
    # pages it takes a few passes, not 32 / DIGIT_BITS.
    bits = s.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # unsigned order = float order
    k_max = tl.max(tl.where(cand, key, 0), 0)
    k_min = tl.min(tl.where(cand, key, 0xFFFFFFFF), 0)
    NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
    bins = tl.arange(0, NUM_BINS)
    rem = tl.maximum(want - num_forced, 0)
    # `shift`: the bits below the found prefix; a candidate matches when its key >> shift equals it.
    # First skip the digits that the largest and smallest candidate keys (so all of them) share.
    shift = tl.full([], 32, tl.int32)
    while (shift > 0) & (_above(k_max, shift - DIGIT_BITS, DIGIT_BITS) == _above(k_min, shift - DIGIT_BITS,
                                                                                  DIGIT_BITS)):
        shift -= DIGIT_BITS
    prefix = _above(k_max, shift, DIGIT_BITS)
    count = tl.sum(cand.to(tl.int32), 0)  # candidates matching the prefix
    while (shift > 0) & (count > rem) & (rem > 0):  # rem == 0: the forced pages fill `want`
        shift -= DIGIT_BITS
        digit = ((key >> shift.to(tl.uint32)) & (NUM_BINS - 1)).to(tl.int32)
        match = cand & (_above(key, shift + DIGIT_BITS, DIGIT_BITS) == prefix)
        hist = tl.histogram(digit, NUM_BINS, mask=match)
        higher = count - tl.cumsum(hist, 0)  # matching keys in the bins above each bin
        # d, the highest bin reaching rem, with its `higher` and count in one reduction: the bins
        # reaching rem are a prefix, and d's higher is their least (hist[d] >= rem - higher[d] > 0)
        packed = (higher.to(tl.int64) << 40) | (hist.to(tl.int64) << 8) | (NUM_BINS - 1 - bins)
        best = tl.min(tl.where(higher + hist >= rem, packed, 1 << 62), 0)
        d = NUM_BINS - 1 - (best & 0xFF).to(tl.int32)
        rem -= (best >> 40).to(tl.int32)
        count = ((best >> 8) & 0xFFFFFFFF).to(tl.int32)
        prefix = (prefix << DIGIT_BITS) | d.to(tl.uint32)
    # take the forced pages, the candidates above the prefix and its first `rem` ties (the earliest
    # pages); one scan counts both (ties in the high half), and gives each chosen page its
    # position-ordered slot
    top = _above(key, shift, DIGIT_BITS)
    above = forced | (cand & (top > prefix))
    ties = cand & (top == prefix)
    c = tl.cumsum(above.to(tl.int32) + (ties.to(tl.int32) << 16), 0)
    take = above | (ties & ((c >> 16) <= rem))
    dest = (c & 0xFFFF) + tl.minimum(c >> 16, rem) - 1
    blk = tl.load(bt_row_ptr + offs, mask=valid, other=0)
    tl.store(out_ptr + dest, blk, mask=take & (dest < max_pages))


@triton.jit
def _quest_select_kernel(
    scores_ptr,  # [B, Hkv, P] fp32 (quest_page_scores; -inf past a sequence's end)
    bt_ptr,  # [B, P] int32
    seq_lens_ptr,  # [B] int32
    tables_ptr,  # out: [B, Hkv, K] int32, the chosen pages' blocks in position order
    vlens_ptr,  # out: [B] int32 virtual context lengths
    stride_sb, stride_sh, stride_bt, stride_tb, stride_th,
    num_pages_max, max_pages,
    budget_bits,  # the KV budget's float64 bits (an int64), so that ceil(budget * pages) is the host's
    sink_pages,
    store,  # STORE: ``cache_ops.StoreArgs.args`` of the step's K/V store (token b of sequence b); else ()
    BLOCK_SIZE: tl.constexpr, P_PAD: tl.constexpr, K_PAD: tl.constexpr, DIGIT_BITS: tl.constexpr,
    STORE: tl.constexpr, STORE_CONSTS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv_heads = tl.num_programs(1) - STORE
    if STORE:  # the last program of each sequence stores its token, beside the selection
        if kvh == num_kv_heads:
            store_token(store, b.to(tl.int64), STORE_CONSTS)
    if kvh < num_kv_heads:
        _select_pages(scores_ptr, bt_ptr, seq_lens_ptr, tables_ptr, vlens_ptr, b, kvh,
                      stride_sb, stride_sh, stride_bt, stride_tb, stride_th, num_pages_max, max_pages,
                      budget_bits, sink_pages, BLOCK_SIZE, P_PAD, K_PAD, DIGIT_BITS)


@triton.jit
def _select_pages(scores_ptr, bt_ptr, seq_lens_ptr, tables_ptr, vlens_ptr, b, kvh,
                  stride_sb, stride_sh, stride_bt, stride_tb, stride_th, num_pages_max, max_pages,
                  budget_bits, sink_pages,
                  BLOCK_SIZE: tl.constexpr, P_PAD: tl.constexpr, K_PAD: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Sequence b's, KV head kvh's chosen blocks and (for head 0) its virtual length."""
    seq_len = tl.load(seq_lens_ptr + b)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    # pages read: ceil(budget * pages), at least the own page and the sinks' pages, at most all
    budget = budget_bits.to(tl.float64, bitcast=True)
    want = tl.minimum(tl.maximum(tl.ceil(budget * num_pages.to(tl.float64)).to(tl.int32), 1 + sink_pages), num_pages)
    want = tl.minimum(want, max_pages)
    s_row = scores_ptr + b.to(tl.int64) * stride_sb + kvh * stride_sh
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    out = tables_ptr + b.to(tl.int64) * stride_tb + kvh * stride_th
    # the row in the narrowest of three register widths that holds the sequence's pages: the
    # search's passes cost per register, and a block table a little wider than a power of two
    # (32k tokens and a few more) would double them for every sequence
    if num_pages <= P_PAD // 4:
        _select_row(s_row, bt_row, out, num_pages, num_pages_max, want, max_pages, sink_pages, P_PAD // 4, DIGIT_BITS)
    elif num_pages <= P_PAD // 2:
        _select_row(s_row, bt_row, out, num_pages, num_pages_max, want, max_pages, sink_pages, P_PAD // 2, DIGIT_BITS)
    else:
        _select_row(s_row, bt_row, out, num_pages, num_pages_max, want, max_pages, sink_pages, P_PAD, DIGIT_BITS)
    pad = tl.arange(0, K_PAD)
    tl.store(out + pad, tl.zeros([K_PAD], tl.int32), mask=(pad >= want) & (pad < max_pages))
    if kvh == 0:
        tl.store(vlens_ptr + b, (want - 1) * BLOCK_SIZE + seq_len - (num_pages - 1) * BLOCK_SIZE)


def quest_select(
    scores: torch.Tensor,  # [B, Hkv, P] fp32 from quest_page_scores
    block_tables: torch.Tensor,  # [B, P] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_size: int,
    kv_budget: float,
    num_sinks: int,
    max_pages: int,  # host bound on the pages any query reads (sizes the output)
    store: StoreArgs | None = None,  # the step's K/V store (one token per sequence), done in the same launch
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, Hkv, max_pages] int32, [B] int32
    """Quest's top pages per (sequence, KV head) in one launch: the exact want-th largest page
    score (a row held in registers, found by a radix search over the scores' bits), then the
    chosen pages' blocks written in position order by a prefix sum, the own page last (ties at the
    threshold: the earliest pages). Replaces topk + sort + gather on the device. ``store``: one more
    program per sequence writes its new token's K/V (and key bounds) meanwhile, instead of a launch
    of its own before the scores; the own page is always chosen, so its score, read before the
    store, is never used. Same contract as ``flashserve.layers.sparse_attention.quest_block_tables``."""
    B, Hkv, P = scores.shape
    tables = torch.empty(B, Hkv, max_pages, dtype=torch.int32, device=scores.device)
    vlens = torch.empty(B, dtype=torch.int32, device=scores.device)
    if B == 0:
        return tables, vlens
    assert scores.stride(2) == 1 and block_tables.stride(1) == 1
    assert P < 1 << 15, f"Quest selects over at most 32767 pages per sequence, got a block table of {P}"
    p_pad = max(16, next_power_of_2(P))  # the scan packs two counts < 2**15 in an int32
    if store is not None:
        assert store.args[0].shape[0] == B, "the store's tokens must be the sequences' (one each)"
    _quest_select_kernel[(B, Hkv + (store is not None))](
        scores, block_tables, seq_lens, tables, vlens,
        scores.stride(0), scores.stride(1), block_tables.stride(0), tables.stride(0), tables.stride(1),
        P, max_pages, struct.unpack("<q", struct.pack("<d", float(kv_budget)))[0], -(-num_sinks // block_size),
        store.args if store is not None else (),
        BLOCK_SIZE=block_size, P_PAD=p_pad, K_PAD=max(16, next_power_of_2(max_pages)),
        DIGIT_BITS=SELECT_DIGIT_BITS, STORE=int(store is not None), STORE_CONSTS=store.consts if store is not None else (),
        num_warps=SELECT_WARPS,
    )
    return tables, vlens
