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
per-expert torch loop. With Triton ops the routing is one launch after the router's Linear, and
at decode sizes (``ROUTER_MAX_TOKENS`` tokens) one launch with the router's product inside.
The experts' storage comes from the quantization config's ``expert_method``
(``flashserve.quant``): dense, or int8 / fp8 per output channel (``flashserve.quant.experts``).
Under tensor parallelism each rank holds ``E / N`` experts and the partial outputs are summed
across ranks (``flashserve.distributed.expert_parallel``).
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.distributed.expert_parallel import expert_range, local_expert_ids
from flashserve.distributed.parallel_state import current_parallel
from flashserve.layers.activation import SiluAndMul
from flashserve.layers.linear import GateUpLinear, Linear
from flashserve.quant.base import LinearMethod, QuantConfig, current_quant_config, quant_scope

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
    """The stacked expert weights of one layer (this rank's ``[first, first + num_local)`` of
    ``num_experts``); ``weight_loader`` takes either a whole stacked tensor (shard None) or one
    expert's projection (shard ``(expert, part)``, skipped when another rank holds the expert).
    After loading, ``quant_method.finalize`` may replace the dense tensors by quantized ones
    (``tensors()`` gives what the kernels take either way)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        ctx = current_parallel()
        self.num_experts = num_experts
        self.first, self.num_local = expert_range(num_experts, ctx.tp_rank, ctx.tp_size)
        self.intermediate_size = intermediate_size
        E = self.num_local
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)  # [E_local, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(E, hidden_size, intermediate_size),
                                      requires_grad=False)  # [E_local, H, I]
        # what a checkpoint of per-expert tensors must provide (the loader's completeness check)
        local = range(self.first, self.first + E)
        self.gate_up_proj.shard_ids = [(e, p) for e in local for p in (0, 1)]
        self.down_proj.shard_ids = [(e, None) for e in local]
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader
        self.quant_method = current_quant_config().expert_method(self)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            target = param.data
            if loaded.shape[0] == self.num_experts and self.num_local != self.num_experts:
                loaded = loaded[self.first:self.first + self.num_local]  # this rank's experts
        else:
            expert, part = shard_id
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert {expert} out of range: this layer has {self.num_experts} experts")
            if not self.first <= expert < self.first + self.num_local:
                return  # held by another rank
            target = param.data[expert - self.first]
            if part is not None:
                target = target.narrow(0, part * self.intermediate_size, self.intermediate_size)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(w13 [E_local, 2I, H], w2 [E_local, H, I], s13 [E_local, 2I] | None, s2 [E_local, H] | None)."""
        if "gate_up_proj" in self._parameters:
            return self.gate_up_proj, self.down_proj, None, None
        return self.w13, self.w2, self.s13, self.s2

    def extra_repr(self) -> str:
        w13 = self.tensors()[0]
        E, two_i, H = w13.shape
        held = "" if self.num_local == self.num_experts else f" (experts {self.first}..{self.first + E - 1})"
        return (f"experts={self.num_experts}{held}, hidden={H}, intermediate={two_i // 2}, "
                f"{self.quant_method.label}")


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert: SwiGLU MLP of ``shared_expert_intermediate_size``."""

    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(hidden_size, intermediate_size, prefix=f"{prefix}.gate_up_proj")
        self.act_fn = SiluAndMul()
        # gate/up split by columns under tensor parallelism (MergedLinear), so down by rows
        self.down_proj = Linear(intermediate_size, hidden_size, prefix=f"{prefix}.down_proj", parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.act_fn.into(self.down_proj, self.gate_up_proj(x))


class MoEMLP(nn.Module):
    """Router + stacked experts (+ shared expert): ``[T, hidden] -> [T, hidden]``."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__()
        if config.num_experts < 1:
            raise ValueError(f"{prefix}: an MoE layer needs num_experts >= 1 in the model config")
        if not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise ValueError(f"{prefix}: top-k (num_experts_per_tok={config.num_experts_per_tok}) must be between 1 "
                             f"and the number of experts ({config.num_experts})")
        self.top_k = config.num_experts_per_tok
        self.scoring = config.moe_scoring
        self.renormalize = config.norm_topk_prob
        # The router and the shared expert's gate stay dense under every quantization: their few
        # outputs pick the experts (a rounding error flips a route), and they are < 0.1% of the bytes.
        with quant_scope(QuantConfig()):
            self.gate = Linear(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
        self.experts = ExpertWeights(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(config.hidden_size, config.shared_expert_intermediate_size,
                                              f"{prefix}.shared_expert")
            with quant_scope(QuantConfig()):
                self.shared_expert_gate = Linear(config.hidden_size, 1, prefix=f"{prefix}.shared_expert_gate")
        self.parallel = current_parallel()  # experts split over its tensor-parallel ranks
        self.triton = False  # set by flashserve.layers.fused.use_triton_ops: the fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        from flashserve.kernels.fused_moe import moe_loop

        if self.triton:  # one launch for softmax / top-k / renormalisation
            from flashserve.kernels.fused_moe import ROUTER_MAX_TOKENS, fused_route, fused_router_route

            if x.shape[0] <= ROUTER_MAX_TOKENS and type(self.gate.quant_method) is LinearMethod:
                # decode: the router's product in that launch too, from its dense weight (replicated
                # under tensor parallelism, no bias); another method (low rank, ...) keeps its own
                weights, ids = fused_router_route(x, self.gate.weight, self.top_k, self.scoring, self.renormalize)
            else:
                weights, ids = fused_route(self.gate(x), self.top_k, self.scoring, self.renormalize)  # [T, k] each
        else:
            weights, ids = route(self.gate(x), self.top_k, self.scoring, self.renormalize)
        experts = self.experts
        split = experts.num_local != experts.num_experts
        if split:  # the same routing on every rank; each runs the pairs of the experts it holds
            ids = local_expert_ids(ids, experts.first, experts.num_local)
        w13, w2, s13, s2 = experts.tensors()
        if self.triton:
            from flashserve.kernels.fused_moe import fused_moe

            out = fused_moe(x, w13, w2, weights, ids, s13, s2, held_elsewhere=split)
        else:
            out = moe_loop(x, w13, w2, weights, ids, s13, s2)
        if split:
            out = self.parallel.all_reduce(out)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def inactive_expert_bytes(model: nn.Module, tokens: int = 1) -> int:
    """Bytes of expert weights a step of ``tokens`` tokens does not read when each token picks
    distinct experts (batch 1: all but ``k`` experts per layer); for bandwidth figures."""
    total = 0
    for module in model.modules():
        if isinstance(module, MoEMLP):
            E = module.experts.num_local  # this rank's experts
            per_expert = sum(t[0].numel() * t.element_size() for t in module.experts.tensors() if t is not None)
            total += per_expert * max(E - min(E, tokens * module.top_k), 0)
    return total
