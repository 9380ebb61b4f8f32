"""Rotary position embedding (neox / rotate-half style), applied in place to q and k, optionally
after a per-head RMSNorm of q and k (Qwen3's and Gemma 3's q_norm / k_norm) in the same launch.

``cos_sin_cache`` is [max_pos, rotary_dim]: cos in the first rotary_dim/2 columns, sin in the
rest. Within each head the first rotary_dim dims are rotated as two halves
(x1 = x[:R/2], x2 = x[R/2:R]): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin; dims past R
(partial rotary) are left untouched, or only normalised when there is a norm.

The norm is the one of ``flashserve.kernels.norm.rms_norm`` over each whole head (fp32 math,
``x * rstd * w`` rounded to x's dtype), and that rounded value is what gets rotated, so the fused
launch computes the same values as the norm kernel followed by the rotary kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.utils import next_power_of_2


@triton.jit
def _norm_rotate_heads(
    x_ptr, w_ptr, t, stride_t, stride_h, num_heads, cos, sin,  # cos/sin: [1, BLOCK_R] fp32
    half, head_dim, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token t's heads of x, in place: with HAS_NORM RMS-normalise each head (weight w_ptr
    [head_dim]), then rotate its first 2 * half dims."""
    dtype = x_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    heads = x_ptr + t * stride_t + offs_h * stride_h  # [BLOCK_H, 1]
    h_mask = offs_h < num_heads
    offs_r = tl.arange(0, BLOCK_R)[None, :]
    r_mask = offs_r < half
    mask = h_mask & r_mask
    x1 = tl.load(heads + offs_r, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_R]
    x2 = tl.load(heads + half + offs_r, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        d_mask = offs_d < head_dim
        x = tl.load(heads + offs_d, mask=h_mask & d_mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / head_dim + eps))[:, None]  # as _rms_norm_kernel
        tl.debug_barrier()  # the whole heads are read (by other threads too) before any store below
        w1 = tl.load(w_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        x1 = (x1 * rstd * w1).to(dtype).to(tl.float32)  # rounded as the norm kernel stores it
        x2 = (x2 * rstd * w2).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        tail = h_mask & d_mask & (offs_d >= 2 * half)  # past the rotation: normalised only
        tl.store(heads + offs_d, (x * rstd * w).to(dtype), mask=tail)
    tl.store(heads + offs_r, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(heads + half + offs_r, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # [T] int
    q_ptr, k_ptr,  # [T, Hq, D], [T, Hkv, D] (unit stride on D)
    cs_ptr,  # [max_pos, R]
    qw_ptr, kw_ptr,  # [D] q / k norm weights when HAS_NORM
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads, half, head_dim, q_eps, k_eps,
    HAS_K: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < half
    cos = tl.load(cs_ptr + pos * stride_cs + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    _norm_rotate_heads(q_ptr, qw_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, half, head_dim, q_eps,
                       HAS_NORM, BLOCK_HQ, BLOCK_R, BLOCK_D)
    if HAS_K:
        _norm_rotate_heads(k_ptr, kw_ptr, t, stride_kt, stride_kh, num_k_heads, cos, sin, half, head_dim, k_eps,
                           HAS_NORM, BLOCK_HK, BLOCK_R, BLOCK_D)


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
    q_norm: tuple[torch.Tensor, float] | None = None,  # (weight [D], eps)
    k_norm: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply neox-style RoPE to q and k IN PLACE; returns (q, k).

    With ``q_norm`` (and ``k_norm`` when there is a k) every head is first RMS-normalised over
    all head_dim dims with that (weight, eps), in the same launch."""
    num_tokens = q.shape[0]
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and cos_sin_cache.stride(1) == 1
    has_norm = q_norm is not None
    assert not has_norm or k is None or k_norm is not None, "q_norm without k_norm"
    if num_tokens == 0:
        return q, k
    sqt, sqh, hq = _head_strides(q, head_dim)
    skt, skh, hk = _head_strides(k, head_dim) if k is not None else (0, 0, 1)
    q_w, q_eps = q_norm or (cos_sin_cache, 0.0)  # without a norm the weight pointers go unread
    k_w, k_eps = k_norm or (q_w, q_eps)
    assert not has_norm or (q_w.shape == k_w.shape == (head_dim,) and q_w.is_contiguous() and k_w.is_contiguous())
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k if k is not None else q, cos_sin_cache, q_w, k_w,
        sqt, sqh, skt, skh, cos_sin_cache.stride(0),
        hq, hk, half, head_dim, q_eps, k_eps,
        HAS_K=k is not None, HAS_NORM=has_norm,
        BLOCK_HQ=next_power_of_2(hq), BLOCK_HK=next_power_of_2(hk), BLOCK_R=next_power_of_2(half),
        BLOCK_D=next_power_of_2(head_dim),
        num_warps=4 if hq * half >= 1024 else 1, **pdl.launch_args(q.device, early=True),
    )
    return q, k
