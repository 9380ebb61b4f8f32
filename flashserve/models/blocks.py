"""Layer parts a decoder layer is assembled from, by the names a ``LayerSpec`` gives.

``MLP_TYPES`` maps a ``LayerSpec.mlp`` name to a module class built as ``cls(config, prefix=...)``
(``prefix``: its checkpoint name, e.g. ``model.layers.0.mlp``) that maps ``[T, hidden] -> [T, hidden]``. New MLP kinds (GeGLU, mixture of experts) register here; the
decoder layer has no branch on them.

``build_layers`` builds a model's decoder layers, each on the device the loader's placement
gives it (``layer_placement``: weight offloading builds the offloaded layers in host memory), or
on the current device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from flashserve.config import ModelConfig
from flashserve.layers.activation import SiluAndMul, gelu_tanh_and_mul
from flashserve.layers.linear import GateUpLinear, Linear
from flashserve.layers.moe import MoEMLP


class BlockNorms(NamedTuple):
    """Where a decoder layer's RMSNorms sit, by attribute name (None: no norm there). ``attn_in`` and
    ``mlp_in`` take the residual add before their block (``norm(x + residual)``), ``attn_out`` and
    ``mlp_out`` normalise their block's output (Gemma 3). Data for the code that computes a layer's
    step without its forward (``flashserve.models.cpu_decode``)."""

    attn_in: str
    attn_out: str | None
    mlp_in: str
    mlp_out: str | None


class LayerStack:
    """A model's decoder layers, run in order by ``run_layers`` (mixed into the model classes that
    hold ``layers`` and ``_rope_index``: layer i reads the rope tables ``ropes[_rope_index[i]]``).
    The step of the whole stack is one method, so that code which computes it without the layers'
    forwards (``flashserve.models.cpu_decode.CpuDecodeStack``) can stand in for it per instance."""

    layers: nn.ModuleList
    _rope_index: list[int]

    def run_layers(self, ropes: list, hidden: torch.Tensor, residual: torch.Tensor | None,
                   kv_caches: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's ``(hidden, residual) = layer(rope, hidden, residual, kv_cache)`` in order
        (``kv_caches`` empty or None: no cache); returns the last layer's."""
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches else None
            hidden, residual = layer(ropes[self._rope_index[i]], hidden, residual, kv_cache)
        return hidden, residual


class GatedSiluMLP(nn.Module):
    """SwiGLU MLP: fused gate_up projection, silu(gate) * up, down projection."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size, prefix=f"{prefix}.gate_up_proj")
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, prefix=f"{prefix}.down_proj",
                                parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.act_fn.into(self.down_proj, self.gate_up_proj(x))


class GatedGeluTanhMLP(GatedSiluMLP):
    """GeGLU MLP (Gemma): gelu_tanh(gate) * up, with GELU's tanh approximation."""

    def __init__(self, config: ModelConfig, prefix: str = "") -> None:
        super().__init__(config, prefix)
        self.act_fn = GeluTanhAndMul()


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` where ``x = cat([gate, up], -1)``: [..., 2 * I] -> [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_and_mul(x)

    def into(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(self(x))`` (no gated GEMV for this gate)."""
        return linear(self(x))


_PLACEMENT: contextvars.ContextVar[Callable[[int], torch.device] | None] = contextvars.ContextVar(
    "flashserve_layer_placement", default=None)


@contextlib.contextmanager
def layer_placement(device_of: Callable[[int], torch.device]) -> Iterator[None]:
    """Inside the block, models build decoder layer ``i`` (this rank's index) on ``device_of(i)``."""
    token = _PLACEMENT.set(device_of)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def build_layers(count: int, make: Callable[[int], nn.Module]) -> nn.ModuleList:
    """``make(i)`` for ``i < count``, each under the device ``layer_placement`` gives it."""
    device_of = _PLACEMENT.get()
    if device_of is None:
        return nn.ModuleList([make(i) for i in range(count)])
    layers = []
    for i in range(count):
        with torch.device(device_of(i)):
            layers.append(make(i))
    return nn.ModuleList(layers)


MLP_TYPES: dict[str, type[nn.Module]] = {
    "gated_silu": GatedSiluMLP,
    "moe": MoEMLP,  # router + stacked experts (+ shared expert)
    "gated_gelu_tanh": GatedGeluTanhMLP,
}
