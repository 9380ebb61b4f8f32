"""Writing new keys/values into the paged KV cache.

Cache layout (per layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; flat slot
``s`` is block ``s // block_size``, offset ``s % block_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels.utils import next_power_of_2


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,  # [T, H, D] (any strides)
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, H, D]
    slot_ptr,  # [T] int64
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,  # shared by k_cache and v_cache
    num_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per new token: copies its [H, D] key and value tile into the cache.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < head_dim) & (slot >= 0)
    blk = slot // block_size
    off = slot % block_size
    src_k = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    src_v = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    dst = blk * stride_cb + off * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    kk = tl.load(src_k, mask=mask)
    vv = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, kk.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, vv.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # same shape and strides as k_cache
    slot_mapping: torch.Tensor,  # [T] int64 (int32 accepted), -1 = skip
) -> None:
    """Scatter the new tokens' keys and values into the paged cache, in place."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[2] == num_heads and k_cache.shape[3] == head_dim
    assert slot_mapping.shape[0] >= num_tokens
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        num_heads, head_dim, k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_heads), BLOCK_D=next_power_of_2(head_dim),
        num_warps=4 if num_heads * head_dim >= 2048 else 1,
    )
