"""Linear layers of compressed checkpoints: low rank (two thin linears) and 2:4 semi-structured.

``flashserve compress`` writes ordinary Hugging Face-style directories; what the loader must do
differently is said by one key of their ``config.json`` (other readers such as transformers
ignore it)::

    "compression": {
        "low_rank": {"model.layers.0.self_attn.qkv_proj": 288, ...},  # module -> rank
        "semi_structured": "2:4",                                      # weights hold a 2:4 pattern
        ...                                                            # provenance, not read here
    }

* Low rank: before the weights are loaded, each named module (flashserve module names, so the
  fused ``qkv_proj`` / ``gate_up_proj`` are factorised as one matrix) becomes a
  ``LowRankLinear`` whose checkpoint tensors are ``<module>.weight_a`` [r, in] and
  ``<module>.weight_b`` [out, r].
* 2:4: the weights are dense matrices with zeros (any reader computes the right thing). On CUDA
  in fp16/bf16, after loading, each decoder linear also keeps a compressed copy made by
  ``torch.sparse.to_sparse_semi_structured`` and uses it for inputs of at least ``min_tokens``
  rows, i.e. for prefill only: on an H200 the sparse kernel beats the dense GEMM only from about
  1024 rows (1.1-1.4x), and the torch wrapper costs about 0.5 ms a call, far more than a decode
  GEMM. Decode therefore reads the dense weights and gains nothing from 2:4.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers.linear import Linear, default_weight_loader

logger = logging.getLogger("flashserve")

SEMI_STRUCTURED_MIN_TOKENS = 1024  # rows from which the 2:4 kernel pays on an H200


class LowRankLinear(nn.Module):
    """``y = (x A^T) B^T + b`` with ``A = weight_a`` [rank, in] and ``B = weight_b`` [out, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} matrix, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank))
        self.weight_a.weight_loader = default_weight_loader
        self.weight_b.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, rank] -> [T, out]
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """A linear layer whose dense weight holds a 2:4 pattern, plus (CUDA, fp16/bf16) its compressed
    form for inputs of ``>= min_tokens`` rows. ``weight`` stays the dense matrix: decode reads it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, min_tokens: int = SEMI_STRUCTURED_MIN_TOKENS) -> None:
        super().__init__()
        if not is_2_4(weight):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not hold a 2:4 pattern "
                             "(at most 2 non-zeros in every group of 4 inputs)")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.min_tokens = min_tokens
        self.sparse: torch.Tensor | None = None
        if weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
            try:
                from torch.sparse import to_sparse_semi_structured

                self.sparse = to_sparse_semi_structured(weight.detach())
            except (RuntimeError, ValueError) as e:  # shape or device limits of the kernel
                logger.warning("flashserve: 2:4 kernel unavailable for a %s weight (%s); using the dense matrix",
                               tuple(weight.shape), e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.sparse is not None and x.shape[0] >= self.min_tokens:
            y = F.linear(x, self.sparse)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 2:4 kernel={'on' if self.sparse is not None else 'off'}"


def apply_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named linear module of ``model`` by an (uninitialised) LowRankLinear of the
    given rank, on the current default device and dtype. Call before loading the weights."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"compression.low_rank names {name!r}, which is not a module of the model") from None
        if not isinstance(old, Linear):
            raise ValueError(f"compression.low_rank names {name!r}, a {type(old).__name__}, not a linear layer")
        parent, _, child = name.rpartition(".")
        new = LowRankLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None)
        setattr(model.get_submodule(parent), child, new)


def use_semi_structured(model: nn.Module, min_tokens: int = SEMI_STRUCTURED_MIN_TOKENS) -> int:
    """On CUDA in fp16/bf16, swap every loaded decoder linear (its weight must hold a 2:4 pattern)
    for a SemiStructuredLinear; returns how many were swapped. Call after loading the weights."""
    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or ".layers." not in name:
            continue
        if not module.weight.is_cuda or module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue  # no 2:4 kernel: the dense matrix (with its zeros) is already right
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SemiStructuredLinear(module.weight.data, None if module.bias is None else module.bias.data, min_tokens))
        n += 1
    return n


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
