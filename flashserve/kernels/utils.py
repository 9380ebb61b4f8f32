"""Small helpers shared by the Triton kernel launchers (no Triton code here)."""

from __future__ import annotations

import functools
import os

import torch


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=1)
def is_interpreter() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1). Read once,
    at the first call: Triton chose between compiling and interpreting each kernel when it was
    defined, so a later change of the variable changes nothing; and launchers ask on every
    launch (an environment read costs ~0.6 us on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | str | None = None) -> int:
    """Streaming multiprocessors of ``device``; a nominal 132 (H100/H200) off-GPU so that
    heuristics behave the same in the interpreter as on the target hardware."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return _sm_count_cached(dev.index if dev.index is not None else torch.cuda.current_device())
    return 132


def dot_ieee(dtype: torch.dtype) -> bool:
    """Whether tl.dot must run in full fp32 precision (fp32 inputs: no TF32 rounding)."""
    return dtype == torch.float32


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers: CUDA graphs may still point at them


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed int32 arrival counters, at least ``n`` of them, for kernels whose last
    program of a group finishes the group's work (the split-K GEMV): each such launch leaves its
    counters at zero again, so one buffer serves every launch on the device's stream (not two
    streams at once)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf
