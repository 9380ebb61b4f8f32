"""Rotary position embedding (neox / rotate-half style), applied in place to q and k.

``cos_sin_cache`` is [max_pos, rotary_dim]: cos in the first rotary_dim/2 columns, sin in the
rest. Within each head the first rotary_dim dims are rotated as two halves
(x1 = x[:R/2], x2 = x[R/2:R]): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin; dims past R
(partial rotary) are left untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import next_power_of_2


@triton.jit
def _rotate_heads(
    x_ptr, t, stride_t, stride_h, num_heads, cos, sin,  # cos/sin: [1, BLOCK_R] fp32
    half,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h[:, None] < num_heads) & (offs_r[None, :] < half)
    p1 = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_r[None, :]  # [BLOCK_H, BLOCK_R]
    p2 = p1 + half
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # [T] int
    q_ptr, k_ptr,  # [T, Hq, D], [T, Hkv, D] (unit stride on D)
    cs_ptr,  # [max_pos, R]
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads, half,
    HAS_K: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < half
    cos = tl.load(cs_ptr + pos * stride_cs + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, half, BLOCK_HQ, BLOCK_R)
    if HAS_K:
        _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_k_heads, cos, sin, half, BLOCK_HK, BLOCK_R)


def _head_strides(x: torch.Tensor, head_dim: int) -> tuple[int, int, int]:
    """(token stride, head stride, num heads) of x [T, H*D] or [T, H, D] (unit stride on D)."""
    if x.dim() == 2:
        assert x.stride(1) == 1 and x.shape[1] % head_dim == 0
        return x.stride(0), head_dim, x.shape[1] // head_dim
    assert x.dim() == 3 and x.shape[2] == head_dim and x.stride(2) == 1
    return x.stride(0), x.stride(1), x.shape[1]


def rotary_embedding(
    positions: torch.Tensor,  # [T] int32/int64
    q: torch.Tensor,  # [T, Hq * D] or [T, Hq, D]
    k: torch.Tensor | None,  # [T, Hkv * D] or [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim]
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply neox-style RoPE to q and k IN PLACE; returns (q, k)."""
    num_tokens = q.shape[0]
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and cos_sin_cache.stride(1) == 1
    if num_tokens == 0:
        return q, k
    sqt, sqh, hq = _head_strides(q, head_dim)
    skt, skh, hk = _head_strides(k, head_dim) if k is not None else (0, 0, 1)
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k if k is not None else q, cos_sin_cache,
        sqt, sqh, skt, skh, cos_sin_cache.stride(0),
        hq, hk, half,
        HAS_K=k is not None,
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk), BLOCK_R=next_power_of_2(half),
        num_warps=4 if hq * half >= 1024 else 1, **pdl.launch_args(q.device),
    )
    return q, k
