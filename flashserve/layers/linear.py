"""Linear layers with per-parameter weight loaders (nano-vllm style) and pluggable quantization.

Fused projections (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) run as one matmul.
Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies a Hugging
Face shard into the right slice, so ``load_weights`` never needs to know the layout.

Tensor parallelism (``flashserve.distributed.parallel_state``): a layer built with
``parallel="column"`` keeps ``1/tp`` of its output rows (of each fused shard), one built with
``parallel="row"`` ``1/tp`` of its input columns and all-reduces its output. Sharding happens on
the checkpoint tensor, before the quantization method's own loader sees it (``_shard_loader``),
so every LinearMethod (dense, online int8/int4/fp8, GGUF blocks, GPTQ/AWQ) loads its slice
straight from the checkpoint.

How a layer stores and multiplies its weight is its ``quant_method``, chosen at construction by
the quantization config in scope (``flashserve.quant``) from the layer's checkpoint names
(``prefix``, and one ``Partition`` per checkpoint tensor of a fused layer). Without a config
the method is the dense ``F.linear`` on an ``[out, in]`` parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flashserve.distributed.parallel_state import current_parallel, split_size
from flashserve.quant.base import Partition, current_quant_config

# Checkpoint tensor name -> (its output dim, its input dim); None: not split along that side.
# Dense and GGUF weights are [out, in(-bytes)]; GPTQ / AWQ tensors are [in-ish, out-ish].
_CHECKPOINT_DIMS: dict[str, tuple[int | None, int | None]] = {
    "weight": (0, 1), "bias": (0, None), "qweight": (1, 0), "qzeros": (1, 0), "scales": (1, 0), "g_idx": (None, 0),
}


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

    def __init__(self, in_features: int, out_features: int, bias: bool = False, prefix: str = "",
                 parallel: str | None = None) -> None:
        super().__init__()
        self._setup(in_features, [Partition(None, 0, out_features, prefix)], bias, prefix, parallel=parallel)

    def _setup(self, in_features: int, partitions: list[Partition], bias: bool, prefix: str,
               tied: nn.Module | None = None, parallel: str | None = None,
               splits: dict[object, tuple[int, int]] | None = None) -> None:
        """``splits``: shard id -> (this rank's index, number of pieces) of a column-parallel
        layer's output rows (default: rank of tp); K/V of fewer heads than ranks are replicated."""
        ctx = current_parallel()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.parallel = parallel if ctx.tp_size > 1 else None
        self.tp = ctx
        self._splits: dict[object, tuple[int, int]] = {}
        if self.parallel == "column":
            local, offset = [], 0
            for p in partitions:
                index, pieces = (splits or {}).get(p.shard_id, (ctx.tp_rank, ctx.tp_size))
                size = split_size(p.size, pieces, f"the output size of {p.name}")
                self._splits[p.shard_id] = (index, pieces)
                local.append(Partition(p.shard_id, offset, size, p.name))
                offset += size
            partitions = local
        elif self.parallel == "row":
            in_features = split_size(in_features, ctx.tp_size, f"the input size of {prefix}")
        elif self.parallel is not None:
            raise ValueError(f"parallel must be 'column', 'row' or None, got {parallel!r}")
        self.in_features = in_features
        self.out_features = sum(p.size for p in partitions)
        self.prefix = prefix
        self.partitions = partitions
        self.quant_method = current_quant_config().linear_method(self)
        if tied is None:
            self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        if self.parallel is not None:
            for name, param in self._parameters.items():
                if param is not None and hasattr(param, "weight_loader"):
                    param.weight_loader = self._shard_loader(name, param.weight_loader)

    def _shard_loader(self, name: str, loader):
        """Wrap a parameter's loader so it receives this rank's slice of the checkpoint tensor."""
        out_dim, in_dim = _CHECKPOINT_DIMS.get(name, (0, 1))

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            if self.parallel == "column":
                if shard_id is None and len(self.partitions) > 1:
                    raise ValueError(f"{self.prefix}: an already-fused checkpoint tensor cannot be split "
                                     f"for tensor parallelism; give its parts separately")
                dim, (index, pieces) = out_dim, self._splits[shard_id]
            else:
                dim, index, pieces = in_dim, self.tp_rank, self.tp_size
                if name == "g_idx":  # group ids of this rank's input columns, from 0
                    loaded = _local_group_ids(loaded, index, pieces, self.prefix)
                    dim = None
            if dim is not None:
                size = loaded.shape[dim]
                part = split_size(size, pieces, f"dim {dim} of {self.prefix}.{name} in the checkpoint")
                loaded = loaded.narrow(dim, index * part, part)
            loader(param, loaded, shard_id)

        return load

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self._summed(self.quant_method.apply, x)

    def forward_silu_gated(self, h: torch.Tensor) -> torch.Tensor | None:
        """``forward(silu_and_mul(h))`` in one kernel where the weight's method has one for ``h``
        (the batch-1 GEMV), else None; never where hooks watch this layer's input."""
        if self._forward_pre_hooks or self._forward_hooks:
            return None
        return self._summed(self.quant_method.apply_silu_gated, h)

    def _summed(self, apply: Callable[..., torch.Tensor | None], x: torch.Tensor) -> torch.Tensor | None:
        """``apply(self, x, bias)``; a row-parallel layer's partial sums (of this rank's input
        columns) are all-reduced and the bias added once, after the sum. None passes through."""
        if self.parallel != "row":
            return apply(self, x, self.bias)
        y = apply(self, x, None)
        if y is None:
            return None
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.quant_method.label}"


def _local_group_ids(g_idx: torch.Tensor, index: int, pieces: int, prefix: str) -> torch.Tensor:
    """A row-parallel slice of a GPTQ ``g_idx``: only in-order groups split cleanly by rank."""
    part = split_size(g_idx.shape[0], pieces, f"the input size of {prefix}")
    local = g_idx.narrow(0, index * part, part)
    if bool((local[1:] < local[:-1]).any()):
        raise ValueError(f"{prefix}: act-order GPTQ (permuted g_idx) cannot be split across tensor-parallel ranks")
    return local - local.min()


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    ``shard_sizes`` lists the output sizes in order; ``shard_ids`` names them (e.g. ``["q", "k",
    "v"]`` or ``[0, 1]``) and ``shard_names`` gives each one's checkpoint module name. Loading
    shard ``s`` copies into rows ``offset(s) : offset(s) + size(s)``.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], shard_ids: list[object], bias: bool = False,
                 prefix: str = "", shard_names: list[str] | None = None,
                 splits: dict[object, tuple[int, int]] | None = None) -> None:
        if len(shard_sizes) != len(shard_ids):
            raise ValueError("shard_sizes and shard_ids must have the same length")
        names = shard_names or [f"{prefix}:{sid}" for sid in shard_ids]
        nn.Module.__init__(self)
        partitions = []
        offset = 0
        for sid, size, name in zip(shard_ids, shard_sizes, names):
            partitions.append(Partition(sid, offset, size, name))
            offset += size
        self._setup(in_features, partitions, bias, prefix, parallel="column", splits=splits)
        # this rank's shards (all of them on one rank)
        self.shard_offsets: dict[object, tuple[int, int]] = {p.shard_id: (p.offset, p.size) for p in self.partitions}

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
    """Fused q/k/v projection: ``[T, hidden] -> [T, (H + 2 * Hkv) * D]`` with shards q, k, v.

    Under tensor parallelism ``num_heads`` / ``num_kv_heads`` are this rank's: ``H / tp`` query
    heads and ``Hkv / tp`` KV heads, or one replicated KV head when ``Hkv < tp``."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 prefix: str = "") -> None:
        from flashserve.distributed.parallel_state import kv_head_split

        ctx = current_parallel()
        self.head_dim = head_dim
        self.num_heads = split_size(num_heads, ctx.tp_size, "the number of attention heads")
        self.num_kv_heads, kv_pieces = kv_head_split(num_kv_heads, ctx.tp_size)
        kv_split = (ctx.tp_rank * kv_pieces // ctx.tp_size, kv_pieces)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], ["q", "k", "v"], bias, prefix,
                         _siblings(prefix, ["q_proj", "k_proj", "v_proj"]), splits={"k": kv_split, "v": kv_split})


class GateUpLinear(MergedLinear):
    """Fused gate/up projection: ``[T, hidden] -> [T, 2 * I]`` with shards 0 (gate) and 1 (up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, prefix: str = "") -> None:
        super().__init__(hidden_size, [intermediate_size, intermediate_size], [0, 1], bias, prefix,
                         _siblings(prefix, ["gate_proj", "up_proj"]))
