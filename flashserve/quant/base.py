"""The quantization interface: a ``QuantConfig`` picks a ``LinearMethod`` for every linear layer.

While a model is built, ``quant_scope(config)`` installs the config; each ``Linear`` (and the
embedding) asks ``current_quant_config()`` for its method, giving its checkpoint name, so the
model code never tests for quantization. A method

1. ``create_weights(layer)``: registers the parameters the checkpoint loader fills, each with a
   ``weight_loader(param, tensor, shard_id=None)`` (a dense ``[out, in]`` weight, the packed
   tensors of a GPTQ checkpoint, or a placeholder that keeps a GGUF tensor's bytes as given);
2. ``finalize(layer, tied)``: once everything is loaded, builds the kernel-ready weights on the
   layer's device (``flashserve.quant.packed``) and drops what was only needed for loading;
3. ``apply(layer, x, bias)``: ``[T, in] -> [T, out]``.

A fused layer (q/k/v, gate/up) is described by its ``partitions``: one per checkpoint tensor,
each with its output rows. A method may keep shards of different formats apart (a GGUF file
can store q in Q4_K and v in Q6_K); their outputs are concatenated.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Partition:
    """Output rows ``[offset, offset + size)`` of a layer, loaded from checkpoint module ``name``
    under ``shard_id`` (None for a layer with a single checkpoint tensor)."""

    shard_id: object
    offset: int
    size: int
    name: str


class LinearMethod:
    """How one linear layer stores and multiplies its weight (dense by default)."""

    label = "dense"

    def create_weights(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def finalize(self, layer: nn.Module, tied: torch.Tensor | None = None) -> None:
        """Nothing to do for a dense weight (a tied one is already shared)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _dense_gemv(layer.weight, x, bias, gated=False)
        return y if y is not None else F.linear(x, layer.weight, bias)

    def apply_silu_gated(self, layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``apply(silu_and_mul(h))`` in one kernel where this method has one for ``h``, else None."""
        return _dense_gemv(layer.weight, h, bias, gated=True)


def _dense_gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor | None:
    """A dense weight's batch-1 product on CUDA through ``kernels.dense_gemv`` (launched with the
    decode kernels' PDL protocol), or None where that kernel does not take it."""
    if x.device.type != "cuda":
        return None
    from flashserve.kernels.dense_gemv import dense_gemv

    return dense_gemv(x, w, bias, gated=gated)


class PackedLinearMethod(LinearMethod):
    """Base of the quantized methods: after ``finalize`` the layer holds ``packed_parts``, one
    ``PackedWeight`` per group of consecutive partitions, outputs concatenated."""

    label = "packed"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        parts = layer.packed_parts
        y = parts[0](x) if len(parts) == 1 else torch.cat([p(x) for p in parts], dim=-1)
        return y if bias is None else y + bias

    def apply_silu_gated(self, layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        parts = layer.packed_parts
        y = parts[0].silu_gated(h) if len(parts) == 1 else None
        return y if y is None or bias is None else y + bias

    @staticmethod
    def install(layer: nn.Module, parts: list[nn.Module]) -> None:
        """Replace the loading-time parameters by the kernel-ready parts."""
        if "weight" in layer._parameters:
            del layer._parameters["weight"]
        layer.packed_parts = nn.ModuleList(parts)


class EmbeddingMethod:
    """Dense token embedding (``F.embedding`` on a ``[vocab, hidden]`` parameter)."""

    label = "dense"

    def create_weights(self, layer: nn.Module) -> None:
        from flashserve.layers.linear import default_weight_loader

        layer.weight = nn.Parameter(torch.empty(layer.vocab_size, layer.hidden_size), requires_grad=False)
        layer.weight.weight_loader = default_weight_loader

    def finalize(self, layer: nn.Module) -> None:
        pass

    def source(self, layer: nn.Module) -> torch.Tensor:
        """The checkpoint tensor as loaded (what a tied LM head quantizes or packs)."""
        return layer.weight.data

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, layer.weight)


class ExpertMethod:
    """How an MoE layer stores its stacked experts (``flashserve.layers.moe.ExpertWeights``):
    dense by default. A quantized method's ``finalize`` replaces the loaded dense tensors by the
    kernel-ready ones (``flashserve.quant.experts``)."""

    label = "dense"

    def finalize(self, layer: nn.Module) -> None:
        """Nothing to do for dense experts."""


class QuantConfig:
    """No quantization: dense methods everywhere. Subclasses override what they change."""

    name = "none"

    def expert_method(self, layer: nn.Module) -> ExpertMethod:
        """Storage of an MoE layer's experts: dense without quantization; a quantized mode that
        has no expert format says so (its subclass overrides this where it has one)."""
        if self.name != "none":
            raise ValueError(f"quantized experts are not implemented for quantization={self.name!r}; "
                             "MoE models take int8, fp8 or gguf (experts dequantized), or 'none'")
        return ExpertMethod()

    def linear_method(self, layer: nn.Module) -> LinearMethod:
        return LinearMethod()

    def embedding_method(self, layer: nn.Module) -> EmbeddingMethod:
        return EmbeddingMethod()

    def keeps_packed(self, tensor_name: str) -> bool:
        """Whether the loader should hand over this checkpoint tensor's stored bytes (GGUF)."""
        return False

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.name}


_CONFIG: contextvars.ContextVar[QuantConfig] = contextvars.ContextVar("flashserve_quant_config", default=QuantConfig())


def current_quant_config() -> QuantConfig:
    """The config of the model being built (dense outside ``quant_scope``)."""
    return _CONFIG.get()


@contextlib.contextmanager
def quant_scope(config: QuantConfig) -> Iterator[QuantConfig]:
    """Install ``config`` for the layers constructed inside the block."""
    token = _CONFIG.set(config)
    try:
        yield config
    finally:
        _CONFIG.reset(token)


@contextlib.contextmanager
def cpu_single_thread() -> Iterator[None]:
    """Torch's CPU ops on one thread inside the block.

    Load-time repacking is a few memory-bound passes over each tensor; intra-op threads gain
    little there, and on a busy machine their barriers spin: packing SmolLM2's GGUF tensors took
    1.7 s of CPU time on 2 threads against 0.08 s on one (2-core EPYC shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def finalize_quantized(model: nn.Module) -> None:
    """Run every layer's ``finalize`` after loading (tied LM heads get their embedding's tensor)."""
    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    with cpu_single_thread() if on_cpu else contextlib.nullcontext():
        _finalize(model)


def _finalize(model: nn.Module) -> None:
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if isinstance(method, LinearMethod):
            tied = getattr(module, "tied_to", None)
            method.finalize(module, tied.quant_method.source(tied) if tied is not None else None)
        elif isinstance(method, ExpertMethod):
            method.finalize(module)
    for module in model.modules():  # embeddings last: a tied head reads their loaded tensor first
        method = getattr(module, "quant_method", None)
        if isinstance(method, EmbeddingMethod):
            method.finalize(module)
