"""Mixture-of-experts MLP: a router picks ``k`` of ``E`` SwiGLU experts per token.

``MoEMLP`` (the ``"moe"`` MLP kind of ``flashserve.models.blocks``) holds

* ``gate``: the router, a ``Linear(hidden, E)`` (checkpoint name ``mlp.gate``);
* ``experts``: the expert weights stacked per layer, expert-major so that expert parallelism
  can shard them by expert: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (the layout
  transformers >= 5 saves; per-expert checkpoint tensors load into their slice);
* optionally (Qwen2-MoE) a ``shared_expert``, a dense SwiGLU MLP every token goes through,
  scaled by ``sigmoid(shared_expert_gate(x))``.

Routing (``route``): softmax or sigmoid over the router logits in fp32, top-k, and, where the
architecture says so (``norm_topk_prob``), the k weights renormalised to sum to 1. Mixtral
always renormalises (its softmax over the top-k logits is the same thing); Qwen2-MoE and
Qwen3-MoE follow ``norm_topk_prob`` in their config.

The experts run through ``flashserve.kernels.fused_moe``: the fused Triton kernel when the model
is switched to Triton ops (``flashserve.layers.fused.use_triton_ops``, on CUDA), else the
per-expert torch loop. Quantized experts are not implemented: a quantization mode other than
``none`` is refused when the layer is built.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.layers.activation import SiluAndMul
from flashserve.layers.linear import GateUpLinear, Linear
from flashserve.quant.base import current_quant_config

# checkpoint projection name -> (stacked parameter, part): part 0 gate, 1 up, None down
EXPERT_PROJECTIONS: dict[str, tuple[str, int | None]] = {
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),  # Mixtral's names
}


def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax",
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    scores = logits.float().softmax(dim=-1) if scoring == "softmax" else logits.float().sigmoid()
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class ExpertWeights(nn.Module):
    """The stacked expert weights of one layer; ``weight_loader`` takes either a whole stacked
    tensor (shard None) or one expert's projection (shard ``(expert, part)``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size),
                                      requires_grad=False)  # [E, H, I]
        # what a checkpoint of per-expert tensors must provide (the loader's completeness check)
        self.gate_up_proj.shard_ids = [(e, p) for e in range(num_experts) for p in (0, 1)]
        self.down_proj.shard_ids = [(e, None) for e in range(num_experts)]
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            target = param.data
        else:
            expert, part = shard_id
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert {expert} out of range: this layer has {self.num_experts} experts")
            target = param.data[expert]
            if part is not None:
                target = target.narrow(0, part * self.intermediate_size, self.intermediate_size)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def extra_repr(self) -> str:
        E, two_i, H = self.gate_up_proj.shape
        return f"experts={E}, hidden={H}, intermediate={two_i // 2}"


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert: SwiGLU MLP of ``shared_expert_intermediate_size``."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(hidden_size, intermediate_size, prefix=f"{prefix}.gate_up_proj")
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(intermediate_size, hidden_size, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class MoEMLP(nn.Module):
    """Router + stacked experts (+ shared expert): ``[T, hidden] -> [T, hidden]``."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__()
        if config.num_experts < 1:
            raise ValueError(f"{prefix}: an MoE layer needs num_experts >= 1 in the model config")
        if not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise ValueError(f"{prefix}: top-k (num_experts_per_tok={config.num_experts_per_tok}) must be between 1 "
                             f"and the number of experts ({config.num_experts})")
        quant = current_quant_config().name
        if quant != "none":
            raise ValueError(f"quantized experts are not implemented (quantization={quant!r}); "
                             "load this MoE model with quantization='none'")
        self.top_k = config.num_experts_per_tok
        self.scoring = config.moe_scoring
        self.renormalize = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
        self.experts = ExpertWeights(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(config.hidden_size, config.shared_expert_intermediate_size,
                                              f"{prefix}.shared_expert")
            self.shared_expert_gate = Linear(config.hidden_size, 1, prefix=f"{prefix}.shared_expert_gate")
        self.triton = False  # set by flashserve.layers.fused.use_triton_ops: the fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        from flashserve.kernels.fused_moe import moe_loop

        weights, ids = route(self.gate(x), self.top_k, self.scoring, self.renormalize)  # [T, k] each
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        if self.triton:
            from flashserve.kernels.fused_moe import fused_moe

            out = fused_moe(x, w13, w2, weights, ids)
        else:
            out = moe_loop(x, w13, w2, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def inactive_expert_bytes(model: nn.Module, tokens: int = 1) -> int:
    """Bytes of expert weights a step of ``tokens`` tokens does not read when each token picks
    distinct experts (batch 1: all but ``k`` experts per layer); for bandwidth figures."""
    total = 0
    for module in model.modules():
        if isinstance(module, MoEMLP):
            E = module.experts.num_experts
            per_expert = sum(p[0].numel() * p.element_size() for p in module.experts.parameters())
            total += per_expert * max(E - min(E, tokens * module.top_k), 0)
    return total
