"""Writing new keys/values into the paged KV cache.

Cache layout (per layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; flat slot
``s`` is block ``s // block_size``, offset ``s % block_size``. An 8-bit cache (int8 / fp8
e4m3, see ``flashserve.kernels.kv_quant``) is quantized here, on store: one fp16 scale per
(token, head) row, written to the block's scale region.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashserve.kernels import kv_quant, pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.kv_quant import QMAX, is_quantized, kv_scales
from flashserve.kernels.utils import next_power_of_2

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to an integer, ties to even
_MIN_SCALE = tl.constexpr(kv_quant.MIN_SCALE)
_MAX_SCALE = tl.constexpr(kv_quant.MAX_SCALE)


@triton.jit
def _rint(y):
    """Round fp32 to the nearest integer, ties to even (the add rounds in the FPU's mode)."""
    return (y + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def quantize_rows(x, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """x [R, C] fp32 (masked lanes 0) -> (values on the int8 / e4m3 grid as fp32 [R, C], fp16
    scales [R]); bit-identical to ``kv_quant.quantize``. Divisions are IEEE (div_rn), and fp8
    values are rounded to the e4m3 grid here, so the final cast is exact (the interpreter's
    own fp32 -> fp8 rounding is wrong when the mantissa carries into the exponent)."""
    amax = tl.max(tl.abs(x), 1)
    scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, QMAX), _MIN_SCALE), _MAX_SCALE).to(tl.float16)
    y = tl.math.div_rn(x, scale.to(tl.float32)[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT8:
        r = _rint(y)
    else:
        r = round_e4m3(y)
    return r, scale


@triton.jit
def round_e4m3(y):
    """fp32 |y| <= 448 rounded to the nearest fp8 e4m3 value (ties to even), still as fp32, so
    that the cast to e4m3 is exact everywhere (the interpreter's own cast rounds wrongly when the
    mantissa carries into the exponent). e4m3: 3 mantissa bits, smallest normal exponent -6
    (below it the spacing is 2^-9)."""
    pow2 = (y.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2^floor(log2|y|)
    ulp = tl.maximum(pow2, 0.015625) * 0.125
    r = _rint(tl.math.div_rn(y, ulp)) * ulp
    return tl.where(r == 0.0, y * 0.0, r)  # a negative value that rounds to zero keeps its sign


@triton.jit
def store_token(args, t, CONSTS: tl.constexpr):
    """Store token t's [H, D] key and value tile (quantized for an 8-bit cache) and, with BOUNDS,
    fold its key into its page's bounds (the page's first key resets them; exact, as min / max
    pick one of their inputs). ``args`` / ``CONSTS`` as ``StoreArgs`` holds them; the token must
    own its page within the launch."""
    (k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, ks_ptr, vs_ptr, slot_ptr, bounds_ptr,
     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
     stride_cb, stride_co, stride_ch, stride_cd, stride_sb, stride_sh, stride_xb, stride_xm, stride_xh,
     num_heads, head_dim, block_size) = args
    BLOCK_H: tl.constexpr = CONSTS[0]
    BLOCK_D: tl.constexpr = CONSTS[1]
    QUANT: tl.constexpr = CONSTS[2]
    QMAX: tl.constexpr = CONSTS[3]
    IS_INT8: tl.constexpr = CONSTS[4]
    BOUNDS: tl.constexpr = CONSTS[5]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = (offs_h < num_heads) & (slot >= 0)
    mask = h_ok[:, None] & (offs_d[None, :] < head_dim)
    blk = slot // block_size
    off = slot % block_size
    src_k = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    src_v = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    dst = blk * stride_cb + off * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    kk = tl.load(src_k, mask=mask, other=0.0)
    vv = tl.load(src_v, mask=mask, other=0.0)
    if BOUNDS:
        lo_ptr = bounds_ptr + blk * stride_xb + offs_h[:, None] * stride_xh + offs_d[None, :]
        lo, hi = kk.to(tl.float32), kk.to(tl.float32)
        if off != 0:
            lo = tl.minimum(lo, tl.load(lo_ptr, mask=mask).to(tl.float32))
            hi = tl.maximum(hi, tl.load(lo_ptr + stride_xm, mask=mask).to(tl.float32))
        tl.store(lo_ptr, lo.to(bounds_ptr.dtype.element_ty), mask=mask)
        tl.store(lo_ptr + stride_xm, hi.to(bounds_ptr.dtype.element_ty), mask=mask)
    if QUANT:
        kk, k_scale = quantize_rows(kk.to(tl.float32), QMAX, IS_INT8)
        vv, v_scale = quantize_rows(vv.to(tl.float32), QMAX, IS_INT8)
        s_dst = blk * stride_sb + offs_h * stride_sh + off
        tl.store(ks_ptr + s_dst, k_scale, mask=h_ok)
        tl.store(vs_ptr + s_dst, v_scale, mask=h_ok)
    tl.store(k_cache_ptr + dst, kk.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, vv.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(args, CONSTS: tl.constexpr, PDL: tl.constexpr):
    # one program per new token (``store_token``)
    wait_for_prior(PDL)
    store_token(args, tl.program_id(0).to(tl.int64), CONSTS)


class StoreArgs(NamedTuple):
    """A store's kernel arguments (``store_kv_args``): ``store_token``'s ``args`` and ``CONSTS``
    (BLOCK_H, BLOCK_D, QUANT, QMAX, IS_INT8, BOUNDS), and the warps a program of it wants."""

    args: tuple
    consts: tuple
    num_warps: int


def store_kv_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, quest_bounds: torch.Tensor | None = None) -> StoreArgs:
    """The arguments of ``store_token`` for ``store_kv``'s tensors (shapes as it documents)."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2] == num_heads and k_cache.shape[3] == head_dim
    assert slot_mapping.shape[0] >= num_tokens
    quant = is_quantized(k_cache)
    if quant:
        ks, vs = kv_scales(k_cache), kv_scales(v_cache)
        scale_strides = (ks.stride(0), ks.stride(1))
        assert vs.stride() == ks.stride() and ks.stride(2) == 1
    else:
        ks, vs, scale_strides = k_cache, v_cache, (0, 0)  # dummies
    has_bounds = quest_bounds is not None
    if has_bounds:
        assert quest_bounds.shape[1:] == (2, num_heads, head_dim) and quest_bounds.stride(3) == 1
        bound_strides = quest_bounds.stride()[:3]
    else:
        quest_bounds, bound_strides = k, (0, 0, 0)  # dummies
    args = (k, v, k_cache, v_cache, ks, vs, slot_mapping, quest_bounds,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
            *scale_strides, *bound_strides, num_heads, head_dim, k_cache.shape[1])
    consts = (next_power_of_2(num_heads), next_power_of_2(head_dim), quant, QMAX.get(k_cache.dtype, 0.0),
              k_cache.dtype == torch.int8, has_bounds)
    return StoreArgs(args, consts, 4 if num_heads * head_dim >= 2048 else 1)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # same shape and strides as k_cache
    slot_mapping: torch.Tensor,  # [T] int64 (int32 accepted), -1 = skip
    quest_bounds: torch.Tensor | None = None,  # [num_blocks + 1, 2, Hkv, D] (SideState.bounds)
) -> None:
    """Scatter the new tokens' keys and values into the paged cache, in place (quantizing
    them when the cache is 8-bit). ``quest_bounds``: also fold each key into its page's Quest
    bounds, in the same launch; only for steps whose tokens each write a page of their own (a
    decode step; prompts write several keys of one page: ``SideState.update``)."""
    if k.shape[0] == 0:
        return
    store = store_kv_args(k, v, k_cache, v_cache, slot_mapping, quest_bounds)
    _store_kv_kernel[(k.shape[0],)](store.args, CONSTS=store.consts, num_warps=store.num_warps,
                                    **pdl.launch_args(k.device, early=True))
