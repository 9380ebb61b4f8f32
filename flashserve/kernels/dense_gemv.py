"""Batch-1 GEMV over a 16-bit dense weight: ``y[1, N] = x[1, K] @ W^T (+ bias)``, W bf16 / fp16.

The products of a batch-1 decode step read every weight once and do two flops per weight, so the
kernel only has to stream ``W``. Each program owns ``BLOCK_N`` rows and walks K in ``BLOCK_K``
columns, multiplying in fp32 registers and reducing the ``[BLOCK_N, BLOCK_K]`` products once at the
end (no shuffles per step). What it adds over cuBLAS's GEMV is the launch protocol of the other
decode kernels (``pdl``): it reads its first weight tile, lets the next kernel launch, and only
then waits for the kernels before it, so its start overlaps the previous kernel's tail. ``gated``
takes an MLP's ``[gate | up]`` halves as x and applies ``silu(gate) * up`` as it reads them,
rounded as ``activation.silu_and_mul`` rounds, so the down projection needs no activation launch.

Tiles chosen on an H100 in CUDA graphs of distinct weights (docs/benchmarks.md). 4 rows x 2048
columns over 8 warps where K is a multiple of 2048 and at least 4096, or the product has at most
16 x SMs rows: 1.11-1.38x cuBLAS on Llama-3.1-8B's products and LM head, 1.02-1.08x the
16 x 512 tile there; 1.34x the 4 x 1024 tile on Qwen3-0.6B's o (1024 rows), 1.06x on
Qwen3-30B-A3B's o (2048 rows). At 4 x 2048 over 8 warps the columns of x a thread loads are the
ones it multiplies, so its loop shares nothing through shared memory (sm_90 SASS: no barrier per
step, where 16 x 512 has two). Two refinements measured end to end on an H100 (docs/benchmarks.md,
thirty-sixth session): 8 rows x 2048 from K = 8192 (Llama-3.1-8B's down) and 2 rows x 2048 over 4
warps for at most 4096 rows at K >= 4096 (the o products; a gated product keeps 4 rows), batch-1
Llama-3.1-8B bf16 183.5 -> 185.3 tok/s, Qwen3-30B-A3B 300.8 -> 301.7.
Other narrow products take 4 x 1024 (512) columns; the rest 16 x 512 (Qwen3-30B-A3B's qkv,
K = 2048: 7.7 us against 8.3 for 4 x 2048). Splitting long rows (K = 14336) over programs was
slower than not.

Shapes the tiles do not divide return ``None``; callers fall back to ``F.linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from flashserve.kernels import pdl
from flashserve.kernels.pdl import wait_for_prior
from flashserve.kernels.quant_gemv import GemvConfig, _x_floats
from flashserve.kernels.utils import is_interpreter, num_sms


@triton.jit
def _gemv_dense_kernel(
    x_ptr,  # [K] activations, or [2K] gate and up halves (GATED)
    w_ptr,  # [N, K] bf16 / fp16
    b_ptr,  # [N] bias (HAS_BIAS)
    out_ptr,  # [N] in x's dtype
    K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    tiles = w_ptr + rows[:, None] * K + cols[None, :]
    w = tl.load(tiles)  # the first tile before the wait: weights do not depend on earlier kernels
    if PDL:
        gdc_launch_dependents()
    wait_for_prior(PDL)
    acc = w.to(tl.float32) * _x_floats(x_ptr, cols, K, GATED)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(tiles + k0)  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * _x_floats(x_ptr, k0 + cols, K, GATED)[None, :]
    total = tl.sum(acc, axis=1)
    if HAS_BIAS:
        total += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))


def dense_gemv_config(n: int, k: int, device: torch.device | None = None, gated: bool = False) -> GemvConfig | None:
    """The tile for one shape (``split_k`` always 1), or None when it does not divide the shape.
    Where K is a multiple of 2048: 8 rows x 2048 columns from K = 8192; 2 rows x 2048 in 4 warps
    for N <= 4096 at K >= 4096 (not ``gated``: its two x halves want more rows); otherwise 4 rows x
    2048 where K is at least 4096 or 16-row blocks would not give every SM one. Else 4 rows x
    1024 (512) columns in that narrow case and 16 rows x 512 columns in the rest (H100 timings:
    docs/benchmarks.md)."""
    narrow = n // 16 <= num_sms(device)
    if k % 2048 == 0 and (narrow or k >= 4096):
        if k >= 8192 and n % 8 == 0:
            cfg = GemvConfig(8, 2048, 1, 8, 3)
        elif k >= 4096 and n <= 4096 and not gated:
            cfg = GemvConfig(2, 2048, 1, 4, 3)
        else:
            cfg = GemvConfig(4, 2048, 1, 8, 3)
    elif narrow:
        cfg = GemvConfig(4, 1024, 1, 8, 3) if k % 1024 == 0 else GemvConfig(4, 512, 1, 4, 3)
    else:
        cfg = GemvConfig(16, 512, 1, 8, 3)
    return None if n % cfg.block_n or k % cfg.block_k else cfg


def dense_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
               config: GemvConfig | None = None) -> torch.Tensor | None:
    """``x [1, K] @ w[N, K]^T (+ bias)`` -> [1, N] in x's dtype, or None when this shape, dtype or
    layout needs ``F.linear``. ``gated``: x is ``[1, 2K]``, the gate and up halves, and the product is
    ``silu_and_mul(x) @ w^T`` (bit for bit the two calls' result on the same tile)."""
    if x.dim() != 2 or x.shape[0] != 1:
        return None
    k = x.shape[1] // 2 if gated else x.shape[1]
    n = w.shape[0]
    if gated and x.shape[1] != 2 * k:
        raise ValueError(f"a gated GEMV takes [1, 2K] gate and up halves, got {x.shape[1]} columns")
    if (w.dtype != x.dtype or x.dtype not in (torch.bfloat16, torch.float16)
            or w.shape[1] != k or not w.is_contiguous()):
        return None
    cfg = config or dense_gemv_config(n, k, x.device, gated)
    if cfg is None:
        return None
    if cfg.split_k != 1 or n % cfg.block_n or k % cfg.block_k:
        raise ValueError(f"dense GEMV config {cfg} does not fit N = {n}, K = {k}: block_n must divide N, "
                         "block_k K, and split_k must be 1")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    launch = pdl.launch_args(x.device)
    if not is_interpreter():
        launch.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _gemv_dense_kernel[(n // cfg.block_n,)](
        x, w, bias if bias is not None else out, out, k,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATED=gated, HAS_BIAS=bias is not None, **launch,
    )
    return out.view(1, n)
