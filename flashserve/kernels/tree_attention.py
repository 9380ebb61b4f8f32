"""Paged attention with token-tree masks (Triton): the verification step of SpecInfer-style trees.

The masks are described in ``flashserve.kernels.tree_mask`` (``TreeMask``), whose
``tree_attention_reference`` is this kernel's oracle. The kernel is FlashAttention-2 style:
one program per (KV head, context slice, sequence, query tile), the GQA group's heads folded
into the rows, an online softmax over the paged keys, and the tree test (bit j of the query's
ancestor mask for the key at ``ctx + j``) in place of the causal test for a tree's nodes. On a
sliding-window layer only the sink tiles and the tiles from the root's window on are read, and
the window test compares depth positions (``TreeMask.depths``). It stores the step's K/V first
(``store_kv``). As in decode steps, the context is cut into slices (FlashDecoding: a tree of a
few nodes at batch 1 would otherwise leave all but a handful of SMs idle at long contexts),
whose partial outputs the decode path's reduction combines (``decode_attention.reduce_splits``).
Backends route a step here when ``AttentionMetadata.tree`` is set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels._paged_common import split_range, window_tiles
from flashserve.kernels.decode_attention import choose_num_splits, reduce_splits
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.tree_mask import TreeMask, tree_attention_reference
from flashserve.kernels.utils import dot_ieee, next_power_of_2, num_sms

BLOCK_N = 32  # keys per tile


@triton.jit
def _tree_tile(
    m_i, l_i, acc, q, n0, k_cache_ptr, v_cache_ptr, bt_row, depths_ptr,
    seq_len, ctx, tree_len, tok_start, q_pos, q_rot, bits, lo_key,
    win_len, dil, n_sink, qk_scale, kvh, offs_d, d_ok,
    stride_cb, stride_co, stride_ch,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Keys [n0, n0 + BLOCK_N): scores, tree / causal / window visibility, online softmax update."""
    k_pos = n0 + tl.arange(0, BLOCK_N)
    k_ok = k_pos < seq_len
    if WINDOW:  # keys below the window's oldest one (and not sinks) may sit in released blocks: never read
        k_ok = k_ok & ((k_pos >= lo_key) | (k_pos < n_sink))
    blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    off = blk * stride_cb + (k_pos % BLOCK_SIZE) * stride_co + kvh * stride_ch
    kt = tl.load(k_cache_ptr + off[None, :] + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    j = tl.maximum(k_pos - ctx, 0)
    tree_key = (k_pos >= ctx) & (tree_len > 0)
    in_tree = ((bits[:, None] >> j[None, :].to(tl.int64)) & 1) != 0
    causal = k_pos[None, :] <= q_pos[:, None]
    visible = tl.where(tree_key[None, :], in_tree, causal) & k_ok[None, :]
    if WINDOW:  # distances between depth positions (a tree key sits at ctx + its depth)
        k_depth = tl.load(depths_ptr + tok_start + j, mask=tree_key & k_ok, other=0)
        k_rot = tl.where(tree_key, ctx + k_depth, k_pos)
        dist = q_rot[:, None] - k_rot[None, :]
        in_window = ((dist < win_len) & (dist % dil == 0)) | (k_pos < n_sink)[None, :]
        visible = visible & in_window
    s = tl.where(visible, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    p = tl.where(visible, p, 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(v_cache_ptr + off[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _tree_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr,  # q [T, Hq, D]; caches [num_blocks, BLOCK_SIZE, Hkv, D]
    o_ptr,  # o [T, Hq, D]; with SPLIT the slices' partial outputs [T, Hq, num_splits, D] (fp32)
    lse_ptr,  # SPLIT: the slices' base-2 log-sum-exps [T, Hq, num_splits] (fp32)
    qsl_ptr, seq_lens_ptr, block_tables_ptr, bits_ptr, tree_lens_ptr, depths_ptr,
    qk_scale,  # scale * log2(e)
    win, dil, n_sink,  # WINDOW: tokens seen, dilation, sink tokens (flashserve.config.AttentionSpec)
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    stride_cb, stride_co, stride_ch,
    stride_bt, head_dim, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    kvh = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    b = tl.program_id(1)
    q_tile = tl.program_id(2) * BLOCK_Q
    tok_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - tok_start
    if q_tile >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    tree_len = tl.load(tree_lens_ptr + b)
    ctx = seq_len - tree_len  # tree nodes live at positions ctx .. seq_len - 1 (none if tree_len = 0)

    offs_m = tl.arange(0, BLOCK_M)
    qi = q_tile + offs_m // GROUP_PAD  # query index within the sequence's new tokens
    g = offs_m % GROUP_PAD
    row_ok = (qi < q_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    tok = (tok_start + qi).to(tl.int64)
    head = kvh * GROUP + g
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = seq_len - q_len + qi  # [BLOCK_M] absolute (index) positions
    bits = tl.load(bits_ptr + tok, mask=row_ok, other=0)  # [BLOCK_M] int64
    q_depth = tl.load(depths_ptr + tok, mask=row_ok, other=0)
    q_rot = tl.where(tree_len > 0, ctx + q_depth, q_pos)  # where the row's decode step would sit

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    hi = tl.minimum(seq_len, seq_len - q_len + q_tile + BLOCK_Q)
    lo_key = 0
    sink_end = 0
    win_start = 0
    if WINDOW:  # the sink tiles, then the window of the sequence's oldest query (a tree's root) on
        sink_end, win_start, _, _ = window_tiles(seq_len - q_len, seq_len - 1, win, dil, n_sink, BLOCK_N)
        lo_key = tl.maximum(seq_len - q_len - (win - 1) * dil, 0)
    # the keys in a virtual order, sink tiles [0, sink_end) then tiles [win_start, hi), cut into
    # num_splits equal tile-aligned slices; this program takes slice `split`
    v0, v1 = split_range(sink_end + tl.maximum(hi - win_start, 0), split, num_splits, BLOCK_N)
    for v in range(v0, v1, BLOCK_N):
        n0 = tl.where(v < sink_end, v, win_start + (v - sink_end))
        m_i, l_i, acc = _tree_tile(m_i, l_i, acc, q, n0, k_cache_ptr, v_cache_ptr, bt_row, depths_ptr,
                                   seq_len, ctx, tree_len, tok_start, q_pos, q_rot, bits, lo_key,
                                   win * dil, dil, n_sink, qk_scale, kvh, offs_d, d_ok,
                                   stride_cb, stride_co, stride_ch, BLOCK_N, BLOCK_SIZE, WINDOW, DOT_PREC)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:  # the slice's normalised output and base-2 log-sum-exp (-inf: it saw no key)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(o_ptrs + split * stride_os, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + tok * stride_lt + head * stride_lh + split, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta, scale: float, spec=None, max_seq_len: int | None = None,
                   num_splits: int | None = None) -> torch.Tensor:
    """The Triton path: store the step's K/V, then one program per (KV head, context slice,
    sequence, query tile), and with several slices a reduction of their partial outputs.
    ``spec``: the layer's ``AttentionSpec`` (a sliding window is measured at the nodes' depth
    positions, ``flashserve.kernels.tree_mask``); None: full attention. ``max_seq_len``: the host
    bound on the context that sizes the slice count (``meta.max_seq_len`` when None; a fixed
    bound under CUDA graphs), as for decode steps (``decode_attention.choose_num_splits``);
    ``num_splits`` pins it."""
    from flashserve.kernels import kv_quant
    from flashserve.kernels.cache_ops import store_kv

    if kv_quant.is_quantized(k_cache):  # 8-bit caches: the reference dequantizes on read
        return tree_attention_reference(q, k, v, k_cache, v_cache, meta, scale, spec)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    tree: TreeMask = meta.tree.to(q.device)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    group_pad = next_power_of_2(group)
    block_q = max(1, 64 // group_pad)
    block_d = max(16, next_power_of_2(D))
    q_tiles = triton.cdiv(meta.max_query_len, block_q)
    if num_splits is None:
        bound = meta.max_seq_len if max_seq_len is None else max_seq_len
        num_splits = choose_num_splits(meta.num_seqs * q_tiles, Hkv, bound, num_sms(q.device), BLOCK_N)
    out = torch.empty_like(q)
    if num_splits > 1:
        mid_o = torch.empty(T, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(T, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        mid_o, mid_lse = out.unsqueeze(2), out  # the output itself; no log-sum-exps
    window = spec is not None and spec.kind == "sliding"
    _tree_kernel[(Hkv * num_splits, meta.num_seqs, q_tiles)](
        q, k_cache, v_cache, mid_o, mid_lse, meta.query_start_loc, meta.seq_lens, meta.block_tables, tree.bits,
        tree.tree_lens, tree.depths, scale * 1.4426950408889634,
        spec.sliding_window if window else 0, spec.dilation if window else 1, spec.num_sinks if window else 0,
        q.stride(0), q.stride(1), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), D, num_splits,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_q * group_pad,
        BLOCK_N=BLOCK_N, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1],
        DOT_PREC="ieee" if dot_ieee(q.dtype) else "tf32",  # fp32 inputs: exact products, as the other kernels
        WINDOW=window, SPLIT=num_splits > 1, **pdl.launch_args(q.device),
    )
    if num_splits > 1:
        reduce_splits(mid_o, mid_lse, out)
    return out
