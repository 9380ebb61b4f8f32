"""Kernel-ready quantized weights: one small module per stored matrix, ``forward(x) = x @ W^T``.

A ``PackedWeight`` owns the tensors a kernel reads (registered as buffers, so ``.to()``, the
CPU huge-page packing and byte counts see them) and picks its kernel from the device it was
built for:

| format | CUDA | CPU |
|---|---|---|
| int8 per channel | Triton ``wq_matmul`` | ``_weight_int8pack_mm`` (bf16 activations) |
| int4 group-wise | Triton ``wq_matmul`` | ``_weight_int4pack_mm_for_cpu`` (bf16 activations) |
| fp8 e4m3, weight only | Triton ``wq_matmul`` | emulated: fp8-rounded weights, dense matmul |
| fp8 e4m3, W8A8 | per-token fp8 activations + ``torch._scaled_mm`` | emulated likewise |
| GGUF blocks | Triton ``gguf_matmul`` on the file's bytes | ``cpu_native`` on the block fields (int16 activations) where it runs, else the int4 CPU kernel (exact re-expression) |

On CUDA, M (rows of x) above ``DEQUANT_MIN_M`` goes through a dense bf16 copy and cuBLAS
(prefill chunks, where the copy is paid once for many rows); below it the fused kernels run.
``invariant(x)`` is the batch-invariant mode's product on CUDA (``flashserve.layers.batch_invariant``):
the fused kernel with one launch configuration for every M.
CPU outputs are rounded to bf16 by torch's kernels and cast back to x's dtype; the native GGUF
kernel (``flashserve.kernels.cpu_native``, where it builds) returns fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import cpu_native, quant_cpu, quant_reference as ref

DEQUANT_MIN_M = 2048  # CUDA: rows from which dequantize + cuBLAS replaces the fused kernel


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def dense_invariant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` for a dense ``[N, K]`` weight in x's dtype with the batch-invariant configuration."""
    from flashserve.kernels.quant_gemm import FMT_DENSE, invariant_config, wq_matmul

    n, k = w.shape
    return wq_matmul(x, w, w, None, FMT_DENSE, config=invariant_config(n, k, FMT_DENSE, 0, x.device, x.element_size()))


class PackedWeight(nn.Module):
    """``[M, K] -> [M, N]`` with a quantized ``[N, K]`` weight.

    ``dequantize()`` returns the fp32 weight the kernel multiplies by; ``reference(x)`` computes
    what ``forward`` computes with dense torch ops (same roundings, another summation order):
    the oracle of the kernel and of a whole quantized model (tests swap it in)."""

    out_features: int
    in_features: int
    label: str
    # whether the norms before this product launch its kernel at their start (``pdl.launch_args``):
    # helps a GEMV that reads its weights before it waits and keeps all its programs resident
    early_inputs = False

    def dequantize(self) -> torch.Tensor:  # fp32 [N, K]
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 dequantized weight, fp32 products, rounded to x's dtype (the CUDA kernels)."""
        return (x.float() @ self.dequantize().t()).to(x.dtype)

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` on CUDA with one kernel configuration for every M: a row's result does not
        depend on the other rows of the call."""
        raise ValueError(f"{self.label} weights have no batch-invariant product on this device")

    def gemv_operands(self) -> tuple | None:
        """``(w, scales, zeros, fmt, group)`` for ``quant_gemv.wq_gemv``, or None where that kernel
        does not take this weight."""
        return None

    def silu_gated(self, h: torch.Tensor) -> torch.Tensor | None:
        """``forward(silu_and_mul(h))`` for ``h = [gate | up]`` in one launch, the gating done as the
        batch-1 GEMV reads its input; None where that kernel does not run (the caller then makes
        the two calls, whose result this equals exactly)."""
        operands = self.gemv_operands() if _on_cuda(h) and h.shape[0] == 1 else None
        if operands is None:
            return None
        from flashserve.kernels.quant_gemv import wq_gemv

        return wq_gemv(h, *operands, gated=True)

    def extra_repr(self) -> str:
        return f"{self.label}, in={self.in_features}, out={self.out_features}"


class DenseWeight(PackedWeight):
    """A plain matrix (fallback for formats without a kernel on this device)."""

    def __init__(self, w: torch.Tensor, label: str = "dense") -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.label = label
        self.register_buffer("weight", w.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight)

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        return dense_invariant(x, self.weight.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    reference = forward


class Int8Weight(PackedWeight):
    """int8 per output channel: ``w = q * scale``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.label = "int8"
        self.register_buffer("q", q.contiguous(), persistent=False)
        # CPU: the op wants scales in the activation dtype (bf16)
        scale_dtype = torch.float32 if _on_cuda(q) else torch.bfloat16
        self.register_buffer("scale", scale.to(scale_dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _on_cuda(x):
            from flashserve.kernels.quant_gemm import FMT_INT8, wq_dequantize, wq_matmul

            if x.shape[0] >= DEQUANT_MIN_M:
                return F.linear(x, wq_dequantize(self.q, self.scale, None, FMT_INT8, self.in_features, dtype=x.dtype))
            return wq_matmul(x, self.q, self.scale, None, FMT_INT8)
        return quant_cpu.cpu_int8_matmul(x, self.q, self.scale).to(x.dtype)

    def gemv_operands(self) -> tuple | None:
        from flashserve.kernels.quant_gemm import FMT_INT8

        return (self.q, self.scale, None, FMT_INT8, 0) if _on_cuda(self.q) else None

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        from flashserve.kernels.quant_gemm import FMT_INT8, invariant_config, wq_matmul

        cfg = invariant_config(self.out_features, self.in_features, FMT_INT8, 0, x.device, x.element_size())
        return wq_matmul(x, self.q, self.scale, None, FMT_INT8, config=cfg)

    def dequantize(self) -> torch.Tensor:
        return ref.dequantize_int8(self.q, self.scale)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if _on_cuda(x):
            return super().reference(x)
        return quant_cpu.cpu_int8_reference(x, self.q, self.scale).to(x.dtype)


class Int4Weight(PackedWeight):
    """int4 group-wise, ``w = (u - 8) * scale + zero``; ``perm`` (act-order checkpoints) says which
    input column each stored column multiplies: ``y = x[:, perm] @ W^T``.

    CUDA keeps the canonical packing (``quant_reference.pack_int4``); the CPU repacks for torch's
    int4 kernel, re-expressing groups it lacks (a multiple of 32 becomes 32 with repeated scales),
    padding N to a multiple of 16. ``planes=2`` marks a weight whose columns were split in two
    4-bit planes (8-bit values ``16 * hi + lo``): x is fed twice.
    """

    early_inputs = True  # the int4 GEMV (batch-1 Llama-3.1-8B on an H100: 363.5 -> 373.9 tok/s)

    def __init__(self, u: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                 perm: torch.Tensor | None = None, label: str = "", planes: int = 1,
                 packed: torch.Tensor | None = None, shape: tuple[int, int] | None = None) -> None:
        """``u`` uint8 [N, planes * K] in 0..15; or, on the CPU, ``packed`` already in the CPU
        kernel's layout (then ``shape`` gives [N, planes * K], N a multiple of 16)."""
        super().__init__()
        n, k_stored = u.shape if u is not None else shape
        self.out_features, self.in_features = n, k_stored // planes
        self.group = group
        self.planes = planes
        self.label = label or f"int4-g{group}"
        self.register_buffer("perm", perm, persistent=False)
        if _on_cuda(scales):
            if planes != 1:
                raise ValueError("two-plane int4 weights are a CPU representation")
            self.register_buffer("packed", ref.pack_int4(u), persistent=False)
            self.register_buffer("scales", scales.float().contiguous(), persistent=False)
            self.register_buffer("zeros", None if zeros is None else zeros.float().contiguous(), persistent=False)
            return
        if zeros is None:
            zeros = torch.zeros_like(scales)
        if group not in quant_cpu.CPU_INT4_GROUPS:
            if group % 32:
                raise ValueError(f"int4 group {group} has no CPU kernel (needs a multiple of 32)")
            scales, zeros = scales.repeat_interleave(group // 32, 1), zeros.repeat_interleave(group // 32, 1)
            self.group = 32
        pad = -n % 16
        if pad:  # u = 8 with zero 0 is an all-zero row
            u = torch.cat([u, torch.full((pad, k_stored), 8, dtype=torch.uint8)])
            scales = torch.cat([scales, torch.zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, torch.zeros(pad, zeros.shape[1])])
        self.register_buffer("packed", packed if packed is not None else quant_cpu.pack_int4_for_cpu(u), persistent=False)
        self.register_buffer("scale_zeros", quant_cpu.scale_zeros_for_cpu(scales, zeros), persistent=False)
        self.padded = pad > 0
        if perm is None and not self.padded:  # chosen once: no per-call checks at batch-1 decode
            self.forward = self._cpu_forward

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` -> the ``[M, planes * K]`` columns the stored weight multiplies (CPU)."""
        return torch.cat([x] * self.planes, dim=1) if self.planes > 1 else x

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` on the CPU for a weight without column permutation or padded rows."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(self.feed(x).to(quant_cpu.ACT_DTYPE).contiguous(), self.packed,
                                                       self.group, self.scale_zeros)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if _on_cuda(x):
            from flashserve.kernels.quant_gemm import FMT_INT4, wq_dequantize, wq_matmul

            if x.shape[0] >= DEQUANT_MIN_M:
                w = wq_dequantize(self.packed, self.scales, self.zeros, FMT_INT4, self.in_features, self.group, x.dtype)
                return F.linear(x, w)
            return wq_matmul(x, self.packed, self.scales, self.zeros, FMT_INT4, self.group)
        y = quant_cpu.cpu_int4_matmul(self.feed(x), self.packed, self.group, self.scale_zeros)
        return (y[:, : self.out_features] if self.padded else y).to(x.dtype)

    def gemv_operands(self) -> tuple | None:
        from flashserve.kernels.quant_gemm import FMT_INT4

        if self.perm is not None or not _on_cuda(self.packed):
            return None
        return self.packed, self.scales, self.zeros, FMT_INT4, self.group

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        from flashserve.kernels.quant_gemm import FMT_INT4, invariant_config, wq_matmul

        if self.perm is not None:
            x = x.index_select(1, self.perm)
        cfg = invariant_config(self.out_features, self.in_features, FMT_INT4, self.group, x.device, x.element_size())
        return wq_matmul(x, self.packed, self.scales, self.zeros, FMT_INT4, self.group, config=cfg)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, planes * K]`` in stored column order (``perm`` not undone)."""
        if _on_cuda(self.packed):
            return ref.dequantize_int4(self.packed, self.scales, self.zeros, self.group)
        n_pad = self.packed.shape[0]
        u = quant_cpu.unpack_int4_for_cpu(self.packed, n_pad, self.packed.shape[1] * 2).float()
        sz = self.scale_zeros.float()  # [groups, N, 2], bf16 values
        s = sz[..., 0].t().repeat_interleave(self.group, 1)
        z = sz[..., 1].t().repeat_interleave(self.group, 1)
        return ((u - 8.0) * s + z)[: self.out_features]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """CPU: bf16 x (fed ``planes`` times), bf16 scales / zeros, fp32 products, bf16 out. The
        dequantized weight is kept after the first call (a reference model is slow, not small)."""
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if _on_cuda(x):
            return super().reference(x)
        if getattr(self, "_dense_for_reference", None) is None:
            self._dense_for_reference = self.dequantize()
        xb = self.feed(x).to(torch.bfloat16).float()
        return (xb @ self._dense_for_reference.t()).to(torch.bfloat16).to(x.dtype)


class Q6KWeight(Int4Weight):
    """GGUF Q6_K on the CPU through torch's int4 kernel, exactly up to its bf16 scales (where
    ``cpu_native`` does not run).

    Q6_K is ``w = a * (q - 32)`` per 16 columns, ``q = 16 * hi + lo`` (2 + 4 bits); the kernel's
    groups are 32 columns with one scale and zero. Each kernel group holds one 16-column group
    twice: ``u = lo`` fed ``x``, then ``u = 2 * hi + 5`` fed ``8 * x`` (exact in bf16), scale ``a``,
    zero 0: ``(lo - 8) a x + (2 hi - 3) a 8x = a (16 hi + lo - 32) x``. Unlike a dense fp32 copy,
    a row's product does not depend on how many rows the call has (speculative verification)."""

    def __init__(self, raw: torch.Tensor) -> None:
        q, a = ref.gguf_q6_k(raw)
        n, k = q.shape
        q = q.reshape(n, k // 16, 1, 16)
        u = torch.cat([q & 15, 2 * (q >> 4) + 5], dim=2).reshape(n, 2 * k)
        super().__init__(u, a, None, 32, label="gguf-Q6_K", planes=2)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        x = x.reshape(m, k // 16, 1, 16)
        return torch.cat([x, 8.0 * x], dim=2).reshape(m, 2 * k)


class Fp8Weight(PackedWeight):
    """fp8 e4m3 per output channel. ``w8a8``: activations are quantized per token to fp8 too and
    the product runs in fp8 (``torch._scaled_mm``, Hopper / Ada). On CPU both are emulated with
    the fp8-rounded values in a dense fp32 matmul (for quality measurements; no speed claim)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, w8a8: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.w8a8 = w8a8
        self.label = "fp8-w8a8" if w8a8 else "fp8"
        if _on_cuda(q):
            self.register_buffer("q", q.contiguous(), persistent=False)
            self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        else:
            self.register_buffer("weight", ref.dequantize_fp8(q, scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _on_cuda(x):
            if self.w8a8:
                xq, xs = ref.quantize_fp8(x)
                return F.linear(ref.dequantize_fp8(xq, xs), self.weight).to(x.dtype)
            return F.linear(x.float(), self.weight).to(x.dtype)
        if self.w8a8:
            from flashserve.kernels.quant_act import quantize_fp8_rows

            xq, xs = quantize_fp8_rows(x)  # dynamic per-token scales [M], one launch
            y = torch._scaled_mm(xq, self.q.t(), scale_a=xs[:, None], scale_b=self.scale.view(1, -1),
                                 out_dtype=torch.bfloat16)  # row-wise scaling outputs bf16 only
            return y.to(x.dtype)
        from flashserve.kernels.quant_gemm import FMT_FP8, wq_dequantize, wq_matmul

        if x.shape[0] >= DEQUANT_MIN_M:
            return F.linear(x, wq_dequantize(self.q, self.scale, None, FMT_FP8, self.in_features, dtype=x.dtype))
        return wq_matmul(x, self.q, self.scale, None, FMT_FP8)

    def gemv_operands(self) -> tuple | None:
        from flashserve.kernels.quant_gemm import FMT_FP8

        return (self.q, self.scale, None, FMT_FP8, 0) if not self.w8a8 and "q" in self._buffers else None

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        if self.w8a8:  # torch._scaled_mm picks its kernel by M
            return super().invariant(x)
        from flashserve.kernels.quant_gemm import FMT_FP8, invariant_config, wq_matmul

        cfg = invariant_config(self.out_features, self.in_features, FMT_FP8, 0, x.device, x.element_size())
        return wq_matmul(x, self.q, self.scale, None, FMT_FP8, config=cfg)

    def dequantize(self) -> torch.Tensor:
        if hasattr(self, "q"):
            return ref.dequantize_fp8(self.q, self.scale)
        return self.weight.float()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.w8a8:  # fp8 activations, exact fp32 products; on CUDA rounded to bf16 as _scaled_mm does
            xq, xs = ref.quantize_fp8(x)
            y = ref.dequantize_fp8(xq, xs) @ self.dequantize().t()
            return (y.to(torch.bfloat16) if _on_cuda(x) else y).to(x.dtype)
        return super().reference(x)


class GGUFWeight(PackedWeight):
    """A GGUF matrix on CUDA, kept in the file's block layout (``quant_gguf``)."""

    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = raw.shape[0], in_features
        self.qtype = qtype
        self.label = f"gguf-{qtype}"
        self.register_buffer("raw", raw.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from flashserve.kernels.quant_gguf import gguf_dequantize, gguf_matmul

        if x.shape[0] >= DEQUANT_MIN_M:
            return F.linear(x, gguf_dequantize(self.raw, self.qtype, self.in_features, x.dtype))
        return gguf_matmul(x, self.raw, self.qtype)

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        from flashserve.kernels.quant_gguf import gguf_invariant_config, gguf_matmul

        return gguf_matmul(x, self.raw, self.qtype, gguf_invariant_config(self.out_features, self.in_features, x.device))

    def dequantize(self) -> torch.Tensor:
        return ref.gguf_dequantize(self.raw, self.qtype)


class CpuGGUFWeight(PackedWeight):
    """A GGUF matrix of any type on the CPU for ``cpu_native``'s kernel: the file's block fields in
    planes (``cpu_native.split_blocks``; the K-quants' groups with exact fp32 scales); each row of x
    quantized to int16 per 32 columns, integer dot products, fp32 out. A row's result does not
    depend on the call's other rows."""

    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = raw.shape[0], in_features
        self.qtype = qtype
        self.label = f"gguf-{qtype}"
        for name, plane in cpu_native.split_blocks(raw, qtype)._asdict().items():
            self.register_buffer(name, plane, persistent=False)
        self.forward = self._forward  # chosen once, like ``Int4Weight._cpu_forward``

    @property
    def planes(self) -> cpu_native.Planes:
        b = self._buffers  # read per call (the buffers may move), without nn.Module's slow lookup
        return cpu_native.Planes(b["qs"], b["d"], b["m"], b["qh"])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_native.matmul(x, self.planes, self.qtype)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return cpu_native.dequantize(self.planes, self.qtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_native.matmul_reference(x, self.planes, self.qtype).to(x.dtype)


def gguf_weight(raw: torch.Tensor, qtype: str, in_features: int, device: torch.device) -> PackedWeight:
    """A GGUF matrix for ``device``: the raw blocks on CUDA; on the CPU, the blocks (every type) for
    the native kernel where it runs (``CpuGGUFWeight``), else torch's int4 kernel
    with the block's affine map re-expressed exactly (``w = a * u + c`` per 32 columns: 4-bit
    ``u`` in one plane, 5 to 8-bit ``u`` in two planes ``u = 16 * hi + lo``), Q6_K's 16-column
    groups as ``Q6KWeight`` describes."""
    if device.type == "cuda":
        return GGUFWeight(raw.to(device), qtype, in_features)
    if qtype in cpu_native.QTYPES and cpu_native.available():
        return CpuGGUFWeight(raw, qtype, in_features)
    if qtype == "Q6_K":
        return Q6KWeight(raw)
    a, c = ref.gguf_group_scales(raw, qtype)
    if ref.GGUF_AFFINE_BITS[qtype] <= 4:  # (u - 8) * a + (8a + c)
        packed = None
        if qtype in ref.NIBBLE_HALF:  # the file's nibbles straight into the kernel's packing
            packed = quant_cpu.pack_nibble_runs_for_cpu(ref.gguf_quant_bytes(raw, qtype), ref.NIBBLE_HALF[qtype])
        u = ref.gguf_affine(raw, qtype)[0] if packed is None else None
        return Int4Weight(u, a, 8.0 * a + c, 32, label=f"gguf-{qtype}", packed=packed, shape=(raw.shape[0], in_features))
    # a (16 hi + lo) + c = (hi - 8) 16a + z_hi + (lo - 8) a + z_lo with z_hi + z_lo = 136a + c. The
    # kernel rounds zeros to bf16: keep each a power-of-two multiple of a where the type allows
    # (Q8_0: c = -128a, z_hi = 0, z_lo = 8a; Q5_0: c = -16a, z_hi = 128a, z_lo = -8a).
    z_hi, z_lo = (0.0 * a, 8.0 * a + 128.0 * a + c) if qtype == "Q8_0" else (128.0 * a, 8.0 * a + c)
    scales = torch.cat([16.0 * a, a], dim=1)
    zeros = torch.cat([z_hi, z_lo], dim=1)
    packed = quant_cpu.pack_byte_planes_for_cpu(ref.gguf_quant_bytes(raw, qtype)) if qtype == "Q8_0" else None
    u = None
    if packed is None:
        u = ref.gguf_affine(raw, qtype)[0]
        u = torch.cat([u >> 4, u & 15], dim=1)
    return Int4Weight(u, scales, zeros, 32, label=f"gguf-{qtype}", planes=2, packed=packed,
                      shape=(raw.shape[0], 2 * in_features))
