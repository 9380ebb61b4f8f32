"""Fused mixture-of-experts MLP: routed tokens through stacked SwiGLU experts in two launches.

Weights are stacked per layer, expert-major (so they shard by expert):
``w13 [E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)`` up) and ``w2 [E, H, I]``, the checkpoints'
``[out, in]`` layout. They are bf16 / fp16 / fp32, or weight-only quantized per output channel:
int8 or fp8 e4m3 with fp32 scales ``s13 [E, 2I]`` / ``s2 [E, H]`` (``w = q * s``); the kernels
load the 8-bit values, convert them in registers and apply the scales to the accumulators, so a
quantized expert is read at one byte per weight. A token routed to ``k`` experts makes ``k``
(token, slot) *pairs*, numbered ``t * k + slot``. An expert id of ``-1`` marks a pair whose
expert is not held here (expert parallelism): it contributes nothing.

Two paths, same result:

* **grouped GEMM** (``T > DECODE_MAX_TOKENS``): ``moe_align`` sorts the pairs by expert and pads
  each expert's run to a multiple of ``BLOCK_M`` (``sorted_ids``, sentinel ``T * k`` in the
  padding), with one expert id per block of ``BLOCK_M`` rows. One launch computes
  ``silu(x W_gate^T) * (x W_up^T)`` for every pair (gate and up accumulated side by side, the
  activation applied in registers), one more launch the down projection times the routing weight;
  the ``k`` rows of each token are summed at the end. Each block reads its expert's weights once,
  so an expert without tokens costs nothing. All shapes are fixed by ``T``, ``k`` and ``E`` (the
  padding is an upper bound, blocks past the end exit at once), so no step synchronises with the
  host and the launches can be captured in a CUDA graph. Tile sizes come from ``TUNED_GEMM``
  (by shape and rows per expert) or a heuristic.
* **decode** (``T <= DECODE_MAX_TOKENS``): no sort. The gate/up launch has one program per
  (pair, tile of ``I``) reading the active expert's rows (a GEMV, products accumulated in a 2-D
  register tile and reduced once at the end); the down launch has one program per (token, tile of
  ``H``) that streams the token's ``k`` experts' rows side by side (a ``[k, BLOCK_N, BLOCK_K]``
  tile per step) and writes the weighted sum in x's dtype, so a batch-1 step is two launches that
  read exactly the ``k`` active experts' weights. With programmatic dependent launch (``pdl``) the
  gate/up launch waits for the routing, then releases the down launch, whose programs read the
  expert ids and their first weight tiles while gate/up still runs, and wait only before reading
  its activations; the routing launch reads its first router weights before it waits.

Routing, the kernel form of ``flashserve.layers.moe.route``: ``fused_route`` scores the router
logits, picks the top k and renormalises in one launch; up to ``ROUTER_MAX_TOKENS`` tokens
``fused_router_route`` also computes the logits in that launch, from the router's dense weight
(else the router's Linear is a launch of its own).

``moe_loop`` is the per-expert torch loop (dequantizing a quantized expert first): the CPU path,
the reference of the tests and the baseline of ``flashserve bench moe``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import arrival_counters, cdiv, is_interpreter, next_power_of_2, num_sms

DECODE_MAX_TOKENS = 4  # up to this many tokens per step: the GEMV path (no sort, no padding)
DOWN_TILE = 8192  # decode down launch: weights per step of a program (its k experts' tiles together)
# Up to this many tokens the router's logits are computed inside the routing launch
# (``fused_router_route``). Its last program routes every token from one [tokens, experts] register
# tile (16 x 128 fp32 for Qwen3-MoE: 16 a thread), and every program re-reads all the token rows
# and multiplies them on CUDA cores, work that grows with T while a cuBLAS GEMM's hardly does: the
# fusion saves a launch at decode sizes, prefill keeps the Linear then ``fused_route``. Measured on
# the H200 (Qwen3-MoE's 2048 x 128 bf16 router, 48 calls per CUDA graph): 5.7 / 6.4 / 7.2 us per
# call at 1 / 2 / 4 tokens against 7.7 / 8.2 / 8.2 for the Linear then ``fused_route``, but 10.5 /
# 16.7 against 8.4 / 8.3 at 8 / 16 tokens.
ROUTER_MAX_TOKENS = 4
ROUTER_BLOCK_N = 2  # router rows (experts) per program: 64 programs of 8 KB for Qwen3-MoE's bf16 router
ROUTER_WARPS = 4  # warps per program: the product tile holds 16 fp32 a thread

# weight formats of the kernels (constexpr W_FMT)
FMT_DENSE, FMT_INT8, FMT_FP8 = 0, 1, 2


class GemmConfig(NamedTuple):
    """Launch parameters of the grouped GEMM (both projections)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class GemvConfig(NamedTuple):
    """Launch parameters of the decode path: tile of output rows x reduction columns."""

    block_n: int
    block_k: int
    num_warps: int


# (experts, hidden, expert intermediate, rows per expert bucket) -> grouped GEMM launch. Keys come
# from ``flashserve bench moe --sweep`` on an H200 (it prints the best entry per shape in this
# form); shapes not listed use ``_heuristic_gemm``. The bucket is the mean number of pairs per
# expert rounded up to a power of two (16 .. 256).
TUNED_GEMM: dict[tuple[int, int, int, int], GemmConfig] = {
    # H200, torch 2.11, 2026-12-02 (`flashserve bench moe --sweep --tokens 1,4,256`): best of the sweep.
    # qwen3-30b-a3b T=256: 871 us, heuristic 907 us
    (128, 2048, 768, 16): GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    # mixtral-8x7b T=256: 901 us, heuristic 1199 us
    (8, 4096, 14336, 64): GemmConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
}
# (experts, hidden, expert intermediate) -> decode launch (gate/up, down); same sweep.
TUNED_GEMV: dict[tuple[int, int, int], tuple[GemvConfig, GemvConfig]] = {
    # qwen3-30b-a3b T=1: 31.5 us, heuristic 35.6 us; down re-tuned on an H100 (2026-12-06) for the
    # launch that streams the k experts side by side: 32.2 us (37.0 before it, same card)
    (128, 2048, 768): (GemvConfig(block_n=16, block_k=256, num_warps=4), GemvConfig(block_n=8, block_k=128, num_warps=4)),
    # mixtral-8x7b T=1: 177 us, heuristic 202 us; down re-tuned likewise: 241.1 us (heuristic 244.4)
    (8, 4096, 14336): (GemvConfig(block_n=64, block_k=128, num_warps=8), GemvConfig(block_n=4, block_k=256, num_warps=4)),
}


def quantized_format(w: torch.Tensor, scale: torch.Tensor | None) -> int:
    """The kernels' W_FMT of a stacked weight (and a check that a quantized one has scales)."""
    if w.dtype == torch.int8:
        fmt = FMT_INT8
    elif w.dtype == torch.float8_e4m3fn:
        fmt = FMT_FP8
    elif w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        fmt = FMT_DENSE
    else:
        raise ValueError(f"expert weights of dtype {w.dtype} are not supported (float, int8 or float8_e4m3fn)")
    if (fmt != FMT_DENSE) != (scale is not None):
        raise ValueError("int8 / fp8 expert weights need per-output-channel scales (and dense ones take none)")
    return fmt


def dequantize_experts(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``w [..., N, K]`` (int8 / fp8 with ``scale [..., N]``, or dense) -> dense ``dtype``."""
    if scale is None:
        return w.to(dtype)
    return (w.float() * scale.float()[..., None]).to(dtype)


def moe_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, s13: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: for each expert with tokens, gather them, run its SwiGLU MLP, scatter-add the
    outputs times their routing weights. x [T, H], w13 [E, 2I, H], w2 [E, H, I] (int8 / fp8
    with scales s13 [E, 2I], s2 [E, H]: dequantized to x's dtype first), topk_weights [T, k]
    (fp32), topk_ids [T, k] (-1: expert not held here) -> [T, H] in x's dtype (sum in fp32)."""
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    hit = torch.unique(flat_ids).tolist()  # host sync: fine for the CPU path and the reference
    for e in hit:
        if e < 0:
            continue
        pairs = torch.nonzero(flat_ids == e).squeeze(1)  # [n_e] pair indices
        rows = pairs // topk_ids.shape[1]
        w_gu = dequantize_experts(w13[e], None if s13 is None else s13[e], x.dtype)
        w_d = dequantize_experts(w2[e], None if s2 is None else s2[e], x.dtype)
        gu = F.linear(x[rows], w_gu)  # [n_e, 2I]
        act = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype)
        y = F.linear(act, w_d).float()  # [n_e, H]
        out.index_add_(0, rows, y * topk_weights.reshape(-1)[pairs].float()[:, None])
    return out.to(x.dtype)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to a multiple of ``block_m``.

    topk_ids [T, k] (-1: not held here) -> (sorted_ids [P] int32: pair index, or ``T * k`` for
    padding; block_expert [P // block_m] int32: the expert of each block, -1 past the last
    expert's run and for the pairs of experts held elsewhere, which are sorted last).
    ``P`` is the worst case over all routings of this shape, so nothing depends on the values.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    flat = torch.where(flat < 0, num_experts, flat)  # experts held elsewhere: one extra bucket
    n = flat.numel()
    device = flat.device
    buckets = num_experts + 1
    P = cdiv(n + min(buckets, n) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(buckets, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # [E + 1] end of each expert's run in the sorted order
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
def _load_weight(ptrs, mask, W_FMT: tl.constexpr, DTYPE: tl.constexpr):
    """A weight tile in the compute dtype: 8-bit values converted in registers (fp8 arrives as its
    bytes: masked fp8 loads do not run in the interpreter)."""
    w = tl.load(ptrs, mask=mask, other=0)
    if W_FMT == 2:
        w = w.to(tl.float8e4nv, bitcast=True)
    if W_FMT != 0:
        w = w.to(tl.float32)
    return w.to(DTYPE)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (row = pair // ROW_DIV) or pairs (ROW_DIV = 1)
    w_ptr,  # [E, N (x2 if GATED), K]
    s_ptr,  # [E, N (x2 if GATED)] fp32 scales (W_FMT != 0)
    out_ptr,  # [T * k, N]
    sorted_ids_ptr, block_expert_ptr, weights_ptr,  # [P], [P // BLOCK_M], [T * k]
    num_pairs, N, K,
    stride_am, stride_we, stride_wn, stride_se, stride_om,
    ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    W_FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the last expert's run, or an expert held elsewhere
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
        w = _load_weight(w_ptrs, k_ok[:, None] & n_ok[None, :], W_FMT, a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if GATED:
            wu = _load_weight(w_ptrs + N * stride_wn, k_ok[:, None] & n_ok[None, :], W_FMT, a.dtype)
            acc_up = tl.dot(a, wu, acc_up, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if W_FMT != 0:  # per-output-channel scales, once on the accumulators
        s_row = s_ptr + expert * stride_se + offs_n
        acc = acc * tl.load(s_row, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(s_row + N, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [E, 2N, K]
    s_ptr,  # [E, 2N] fp32 scales (W_FMT != 0)
    out_ptr,  # [T * k, N]: silu(gate) * up per pair
    ids_ptr,  # [T * k] expert of each pair (-1: held elsewhere)
    N, K,
    stride_xm, stride_we, stride_wn, stride_se, stride_om,
    TOP_K: tl.constexpr, W_FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PDL:  # the expert ids come from the routing launch: wait for it, then release the down launch
        gdc_wait()
        gdc_launch_dependents()
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # not held here: the down launch skips this pair
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    # products accumulated elementwise, reduced once after the loop (no per-step shuffles)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mask = n_ok[:, None] & k_ok[None, :]
        acc += _load_weight(w_ptrs, mask, W_FMT, tl.float32) * a
        acc_up += _load_weight(w_ptrs + N * stride_wn, mask, W_FMT, tl.float32) * a
        w_ptrs += BLOCK_K
    gate = tl.sum(acc, axis=1)
    up = tl.sum(acc_up, axis=1)
    if W_FMT != 0:
        s_row = s_ptr + expert * stride_se + offs_n
        gate = gate * tl.load(s_row, mask=n_ok, other=0.0)
        up = up * tl.load(s_row + N, mask=n_ok, other=0.0)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs_n, act.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _moe_gemv_down_kernel(
    act_ptr,  # [T * k, K]
    w_ptr,  # [E, N, K]
    s_ptr,  # [E, N] fp32 scales (W_FMT != 0)
    out_ptr,  # [T, N] in x's dtype: the weighted sum over the token's experts
    ids_ptr, weights_ptr,  # [T * k], [T * k] fp32
    N, K,
    stride_am, stride_we, stride_wn, stride_se, stride_om,
    TOP_K: tl.constexpr, K_BLOCK: tl.constexpr, W_FMT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    tok = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = tl.arange(0, K_BLOCK)
    pairs = tok * TOP_K + slots
    slot_ok = slots < TOP_K
    # the routing launch finished before the gate/up one released this one (it waits, then launches
    # its dependents), so the expert ids can be read before the wait, and the first weight tiles too
    expert = tl.load(ids_ptr + pairs, mask=slot_ok, other=-1).to(tl.int64)
    here = expert >= 0  # an expert held elsewhere (or a padding slot): every load masked, nothing read
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # [K_BLOCK, BLOCK_N, BLOCK_K]: the token's k experts' rows side by side, all loads of a step in flight
    w_ptrs = (w_ptr + tl.maximum(expert, 0)[:, None, None] * stride_we
              + offs_n[None, :, None].to(tl.int64) * stride_wn + offs_k[None, None, :])
    a_ptrs = act_ptr + pairs[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [K_BLOCK, BLOCK_K]
    rows_ok = here[:, None, None] & n_ok[None, :, None]
    w = _load_weight(w_ptrs, rows_ok & (offs_k < K)[None, None, :], W_FMT, tl.float32)
    wait_for_prior(PDL)
    acc = tl.zeros([K_BLOCK, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs + k0, mask=here[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += w * a[:, None, :]
        k_next = offs_k + k0 + BLOCK_K < K
        w = _load_weight(w_ptrs + k0 + BLOCK_K, rows_ok & k_next[None, None, :], W_FMT, tl.float32)
    sums = tl.sum(acc, axis=2)  # [K_BLOCK, BLOCK_N] per expert and row
    if W_FMT != 0:  # per-output-channel scales, once on the sums
        sums = sums * tl.load(s_ptr + tl.maximum(expert, 0)[:, None] * stride_se + offs_n[None, :],
                              mask=here[:, None] & n_ok[None, :], other=0.0)
    gate = tl.load(weights_ptr + pairs, mask=slot_ok, other=0.0)
    total = tl.sum(sums * gate[:, None], axis=0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _route_rows(logits, rows, row_ok, weights_ptr, ids_ptr, E, ROWS: tl.constexpr, TOP_K: tl.constexpr,
                K_BLOCK: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """Route a tile of tokens and store the result: router logits [ROWS, BLOCK_E] fp32 (lanes from
    E on -inf) of tokens ``rows`` [ROWS] (stored where ``row_ok``) -> weights [T, k] fp32 and
    expert ids [T, k] int32 (softmax or sigmoid, ``k`` rounds of arg-max, renormalisation)."""
    offs = tl.arange(0, BLOCK_E)[None, :]
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    # NaN (a NaN logit, e.g. from a padding row) ranks below every real score but above the
    # padding lanes: arg-max over NaNs would find no lane and return BLOCK_E, an expert that does
    # not exist, and the expert kernels would read past the weights
    scores = tl.where(scores == scores, scores, -0.5)
    scores = tl.where(offs < E, scores, -1.0)  # below every real score (softmax and sigmoid are >= 0)
    slots = tl.arange(0, K_BLOCK)[None, :]
    # one int64 key per lane: the score's bits made order-preserving as a signed int (negatives get
    # their magnitude bits flipped) above the reversed lane index, so one max per round finds the
    # best score and, among equal scores, the lowest lane (a max and a min per round before: the
    # four-warp router launch went from 65 to 20 barriers, 5.52 -> 5.25 us a call on an H100)
    bits = scores.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (bits.to(tl.int64) << 32) | (BLOCK_E - 1 - offs).to(tl.int64)
    sel_w = tl.zeros([ROWS, K_BLOCK], dtype=tl.float32)
    sel_i = tl.zeros([ROWS, K_BLOCK], dtype=tl.int32)
    for slot in range(TOP_K):  # k rounds of arg-max (k is small), kept in registers
        best = tl.max(keys, axis=1)[:, None]
        idx = (BLOCK_E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        top = (best >> 32).to(tl.int32)
        top = tl.where(top < 0, top ^ 0x7FFFFFFF, top).to(tl.float32, bitcast=True)
        sel_w = tl.where(slots == slot, top, sel_w)
        sel_i = tl.where(slots == slot, idx, sel_i)
        keys = tl.where(offs == idx, -0x7FFFFFFFFFFFFFFF, keys)  # below every key of a score
    if RENORMALIZE:
        sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]
    out = rows[:, None].to(tl.int64) * TOP_K + slots
    mask = row_ok[:, None] & (slots < TOP_K)
    tl.store(weights_ptr + out, sel_w, mask=mask)
    tl.store(ids_ptr + out, sel_i, mask=mask)


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype
    weights_ptr, ids_ptr,  # [T, k] fp32, [T, k] int32
    E, stride_lm,
    TOP_K: tl.constexpr, K_BLOCK: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    tok = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + tok.to(tl.int64) * stride_lm + offs, mask=offs < E, other=float("-inf"))
    rows = tok + tl.arange(0, 1)  # a tile of one token, always stored
    _route_rows(logits.to(tl.float32)[None, :], rows, rows >= 0, weights_ptr, ids_ptr, E, 1, TOP_K, K_BLOCK,
                SIGMOID, RENORMALIZE, BLOCK_E)


def fused_route(logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashserve.layers.moe.route`` in one launch: router logits [T, E] -> (weights [T, k] fp32,
    expert ids [T, k] int32), one program per token (softmax or sigmoid, ``k`` rounds of arg-max,
    renormalisation). Replaces the six small launches of the torch routing at decode."""
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top-k must be between 1 and the number of experts ({E}), got {top_k}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T:
        logits = logits.contiguous()
        _route_kernel[(T,)](logits, weights, ids, E, logits.stride(0), TOP_K=top_k, K_BLOCK=next_power_of_2(top_k), SIGMOID=scoring == "sigmoid",
                            RENORMALIZE=renormalize, BLOCK_E=next_power_of_2(E), **_launch_kw(4))
    return weights, ids


@triton.jit
def _router_route_kernel(
    x_ptr,  # [T, H] activations
    w_ptr,  # [E, H] router weight, x's dtype
    logits_ptr,  # [T, E] in x's dtype: the router's output as its Linear stores it
    count_ptr,  # int32 [1] zero: programs arrived
    weights_ptr, ids_ptr,  # [T, k] fp32, [T, k] int32
    T, E, H, stride_xm, stride_wn,
    TOP_K: tl.constexpr, K_BLOCK: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    toks = tl.arange(0, BLOCK_T)
    t_ok = toks < T
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < E
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + toks[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BT, BK]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
    # every token against this program's BLOCK_N router rows, products accumulated elementwise in
    # fp32 and reduced once after the loop; the first weight tile read before the wait
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < H)[None, :], other=0.0).to(tl.float32)
    wait_for_prior(PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k + k0 < H
        x = tl.load(x_ptrs + k0, mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        w = tl.load(w_ptrs + k0 + BLOCK_K, mask=n_ok[:, None] & (offs_k + k0 + BLOCK_K < H)[None, :],
                    other=0.0).to(tl.float32)
    logit_ptrs = logits_ptr + toks[:, None] * E
    tl.store(logit_ptrs + offs_n[None, :], tl.sum(acc, axis=2).to(logits_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])
    tl.debug_barrier()  # every thread's logits are written before the count is released
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:  # the last program routes every token
        offs_e = tl.arange(0, BLOCK_E)
        logits = tl.load(logit_ptrs + offs_e[None, :], mask=t_ok[:, None] & (offs_e < E)[None, :],
                         other=float("-inf"), cache_modifier=".cg")
        _route_rows(logits.to(tl.float32), toks, t_ok, weights_ptr, ids_ptr, E, BLOCK_T, TOP_K, K_BLOCK,
                    SIGMOID, RENORMALIZE, BLOCK_E)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")


def fused_router_route(x: torch.Tensor, weight: torch.Tensor, top_k: int, scoring: str = "softmax",
                       renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_route(F.linear(x, weight), ...)`` in one launch, for up to ``ROUTER_MAX_TOKENS``
    tokens: x [T, H] and the router's dense, bias-free weight [E, H] of x's dtype -> (weights
    [T, k] fp32, expert ids [T, k] int32).

    Each program computes the logits of every token for ``ROUTER_BLOCK_N`` experts (so the weight
    is read once whatever T; products summed in fp32) and stores them rounded to x's dtype, as
    the Linear's output is; the last program to arrive (``utils.arrival_counters``, so not on
    two streams at once) reads back the [T, E] logits and routes every token with
    ``fused_route``'s code. The logits are the Linear's up to the rounding of the sums (fp32 here,
    in another order than cuBLAS's)."""
    T, H = x.shape
    E = weight.shape[0]
    if tuple(weight.shape) != (E, H) or weight.dtype != x.dtype:
        raise ValueError(f"router weight {tuple(weight.shape)} {weight.dtype} does not match "
                         f"x {tuple(x.shape)} {x.dtype}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top-k must be between 1 and the number of experts ({E}), got {top_k}")
    if T > ROUTER_MAX_TOKENS:
        raise ValueError(f"fused_router_route takes at most {ROUTER_MAX_TOKENS} tokens, got {T}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T:
        x, weight = x.contiguous(), weight.contiguous()
        logits = torch.empty(T, E, dtype=x.dtype, device=x.device)
        block_t = next_power_of_2(T)
        # the product tile [BLOCK_T, BLOCK_N, BLOCK_K] at most 16 fp32 a thread; small K tiles in
        # the interpreter so that the tests' hidden sizes take several steps
        tile = 16 * 32 * ROUTER_WARPS
        block_k = 16 if is_interpreter() else min(tile // (block_t * ROUTER_BLOCK_N), next_power_of_2(H))
        _router_route_kernel[(cdiv(E, ROUTER_BLOCK_N),)](
            x, weight, logits, arrival_counters(x.device, 1), weights, ids, T, E, H, x.stride(0), weight.stride(0),
            TOP_K=top_k, K_BLOCK=next_power_of_2(top_k), SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize,
            BLOCK_T=block_t, BLOCK_N=ROUTER_BLOCK_N, BLOCK_K=block_k, BLOCK_E=next_power_of_2(E),
            **_launch_kw(ROUTER_WARPS), **pdl.launch_args(x.device, early=True))
    return weights, ids


def rows_bucket(num_pairs: int, num_experts: int) -> int:
    """Mean pairs per expert rounded up to a power of two, in 16 .. 256 (the table's key)."""
    return min(max(next_power_of_2(cdiv(num_pairs, num_experts)), 16), 256)


def _heuristic_gemm(bucket: int) -> GemmConfig:
    block_m = 16 if bucket <= 16 else 32 if bucket <= 64 else 64
    # 8 warps for 64-row tiles: the gated launch keeps two [BM, BN] fp32 accumulators
    return GemmConfig(block_m, 64 if block_m < 64 else 128, 64, 8 if block_m >= 64 else 4, 3)


def gemm_config(num_pairs: int, num_experts: int, hidden: int, inter: int) -> GemmConfig:
    """The grouped GEMM's launch: the tuned entry of this shape, else the heuristic (small tiles
    in the interpreter)."""
    if is_interpreter():
        return GemmConfig(16, 16, 16, 4, 1)
    bucket = rows_bucket(num_pairs, num_experts)
    return TUNED_GEMM.get((num_experts, hidden, inter, bucket)) or _heuristic_gemm(bucket)


def gemv_configs(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, device: torch.device
                 ) -> tuple[GemvConfig, GemvConfig]:
    """(gate/up, down) launches of the decode path (gate/up: a program per pair and tile of
    ``inter`` rows; down: per token and tile of ``hidden`` rows)."""
    if is_interpreter():
        return GemvConfig(16, 16, 4), GemvConfig(16, 16, 4)
    tuned = TUNED_GEMV.get((num_experts, hidden, inter))
    if tuned is not None:
        return tuned
    # enough programs to keep every SM streaming: narrow row tiles when the rows are few
    sms = num_sms(device)
    pairs = tokens * top_k
    gu_n = 32 if pairs * cdiv(inter, 32) >= 4 * sms else 16 if pairs * cdiv(inter, 16) >= 2 * sms else 8
    dn_n = 32 if tokens * cdiv(hidden, 32) >= 4 * sms else 16 if tokens * cdiv(hidden, 16) >= 2 * sms else 8
    # the down tile holds the token's k experts' rows: at most DOWN_TILE weights (64 a thread at 4 warps)
    dn_k = max(32, min(256, DOWN_TILE // (next_power_of_2(top_k) * dn_n)))
    return GemvConfig(gu_n, 256, 4), GemvConfig(dn_n, dn_k, 4)


def _grouped(a: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, fmt: int, out: torch.Tensor,
             sorted_ids: torch.Tensor, block_expert: torch.Tensor, weights: torch.Tensor, row_div: int, gated: bool,
             mul_weight: bool, cfg: GemmConfig) -> None:
    n = out.shape[1]
    grid = (block_expert.numel(), cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](
        a, w if fmt != FMT_FP8 else w.view(torch.uint8), s if s is not None else weights, out, sorted_ids,
        block_expert, weights, out.shape[0], n, a.shape[1],
        a.stride(0), w.stride(0), w.stride(1), s.stride(0) if s is not None else 0, out.stride(0),
        ROW_DIV=row_div, GATED=gated, MUL_WEIGHT=mul_weight,
        DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32", W_FMT=fmt,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **({} if is_interpreter() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}),
    )


def _launch_kw(num_warps: int) -> dict:
    return {} if is_interpreter() else {"num_warps": num_warps}


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
              decode_max_tokens: int = DECODE_MAX_TOKENS, gemm: GemmConfig | None = None,
              gemv: tuple[GemvConfig, GemvConfig] | None = None, held_elsewhere: bool = False) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I] (dense, or int8 / fp8 with fp32 scales
    s13 [E, 2I], s2 [E, H]), topk_weights [T, k] (fp32), topk_ids [T, k] (-1: expert held
    elsewhere, allowed with ``held_elsewhere``) -> [T, H] = sum over slots of
    weight * down(silu(gate(x)) * up(x)), in x's dtype. ``gemm`` / ``gemv`` override the launch
    parameters (the benchmark's sweep)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    f13, f2 = quantized_format(w13, s13), quantized_format(w2, s2)
    if T == 0:
        return torch.empty_like(x)
    x = x.contiguous()
    num_pairs = T * top_k
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    if T <= decode_max_tokens:
        ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
        gu, dn = gemv or gemv_configs(T, top_k, E, H, inter, x.device)
        out = torch.empty_like(x)
        _moe_gemv_gate_up_kernel[(num_pairs, cdiv(inter, gu.block_n))](
            x, w13 if f13 != FMT_FP8 else w13.view(torch.uint8), s13 if s13 is not None else weights, act, ids,
            inter, H, x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0) if s13 is not None else 0,
            act.stride(0), TOP_K=top_k, W_FMT=f13, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k,
            **_launch_kw(gu.num_warps), **pdl.launch_args(x.device))
        _moe_gemv_down_kernel[(T, cdiv(H, dn.block_n))](
            act, w2 if f2 != FMT_FP8 else w2.view(torch.uint8), s2 if s2 is not None else weights, out, ids,
            weights, H, inter, act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0) if s2 is not None else 0,
            out.stride(0), TOP_K=top_k, K_BLOCK=next_power_of_2(top_k), W_FMT=f2, BLOCK_N=dn.block_n,
            BLOCK_K=dn.block_k, **_launch_kw(dn.num_warps), **pdl.launch_args(x.device, early=True))
        return out
    cfg = gemm or gemm_config(num_pairs, E, H, inter)
    # [T*k, H] weighted rows; zeroed when some pairs' experts are elsewhere (their rows are not written)
    y = (torch.zeros if held_elsewhere else torch.empty)(num_pairs, H, dtype=torch.float32, device=x.device)
    sorted_ids, block_expert = moe_align(topk_ids, E, cfg.block_m)
    _grouped(x, w13, s13, f13, act, sorted_ids, block_expert, weights, top_k, gated=True, mul_weight=False, cfg=cfg)
    _grouped(act, w2, s2, f2, y, sorted_ids, block_expert, weights, 1, gated=False, mul_weight=True, cfg=cfg)
    return y.view(T, top_k, H).sum(dim=1).to(x.dtype)
