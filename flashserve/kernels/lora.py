"""LoRA deltas for a few rows (decode and short verification steps): each row reads only its own
adapter's weights, in two launches.

The adapted layers (``flashserve.lora.layers``) keep every slot's A rows in ``a`` [C, K] and B
(scaling folded in), transposed, in ``b_t`` [C, N], ``width`` rows per slot. For a row ``i`` whose
adapter is slot ``s = ids[i]`` (-1: none):

* shrink: ``t[i] = a[s*width : (s+1)*width] @ x[i]`` (fp32, ``width`` values; zeros without an
  adapter);
* expand: ``y[i] += t[i] @ b_t[s*width : (s+1)*width]``, in place, in fp32 before the one rounding
  to y's dtype (rows without an adapter are left as they are).

Against the masked products over every slot that larger steps use, this reads one adapter per
row instead of all of them and launches two kernels instead of four products and masks. Both
kernels wait for the kernel before them first (``flashserve.kernels.pdl``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior

MAX_ROWS = 16  # steps of more rows take the masked products (flashserve.lora.layers)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, ids_ptr, t_ptr,  # x [T, K], a [C, K], ids [T], t [T, W] fp32
    K, W, stride_x,
    BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(ids_ptr + row)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    live = (cols < W) & (slot >= 0)
    a_rows = slot * W + cols
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kin = ks < K
        x = tl.load(x_ptr + row * stride_x + ks, mask=kin & (slot >= 0), other=0.0).to(tl.float32)
        a = tl.load(a_ptr + a_rows[:, None] * K + ks[None, :], mask=live[:, None] & kin[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(t_ptr + row * W + cols, acc, mask=cols < W)


@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, b_ptr, ids_ptr,  # y [T, N] (updated in place), t [T, W] fp32, b_t [C, N], ids [T]
    N, W, stride_y,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(ids_ptr + row)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out = (ns < N) & (slot >= 0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W)
        win = (ws < W) & (slot >= 0)
        t = tl.load(t_ptr + row * W + ws, mask=win, other=0.0)
        b = tl.load(b_ptr + (slot * W + ws)[:, None] * N + ns[None, :], mask=win[:, None] & out[None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * t[:, None], axis=0)
    y = tl.load(y_ptr + row * stride_y + ns, mask=out, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + ns, (y + acc).to(y_ptr.dtype.element_ty), mask=out)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, ids: torch.Tensor,
             width: int) -> torch.Tensor:
    """``y [T, N] += `` each row's adapter delta (module docstring), in place; returns y. ``x``
    [T, K]; ``a`` [C, K] and ``b_t`` [C, N] contiguous, ``width`` rows per slot; ``ids`` [>= T]
    int64, each row's slot (-1: none)."""
    rows, k = x.shape
    n = y.shape[1]
    if rows == 0:
        return y
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous() and b_t.is_contiguous()
    t = torch.empty(rows, width, dtype=torch.float32, device=x.device)
    block_w = min(16, triton.next_power_of_2(width))
    _shrink_kernel[(rows, triton.cdiv(width, block_w))](
        x, a, ids, t, k, width, x.stride(0),
        BLOCK_W=block_w, BLOCK_K=256, num_warps=4, **pdl.launch_args(x.device),
    )
    block_n = min(256, triton.next_power_of_2(n))
    _expand_kernel[(rows, triton.cdiv(n, block_n))](
        y, t, b_t, ids, n, width, y.stride(0),
        BLOCK_N=block_n, BLOCK_W=16, num_warps=4, **pdl.launch_args(x.device),
    )
    return y
