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


def graph_ms(calls: list[Callable[[], object]], replays: int = 10) -> float:
    """Milliseconds per call of ``calls`` captured once in a CUDA graph, one after the other."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # compile and warm up outside the capture
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * len(calls))


def attention_bytes(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    context_tokens: int, elem_bytes: int) -> int:
    """Minimum HBM traffic of one paged attention call: q + out + every context K/V once."""
    return elem_bytes * head_dim * (2 * num_tokens * num_heads + 2 * context_tokens * num_kv_heads)
