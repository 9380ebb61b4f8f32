"""Online quantization: a bf16 / fp16 / fp32 checkpoint is loaded dense, then each linear layer
is quantized in place on its device (``finalize``), one layer at a time.

Schemes: int8 per output channel (symmetric); int4 group-wise, symmetric or with zero points;
fp8 e4m3 per output channel, weight-only or W8A8 (activations quantized per token at run time).
Per-row scales make quantizing a fused q/k/v or gate/up matrix the same as quantizing its
shards one by one. Embeddings stay dense. The LM head takes int8 under every scheme (as
llama.cpp's Q4_K_M keeps its output layer at 6 bits): on SmolLM2 an int4 or fp8 head cost more
perplexity than the rest of the model together (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashserve.kernels import quant_reference as ref
from flashserve.quant.base import ExpertMethod, LinearMethod, PackedLinearMethod, QuantConfig
from flashserve.quant.packed import Fp8Weight, Int4Weight, Int8Weight, PackedWeight

INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Scheme:
    """One online scheme: ``kind`` is int8, int4 or fp8."""

    kind: str
    group: int = 0  # int4
    zero_point: bool = False  # int4
    w8a8: bool = False  # fp8

    @property
    def name(self) -> str:
        if self.kind == "int4":
            return f"int4-g{self.group}" + ("-zp" if self.zero_point else "")
        return "fp8-w8a8" if self.w8a8 else self.kind


HEAD_SCHEME = Scheme("int8")  # the LM head's scheme under every online mode


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> PackedWeight:
    """Quantize a dense ``[N, K]`` weight on its own device."""
    if scheme.kind == "int8":
        return Int8Weight(*ref.quantize_int8(w))
    if scheme.kind == "int4":
        u, scales, zeros = ref.quantize_int4(w, scheme.group, scheme.zero_point)
        return Int4Weight(u, scales, zeros if scheme.zero_point else None, scheme.group)
    if scheme.kind == "fp8":
        q, scale = ref.quantize_fp8(w)
        return Fp8Weight(q, scale, scheme.w8a8)
    raise ValueError(f"unknown scheme {scheme.kind!r}")


class OnlineLinearMethod(PackedLinearMethod):
    """Loads like a dense layer; ``finalize`` quantizes and frees the dense weight."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.label = scheme.name

    def create_weights(self, layer: nn.Module) -> None:
        LinearMethod.create_weights(self, layer)

    def finalize(self, layer: nn.Module, tied: torch.Tensor | None = None) -> None:
        w = tied if tied is not None else layer.weight.data
        self.install(layer, [quantize_weight(w, self.scheme)])


class OnlineQuantConfig(QuantConfig):
    """Every linear layer (LM head included) in one online scheme."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.name

    def linear_method(self, layer: nn.Module) -> LinearMethod:
        if layer.prefix == "lm_head":
            return OnlineLinearMethod(HEAD_SCHEME)
        if self.scheme.kind == "int4" and layer.in_features % self.scheme.group:
            raise ValueError(group_error(self.scheme.group, layer.in_features, layer.prefix))
        return OnlineLinearMethod(self.scheme)

    def expert_method(self, layer: nn.Module) -> ExpertMethod:
        """MoE experts: int8 / fp8 per output channel, weight-only (``flashserve.quant.experts``)."""
        from flashserve.quant.experts import OnlineExpertMethod

        return OnlineExpertMethod(self.scheme.kind)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.name}


def group_error(group: int, in_features: int, layer: str) -> str:
    fits = [g for g in INT4_GROUPS if in_features % g == 0]
    hint = f"; group sizes that divide it: {', '.join(map(str, fits))}" if fits else ""
    return f"int4 group size {group} does not divide in_features {in_features} of {layer}{hint}"


def linear_in_features(model_config: Any) -> dict[str, int]:
    """in_features of every kind of linear layer of a Llama-family model (for checks made
    before anything is allocated)."""
    c = model_config
    return {
        "self_attn.qkv_proj": c.hidden_size,
        "self_attn.o_proj": c.num_heads * c.head_dim,
        "mlp.gate_up_proj": c.hidden_size,
        "mlp.down_proj": c.intermediate_size,
    }


def check_int4_groups(group: int, model_config: Any) -> None:
    """Raise before allocation if ``group`` does not divide some layer's in_features."""
    for name, k in linear_in_features(model_config).items():
        if k % group:
            raise ValueError(group_error(group, k, name))


def auto_int4_group(model_config: Any) -> int:
    """``int4`` without a group: 128, or the largest of 64 / 32 that divides every layer."""
    ks = linear_in_features(model_config).values()
    for g in sorted(INT4_GROUPS, reverse=True):
        if all(k % g == 0 for k in ks):
            return g
    check_int4_groups(INT4_GROUPS[0], model_config)
    return INT4_GROUPS[0]
