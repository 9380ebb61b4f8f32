"""Bulk L2 prefetch of a decoder layer's output-projection weights while its attention runs.

At decode sizes a layer's rotary, KV-cache write and decode attention are latency-bound: for
10-15 us they read little (the context's K/V), and HBM idles. The output projection after them
then streams its weights at the read ceiling. ``prefetch`` issues Hopper's
``cp.async.bulk.prefetch.L2`` for those weights (and for any small weight the MLP reads first,
an MoE router) right after the qkv product, so they arrive in L2 during attention and the
projection reads them from there. A prefetch is a hint: it changes no value, has no completion to
wait for, and its launch ends as soon as the copies are issued.

The launch takes part in programmatic dependent launch (``pdl``): it lets the next kernel launch
at once and waits for the qkv product before it issues, so the copies do not compete with that
product's reads, and the kernels after it see everything before it. What to prefetch is decided
once, after loading (``plan_model``: each module with a ``plan_l2_prefetch(device)`` method, the
Llama-family attention), as byte views of the weights (at most ``BUDGET`` of the L2 in total per
layer: the first bytes, the rows the projection reads first).

On CUDA devices of compute capability 9.0 and later when ``FLASHSERVE_L2_PREFETCH=1`` (opt-in: it
has not run on a GPU yet, so nothing says it pays); never in Triton's interpreter or with
offloaded weights (their device copies are staging buffers).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashserve.kernels import pdl
from flashserve.kernels.utils import cdiv, is_interpreter

ENABLED = os.environ.get("FLASHSERVE_L2_PREFETCH", "0") not in ("", "0")  # opt-in until measured on a GPU
# steps of at most this many tokens prefetch (batch-1 decode and verification, small batches); larger
# batches read more K/V during attention, so HBM idles less then (not measured)
MAX_TOKENS = 8
BUDGET = 0.6  # share of the L2 one layer's prefetch may fill
CHUNK = 16384  # bytes per prefetch instruction (a multiple of 16)
BLOCK = 128  # instructions per program
MIN_BYTES = 1 << 16  # smaller tensors (scales, biases, norms) are not worth an instruction
# one bulk prefetch of $2 bytes at $1, skipped when $2 is 0
_ASM = tl.constexpr("{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")


@triton.jit
def _chunks(pid, a_bytes, b_bytes, a_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``pid``'s chunks: per instruction, its start in span a and its size there, then
    its start in span b and its size there (size 0: none). Chunks 0 .. a_chunks - 1 cover a, the
    next ones b; each starts at a multiple of CHUNK in its span (so an address keeps the span's
    16-byte alignment) and sizes are cut to multiples of 16."""
    offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    a_size = tl.minimum(tl.maximum(a_bytes - offs, 0), CHUNK) // 16 * 16
    ob = offs - a_chunks * CHUNK
    b_size = tl.where(ob >= 0, tl.minimum(tl.maximum(b_bytes - ob, 0), CHUNK), 0) // 16 * 16
    return offs, a_size.to(tl.int32), tl.maximum(ob, 0), b_size.to(tl.int32)


@triton.jit
def _l2_prefetch_kernel(a_ptr, a_bytes, b_ptr, b_bytes, a_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    a_start, a_size, b_start, b_size = _chunks(tl.program_id(0), a_bytes, b_bytes, a_chunks, CHUNK, BLOCK)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [a_ptr + a_start, a_size], dtype=tl.int32, is_pure=False, pack=1)
    tl.inline_asm_elementwise(_ASM, "=r,l,r", [b_ptr + b_start, b_size], dtype=tl.int32, is_pure=False, pack=1)


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether layers on ``device`` prefetch their weights into L2."""
    if not ENABLED or device.type != "cuda" or is_interpreter():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def weight_spans(modules: Iterable[nn.Module], device: torch.device, budget_bytes: int) -> tuple[torch.Tensor, ...]:
    """Byte views of the weights of ``modules`` worth prefetching (on ``device``, contiguous, at
    least ``MIN_BYTES``, each storage once), in module order, cut to ``budget_bytes`` in total."""
    spans, seen, left = [], set(), budget_bytes
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            nbytes = t.numel() * t.element_size()
            on_device = t.device.type == device.type and device.index in (None, t.device.index)
            if (not on_device or not t.is_contiguous() or nbytes < MIN_BYTES or t.data_ptr() % 16 or t.data_ptr() in seen
                    or left < MIN_BYTES):
                continue
            seen.add(t.data_ptr())
            take = min(nbytes, left) // 16 * 16
            spans.append(t.detach().reshape(-1).view(torch.uint8)[:take])
            left -= take
    return tuple(spans)


def budget(device: torch.device) -> int:
    """Bytes one layer's prefetch may take: ``BUDGET`` of the device's L2."""
    return int(torch.cuda.get_device_properties(device).L2_cache_size * BUDGET)


def prefetch(spans: tuple[torch.Tensor, ...]) -> None:
    """Issue the bulk L2 prefetches of ``spans`` (``weight_spans``), two spans per launch."""
    for i in range(0, len(spans), 2):
        a = spans[i]
        b = spans[i + 1] if i + 1 < len(spans) else a[:0]
        on = pdl.enabled(a.device)
        a_chunks = cdiv(a.numel(), CHUNK)
        grid = (cdiv(a_chunks + cdiv(b.numel(), CHUNK), BLOCK),)
        _l2_prefetch_kernel[grid](a, a.numel(), b, b.numel(), a_chunks, CHUNK=CHUNK, BLOCK=BLOCK, PDL=int(on),
                                  launch_pdl=on, num_warps=4)


@dataclass(frozen=True, eq=False)
class Prefetch:
    """One layer's planned prefetch: called with a step's token count, it prefetches ``spans``
    when the step is small enough for its products to be weight-bound."""

    spans: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.spans)

    def __call__(self, num_tokens: int) -> None:
        if num_tokens <= MAX_TOKENS:
            prefetch(self.spans)


def plan(modules: Iterable[nn.Module], device: torch.device, limit: int) -> Prefetch | None:
    """The prefetch of the weights of ``modules`` on ``device`` within ``limit`` bytes, None when
    nothing is worth it."""
    spans = weight_spans(modules, device, limit)
    return Prefetch(spans) if spans else None


def plan_model(model: nn.Module, device: torch.device) -> int:
    """Let every module of ``model`` that prefetches (``plan_l2_prefetch(device, limit)``,
    returning the bytes it chose) choose its spans now that the weights are in place; returns the
    bytes prefetched per step (0 when off)."""
    if not enabled(device):
        return 0
    limit = budget(device)
    total = 0
    for module in model.modules():
        plan_layer = getattr(module, "plan_l2_prefetch", None)
        if plan_layer is not None:
            total += plan_layer(device, limit)
    return total
