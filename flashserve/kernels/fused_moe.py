"""Fused mixture-of-experts MLP: routed tokens through stacked SwiGLU experts in two launches.

Weights are stacked per layer, expert-major (so they shard by expert):
``w13 [E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)`` up) and ``w2 [E, H, I]``, the checkpoints'
``[out, in]`` layout. A token routed to ``k`` experts makes ``k`` (token, slot) *pairs*, numbered
``t * k + slot``.

Two paths, same result:

* **grouped GEMM** (``T > DECODE_MAX_TOKENS``): ``moe_align`` sorts the pairs by expert and pads
  each expert's run to a multiple of ``BLOCK_M`` (``sorted_ids``, sentinel ``T * k`` in the
  padding), with one expert id per block of ``BLOCK_M`` rows. One launch computes
  ``silu(x W_gate^T) * (x W_up^T)`` for every pair (gate and up accumulated side by side, the
  activation applied in registers), one more launch the down projection times the routing weight;
  the ``k`` rows of each token are summed at the end. Each block reads its expert's weights once,
  so an expert without tokens costs nothing. All shapes are fixed by ``T``, ``k`` and ``E`` (the
  padding is an upper bound, blocks past the end exit at once), so no step synchronises with the
  host and the launches can be captured in a CUDA graph.
* **decode** (``T <= DECODE_MAX_TOKENS``): no sort; one program per (pair, output tile) reads the
  active expert's rows directly (a GEMV), so a batch-1 step reads exactly the ``k`` active
  experts' weights.

``moe_loop`` is the per-expert torch loop: the CPU path, the reference of the tests and the
baseline of ``flashserve bench moe``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashserve.kernels.utils import cdiv, is_interpreter, num_sms

DECODE_MAX_TOKENS = 4  # up to this many tokens per step: the GEMV path (no sort, no padding)


def moe_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor) -> torch.Tensor:
    """Reference: for each expert with tokens, gather them, run its SwiGLU MLP, scatter-add the
    outputs times their routing weights. x [T, H], w13 [E, 2I, H], w2 [E, H, I],
    topk_weights [T, k] (fp32), topk_ids [T, k] -> [T, H] in x's dtype (sum in fp32)."""
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    hit = torch.unique(flat_ids).tolist()  # host sync: fine for the CPU path and the reference
    for e in hit:
        pairs = torch.nonzero(flat_ids == e).squeeze(1)  # [n_e] pair indices
        rows = pairs // topk_ids.shape[1]
        gu = F.linear(x[rows], w13[e])  # [n_e, 2I]
        act = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
        y = F.linear(act, w2[e]).float()  # [n_e, H]
        out.index_add_(0, rows, y * topk_weights.reshape(-1)[pairs].float()[:, None])
    return out.to(x.dtype)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to a multiple of ``block_m``.

    topk_ids [T, k] -> (sorted_ids [P] int32: pair index, or ``T * k`` for padding;
    block_expert [P // block_m] int32: the expert of each block, -1 past the last one).
    ``P`` is the worst case over all routings of this shape, so nothing depends on the values.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    P = cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # [E] end of each expert's run in the sorted order
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in token order within
    sorted_e = flat[order]
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    sorted_ids = torch.full((P,), n, dtype=torch.int32, device=device)
    sorted_ids[(ends - padded)[sorted_e] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, P, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (row = pair // ROW_DIV) or pairs (ROW_DIV = 1)
    w_ptr,  # [E, N (x2 if GATED), K]
    out_ptr,  # [T * k, N]
    sorted_ids_ptr, block_expert_ptr, weights_ptr,  # [P], [P // BLOCK_M], [T * k]
    num_pairs, N, K,
    stride_am, stride_we, stride_wn, stride_om,
    ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the last expert's run
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_ok = pair < num_pairs
    a_row = (pair // ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if GATED:
            wu = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_gemv_kernel(
    a_ptr,  # [rows, K]
    w_ptr,  # [E, N (x2 if GATED), K]
    out_ptr,  # [T * k, N]
    ids_ptr, weights_ptr,  # [T * k] expert of each pair, its routing weight
    N, K,
    stride_am, stride_we, stride_wn, stride_om,
    ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    a_row = (pair // ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptr + a_row * stride_am + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
        if GATED:
            wu = tl.load(w_ptrs + N * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc_up += tl.sum(wu * a[None, :], axis=1)
        w_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _gemm_blocks(num_pairs: int, num_experts: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) from the mean rows per expert (small in the interpreter)."""
    if is_interpreter():
        return 16, 16, 16
    per_expert = num_pairs / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    return block_m, 64 if block_m < 64 else 128, 64


def _grouped(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
             block_expert: torch.Tensor, weights: torch.Tensor, row_div: int, gated: bool, mul_weight: bool,
             blocks: tuple[int, int, int]) -> None:
    block_m, block_n, block_k = blocks
    n = out.shape[1]
    grid = (block_expert.numel(), cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, block_expert, weights, out.shape[0], n, a.shape[1],
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ROW_DIV=row_div, GATED=gated, MUL_WEIGHT=mul_weight,
        DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # 8 warps for 64-row tiles: the gated launch keeps two [BM, BN] fp32 accumulators
        **({} if is_interpreter() else {"num_warps": 8 if block_m >= 64 else 4, "num_stages": 3}),
    )


def _gemv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
          row_div: int, gated: bool, mul_weight: bool) -> None:
    n = out.shape[1]
    if is_interpreter():
        block_n, block_k = 16, 16
    else:  # narrower tiles when 32-row tiles would leave SMs idle (few pairs, small N)
        block_n = 32 if out.shape[0] * cdiv(n, 32) >= 4 * num_sms(a.device) else 16
        block_k = 128
    _moe_gemv_kernel[(out.shape[0], cdiv(n, block_n))](
        a, w, out, ids, weights, n, a.shape[1],
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ROW_DIV=row_div, GATED=gated, MUL_WEIGHT=mul_weight, BLOCK_N=block_n, BLOCK_K=block_k,
        **({} if is_interpreter() else {"num_warps": 4}),
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, decode_max_tokens: int = DECODE_MAX_TOKENS) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] (fp32), topk_ids [T, k]
    -> [T, H] = sum over slots of weight * down(silu(gate(x)) * up(x)), in x's dtype."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if T == 0:
        return torch.empty_like(x)
    x = x.contiguous()
    num_pairs = T * top_k
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    y = torch.empty(num_pairs, H, dtype=torch.float32, device=x.device)  # [T*k, H], weighted
    if T <= decode_max_tokens:
        ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
        _gemv(x, w13, act, ids, weights, top_k, gated=True, mul_weight=False)
        _gemv(act, w2, y, ids, weights, 1, gated=False, mul_weight=True)
    else:
        blocks = _gemm_blocks(num_pairs, E, max(inter, H), H)
        sorted_ids, block_expert = moe_align(topk_ids, E, blocks[0])
        _grouped(x, w13, act, sorted_ids, block_expert, weights, top_k, gated=True, mul_weight=False, blocks=blocks)
        _grouped(act, w2, y, sorted_ids, block_expert, weights, 1, gated=False, mul_weight=True, blocks=blocks)
    return y.view(T, top_k, H).sum(dim=1).to(x.dtype)
