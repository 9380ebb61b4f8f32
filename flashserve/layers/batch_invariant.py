"""Batch-invariant mode (``LLM(..., batch_invariant=True)``, ``--batch-invariant``): on the GPU a
token's logits do not depend on the other rows of its step.

Without it, a row's bits depend on the step around it: cuBLAS and the quantized kernels pick
their tiles and K split by row count, the decode attention splits the context by batch size,
and a speculative verification step attends its 1 + k tokens with another tile shape than a
one-token decode step. Greedy speculative decoding then drifts from plain decoding at near-ties
(and so does a request between a small and a large batch). With this mode:

* **products**: every linear layer runs the Triton kernels with one launch configuration for
  every row count (``quant_gemm.invariant_config``: 64-row tiles, the weight's own N tiles and
  K split, the split partials added in order). Dense weights go through the dense format of
  the same kernel; packed weights through ``PackedWeight.invariant``. No cuBLAS, no batch-1
  GEMV, no dequantize + cuBLAS for long prompts: that is the price (``flashserve bench latency
  --batch-invariant`` measures it);
* **attention**: ``TritonAttentionBackend(batch_invariant=True)`` attends every new token of a
  sequence with few new tokens (decode, verification, a short last prompt chunk) as its own
  one-token decode row, over a split count fixed by the model's context length;
* norms, rotary, activations, residual adds and the sampler work row by row already.

Speculative chains (every proposer) then give plain decoding's tokens bit for bit on the GPU,
as the CPU path does without this mode (its kernels are row-exact for bf16 and packed weights).
Not covered, refused with an error: mixture-of-experts layers, token trees (``tree_width`` > 1),
fp8 W8A8 (``torch._scaled_mm``), factorised / 2:4-pruned layers, and attention kinds other than
full and sliding.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.quant.base import LinearMethod, PackedLinearMethod
from flashserve.quant.packed import dense_invariant

ATTENTION_KINDS = ("full", "sliding")


class BatchInvariantMethod(LinearMethod):
    """Wraps a layer's dense or packed method once its weights are final (CUDA)."""

    def __init__(self, inner: LinearMethod) -> None:
        self.inner = inner
        self.label = f"{inner.label}, batch-invariant"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.inner, PackedLinearMethod):
            parts = layer.packed_parts
            y = parts[0].invariant(x) if len(parts) == 1 else torch.cat([p.invariant(x) for p in parts], dim=-1)
        else:
            y = dense_invariant(x, layer.weight)
        return y if bias is None else y + bias

    def apply_silu_gated(self, layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> None:
        return None  # the gated batch-1 GEMV is a row-count-specific kernel


def check_backend(device: torch.device, backend: str) -> None:
    """The mode's attention rows are the Triton backend's: on CUDA (also a device given as
    ``auto``) the torch backend would leave them batch-dependent."""
    if device.type == "cuda" and backend != "triton":
        raise ValueError(f"batch_invariant=True on CUDA needs the triton attention backend, not {backend!r}")


def use_batch_invariant(model: nn.Module, kernels: bool = True) -> int:
    """Switch every linear layer of a CUDA model (``kernels``) to its batch-invariant product;
    returns how many. Without ``kernels`` (a CPU model) only check that its products are
    row-exact already. Raises ValueError, before changing anything,
    for layers the mode does not cover."""
    from flashserve.layers.linear import Linear
    from flashserve.layers.moe import MoEMLP

    linears = []
    for name, module in model.named_modules():
        if isinstance(module, MoEMLP):
            raise ValueError(f"batch_invariant=True does not cover mixture-of-experts layers ({name}): the fused "
                             "MoE kernels pick their path by token count")
        if isinstance(module, Linear):
            method = module.quant_method
            if not kernels:
                dense = type(method) is LinearMethod and module.weight.dtype != torch.bfloat16
                if dense or any(p.label.startswith("fp8") for p in getattr(module, "packed_parts", ())):
                    what = f"dense {module.weight.dtype}" if dense else "emulated fp8"
                    raise ValueError(f"batch_invariant=True on the CPU: {what} products ({name}) round a row by "
                                     "the step's row count (MKL); use bfloat16 or packed GGUF / int4 weights, "
                                     "whose CPU kernels are row-exact")
                continue
            if type(method) is not LinearMethod and not isinstance(method, PackedLinearMethod):
                raise ValueError(f"batch_invariant=True does not cover {method.label} layers ({name}); it covers "
                                 "dense and quantized (int8, int4, fp8 weight-only, GGUF, GPTQ, AWQ) linears")
            linears.append(module)
    for module in linears:
        module.quant_method = BatchInvariantMethod(module.quant_method)
    return len(linears)
