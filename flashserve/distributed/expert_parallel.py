"""Expert parallelism: an MoE layer's experts split across the tensor-parallel ranks.

Under ``tensor_parallel_size = N`` the attention and dense MLPs are split by heads and columns
(``flashserve.layers.linear``) and each MoE layer (``flashserve.layers.moe.MoEMLP``) holds a
contiguous ``E / N`` of its experts: rank ``r`` holds experts ``[r E / N, (r + 1) E / N)``. The
router is replicated and its input is the same on every rank (the attention output is
all-reduced), so every rank picks the same experts for every token. Each rank runs the pairs
whose expert it holds (the others get id ``-1``, which the kernels and the torch loop skip) and
one all-reduce over the tensor-parallel group sums the ranks' partial outputs. A shared expert
(Qwen2-MoE) is split like a dense MLP (gate/up by columns, down by rows).

Every rank reads only its experts' weights: memory and weight traffic per rank fall by ``N``.
"""

from __future__ import annotations

import torch


def expert_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """(first expert, number of experts) held by ``rank`` of ``size``."""
    if num_experts % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide the number of experts ({num_experts}); "
                         f"expert parallelism gives each rank the same number of experts")
    count = num_experts // size
    return rank * count, count


def local_expert_ids(ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Global expert ids [T, k] -> this rank's local ids, ``-1`` for experts held elsewhere."""
    local = ids - first
    return torch.where((local >= 0) & (local < count), local, torch.full_like(local, -1))


def check_expert_parallel(model_config, tp_size: int) -> None:
    """Refuse an MoE model whose experts (or shared expert) do not split over ``tp_size`` ranks."""
    expert_range(model_config.num_experts, 0, tp_size)
    shared = model_config.shared_expert_intermediate_size
    if shared and shared % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide the shared expert's intermediate size "
                         f"({shared})")
