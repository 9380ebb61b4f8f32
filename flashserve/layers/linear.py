"""Linear layers with per-parameter weight loaders (nano-vllm style).

Fused projections (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) run as one matmul.
Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies a Hugging
Face shard into the right slice, so ``load_weights`` never needs to know the layout. The
``tp_rank``/``tp_size`` attributes are placeholders for tensor parallelism (always 0/1 now).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole tensor into ``param`` (shapes must match exactly)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not sharded, got shard {shard_id!r}")
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """Plain ``y = x W^T (+ b)``; weight ``[out, in]`` as in HF checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.tp_rank, self.tp_size = 0, 1
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    ``shard_sizes`` lists the output sizes in order; ``shard_ids`` names them (e.g. ``["q", "k",
    "v"]`` or ``[0, 1]``). Loading shard ``s`` copies into rows ``offset(s) : offset(s) + size(s)``.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], shard_ids: list[object], bias: bool = False) -> None:
        if len(shard_sizes) != len(shard_ids):
            raise ValueError("shard_sizes and shard_ids must have the same length")
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for sid, size in zip(shard_ids, shard_sizes):
            self.shard_offsets[sid] = (offset, size)
            offset += size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor
            default_weight_loader(param, loaded)
            return
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)  # [size, in] or [size]
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shape mismatch for shard {shard_id!r}: expected {tuple(target.shape)}, got {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a fused output ``[T, sum(sizes)]`` back into its parts."""
        return y.split(self.shard_sizes, dim=-1)


class QKVLinear(MergedLinear):
    """Fused q/k/v projection: ``[T, hidden] -> [T, (H + 2 * Hkv) * D]`` with shards q, k, v."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], ["q", "k", "v"], bias)


class GateUpLinear(MergedLinear):
    """Fused gate/up projection: ``[T, hidden] -> [T, 2 * I]`` with shards 0 (gate) and 1 (up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__(hidden_size, [intermediate_size, intermediate_size], [0, 1], bias)
