"""Adapters applied to the model's linear layers: a ``LinearMethod`` wrapper.

Every adapted layer keeps its base method (dense, quantized, GGUF) and adds, for each token, the
delta of its request's adapter: ``y += (x A_s^T) B_s^T`` for the token's adapter ``s`` (none: no
delta). The engine holds a fixed number of adapter slots (``AdapterSlots``: ``max_loras``, each of
rank up to ``max_lora_rank``); a layer keeps every slot in two stacked matrices, one column block
per (slot, checkpoint module of the layer) of ``rank`` columns (zero beyond an adapter's own
rank, and for a slot without an adapter):

* ``a`` ``[C, K]``: the blocks' A rows;
* ``b_t`` ``[C, N]``: the blocks' B (scaling folded in), transposed, each block in the output
  columns of its module (a fused q/k/v layer's q block only in the q columns), zero elsewhere;
* ``col_slot`` ``[C]``: the slot of each row.

A step is then three products of static shape whatever the mix of adapters: ``t = x a^T``, the
columns of other slots zeroed (``ids[:, None] == col_slot``), ``y += t b_t``. So CUDA graphs
capture it, every adapter and the base model share one batch, and the work grows with the number
of slots times their rank (small next to the base product while ``C`` is far below ``N``).
Loading or removing an adapter rewrites its slot's blocks in place, so the graphs stay valid.
Each token's slot comes from ``LoRABatch.ids``, a row of the step's input buffers. On the CPU,
where nothing is captured, a layer instead multiplies each token by its own adapter only: fp32
adapters through the native kernel (``cpu_native.lora_add``, which the native decode layers of
``flashserve.models.cpu_decode`` call with the same values), others by the adapters its step
uses, each on its tokens (``LoRABatch.set_step``). The other adapters' weights are not read.

Tensor parallelism: a column-parallel layer keeps its output rows of each B, a row-parallel one
its input columns of each A; the row-parallel delta is a partial sum like the base product and is
all-reduced with it (``Linear._summed``), which makes it exact. A pipeline stage adapts its own
layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flashserve.distributed.parallel_state import current_parallel
from flashserve.kernels import cpu_native
from flashserve.lora.adapter import LoRAAdapter

_LAYER = re.compile(r"\.layers\.(\d+)\.")  # a decoder layer's index in a module name


class LoRABatch:
    """Each token's adapter index (-1: none) for the step being run: ``ids`` [max tokens] int64,
    a view the Worker points at its step buffers once; layers read its first T entries.

    On the CPU (``per_step``), where nothing is captured, ``set_step`` also lists the adapters the
    step uses, with their tokens (None: all of them), so that layers read only those adapters'
    weights (``LoRAMethod.apply``)."""

    def __init__(self, per_step: bool) -> None:
        self.ids: torch.Tensor | None = None
        self.per_step = per_step
        self.groups: tuple[tuple[int, torch.Tensor | None], ...] | None = None

    def set_step(self, token_lora: np.ndarray | None) -> None:
        """The step's tokens' adapters (None: no token has one), from the host."""
        if not self.per_step:
            return
        groups = []
        for s in () if token_lora is None else np.unique(token_lora[token_lora >= 0]):
            mine = token_lora == s
            groups.append((int(s), None if mine.all() else torch.from_numpy(np.flatnonzero(mine))))
        self.groups = tuple(groups)


class LoRAMethod:
    """``base``'s product plus each token's adapter delta (module docstring), for the checkpoint
    modules ``parts`` (Partitions of the layer) with ``rank`` columns each per slot."""

    def __init__(self, base, parts: list, slots: int, rank: int, in_features: int, out_features: int,
                 batch: LoRABatch, dtype: torch.dtype, device: torch.device) -> None:
        self.base = base
        self.parts = parts
        self.width = width = len(parts) * rank  # columns of one slot: slot s has [s * width, (s + 1) * width)
        # [C, K], [C, N] (C = slots * width): a slot's rows are consecutive; zero: no adapter
        self.a = torch.zeros(slots * width, in_features, dtype=dtype, device=device)
        self.b_t = torch.zeros(slots * width, out_features, dtype=dtype, device=device)
        self.col_slot = torch.arange(slots * width, device=device) // width
        self.batch = batch
        self.label = f"{base.label}+lora"
        # fp32 adapters on the CPU: the native kernel's form of them (None: torch's products)
        self.native = None
        if self.a.device.type == "cpu" and self.a.dtype == torch.float32 and cpu_native.available():
            self.native = cpu_native.LoRAWeights(self.a, self.b_t, width)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, bias)
        if self.native is not None and x.dim() == 2 and x.dtype == y.dtype == torch.float32 and y.is_contiguous():
            return cpu_native.lora_add(y, x, self.native, self.batch.ids)
        if self.batch.groups is not None:  # the CPU: the step's adapters only
            for s, rows in self.batch.groups:
                a, b = self.a[s * self.width : (s + 1) * self.width], self.b_t[s * self.width : (s + 1) * self.width]
                y = torch.addmm(y, x @ a.t(), b) if rows is None else y.index_add(0, rows, (x[rows] @ a.t()) @ b)
            return y
        ids = self.batch.ids[: x.shape[0]]
        t = (x @ self.a.t()) * (ids[:, None] == self.col_slot)  # [T, C]: only the token's adapter
        return torch.addmm(y, t, self.b_t)

    def apply_silu_gated(self, layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> None:
        """No fused activation: the caller applies it and calls ``apply``."""
        return None


def _local(layer: nn.Module, part, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a module's A [r, in] and B [out, r] (``part``: the layer's Partition)."""
    if layer.parallel == "column":
        index, _ = layer._splits[part.shard_id]
        b = b.narrow(0, index * part.size, part.size)
    elif layer.parallel == "row":
        a = a.narrow(1, layer.tp_rank * layer.in_features, layer.in_features)
    return a, b


def _check_shapes(adapter: LoRAAdapter, layer: nn.Module, part, a: torch.Tensor, b: torch.Tensor) -> None:
    full_in = layer.in_features * (layer.tp_size if layer.parallel == "row" else 1)
    full_out = part.size * (layer._splits[part.shard_id][1] if layer.parallel == "column" else 1)
    if a.shape[1] != full_in or b.shape[0] != full_out:
        raise ValueError(f"LoRA adapter {adapter.name!r}: {part.name} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                         f"but the model's layer maps {full_in} inputs to {full_out} outputs; was the adapter "
                         "trained for another model?")


# the checkpoint modules an engine with room for adapters loaded later adapts: every decoder
# layer's attention and MLP projections
PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


class AdapterSlots:
    """A model's adapted layers and the adapter each of ``slots`` slots holds (slot ``i`` is index
    ``i`` in ``LoRABatch.ids``). Every adapted layer reserves ``rank`` columns per module and slot,
    so writing or clearing a slot (``write``) changes values in place and never shapes or
    addresses: captured CUDA graphs and the native CPU layers keep reading the same tensors.

    ``modules``: the checkpoint module names to adapt (None: every projection of ``PROJECTIONS``
    in the decoder layers). A pipeline stage adapts its own layers only."""

    def __init__(self, model: nn.Module, slots: int, rank: int, modules: frozenset[str] | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        from flashserve.layers.linear import Linear

        if slots < 1 or rank < 1:
            raise ValueError(f"LoRA needs at least one adapter slot (max_loras) and a rank >= 1 (max_lora_rank); "
                             f"got {slots} and {rank}")
        self.slots, self.rank = slots, rank
        self.names: list[str | None] = [None] * slots  # each slot's adapter
        # whether a checkpoint module belongs to this pipeline stage (the model's own rule)
        self._mine = model.on_this_stage if current_parallel().pp_size > 1 else lambda name: True
        self.batch = LoRABatch(per_step=device.type == "cpu")
        self.layers: dict[str, tuple[nn.Module, object]] = {}  # module name -> (its layer, its Partition)
        self.methods: list[LoRAMethod] = []
        self.linears: set[str] = set()  # the checkpoint modules of this stage's linear layers
        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            self.linears.update(p.name for p in module.partitions)
            parts = [p for p in module.partitions if self._wanted(p.name, modules)]
            if not parts:
                continue
            method = LoRAMethod(module.quant_method, parts, slots, rank, module.in_features, module.out_features,
                                self.batch, dtype, device)
            module.quant_method = method
            self.methods.append(method)
            self.layers.update((p.name, (module, p)) for p in parts)

    def _wanted(self, name: str, modules: frozenset[str] | None) -> bool:
        if modules is not None:
            return name in modules
        m = _LAYER.search(name)
        return m is not None and name.rsplit(".", 1)[-1] in PROJECTIONS

    def check(self, adapter: LoRAAdapter) -> None:
        """ValueError, naming the adapter and the problem, unless ``write`` can take it: a rank
        within the slots' ``rank``, and every module it adapts in this stage one of the adapted
        layers here, of that layer's shapes."""
        if adapter.rank > self.rank:
            raise ValueError(f"LoRA adapter {adapter.name!r} has rank {adapter.rank}, above this engine's "
                             f"max_lora_rank {self.rank}; start the engine with max_lora_rank >= {adapter.rank}")
        mine = [n for n in adapter.weights if self._mine(n)]
        for missing, why, scope in (
                ([n for n in mine if n not in self.linears], "this model has no linear layer for",
                 "supported: the decoder layers' attention and MLP projections"),
                ([n for n in mine if n not in self.layers], "this engine does not adapt",
                 f"it adapts {self._scope()}")):
            if missing:
                missing = sorted(missing)
                raise ValueError(f"LoRA adapter {adapter.name!r} adapts modules {why}: {', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''} ({scope})")
        for name, (a, b) in adapter.weights.items():
            if name in self.layers:
                _check_shapes(adapter, *self.layers[name], a, b)

    def _scope(self) -> str:
        """What this engine adapts, in words."""
        leaves = sorted({n.rsplit(".", 1)[-1] for n in self.layers})
        if set(leaves) == PROJECTIONS:
            return "the decoder layers' attention and MLP projections"
        return (f"the modules of the adapters it started with: {', '.join(leaves)}; with max_loras it adapts every "
                "attention and MLP projection")

    def write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Put ``adapter`` (checked by ``check``) in ``slot``, or clear it (None)."""
        for method in self.methods:
            cols = slice(slot * method.width, (slot + 1) * method.width)
            method.a[cols] = 0
            method.b_t[cols] = 0
            if adapter is None:
                continue
            for j, part in enumerate(method.parts):
                ab = adapter.weights.get(part.name)
                if ab is None:
                    continue
                layer = self.layers[part.name][0]
                a, b = _local(layer, part, *ab)
                c = slot * method.width + j * self.rank
                method.a[c : c + a.shape[0]] = a.to(method.a.dtype)
                method.b_t[c : c + a.shape[0], part.offset : part.offset + part.size] = b.t().to(method.b_t.dtype)
        self.names[slot] = None if adapter is None else adapter.name


def install_adapters(model: nn.Module, adapters: Sequence[LoRAAdapter], dtype: torch.dtype, device: torch.device,
                     max_loras: int | None = None, max_rank: int | None = None) -> AdapterSlots:
    """Adapt ``model`` for ``max_loras`` slots (None: one per adapter) of rank ``max_rank`` (None:
    the adapters' largest) and put adapter ``i`` of ``adapters`` in slot ``i``. With slots to
    spare (``max_loras`` given), every attention and MLP projection is adapted, for adapters loaded
    later; otherwise the modules the adapters adapt. Raises ValueError, before any adapter is in
    place, for an adapter the slots cannot take."""
    if max_loras is not None and max_loras < len(adapters):
        raise ValueError(f"max_loras={max_loras} is below the {len(adapters)} adapters given (lora_modules)")
    if max_rank is None and not adapters:
        raise ValueError("LoRA without adapters to start with needs max_lora_rank")
    rank = max_rank if max_rank is not None else max(a.rank for a in adapters)
    modules = None if max_loras is not None else frozenset(n for a in adapters for n in a.weights)
    lora = AdapterSlots(model, max_loras or len(adapters), rank, modules, dtype, device)
    for adapter in adapters:
        lora.check(adapter)
    for slot, adapter in enumerate(adapters):
        lora.write(slot, adapter)
    return lora
