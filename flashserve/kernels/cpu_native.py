"""GGUF block products on the CPU in a small C kernel (``cpu_gguf.c``), built on first use.

On CPUs with AVX2 but no AVX-512, torch's int4 CPU kernel is slower than a dense fp32 product at
SmolLM2's layer shapes (docs/quantization.md, "AVX2 only"). Integer dot products with the file's
blocks, llama.cpp's way, are faster there. ``cpu_gguf.c`` takes them for every GGUF type (Q4_0,
Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) with AVX2 + FMA + F16C intrinsics, on activations quantized
to int16 per 32 columns (llama.cpp uses int8: 300x the error, and no faster here). The blocks
are split into planes at load (quants, fp16 scales, fp16 offsets or fifth bits:
``split_blocks``, the same bytes; Q4_K's and Q5_K's super-blocks as 32-column groups with exact
fp32 scales and offsets, Q6_K's as int8 ``q - 32`` with the exact fp32 scales of 16-column
halves), each run of eight blocks transposed (``group_layout``: a vector holds two columns of
each of the eight, so their exact integer dot products come out one per lane), so that eight
blocks convert and scale in one instruction each.

This module compiles the kernel once per source version and instruction set with the system's C
compiler (``cc``; OpenMP for threads, resolved to torch's own runtime, already loaded) into the
user's cache folder and calls it through ctypes: AVX2, plus AVX-512 VNNI or AVX-VNNI where the
CPU has them (``isa_flags``; the same integer sums, so the same results;
``FLASHSERVE_NATIVE_CPU=avx2`` keeps plain AVX2). ``available()`` is False, and the callers keep
torch's kernels, where the CPU lacks AVX2, FMA or F16C, no compiler works, or
``FLASHSERVE_NATIVE_CPU=0``.

The library also holds the fp32 RMSNorm of CPU models (``rms_norm``, through
``flashserve.layers.norm``: torch's composite one costs ~16 us a row at SmolLM2's width, 61
calls a decode step), the CPU decode layer's rope and K/V writes (``rope_store``: the values
of its ten torch ops, bit for bit, in one call), one-query attention (``attention``),
SiLU-and-mul (``silu_mul``) and GELU(tanh)-and-mul (``gelu_tanh_mul``, Gemma's gate), which the
torch paths' fp32 CPU decode rows and MLPs call too, LoRA adapters' deltas (``lora_add``, which
the CPU's adapted layers call too), a whole decoder layer's decode step in one call
(``DecodeLayer``), built from those functions, and a model's whole stack of such layers in one
call (``DecodeStack``).

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
QTYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 3, "Q4_K": 4, "Q6_K": 5, "Q5_K": 6}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22}
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ENV = "FLASHSERVE_NATIVE_CPU"


class _Weight(ctypes.Structure):  # fs_weight
    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("qh", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("qtype", ctypes.c_int64)]


MAX_PARTS = 3  # matrices of one product (q, k and v of different types), outputs side by side


class _Linear(ctypes.Structure):  # fs_linear
    _fields_ = [("parts", _Weight * MAX_PARTS), ("n_parts", ctypes.c_int64), ("n", ctypes.c_int64),
                ("lora_a", ctypes.c_void_p), ("lora_b_t", ctypes.c_void_p), ("lora_width", ctypes.c_int64),
                ("lora_adapters", ctypes.c_int64)]


class _Norm(ctypes.Structure):  # fs_norm
    _fields_ = [("w", ctypes.c_void_p), ("eps", ctypes.c_double)]


NORMS = ("attn_in", "q", "k", "attn_out", "mlp_in", "mlp_out")  # fs_layer's norms, in its order
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # FS_SILU, FS_GELU_TANH


class _Layer(ctypes.Structure):  # fs_layer
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                *((name, _Norm) for name in NORMS), ("scale", ctypes.c_double), ("hidden", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("intermediate", ctypes.c_int64), ("activation", ctypes.c_int64), ("window", ctypes.c_int64)]


class _Step(ctypes.Structure):  # fs_step
    _fields_ = [("t_rows", ctypes.c_int64), ("n_seqs", ctypes.c_int64), ("seqs", ctypes.c_void_p),
                ("rows", ctypes.c_void_p), ("slots", ctypes.c_void_p), ("cos_full", ctypes.c_void_p),
                ("sin_signed", ctypes.c_void_p), ("threads", ctypes.c_int64)]


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flags.split(":", 1)[1].split())


# Instruction sets the products use beside AVX2, slower first: (the /proc/cpuinfo flags, cc's).
_ISAS = [({"avx_vnni"}, ("-mavxvnni",)),
         ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
          ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"))]


def runnable_isas() -> list[tuple[str, ...]]:
    """The compiler flags of every build beside plain AVX2 that this CPU runs, slower first."""
    return [flags for need, flags in _ISAS if need <= _cpu_flags()]


def isa_flags() -> tuple[str, ...]:
    """What this CPU adds to AVX2 for the products' integer dot products: AVX-512 with VNNI (two
    groups' chunks per instruction), else AVX-VNNI, else nothing (``FLASHSERVE_NATIVE_CPU=avx2``:
    nothing). The same integers, so the same results, whichever the build."""
    runnable = runnable_isas()
    return () if os.environ.get(ENV) == "avx2" or not runnable else runnable[-1]


def _build(target: Path, flags: list[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([os.environ.get("CC", "cc"), *flags, str(SOURCE), "-o", str(out)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent builders each install a whole file


@functools.lru_cache(maxsize=None)
def _library(isa: tuple[str, ...] | None = None) -> ctypes.CDLL | None:
    """The library built for this CPU (``isa`` None: ``isa_flags()``), or for AVX2 plus ``isa``."""
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    from flashserve.loader.tokenizer import cache_root  # flashserve's user cache ($FLASHSERVE_CACHE)

    flags = [*FLAGS, *(isa_flags() if isa is None else isa)]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_root() / f"cpu_gguf-{key}.so"
    try:
        if not target.exists():
            _build(target, flags)
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
    for gate in (lib.fs_silu_mul, lib.fs_gelu_tanh_mul):
        gate.argtypes = [p, i64, i64, p]
        gate.restype = None
    lib.fs_attention.argtypes = [p, p, p, p, i64, i64, i64, i64, ctypes.c_float, p, ctypes.c_int]
    lib.fs_attention.restype = ctypes.c_int
    lib.fs_lora_add.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, i64, ctypes.c_int]
    lib.fs_lora_add.restype = ctypes.c_int
    lib.fs_decode_layer.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step), p, p, p, p, p, p, p]
    lib.fs_decode_layer.restype = ctypes.c_int
    lib.fs_decode_stack.argtypes = [ctypes.POINTER(_Layer), i64, ctypes.POINTER(_Step), ctypes.POINTER(i64),
                                    ctypes.POINTER(p), ctypes.POINTER(p), p, p, p, p, p]
    lib.fs_decode_stack.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether CPU models use the native kernels: not switched off (``FLASHSERVE_NATIVE_CPU=0``) and
    they run on this machine (built and loaded on the first call). Decided once per process."""
    return os.environ.get(ENV, "1") != "0" and _library() is not None


class Planes(NamedTuple):
    """A GGUF matrix as the kernel reads it (runs of 8 blocks in the group layout): ``qs`` uint8
    ``[N, K / 2]`` (4 and 5-bit types) or ``[N, K]`` (Q8_0, Q6_K: int8 values), ``d`` fp16 scales,
    ``m`` fp16 offsets (Q4_1, else None) and ``qh`` int32 fifth bits, bit j for column j (Q5_0,
    Q5_K, else None), ``[N, K / 32]``. Q4_K and Q5_K: their 32-column groups' ``w = a * u + c``
    with ``d = a`` and ``m = c`` in fp32. Q6_K: ``q - 32`` with the fp32 scales of each block's
    columns 0..15 in ``d``, 16..31 in ``m``."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    qh: torch.Tensor | None


_BITS = torch.arange(32, dtype=torch.int32)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 ``[..., 32]`` -> int32 ``[...]`` with bit j from ``bits[..., j]``."""
    words = (bits.long() << _BITS.long()).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def split_blocks(raw: torch.Tensor, qtype: str) -> Planes:
    """uint8 ``[N, row_bytes]`` GGUF blocks -> their fields as contiguous planes, quants and fifth
    bits in the kernel's group layout (a byte permutation; the K-quants' values regrouped per 32
    columns with the groups' exact fp32 scales, and offsets)."""
    n = raw.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        u, a, c = ref.gguf_affine(raw, qtype)  # [N, K] in 0..15 (0..31), [N, K / 32] fp32
        halves = (u & 15).reshape(n, -1, 2, 16)  # columns i and i + 16 of each group into byte i
        qh = _pack_bits((u >> 4).reshape(n, -1, 32)) if qtype == "Q5_K" else None  # bit j: column j's fifth
        return group_layout(Planes((halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, -1), a.contiguous(),
                                   c.contiguous(), qh))
    if qtype == "Q6_K":  # q - 32 as int8, each 32 columns' two 16-column scales as d and m
        q, a = ref.gguf_q6_k(raw)  # [N, K] in 0..63, [N, K / 16] fp32
        signed = (q.to(torch.int16) - 32).to(torch.int8).view(torch.uint8)
        halves = a.reshape(n, -1, 2)
        return group_layout(Planes(signed, halves[..., 0].contiguous(), halves[..., 1].contiguous(), None))
    blocks = raw.reshape(n, -1, BLOCK_BYTES[qtype])
    quants = {"Q4_1": 4, "Q5_0": 6}.get(qtype, 2)  # where the quants start: after d (and m, or qh)

    def field(start: int, dtype: torch.dtype) -> torch.Tensor:
        return blocks[..., start : start + dtype.itemsize].contiguous().view(dtype).reshape(n, -1)

    return Planes(_regroup(blocks[..., quants:], inverse=False), field(0, torch.float16),
                  field(2, torch.float16) if qtype == "Q4_1" else None,
                  _regroup_bits(field(2, torch.int32), inverse=False) if qtype == "Q5_0" else None)


def _regroup(qs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Quants ``[N, nb, bytes a block]`` (any strides, the last 1) -> ``[N, nb * bytes]`` with the
    runs of 8 blocks in the group layout (or back), in one copy of 16-bit column pairs."""
    n, nb, per = qs.shape
    whole, pairs = nb // 8 * 8, per // 2
    words = qs.view(torch.int16)  # [N, nb, pairs]: the bytes of two columns each
    head = words[:, :whole].unflatten(1, (whole // 8, 8))  # [N, G, 8 blocks, pairs]
    if inverse:  # a group is [pairs, 8 blocks]
        head = head.flatten(2, 3).unflatten(2, (pairs, 8))
    out = torch.empty(n, nb, pairs, dtype=torch.int16)
    moved = head.transpose(2, 3)
    out[:, :whole].view(moved.shape).copy_(moved)
    out[:, whole:] = words[:, whole:]
    return out.view(torch.uint8).reshape(n, -1)


def _regroup_bits(qh: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Fifth bits ``[N, nb]`` (Q5_0, Q5_K; bit j: column j of a block) into the group layout, or back."""
    n, nb = qh.shape
    whole = nb // 8 * 8
    bits = (qh[:, :whole, None] >> _BITS) & 1  # [N, whole, 32]
    if inverse:  # word (p, half), bit (h, block, e) -> block, column half * 16 + 4p + 2h + e
        bits = bits.reshape(n, -1, 4, 2, 2, 8, 2).permute(0, 1, 5, 3, 2, 4, 6)
    else:
        bits = bits.reshape(n, -1, 8, 2, 4, 2, 2).permute(0, 1, 4, 3, 5, 2, 6)
    return torch.cat([_pack_bits(bits.reshape(n, whole, 32)), qh[:, whole:]], dim=1).contiguous()


def group_layout(w: Planes, inverse: bool = False) -> Planes:
    """``w`` with each row's runs of 8 blocks (all but its last ``nb % 8``) in the kernel's group
    layout (cpu_gguf.c): chunk c holds columns 2c, 2c + 1 of blocks 0..7 (4-bit types: the bytes
    of those columns, c < 8); Q5_0's and Q5_K's words 2p, 2p + 1 the fifth bits of the low and high
    halves of chunks 2p, 2p + 1. ``inverse``: back to the file's order."""
    n, nb = w.d.shape
    qh = None if w.qh is None else _regroup_bits(w.qh, inverse)
    return Planes(_regroup(w.qs.view(n, nb, -1), inverse), w.d, w.m, qh)


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


def _gate_mul(gate: Callable, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inter)
    gate(x.data_ptr(), x.numel() // (2 * inter), inter, out.data_ptr())
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x [..., 2 I]`` -> ``silu(x[..., :I]) * x[..., I:]`` ``[..., I]`` (``e^x`` by an 8-lane
    polynomial: within a few ulp of torch's ``F.silu(g) * u``, not bit for bit)."""
    return _gate_mul(_library().fs_silu_mul, x)


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x [..., 2 I]`` -> ``gelu_tanh(x[..., :I]) * x[..., I:]`` ``[..., I]``, GELU's tanh
    approximation computed as ``g / (1 + e^(-2y))`` (``y = sqrt(2 / pi) (g + 0.044715 g^3)``, the
    same polynomial ``e^x``): within a few ulp of the exact function of ``g``; torch's
    ``0.5 g (1 + tanh y)`` loses digits where ``tanh y`` nears -1, so the two differ there."""
    return _gate_mul(_library().fs_gelu_tanh_mul, x)


MAX_HEAD_DIM = 512


def _attention_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    dim = q.shape[-1]
    return (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32 and dim % 8 == 0 and dim <= MAX_HEAD_DIM
            and k.dim() == 3 and k.shape == v.shape and k.shape[2] == dim and q.shape[-2] % k.shape[1] == 0)


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the torch paths hand one query to ``attention``: fp32 CPU tensors of shapes it takes
    (a head size that is a multiple of 8 up to ``MAX_HEAD_DIM``), no autograd, and the library
    runs here."""
    return _attention_takes(q, k, v) and not torch.is_grad_enabled() and available()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row ``q [H, D]`` (or ``[1, H, D]``) over every row of ``k``, ``v`` ``[S, Hkv, D]``
    (GQA: query head h reads kv head ``h // (H / Hkv)``) -> ``[H, D]``. Each head's softmax is
    computed in full in fp32 (scores, ``e^(s - max)`` summed in 8 lanes, the weighted values summed
    in key order), so a head's result does not depend on the thread count."""
    heads, dim = q.shape[-2], q.shape[-1]
    s_len, kv_heads = k.shape[0], k.shape[1]
    if not _attention_takes(q, k, v):
        raise ValueError(f"cpu_native.attention: fp32 q [H, D] and k, v [S, Hkv, D] with D % 8 == 0, "
                         f"D <= {MAX_HEAD_DIM}, Hkv dividing H expected; got {tuple(q.shape)}, {tuple(k.shape)}")
    q = q.contiguous()
    k, v = (x if x.stride() == (kv_heads * dim, dim, 1) else x.contiguous() for x in (k, v))
    out = q.new_empty(heads, dim)
    if _library().fs_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), None, s_len, heads, kv_heads, dim, scale,
                               out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"cpu_native: no memory for the scores of {s_len} keys")
    return out


_NO_ROWS = torch.zeros(1, dtype=torch.int64)  # the scattered rows of a step that has none


class LoRAWeights(NamedTuple):
    """A product's LoRA adapters as ``fs_lora_add`` reads them (``flashserve.lora.layers``): fp32
    contiguous ``a`` ``[adapters * width, K]`` and ``b_t`` ``[adapters * width, N]``, adapter ``s``
    owning their rows ``s * width .. (s + 1) * width``."""

    a: torch.Tensor
    b_t: torch.Tensor
    width: int

    @property
    def adapters(self) -> int:
        return self.a.shape[0] // self.width


def _raise_for(code: int, rows: int) -> None:
    """The error a native call's return code names (0: none)."""
    if code == -1:
        raise MemoryError(f"cpu_native: no memory for a step of {rows} rows")
    if code == -2:
        raise ValueError("cpu_native: a row names a LoRA adapter that the product does not have")


def lora_add(y: torch.Tensor, x: torch.Tensor, lora: LoRAWeights, ids: torch.Tensor) -> torch.Tensor:
    """``y [M, N] += (x [M, K] A_s^T) B_s^T`` in place for each row whose adapter ``s = ids[row]``
    (int64 ``[M]``) is >= 0, other rows unchanged; fp32 contiguous ``y`` and ``x``. Each row's
    values depend on neither M nor the thread count (``fs_lora_add``), and are the ones the native
    decode layer adds."""
    m, k = x.shape
    if (x.dtype != torch.float32 or y.dtype != torch.float32 or ids.dtype != torch.int64 or not y.is_contiguous()
            or y.shape != (m, lora.b_t.shape[1]) or k != lora.a.shape[1] or ids.shape[0] < m):
        raise ValueError("cpu_native.lora_add: fp32 y [M, N], x [M, K] and int64 ids [M] fitting the adapters expected")
    x, ids = x.contiguous(), ids.contiguous()
    _raise_for(_library().fs_lora_add(x.data_ptr(), m, k, lora.a.data_ptr(), lora.b_t.data_ptr(), y.shape[1],
                                      lora.width, lora.adapters, ids.data_ptr(), y.data_ptr(), y.shape[1],
                                      torch.get_num_threads()), m)
    return y


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype``: itself where it is one already (no torch op)."""
    return x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()


def _weight(w: Planes, qtype: str) -> _Weight:
    return _Weight(*_pointers(w), w.qs.shape[0], w.d.shape[1] * 32, QTYPES[qtype])


def _linear(parts: list[tuple[Planes, str]], lora: LoRAWeights | None) -> _Linear:
    if not 1 <= len(parts) <= MAX_PARTS or len({w.d.shape[1] for w, _ in parts}) != 1:
        raise ValueError(f"cpu_native.DecodeLayer: a product of 1 to {MAX_PARTS} matrices of one input width expected")
    weights = [_weight(*part) for part in parts]
    n, k = sum(w.n for w in weights), weights[0].k
    if lora is None:
        return _Linear((_Weight * MAX_PARTS)(*weights), len(weights), n)
    a, b_t = lora.a, lora.b_t
    if (not all(w.dtype == torch.float32 and w.is_contiguous() for w in (a, b_t)) or a.shape[1] != k
            or b_t.shape[1] != n or a.shape[0] != b_t.shape[0] or a.shape[0] % lora.width):
        raise ValueError("cpu_native.DecodeLayer: LoRA adapters of the product's shapes (fp32, contiguous) expected")
    return _Linear((_Weight * MAX_PARTS)(*weights), len(weights), n, a.data_ptr(), b_t.data_ptr(), lora.width,
                   lora.adapters)


class DecodeLayer:
    """A decoder layer's decode step in one native call (``fs_decode_layer``): residual add, RMSNorm,
    the qkv product (per-head q and k RMSNorms where the layer has them), rope and the K/V writes,
    each new row's attention over its sequence's cache rows (read in place; the last ``window``
    positions of a sliding-window layer), the o product (and its RMSNorm) and residual add,
    RMSNorm, the gate/up product, ``silu_mul`` or ``gelu_tanh_mul``, the down product (and its
    RMSNorm): the functions of this module, in the order the general forwards call them
    (``flashserve.models.cpu_decode``), so the values are the same bit for bit. The weights must
    not move afterwards (their addresses are read once, as in ``bind``).

    ``products``: qkv, o, gate_up and down, each a list of matrices whose outputs are concatenated;
    ``norms``: ``(weight, eps)`` by role (``NORMS``; ``attn_in`` and ``mlp_in`` required, the
    others where the layer has them); ``activation``: a key of ``ACTIVATIONS``; ``window``: the
    keys a query sees, itself included (0: all before it); ``lora``: each product's LoRA adapters
    (None: it has none), whose delta each row of a call adds for its adapter (``lora_add``'s
    values)."""

    def __init__(self, products: list[list[tuple[Planes, str]]], norms: dict[str, tuple[torch.Tensor, float]],
                 heads: int, kv_heads: int, head_dim: int, scale: float, activation: str = "silu",
                 window: int = 0, lora: list[LoRAWeights | None] | None = None) -> None:
        lora = lora or [None] * len(products)
        qkv, o, gate_up, down = (_linear(p, adapters) for p, adapters in zip(products, lora, strict=True))
        if (qkv.n != (heads + 2 * kv_heads) * head_dim or o.n != down.n or gate_up.n != 2 * down.parts[0].k
                or not {"attn_in", "mlp_in"} <= norms.keys() <= set(NORMS)):
            raise ValueError("cpu_native.DecodeLayer: products or norms that do not fit one decoder layer")
        weights = {name: w.contiguous() for name, (w, _) in norms.items()}
        self._keep = (*weights.values(), lora)
        given = {name: _Norm(weights[name].data_ptr(), eps) for name, (_, eps) in norms.items()}
        self.layer = _Layer(qkv, o, gate_up, down, *(given.get(name, _Norm(None, 0.0)) for name in NORMS), scale,
                            down.n, heads, kv_heads, head_dim, down.parts[0].k, ACTIVATIONS[activation], window)
        self.lib = _library()

    @staticmethod
    def step(contexts: list[int | torch.Tensor], seq_lens: list[int], query_lens: list[int], slots: torch.Tensor,
             cos_full: torch.Tensor, sin_signed: torch.Tensor) -> tuple:
        """What every layer of one step shares: each sequence's context in the cache (the row of its
        first token when its rows are consecutive, else its rows, int64 ``[S]``), its length and its
        new rows; the new tokens' cache rows; rope's ``[T, 1, D]`` tables. The tensors are kept
        alive with the struct."""
        scattered = [c for c in contexts if not isinstance(c, int)]
        rows = torch.cat(scattered).to(torch.int64) if scattered else _NO_ROWS
        seqs, start = [], 0
        for c, s, n in zip(contexts, seq_lens, query_lens):
            seqs += (c, s, n, 0) if isinstance(c, int) else (-1, s, n, start)
            start += 0 if isinstance(c, int) else c.shape[0]
        seqs = (ctypes.c_int64 * len(seqs))(*seqs)  # a ctypes array: no torch op (a step's Python runs cache-cold)
        tensors = (rows, _dense(slots, torch.int64), _dense(cos_full, torch.float32), _dense(sin_signed, torch.float32))
        st = _Step(slots.shape[0], len(contexts), ctypes.addressof(seqs), *(x.data_ptr() for x in tensors),
                   torch.get_num_threads())
        return st, (seqs, *tensors)

    def __call__(self, step: tuple, hidden: torch.Tensor, residual: torch.Tensor | None, k_flat: torch.Tensor,
                 v_flat: torch.Tensor, lora_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 contiguous ``hidden``, ``residual`` ``[T, hidden]`` -> (the MLP's output, the residual
        stream), the new rows' k and v written to the caches ``[rows, Hkv, D]``; ``lora_ids``:
        contiguous int64, each row's LoRA adapter (-1: none) in its first T entries (None: no row
        has one)."""
        out, res = torch.empty_like(hidden), torch.empty_like(hidden)
        _raise_for(self.lib.fs_decode_layer(ctypes.byref(self.layer), ctypes.byref(step[0]), hidden.data_ptr(),
                                            None if residual is None else residual.data_ptr(), out.data_ptr(),
                                            res.data_ptr(), k_flat.data_ptr(), v_flat.data_ptr(),
                                            None if lora_ids is None else lora_ids.data_ptr()), hidden.shape[0])
        return out, res


class DecodeStack:
    """The decode step of a stack of ``DecodeLayer``s in one native call (``fs_decode_stack``): each
    layer's ``fs_decode_layer`` in order, with the step of its rope base and KV-cache group and its
    own caches, the residual stream carried from layer to layer as separate calls carry it, so the
    values are the per-layer calls' bit for bit. The layers' descriptions are copied once; the
    weights must not move afterwards (as for ``DecodeLayer``)."""

    def __init__(self, layers: list[DecodeLayer]) -> None:
        self._keep = tuple(layers)  # their norm weights, which the descriptions point to
        self.n_layers = len(layers)
        self.layers = (_Layer * self.n_layers)(*(layer.layer for layer in layers))
        self.lib = _library()

    def caches(self, k_flat: list[torch.Tensor], v_flat: list[torch.Tensor]) -> tuple:
        """Each layer's k and v caches, contiguous fp32 ``[rows, Hkv, D]`` (any shape of those rows),
        as the call reads them: two arrays of their addresses, kept with the tensors."""
        for (k, v), layer in zip(zip(k_flat, v_flat, strict=True), self.layers, strict=True):
            row = layer.kv_heads * layer.head_dim
            if not all(x.dtype == torch.float32 and x.is_contiguous() and x.numel() % row == 0 for x in (k, v)):
                raise ValueError("cpu_native.DecodeStack: contiguous fp32 caches of whole [Hkv, D] rows expected")
        pointers = (ctypes.c_void_p * self.n_layers)
        return pointers(*(k.data_ptr() for k in k_flat)), pointers(*(v.data_ptr() for v in v_flat)), (k_flat, v_flat)

    def step_of(self, index: list[int]) -> ctypes.Array:
        """Which of a call's steps each layer reads (``index[i]`` for layer i), as the call reads it."""
        if len(index) != self.n_layers:
            raise ValueError(f"cpu_native.DecodeStack: a step for each of the {self.n_layers} layers expected")
        return (ctypes.c_int64 * self.n_layers)(*index)

    def __call__(self, steps: list[tuple], step_of: ctypes.Array, caches: tuple, hidden: torch.Tensor,
                 residual: torch.Tensor | None,
                 lora_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 contiguous ``hidden``, ``residual`` (None: the model's first layer) ``[T, hidden]`` ->
        the last layer's (MLP output, residual stream); ``steps``: ``DecodeLayer.step``'s, those
        ``step_of`` (``step_of()``) gives the layers; ``caches``: ``caches()``'s, each layer's new
        rows' k and v written there; ``lora_ids``: as ``DecodeLayer``'s."""
        if (hidden.dtype != torch.float32 or not hidden.is_contiguous() or hidden.shape[-1] != self.layers[0].hidden
                or max(step_of) >= len(steps) or any(st[0].t_rows != hidden.shape[0] for st in steps)):
            raise ValueError("cpu_native.DecodeStack: contiguous fp32 [T, hidden] rows and steps of T rows expected")
        out, res = torch.empty_like(hidden), torch.empty_like(hidden)
        _raise_for(self.lib.fs_decode_stack(self.layers, self.n_layers, (_Step * len(steps))(*(st[0] for st in steps)),
                                            step_of, caches[0], caches[1], hidden.data_ptr(),
                                            None if residual is None else residual.data_ptr(), out.data_ptr(),
                                            res.data_ptr(), None if lora_ids is None else lora_ids.data_ptr()),
                   hidden.shape[0])
        return out, res


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
    """``split_blocks``' inverse for the types kept as their blocks' fields (not the K-quants): the
    GGUF blocks, uint8 ``[N, row_bytes]``."""
    w = group_layout(w, inverse=True)
    n, nb = w.d.shape
    fields = [f for f in (w.d, w.m, w.qh) if f is not None]  # the block's order: d, then m or qh
    parts = [f.contiguous().view(torch.uint8).reshape(n, nb, -1) for f in fields] + [w.qs.reshape(n, nb, -1)]
    return torch.cat(parts, dim=-1).reshape(n, -1)


def _affine(w: Planes, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w = a * u + c`` per group of columns (32; Q6_K's 16): ``u`` ``[N, K]`` (uint8; Q6_K int8
    ``q - 32``), ``a``, ``c`` fp32 ``[N, K / group]`` (``quant_reference.gguf_affine`` of the joined
    blocks; the K-quants from their planes)."""
    if qtype not in ("Q4_K", "Q5_K", "Q6_K"):
        return ref.gguf_affine(join_blocks(w), qtype)
    n = w.qs.shape[0]
    file_order = group_layout(w, inverse=True)
    if qtype == "Q6_K":
        a = torch.stack([w.d, w.m], dim=-1).reshape(n, -1)
        return file_order.qs.view(torch.int8), a, torch.zeros_like(a)
    q = file_order.qs.reshape(n, -1, 1, 16)
    u = torch.cat([q & 15, q >> 4], dim=2).reshape(n, -1)
    if qtype == "Q5_K":
        u = u | ((((file_order.qh[..., None] >> _BITS) & 1).to(torch.uint8) << 4).reshape(n, -1))
    return u, w.d, w.m


def dequantize(w: Planes, qtype: str) -> torch.Tensor:
    """fp32 ``[N, K]``: ``a * u + c`` per group (``_affine``), as ``quant_reference.gguf_dequantize``
    computes it."""
    u, a, c = _affine(w, qtype)
    n, groups = a.shape
    return (u.float().reshape(n, groups, -1) * a[..., None] + c[..., None]).reshape(n, -1)


def matmul_reference(x: torch.Tensor, w: Planes, qtype: str) -> torch.Tensor:
    """``matmul`` in torch: per group ``a * dx * dot(u, xq) + c * sx`` with the groups' ``w = a u + c``
    (``_affine``; ``c`` is 0 where groups are 16 columns), in fp64, rounded to fp32."""
    q, dx, sx = quantize_rows_reference(x)
    u, a, c = _affine(w, qtype)
    m, k = q.shape
    groups = a.shape[1]
    per_block = groups // (k // 32)  # groups in a 32-column block of x
    dots = torch.einsum("mbi,nbi->mnb", q.double().reshape(m, groups, -1), u.double().reshape(-1, groups, k // groups))
    y = (a.double()[None] * dx.double().repeat_interleave(per_block, 1)[:, None] * dots).sum(-1)
    if per_block == 1:
        y = y + (c.double()[None] * sx.double()[:, None]).sum(-1)
    return y.float()
