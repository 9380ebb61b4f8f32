"""Reusable timing helpers for kernel benchmarks (CUDA events on GPU, wall clock on CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 20,
            device: torch.device | str = "cuda") -> float:
    """Median milliseconds per call of ``fn`` (after ``warmup`` untimed calls)."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_bytes(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    context_tokens: int, elem_bytes: int) -> int:
    """Minimum HBM traffic of one paged attention call: q + out + every context K/V once."""
    return elem_bytes * head_dim * (2 * num_tokens * num_heads + 2 * context_tokens * num_kv_heads)
