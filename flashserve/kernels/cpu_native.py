"""GGUF block products on the CPU in a small C kernel (``cpu_gguf.c``), built on first use.

On CPUs with AVX2 but no AVX-512, torch's int4 CPU kernel is slower than a dense fp32 product at
SmolLM2's layer shapes (docs/quantization.md, "AVX2 only"). Integer dot products with the file's
blocks, llama.cpp's way, are faster there. ``cpu_gguf.c`` takes them for Q4_0, Q4_1, Q5_0 and
Q8_0 with AVX2 + FMA + F16C intrinsics, on activations quantized to int16 per 32 columns
(llama.cpp uses int8: 300x the error, and no faster here). The blocks are split into planes at
load (quants, fp16 scales, fp16 offsets or fifth bits: ``split_blocks``, the same bytes) so that
eight blocks' scales convert in one instruction.

This module compiles the kernel once per source version with the system's C compiler (``cc``;
OpenMP for threads, resolved to torch's own runtime, already loaded) into the user's cache
folder and calls it through ctypes. ``available()`` is False, and the callers keep torch's
kernels, where the CPU lacks those instructions, no compiler works, or ``FLASHSERVE_NATIVE_CPU=0``.

The library also holds the fp32 RMSNorm of CPU models (``rms_norm``, through
``flashserve.layers.norm``: torch's composite one costs ~16 us a row at SmolLM2's width, 61
calls a decode step) and the CPU decode layer's rope and K/V writes (``rope_store``: the values
of its ten torch ops, bit for bit, in one call).

``quantize_rows_reference`` and ``matmul_reference`` compute the same arithmetic in torch: the
int16 activations and their scales bit for bit, the products up to fp32 summation order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from flashserve.kernels import quant_reference as ref

SOURCE = Path(__file__).with_name("cpu_gguf.c")
QTYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 3}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22}
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ENV = "FLASHSERVE_NATIVE_CPU"


def _cpu_has_instructions() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(flags.split(":", 1)[1].split())
    return {"avx2", "fma", "f16c"} <= have


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(out)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent builders each install a whole file


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if not _cpu_has_instructions():
        return None
    from flashserve.loader.tokenizer import cache_root  # flashserve's user cache ($FLASHSERVE_CACHE)

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / f"cpu_gguf-{key}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"flashserve's native CPU kernel could not be built or loaded ({detail}); "
                      "using torch's int4 CPU kernel instead", RuntimeWarning, stacklevel=2)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.fs_quantize_rows.argtypes = [p, i64, i64, p, p, p]
    lib.fs_quantize_rows.restype = None
    lib.fs_matmul.argtypes = [ctypes.c_int, p, p, p, p, i64, i64, p, i64, p, ctypes.c_int]
    lib.fs_matmul.restype = ctypes.c_int
    lib.fs_rms_norm.argtypes = [p, p, i64, i64, ctypes.c_float, p]
    lib.fs_rms_norm.restype = None
    lib.fs_rope_store.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p]
    lib.fs_rope_store.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether CPU models use the native kernels: not switched off (``FLASHSERVE_NATIVE_CPU=0``) and
    they run on this machine (built and loaded on the first call). Decided once per process."""
    return os.environ.get(ENV, "1") != "0" and _library() is not None


class Planes(NamedTuple):
    """A GGUF matrix as the kernel reads it: ``qs`` uint8 ``[N, K / 2]`` (4 and 5-bit types) or
    ``[N, K]`` (Q8_0, int8 values), ``d`` fp16 scales, ``m`` fp16 offsets (Q4_1, else None) and
    ``qh`` int32 fifth bits, bit j for column j (Q5_0, else None), ``[N, K / 32]``."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    qh: torch.Tensor | None


def split_blocks(raw: torch.Tensor, qtype: str) -> Planes:
    """uint8 ``[N, row_bytes]`` GGUF blocks -> their fields as contiguous planes (a byte copy)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, BLOCK_BYTES[qtype])
    quants = {"Q4_1": 4, "Q5_0": 6}.get(qtype, 2)  # where the quants start: after d (and m, or qh)

    def field(start: int, dtype: torch.dtype) -> torch.Tensor:
        return blocks[..., start : start + dtype.itemsize].contiguous().view(dtype).reshape(n, -1)

    return Planes(blocks[..., quants:].reshape(n, -1).contiguous(), field(0, torch.float16),
                  field(2, torch.float16) if qtype == "Q4_1" else None,
                  field(2, torch.int32) if qtype == "Q5_0" else None)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``x [M, K]`` -> what the kernel multiplies: int16 ``q [M, K]``, fp32 scales ``dx`` and
    ``sx = dx * sum(q)`` ``[M, K / 32]``."""
    x = x.float().contiguous()
    m, k = x.shape
    q, dx, sx = torch.empty(m, k, dtype=torch.int16), torch.empty(m, k // 32), torch.empty(m, k // 32)
    _library().fs_quantize_rows(x.data_ptr(), m, k, q.data_ptr(), dx.data_ptr(), sx.data_ptr())
    return q, dx, sx


def _product(lib: ctypes.CDLL, code: int, pointers: tuple[int, int, int, int], n: int, k: int, qtype: str,
             x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m = x.shape[0]
    if x.shape[1] != k:  # the kernel would read past the rows
        raise ValueError(f"cpu_native: x has {x.shape[1]} columns, the {qtype} matrix {k}")
    y = torch.empty(m, n)
    if lib.fs_matmul(code, *pointers, n, k, x.data_ptr(), m, y.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"cpu_native: no memory for the int16 blocks of a [{m}, {k}] activation")
    return y


def _pointers(w: Planes) -> tuple[int, int, int, int]:
    return (w.qs.data_ptr(), w.d.data_ptr(), 0 if w.m is None else w.m.data_ptr(),
            0 if w.qh is None else w.qh.data_ptr())


def matmul(x: torch.Tensor, w: Planes, qtype: str) -> torch.Tensor:
    """``x [M, K]`` (any float dtype) times the GGUF matrix ``w`` transposed -> fp32 ``[M, N]``."""
    return _product(_library(), QTYPES[qtype], _pointers(w), w.qs.shape[0], w.d.shape[1] * 32, qtype, x)


def bind(w: Planes, qtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``matmul`` with ``w``'s addresses read once (the CPU decode layer's products, ~5 us a call
    less): only for weights that no longer move (``.to()``, the huge-page packing)."""
    return functools.partial(_product, _library(), QTYPES[qtype], _pointers(w), w.qs.shape[0], w.d.shape[1] * 32,
                             qtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 ``x [..., D]`` normalised over D and scaled by fp32 ``weight [D]`` (no autograd)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _library().fs_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), x.numel() // dim, dim, eps, out.data_ptr())
    return out


def rope_store(qkv: torch.Tensor, heads: int, cos_full: torch.Tensor, sin_signed: torch.Tensor,
               k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """fp32 ``qkv [T, (H + 2 Hkv) D]`` -> rotated q ``[T, H, D]``; the rotated k and v written to
    rows ``slots`` (int64, each valid) of the caches ``[S, Hkv, D]``; ``cos_full`` and
    ``sin_signed`` ``[T, 1, D]``. The values of ``rotate_q_k`` and ``index_copy_``, bit for bit."""
    t, kv_heads, dim = qkv.shape[0], k_flat.shape[1], k_flat.shape[2]
    tensors = (qkv, cos_full, sin_signed, k_flat, v_flat, slots)
    if (not all(x.is_contiguous() for x in tensors) or qkv.shape[1] != (heads + 2 * kv_heads) * dim
            or slots.dtype != torch.int64 or any(x.dtype != torch.float32 for x in tensors[:5])):
        raise ValueError("cpu_native.rope_store: contiguous fp32 tensors (int64 slots) of matching shapes expected")
    q = torch.empty(t, heads, dim)
    _library().fs_rope_store(qkv.data_ptr(), t, heads, kv_heads, dim, cos_full.data_ptr(), sin_signed.data_ptr(),
                             q.data_ptr(), k_flat.data_ptr(), v_flat.data_ptr(), slots.data_ptr())
    return q


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_rows`` in torch, bit for bit."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    d = b.abs().amax(dim=-1) / 32767.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).to(torch.int16)
    s = d * q.sum(dim=-1, dtype=torch.int32).float()
    return q.reshape(m, k), d, s


def join_blocks(w: Planes) -> torch.Tensor:
    """``split_blocks``' inverse: the GGUF blocks, uint8 ``[N, row_bytes]``."""
    n, nb = w.d.shape
    fields = [f for f in (w.d, w.m, w.qh) if f is not None]  # the block's order: d, then m or qh
    parts = [f.contiguous().view(torch.uint8).reshape(n, nb, -1) for f in fields] + [w.qs.reshape(n, nb, -1)]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def dequantize(w: Planes, qtype: str) -> torch.Tensor:
    """fp32 ``[N, K]``, decoded from the blocks by ``quant_reference``."""
    return ref.gguf_dequantize(join_blocks(w), qtype)


def matmul_reference(x: torch.Tensor, w: Planes, qtype: str) -> torch.Tensor:
    """``matmul`` in torch: per block ``a * dx * dot(u, xq) + c * sx`` with the blocks' ``w = a u + c``
    (``quant_reference.gguf_affine``), in fp64, rounded to fp32."""
    q, dx, sx = quantize_rows_reference(x)
    u, a, c = ref.gguf_affine(join_blocks(w), qtype)
    m, k = q.shape
    dots = torch.einsum("mbi,nbi->mnb", q.double().reshape(m, k // 32, 32), u.double().reshape(-1, k // 32, 32))
    y = (a.double()[None] * dx.double()[:, None] * dots).sum(-1) + (c.double()[None] * sx.double()[:, None]).sum(-1)
    return y.float()
