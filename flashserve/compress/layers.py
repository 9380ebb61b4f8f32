"""Linear layers of compressed checkpoints, as ``flashserve.quant`` linear methods: low rank
(two thin products) and 2:4 semi-structured.

``flashserve compress`` writes ordinary Hugging Face-style directories; what the loader must do
differently is said by one key of their ``config.json`` (other readers such as transformers
ignore it)::

    "compression": {
        "low_rank": {"model.layers.0.self_attn.qkv_proj": 288, ...},  # module -> rank
        "semi_structured": "2:4",                                      # weights hold a 2:4 pattern
        ...                                                            # provenance, not read here
    }

The loader wraps the quantization config of the load in a ``CompressionConfig``
(``compression_quant_config``), so the model code never tests for compression: each ``Linear``
asks the config in scope for its method, as for quantization.

* Low rank: each named layer (flashserve module names, so the fused ``qkv_proj`` /
  ``gate_up_proj`` are factorised as one matrix) gets a ``LowRankMethod`` whose checkpoint
  tensors are ``<module>.weight_a`` [r, in] and ``<module>.weight_b`` [out, r]. The layer stays
  a ``Linear`` (same name, same bias); only its storage and product change.
* 2:4: the weights are dense matrices with zeros (any reader computes the right thing), served
  dense by default. ``SemiStructuredMethod(min_tokens)`` can keep a compressed copy of each decoder
  linear (CUDA, fp16/bf16; ``torch.sparse.to_sparse_semi_structured``) and use it for inputs of at
  least ``min_tokens`` rows, i.e. prefill. Measured on the H200 with torch 2.11 (docs/compression.md,
  2026-12-02) that never paid: each call costs about 0.5 ms of wrapper on top of the product, so
  at Llama-3.1-8B shapes the sparse product was 0.10-0.46x dense at 1024 rows and 0.34-0.86x at
  4096, and whole prefills 0.25x / 0.95x, while the copy added 7.3 GiB. So the loader does not
  make it (``SEMI_STRUCTURED_MIN_TOKENS`` is None); ``flashserve bench compress`` turns it on to
  keep measuring it. With a quantization mode other than ``none`` the zeros are simply quantized.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.quant.base import EmbeddingMethod, ExpertMethod, LinearMethod, QuantConfig

logger = logging.getLogger("flashserve")

SEMI_STRUCTURED_MIN_TOKENS: int | None = None  # rows from which loaded 2:4 layers use the kernel (None: never)


def _register(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A frozen parameter the checkpoint loader fills whole."""
    from flashserve.layers.linear import default_weight_loader

    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = default_weight_loader
    setattr(layer, name, param)


class LowRankMethod(LinearMethod):
    """``y = (x A^T) B^T + b`` with ``A = layer.weight_a`` [rank, in], ``B = layer.weight_b`` [out, rank]."""

    label = "low rank"

    def __init__(self, rank: int) -> None:
        self.rank = int(rank)
        self.label = f"low rank {self.rank}"

    def create_weights(self, layer: nn.Module) -> None:
        check_rank(self.rank, layer.out_features, layer.in_features, getattr(layer, "prefix", "") or "layer")
        _register(layer, "weight_a", torch.empty(self.rank, layer.in_features))
        _register(layer, "weight_b", torch.empty(layer.out_features, self.rank))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(F.linear(x, layer.weight_a), layer.weight_b, bias)  # [T, in] -> [T, r] -> [T, out]

    def apply_silu_gated(self, layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> None:
        return None  # two factors: no one-launch gated product


def check_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> None:
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(f"{name}: rank must be in [1, {min(in_features, out_features)}] for a "
                         f"{out_features}x{in_features} matrix, got {rank}")


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredMethod(LinearMethod):
    """A dense weight holding a 2:4 pattern, plus (CUDA, fp16/bf16, when ``min_tokens`` is given)
    its compressed form in ``layer.sparse`` for inputs of ``>= min_tokens`` rows. ``layer.weight``
    stays: decode reads it."""

    label = "2:4"

    def __init__(self, min_tokens: int | None = None) -> None:
        self.min_tokens = min_tokens

    def finalize(self, layer: nn.Module, tied: torch.Tensor | None = None) -> None:
        w = layer.weight
        if not is_2_4(w):
            raise ValueError(f"{getattr(layer, 'prefix', '') or 'layer'}: config.json says 2:4 but the weight of shape "
                             f"{tuple(w.shape)} does not hold the pattern (at most 2 non-zeros in every group of 4 inputs)")
        layer.sparse = None
        if self.min_tokens is not None and w.is_cuda and w.dtype in (torch.float16, torch.bfloat16):
            try:
                from torch.sparse import to_sparse_semi_structured

                layer.sparse = to_sparse_semi_structured(w.detach())
            except (RuntimeError, ValueError) as e:  # shape or device limits of the kernel
                logger.warning("flashserve: 2:4 kernel unavailable for a %s weight (%s); using the dense matrix",
                               tuple(w.shape), e)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        sparse = getattr(layer, "sparse", None)
        if sparse is not None and x.shape[0] >= self.min_tokens:
            y = F.linear(x, sparse).contiguous()  # the 2:4 kernel returns a transposed view
            return y if bias is None else y + bias
        return F.linear(x, layer.weight, bias)


def set_low_rank(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Turn a dense ``Linear`` into a low-rank one in place: ``weight`` [out, in] is replaced by
    ``weight_a = a`` [r, in] and ``weight_b = b`` [out, r] (the bias is kept)."""
    if type(getattr(layer, "quant_method", None)) is not LinearMethod:
        raise ValueError(f"{getattr(layer, 'prefix', '') or type(layer).__name__} is not a dense flashserve linear layer")
    check_rank(a.shape[0], layer.out_features, layer.in_features, layer.prefix or "layer")
    if tuple(a.shape) != (a.shape[0], layer.in_features) or tuple(b.shape) != (layer.out_features, a.shape[0]):
        raise ValueError(f"factors {tuple(b.shape)} @ {tuple(a.shape)} do not make a {layer.out_features}x{layer.in_features} matrix")
    del layer._parameters["weight"]
    layer.quant_method = LowRankMethod(a.shape[0])
    _register(layer, "weight_a", a.detach().clone())
    _register(layer, "weight_b", b.detach().clone())


def set_semi_structured(layer: nn.Module, min_tokens: int | None = None) -> bool:
    """Serve a loaded dense ``Linear`` whose weight holds a 2:4 pattern through the 2:4 method (with
    the sparse kernel from ``min_tokens`` rows, when given); returns whether the kernel is in use
    (CUDA fp16/bf16 only)."""
    if type(getattr(layer, "quant_method", None)) is not LinearMethod:
        raise ValueError(f"{getattr(layer, 'prefix', '') or type(layer).__name__} is not a dense flashserve linear layer")
    method = SemiStructuredMethod(min_tokens)
    method.finalize(layer)
    layer.quant_method = method
    return layer.sparse is not None


def is_low_rank(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "quant_method", None), LowRankMethod)


def compression_spec(config_json: dict[str, Any]) -> dict[str, Any]:
    """The ``compression`` entry of a parsed config.json ({} for an ordinary checkpoint), checked."""
    spec = config_json.get("compression") or {}
    if not isinstance(spec, dict):
        raise ValueError("config.json: 'compression' must be an object")
    ranks = spec.get("low_rank") or {}
    if not isinstance(ranks, dict) or any(not isinstance(r, int) or r < 1 for r in ranks.values()):
        raise ValueError("config.json: compression.low_rank must map module names to positive integer ranks")
    if spec.get("semi_structured") not in (None, "2:4"):
        raise ValueError(f"config.json: compression.semi_structured must be '2:4', got {spec.get('semi_structured')!r}")
    return spec


class CompressionConfig(QuantConfig):
    """Low-rank and 2:4 methods for the layers a checkpoint's ``compression`` entry names; every
    other layer (and the embedding) gets what the quantization config ``inner`` gives it."""

    def __init__(self, spec: dict[str, Any], inner: QuantConfig, min_tokens: int | None = None) -> None:
        self.low_rank: dict[str, int] = dict(spec.get("low_rank") or {})
        self.semi_structured = spec.get("semi_structured") == "2:4"
        self.inner = inner
        self.name = inner.name
        self.min_tokens = min_tokens

    def linear_method(self, layer: nn.Module) -> LinearMethod:
        prefix = getattr(layer, "prefix", "")
        if prefix in self.low_rank:
            if self.inner.name != "none":
                raise ValueError(f"quantization {self.inner.name!r} of a low-rank checkpoint is not supported "
                                 f"({prefix} is factorised); load it with quantization='none'")
            return LowRankMethod(self.low_rank[prefix])
        method = self.inner.linear_method(layer)
        if self.semi_structured and ".layers." in prefix and type(method) is LinearMethod:
            return SemiStructuredMethod(self.min_tokens)
        return method

    def embedding_method(self, layer: nn.Module) -> EmbeddingMethod:
        return self.inner.embedding_method(layer)

    def expert_method(self, layer: nn.Module) -> ExpertMethod:
        """MoE experts are never factorised or pruned: they take the inner config's storage."""
        return self.inner.expert_method(layer)

    def keeps_packed(self, tensor_name: str) -> bool:
        return self.inner.keeps_packed(tensor_name)

    def describe(self) -> dict[str, Any]:
        out = dict(self.inner.describe())
        out["compression"] = {"low_rank_layers": len(self.low_rank), "semi_structured": self.semi_structured}
        return out


def compression_quant_config(config_json: dict[str, Any], inner: QuantConfig) -> QuantConfig:
    """``inner`` itself for an ordinary checkpoint, else a CompressionConfig around it."""
    spec = compression_spec(config_json)
    if not spec.get("low_rank") and not spec.get("semi_structured"):
        return inner
    return CompressionConfig(spec, inner, SEMI_STRUCTURED_MIN_TOKENS)
