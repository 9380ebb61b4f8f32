"""Sizing and allocating the paged KV pool.

One tensor holds every layer's keys and values:
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``; layer ``i`` reads the views
``pool[i, 0]`` (keys) and ``pool[i, 1]`` (values). With ``kv_cache_dtype`` int8 or fp8 the pool
is the same shape in an 8-bit dtype, a strided view whose blocks also carry one fp16 scale per
(token, head) (``flashserve.kernels.kv_quant``): about twice the tokens of a 16-bit pool for
the same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flashserve.config import CacheConfig, ModelConfig
from flashserve.kernels import kv_quant

# Without an explicit budget: this fraction of free GPU memory, or of available host memory on
# CPU (host memory is shared with everything else on the machine, so the default is modest).
DEFAULT_GPU_FRACTION = 0.9
DEFAULT_CPU_FRACTION = 0.2


@dataclass
class KVPoolPlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int
    kv_dtype: torch.dtype | None = None  # int8 / float8_e4m3fn for an 8-bit cache; None: the model's dtype

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> int:
    """Bytes of one block of every layer's keys and values (8-bit: values, scales, padding)."""
    if kv_dtype is not None:
        return 2 * model.num_layers * kv_quant.block_bytes(block_size, model.num_kv_heads, model.head_dim)
    elem = dtype.itemsize
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def check_kv_dtype(kv_dtype: torch.dtype | None, device: torch.device) -> None:
    """fp8 KV needs a GPU with fp8 conversions (compute capability 8.9+); CPU converts in torch."""
    if kv_dtype == torch.float8_e4m3fn and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}; "
                             f"use kv_cache_dtype='int8'")


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA) or available host memory (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_kv_pool(
    model: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_useful_blocks: int,
    reserve_bytes: int = 0,
    extra_bytes_per_block: int = 0,
) -> KVPoolPlan:
    """Number of blocks from the user's budget; refuses (ValueError, with the numbers) when one
    sequence of ``max_model_len`` tokens cannot fit. Never plans more than ``max_useful_blocks``.
    ``extra_bytes_per_block``: what each block costs besides the model's K/V (a draft model's
    K/V for the same tokens, kept in a pool of its own with the same block ids)."""
    kv_dtype = kv_quant.storage_dtype(cache.kv_cache_dtype)
    check_kv_dtype(kv_dtype, device)
    per_block = bytes_per_block(model, cache.block_size, dtype, kv_dtype) + extra_bytes_per_block
    if cache.kv_cache_bytes is not None:
        budget = cache.kv_cache_bytes
        source = f"kv_cache_bytes={cache.kv_cache_bytes}"
    else:
        fraction = cache.kv_cache_memory_fraction
        if fraction is None:
            fraction = DEFAULT_GPU_FRACTION if device.type == "cuda" else DEFAULT_CPU_FRACTION
        free = available_memory(device)
        budget = int(free * fraction) - reserve_bytes
        source = f"{fraction:.2f} of {free / 2**30:.2f} GiB free on {device.type}, less {reserve_bytes / 2**30:.2f} GiB for activations"
    num_blocks = min(max(budget, 0) // per_block, max_useful_blocks)
    needed = -(-max_model_len // cache.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache budget ({source}) holds {num_blocks} blocks of {cache.block_size} tokens "
            f"= {num_blocks * cache.block_size} tokens at {per_block} bytes per block, but one sequence "
            f"of max_model_len={max_model_len} tokens needs {needed} blocks ({needed * per_block} bytes); "
            f"raise the KV cache budget or lower max_model_len"
        )
    return KVPoolPlan(num_blocks=int(num_blocks), block_size=cache.block_size, bytes_per_block=per_block,
                      budget_bytes=budget, kv_dtype=kv_dtype)


def allocate_kv_pool(model: ModelConfig, plan: KVPoolPlan, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pool. On GPU it is zero-filled, so a kernel that over-reads a block never meets NaN
    garbage. On CPU the torch backend reads only slots it has written, so ``torch.empty`` is safe
    there and spares seconds of touching gigabytes up front."""
    if plan.kv_dtype is not None:
        return kv_quant.allocate_pool(model.num_layers, plan.num_blocks, plan.block_size, model.num_kv_heads,
                                      model.head_dim, plan.kv_dtype, device, zero=device.type != "cpu")
    shape = (model.num_layers, 2, plan.num_blocks, plan.block_size, model.num_kv_heads, model.head_dim)
    if device.type == "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)
