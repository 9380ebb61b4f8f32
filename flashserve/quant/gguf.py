"""GGUF tensors kept packed: the loader hands over each quantized tensor's bytes as stored in the
file (a memory-mapped ``uint8 [rows, row_bytes]`` view), and each layer builds its kernel-ready
weight from them at ``finalize`` (``flashserve.quant.packed.gguf_weight``): the blocks themselves
on CUDA, torch's int4 CPU kernel layout on the CPU. Nothing is dequantized to fp32 at load.

Fused q/k/v and gate/up layers group consecutive shards of one type into one matrix (a byte
concatenation of whole rows) and keep shards of different types apart (Q4_K next to Q6_K).
The token embedding stays packed; a lookup dequantizes only the rows it reads.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from flashserve.kernels import quant_reference as ref
from flashserve.quant.base import EmbeddingMethod, ExpertMethod, LinearMethod, PackedLinearMethod, QuantConfig
from flashserve.quant.packed import DenseWeight, gguf_weight

PACKED_TYPES = tuple(ref.GGUF_BLOCKS)  # Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K
FLOAT_TYPES = ("F32", "F16", "BF16")


def raw_tensor(tensor: Any) -> torch.Tensor:
    """A GGUF ReaderTensor's bytes as uint8 ``[rows, row_bytes]`` (a view of the mapped file)."""
    data = np.asarray(tensor.data)
    if data.dtype != np.uint8:
        raise ValueError(f"GGUF tensor {tensor.name} ({tensor.tensor_type.name}) is not stored as blocks")
    with warnings.catch_warnings():  # a read-only mapping: flashserve never writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data.reshape(data.shape[0] if data.ndim > 1 else 1, -1))


def check_gguf_types(types: dict[str, str], path: str = "") -> None:
    """Every tensor must be a float type or a packed type we have kernels for."""
    for name, qtype in types.items():
        if qtype not in PACKED_TYPES and qtype not in FLOAT_TYPES:
            raise ValueError(
                f"GGUF tensor {name} {('in ' + path + ' ') if path else ''}has type {qtype}, which flashserve "
                f"does not run packed; supported: {', '.join(FLOAT_TYPES + PACKED_TYPES)} (or load it dequantized "
                f"with --quantization none, if the gguf package can dequantize {qtype})"
            )


class _Staging:
    """Per-shard tensors as the loader handed them over, until ``finalize``.

    Registers a zero-size ``weight`` placeholder on the layer so the model's loader finds a
    parameter to load into; its ``weight_loader`` keeps the given tensor (no copy)."""

    def __init__(self, layer: nn.Module, qtypes: list[str]) -> None:
        self.qtypes = qtypes
        self.tensors: dict[object, torch.Tensor] = {}
        placeholder = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        placeholder.weight_loader = lambda param, loaded, shard_id=None: self.stage(layer, loaded, shard_id)
        layer.weight = placeholder

    def stage(self, layer: nn.Module, loaded: torch.Tensor, shard_id: object) -> None:
        parts = {p.shard_id: (i, p.size) for i, p in enumerate(getattr(layer, "partitions", []))}
        if not parts:  # an embedding
            parts = {None: (0, layer.vocab_size)}
        if shard_id not in parts:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(parts)}")
        i, rows = parts[shard_id]
        cols = getattr(layer, "in_features", None) or layer.hidden_size
        qtype = self.qtypes[i]
        want = (rows, ref.gguf_row_bytes(qtype, cols)) if qtype in PACKED_TYPES else (rows, cols)
        if tuple(loaded.shape) != want:
            raise ValueError(f"shape mismatch for {qtype} shard {shard_id!r}: expected {want}, got {tuple(loaded.shape)}")
        self.tensors[shard_id] = loaded


class GGUFLinearMethod(PackedLinearMethod):
    """A linear layer whose shards are GGUF tensors (packed, or float for F32/F16/BF16 shards),
    built for ``device`` with dense fallbacks in ``dtype``."""

    def __init__(self, qtypes: list[str], device: torch.device, dtype: torch.dtype) -> None:
        self.qtypes = qtypes
        self.device, self.dtype = device, dtype
        self.label = "gguf-" + "/".join(dict.fromkeys(qtypes))
        self.staged: dict[object, torch.Tensor] = {}

    def create_weights(self, layer: nn.Module) -> None:
        self.staged = _Staging(layer, self.qtypes).tensors

    def finalize(self, layer: nn.Module, tied: torch.Tensor | None = None) -> None:
        staged = {None: tied} if tied is not None else self.staged
        parts, i = [], 0
        while i < len(layer.partitions):  # runs of consecutive shards of one type
            j = i
            while j + 1 < len(layer.partitions) and self.qtypes[j + 1] == self.qtypes[i]:
                j += 1
            tensors = [staged[p.shard_id] for p in layer.partitions[i : j + 1]]
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            if self.qtypes[i] in PACKED_TYPES:
                parts.append(gguf_weight(t, self.qtypes[i], layer.in_features, self.device))
            else:
                parts.append(DenseWeight(t.to(self.device, self.dtype), label=self.qtypes[i]))
            i = j + 1
        self.staged = {}
        self.install(layer, parts)


class GGUFEmbeddingMethod(EmbeddingMethod):
    """A packed token embedding: lookups dequantize the selected rows only."""

    def __init__(self, qtype: str, device: torch.device, dtype: torch.dtype) -> None:
        self.qtype = qtype
        self.device, self.dtype = device, dtype
        self.label = f"gguf-{qtype}"
        self.staged: dict[object, torch.Tensor] = {}

    def create_weights(self, layer: nn.Module) -> None:
        self.staged = _Staging(layer, [self.qtype]).tensors

    def source(self, layer: nn.Module) -> torch.Tensor:
        return self.staged[None] if self.staged else layer.packed

    def finalize(self, layer: nn.Module) -> None:
        del layer._parameters["weight"]
        layer.register_buffer("packed", self.staged[None].to(self.device), persistent=False)
        self.staged = {}

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return ref.gguf_dequantize_rows(layer.packed, self.qtype, input_ids).to(self.dtype)


class GGUFQuantConfig(QuantConfig):
    """Per-tensor GGUF types (HF names, e.g. ``model.layers.0.mlp.down_proj.weight`` -> ``Q4_1``)."""

    name = "gguf"

    def __init__(self, tensor_types: dict[str, str], device: torch.device, dtype: torch.dtype) -> None:
        self.tensor_types = tensor_types
        self.device, self.dtype = torch.device(device), dtype

    def keeps_packed(self, tensor_name: str) -> bool:
        if ".mlp.experts." in tensor_name or ".mlp.gate." in tensor_name or ".shared_expert_gate." in tensor_name:
            return False  # MoE experts are dequantized at load (expert_method); routers are dense
        return self.tensor_types.get(tensor_name) in PACKED_TYPES

    def expert_method(self, layer: nn.Module) -> ExpertMethod:
        """MoE experts: dense, dequantized from the file's blocks at load (no packed expert kernel)."""
        return ExpertMethod()

    def linear_method(self, layer: nn.Module) -> LinearMethod:
        qtypes = [self.tensor_types.get(f"{p.name}.weight", "F32") for p in layer.partitions]
        if all(t in FLOAT_TYPES for t in qtypes):
            return LinearMethod()
        return GGUFLinearMethod(qtypes, self.device, self.dtype)

    def embedding_method(self, layer: nn.Module) -> EmbeddingMethod:
        qtype = self.tensor_types.get(f"{layer.prefix}.weight", "F32")
        return GGUFEmbeddingMethod(qtype, self.device, self.dtype) if qtype in PACKED_TYPES else EmbeddingMethod()

    def describe(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return {"quantization": "gguf", "tensor_types": counts}
