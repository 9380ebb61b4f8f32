"""Linear layers with per-parameter weight loaders (nano-vllm style) and pluggable quantization.

Fused projections (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) run as one matmul.
Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies a Hugging
Face shard into the right slice, so ``load_weights`` never needs to know the layout. The
``tp_rank``/``tp_size`` attributes are placeholders for tensor parallelism (always 0/1 now).

How a layer stores and multiplies its weight is its ``quant_method``, chosen at construction by
the quantization config in scope (``flashserve.quant``) from the layer's checkpoint names
(``prefix``, and one ``Partition`` per checkpoint tensor of a fused layer). Without a config
the method is the dense ``F.linear`` on an ``[out, in]`` parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.quant.base import Partition, current_quant_config


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Copy a whole tensor into ``param`` (shapes must match exactly)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not sharded, got shard {shard_id!r}")
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """``y = x W^T (+ b)``; weight ``[out, in]`` as in HF checkpoints. ``prefix`` is the layer's
    checkpoint name (e.g. ``model.layers.0.self_attn.o_proj``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, prefix: str = "") -> None:
        super().__init__()
        self._setup(in_features, [Partition(None, 0, out_features, prefix)], bias, prefix)

    def _setup(self, in_features: int, partitions: list[Partition], bias: bool, prefix: str,
               tied: nn.Module | None = None) -> None:
        self.in_features = in_features
        self.out_features = sum(p.size for p in partitions)
        self.prefix = prefix
        self.partitions = partitions
        self.tp_rank, self.tp_size = 0, 1
        self.quant_method = current_quant_config().linear_method(self)
        if tied is None:
            self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.quant_method.label}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    ``shard_sizes`` lists the output sizes in order; ``shard_ids`` names them (e.g. ``["q", "k",
    "v"]`` or ``[0, 1]``) and ``shard_names`` gives each one's checkpoint module name. Loading
    shard ``s`` copies into rows ``offset(s) : offset(s) + size(s)``.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], shard_ids: list[object], bias: bool = False,
                 prefix: str = "", shard_names: list[str] | None = None) -> None:
        if len(shard_sizes) != len(shard_ids):
            raise ValueError("shard_sizes and shard_ids must have the same length")
        names = shard_names or [f"{prefix}:{sid}" for sid in shard_ids]
        nn.Module.__init__(self)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        partitions = []
        offset = 0
        for sid, size, name in zip(shard_ids, shard_sizes, names):
            self.shard_offsets[sid] = (offset, size)
            partitions.append(Partition(sid, offset, size, name))
            offset += size
        self._setup(in_features, partitions, bias, prefix)

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


def _siblings(prefix: str, names: list[str]) -> list[str]:
    """Checkpoint names of a fused layer's shards: ``a.b.qkv_proj`` -> ``a.b.q_proj``, ..."""
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    return [f"{parent}.{n}" if parent else n for n in names]


class QKVLinear(MergedLinear):
    """Fused q/k/v projection: ``[T, hidden] -> [T, (H + 2 * Hkv) * D]`` with shards q, k, v."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 prefix: str = "") -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], ["q", "k", "v"], bias, prefix,
                         _siblings(prefix, ["q_proj", "k_proj", "v_proj"]))


class GateUpLinear(MergedLinear):
    """Fused gate/up projection: ``[T, hidden] -> [T, 2 * I]`` with shards 0 (gate) and 1 (up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, prefix: str = "") -> None:
        super().__init__(hidden_size, [intermediate_size, intermediate_size], [0, 1], bias, prefix,
                         _siblings(prefix, ["gate_proj", "up_proj"]))
