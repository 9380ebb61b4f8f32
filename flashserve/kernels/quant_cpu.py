"""Quantized matrix products on the CPU through torch's own kernels.

* int8 per channel: ``torch.ops.aten._weight_int8pack_mm(x, q [N, K] int8, scale [N])``.
* int4 group-wise: ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)``
  with ``w = (u - 8) * scale + zero``; group 32, 64, 128 or 256; N a multiple of 16.

Both are vectorised (AVX-512 and AVX2) only for bfloat16 activations; float32 and float16
inputs take a scalar fallback 10-50x slower (measured here, docs/quantization.md). So the
activations go in as bf16, scales and zeros are bf16 too (the op requires the activation
dtype), the op accumulates in fp32 and rounds its output to bf16; ``cpu_int4_reference`` and
``cpu_int8_reference`` compute exactly that arithmetic with dense torch ops.

Packing: torch's ``_convert_weight_to_int4pack_for_cpu`` takes int32 ``[N, K]`` (4 bytes per
weight) and costs ~6 ns per weight; ``pack_int4_for_cpu`` writes the same bytes from uint8 with
a few tensor ops (the layout, which depends on the CPU's vector width, is documented in torch's
int4mm_kernel.cpp). A probe compares the two once per process and falls back to torch's
packer if they ever disagree.
"""

from __future__ import annotations

import functools

import torch

CPU_INT4_GROUPS = (32, 64, 128, 256)
ACT_DTYPE = torch.bfloat16


def _block_n() -> tuple[int, bool]:
    """(rows per packed block, whether full blocks use the vector layout): 64 rows with the
    AVX-512 kernels, 32 with AVX2; the scalar kernels use 32-row blocks of row pairs."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return 64, True
    return 32, cap == "AVX2"


def _nibble_sources(u: torch.Tensor, block: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed byte in order: the element of ``u [N, K]`` in its low and its high nibble.

    Works on any dtype (only reshapes and permutations), so running it on element indices gives
    the layout's index map (``unpack_int4_for_cpu``)."""
    n, k = u.shape
    rows, vector = block
    full = n // rows * rows if vector else 0
    lo, hi = [], []
    if full:
        nb = full // rows
        if rows == 64:  # byte (k, d) = rows d | d+32 << 4; byte (k, 16 + d) = rows 16+d | 48+d << 4
            v = u[:full].reshape(nb, 4, 16, k)
            lo.append(v[:, 0:2].permute(0, 3, 1, 2).reshape(-1))  # [NB, K, 2, 16]
            hi.append(v[:, 2:4].permute(0, 3, 1, 2).reshape(-1))
        else:  # 32: byte (k, d) = rows d | d+16 << 4
            v = u[:full].reshape(nb, 2, 16, k)
            lo.append(v[:, 0].permute(0, 2, 1).reshape(-1))  # [NB, K, 16]
            hi.append(v[:, 1].permute(0, 2, 1).reshape(-1))
    for start in range(full, n, rows):  # partial blocks, and every block of the scalar layout:
        v = u[start : start + rows]  # byte (k, n / 2) = rows n | n+1 << 4
        v = v.reshape(v.shape[0] // 2, 2, k).permute(2, 0, 1)  # [K, rows/2, 2]
        lo.append(v[..., 0].reshape(-1))
        hi.append(v[..., 1].reshape(-1))
    return torch.cat(lo), torch.cat(hi)


def _pack_layout(u: torch.Tensor, block: tuple[int, bool]) -> torch.Tensor:
    n, k = u.shape
    lo, hi = _nibble_sources(u.to(torch.uint8), block)
    return (lo | (hi << 4)).reshape(n, k // 2)


@functools.lru_cache(maxsize=None)
def _fast_packer_agrees(block: tuple[int, bool]) -> bool:
    """Probe: our packer equals torch's on rows that cover full and partial blocks."""
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (64 + 48, 64), generator=g, dtype=torch.int32)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    return bool(torch.equal(_pack_layout(u.to(torch.uint8), block), ref))


def pack_int4_for_cpu(u: torch.Tensor) -> torch.Tensor:
    """uint8 ``u [N, K]`` with values 0..15 -> the packed weight of ``_weight_int4pack_mm_for_cpu``."""
    n, k = u.shape
    if n % 16 or k % 2:
        raise ValueError(f"int4 CPU weights need N % 16 == 0 and an even K, got [{n}, {k}]")
    block = _block_n()
    if _fast_packer_agrees(block):
        return _pack_layout(u.to(torch.uint8), block)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1)


def _vector_blocks(n: int) -> tuple[int, bool] | None:
    """The vector layout's block when every row is in a full block (else None: general path)."""
    rows, vector = _block_n()
    if not vector or n % rows or not _fast_packer_agrees((rows, vector)):
        return None
    return rows, vector


def pack_nibble_runs_for_cpu(b: torch.Tensor, half: int) -> torch.Tensor | None:
    """GGUF 4-bit quants straight to the CPU kernel's packing, without unpacking to one byte per
    weight: ``b`` uint8 [N, K/2], byte i of each run of ``half`` bytes holding columns i (low
    nibble) and ``i + half`` (high) of its ``2 * half`` columns (Q4_0 / Q4_1: half 16, Q4_K: 32).
    None when N is not whole vector blocks (then unpack and use ``pack_int4_for_cpu``)."""
    n, m = b.shape
    block = _vector_blocks(n)
    if block is None:
        return None
    rows = block[0]
    lanes = rows // 32
    v = b.reshape(n // rows, 2, lanes, 16, m // half, half)  # [NB, top/bottom, lane, d, run, i]
    top, bottom = v[:, 0], v[:, 1]
    low = (top & 15) | (bottom << 4)  # columns run * 2 half + i
    high = (top >> 4) | (bottom & 0xF0)  # columns run * 2 half + half + i
    out = torch.stack([low, high], dim=4)  # [NB, lane, d, run, 2, i]
    return out.permute(0, 3, 4, 5, 1, 2).reshape(n, m)  # [NB, K, lane, d]


def pack_byte_planes_for_cpu(u: torch.Tensor) -> torch.Tensor | None:
    """8-bit ``u [N, K]`` as two 4-bit planes ``[u >> 4 | u & 15]`` (``[N, 2K]`` of 4-bit values)
    in the CPU kernel's packing, straight from the bytes. None when N is not whole vector blocks."""
    n, k = u.shape
    block = _vector_blocks(n)
    if block is None:
        return None
    rows = block[0]
    v = u.reshape(n // rows, 2, rows // 32, 16, k)  # [NB, top/bottom, lane, d, K]
    top, bottom = v[:, 0], v[:, 1]
    planes = torch.stack([(top >> 4) | (bottom & 0xF0), (top & 15) | (bottom << 4)], dim=1)  # [NB, 2, lane, d, K]
    return planes.permute(0, 1, 4, 2, 3).reshape(n, k)


def unpack_int4_for_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_int4_for_cpu``: uint8 ``u [N, K]``."""
    if not _fast_packer_agrees(_block_n()):
        raise RuntimeError("torch's int4 CPU layout differs from the one flashserve knows; cannot unpack")
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    lo, hi = _nibble_sources(idx, _block_n())
    flat = packed.reshape(-1)
    u = torch.empty(n * k, dtype=torch.uint8)
    u[lo] = flat & 15
    u[hi] = flat >> 4
    return u.reshape(n, k)


def scale_zeros_for_cpu(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, G] scales and zeros -> the op's ``[G, N, 2]`` bf16 tensor."""
    return torch.stack([scales.t(), zeros.t()], dim=-1).to(ACT_DTYPE).contiguous()


def cpu_int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` -> bf16 ``[M, N]``."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(ACT_DTYPE).contiguous(), packed, group, scale_zeros)


def cpu_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` -> bf16 ``[M, N]``; ``scale`` bf16 [N]."""
    return torch.ops.aten._weight_int8pack_mm(x.to(ACT_DTYPE).contiguous(), q, scale)


def cpu_int4_reference(x: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """What ``cpu_int4_matmul`` computes, in dense torch: bf16 inputs, scales and zeros; fp32
    dequantization and accumulation; bf16 output."""
    s = scales.to(ACT_DTYPE).float().repeat_interleave(group, dim=1)
    z = zeros.to(ACT_DTYPE).float().repeat_interleave(group, dim=1)
    w = (u.float() - 8.0) * s + z
    return (x.to(ACT_DTYPE).float() @ w.t()).to(ACT_DTYPE)


def cpu_int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(ACT_DTYPE).float()
    return ((x.to(ACT_DTYPE).float() @ q.float().t()) * s).to(ACT_DTYPE)
