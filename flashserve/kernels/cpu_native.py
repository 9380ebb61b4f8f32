"""GGUF block products on the CPU in a small C kernel (``cpu_gguf.c``), built on first use.

On CPUs with AVX2 but no AVX-512, torch's int4 CPU kernel is slower than a dense fp32 product at
SmolLM2's layer shapes (docs/quantization.md, "AVX2 only"). Integer dot products with the file's
blocks as they are, llama.cpp's way, are faster there. ``cpu_gguf.c`` takes them for Q4_0, Q4_1
and Q8_0 with AVX2 + FMA + F16C intrinsics, on activations quantized to int16 per 32 columns
(llama.cpp uses int8: 300x the error, and no faster here, where a step's time goes to reading
the weights). This module compiles it once per source version with the system's C compiler
(``cc``; OpenMP for threads, resolved to torch's own runtime, already loaded) into the user's
cache folder and calls it through ctypes. ``available()`` is False, and the callers keep torch's
kernels, where the CPU lacks those instructions, no compiler works, or ``FLASHSERVE_NATIVE_CPU=0``.

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

import torch

SOURCE = Path(__file__).with_name("cpu_gguf.c")
QTYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
XBLOCK_BYTES = 72  # fp32 d, fp32 d * sum(q), 32 int16
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
ENV = "FLASHSERVE_NATIVE_CPU"


def _cpu_has_instructions() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(flags.split(":", 1)[1].split())
    return {"avx2", "fma", "f16c"} <= have


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flashserve"


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
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_gguf-{key}.so"
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
    lib.fs_quantize_rows.argtypes = [p, i64, i64, p]
    lib.fs_quantize_rows.restype = None
    lib.fs_matmul.argtypes = [ctypes.c_int, p, i64, i64, p, i64, p, ctypes.c_int]
    lib.fs_matmul.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether weights built now use the native kernel: not switched off (``FLASHSERVE_NATIVE_CPU=0``,
    read on each call) and it runs on this machine (built and loaded on the first call)."""
    return os.environ.get(ENV, "1") != "0" and _library() is not None


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x [M, K]`` -> the kernel's activation blocks, uint8 ``[M, K / 32, 72]``."""
    x = x.float().contiguous()
    m, k = x.shape
    out = torch.empty(m, k // 32, XBLOCK_BYTES, dtype=torch.uint8)
    _library().fs_quantize_rows(x.data_ptr(), m, k, out.data_ptr())
    return out


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x [M, K]`` (any float dtype) times the GGUF matrix ``raw`` (uint8 ``[N, row_bytes]``,
    contiguous) transposed -> fp32 ``[M, N]``."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    if k * BLOCK_BYTES[qtype] != raw.shape[1] * 32:  # the kernel would read past the rows
        raise ValueError(f"cpu_native: x has {k} columns, the {qtype} matrix {raw.shape[1] // BLOCK_BYTES[qtype] * 32}")
    y = torch.empty(m, raw.shape[0])
    if _library().fs_matmul(QTYPES[qtype], raw.data_ptr(), raw.shape[0], k, x.data_ptr(), m, y.data_ptr(),
                            torch.get_num_threads()):
        raise MemoryError(f"cpu_native: no memory for the int16 blocks of a [{m}, {k}] activation")
    return y


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``fs_quantize_rows`` computes: int16 ``q [M, K]``, fp32 scales ``d`` and ``d * sum(q)``
    ``[M, K / 32]``."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    d = b.abs().amax(dim=-1) / 32767.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).to(torch.int16)
    s = d * q.sum(dim=-1, dtype=torch.int32).float()
    return q.reshape(m, k), d, s


def unpack_blocks(x_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's activation blocks (``quantize_rows``) as ``quantize_rows_reference`` returns them."""
    m, nb, _ = x_blocks.shape
    head = x_blocks[..., :8].contiguous().view(torch.float32)  # [M, NB, 2]
    return x_blocks[..., 8:].contiguous().view(torch.int16).reshape(m, nb * 32), head[..., 0], head[..., 1]


def matmul_reference(x: torch.Tensor, raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """``matmul`` in torch: per block ``a * dx * dot(u, xq) + c * s`` with the file's ``w = a u + c``."""
    from flashserve.kernels import quant_reference as ref

    q, d, s = quantize_rows_reference(x)
    u, a, c = ref.gguf_affine(raw, qtype)  # u [N, K] unsigned, a / c [N, K / 32]
    m, k = q.shape
    dots = torch.einsum("mbi,nbi->mnb", q.double().reshape(m, k // 32, 32), u.double().reshape(-1, k // 32, 32))
    y = (a.double()[None] * d.double()[:, None] * dots).sum(-1) + (c.double()[None] * s.double()[:, None]).sum(-1)
    return y.float()
