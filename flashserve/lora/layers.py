"""Adapters applied to the model's linear layers: a ``LinearMethod`` wrapper.

Every adapted layer keeps its base method (dense, quantized, GGUF) and adds, for each token, the
delta of its request's adapter: ``y += (x A_s^T) B_s^T`` for the token's adapter ``s`` (none: no
delta). All adapters of a layer live in two stacked matrices, one column block per (adapter,
checkpoint module of the layer) padded to the largest rank ``R``:

* ``a`` ``[C, K]``: the blocks' A rows;
* ``b`` ``[N, C]``: the blocks' B (scaling folded in), each block in the output rows of its
  module (a fused q/k/v layer's q block only in the q rows), zero elsewhere;
* ``col_slot`` ``[C]``: the adapter of each column.

A step is then three products of static shape whatever the mix of adapters: ``t = x a^T``, the
columns of other adapters zeroed (``ids[:, None] == col_slot``), ``y += t b^T``. So CUDA graphs
capture it, every adapter and the base model share one batch, and the work grows with the number
of loaded adapters times their rank (small next to the base product while ``C`` is far below ``N``).
Each token's adapter index comes from ``LoRABatch.ids``, a row of the step's input buffers. On
the CPU, where nothing is captured, a layer instead multiplies each token by its own adapter only:
fp32 adapters through the native kernel (``cpu_native.lora_add``, which the native decode layers
of ``flashserve.models.cpu_decode`` call with the same values), others by the adapters its step
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
    """``base``'s product plus each token's adapter delta (module docstring)."""

    def __init__(self, base, a: torch.Tensor, b: torch.Tensor, col_slot: torch.Tensor, batch: LoRABatch,
                 width: int) -> None:
        self.base = base
        self.a, self.b_t = a.contiguous(), b.t().contiguous()  # [C, K], [C, N]: an adapter's rows are consecutive
        self.col_slot = col_slot
        self.width = width  # columns of one adapter: adapter s has [s * width, (s + 1) * width)
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


def install_adapters(model: nn.Module, adapters: Sequence[LoRAAdapter], dtype: torch.dtype,
                     device: torch.device) -> LoRABatch:
    """Wrap every linear layer that some adapter adapts in a ``LoRAMethod``; adapter ``i`` of
    ``adapters`` is index ``i`` in ``LoRABatch.ids``. Raises ValueError, before changing anything,
    for an adapter module the model has no linear layer for, or one of the wrong shape."""
    from flashserve.layers.linear import Linear

    rank = max(a.rank for a in adapters)
    wanted = {name for a in adapters for name in a.weights}
    pp = current_parallel()
    if pp.pp_size > 1:  # a pipeline stage holds some decoder layers; the others' modules are not its
        start, end = pp.layer_range(model.config.num_layers)
        wanted = {n for n in wanted if (m := _LAYER.search(n)) is None or start <= int(m[1]) < end}
    found: set[str] = set()
    plans = []
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        parts = [p for p in module.partitions if p.name in wanted]
        if not parts:
            continue
        found.update(p.name for p in parts)
        blocks = [(s, p, adapter.weights.get(p.name)) for s, adapter in enumerate(adapters) for p in parts]
        for s, p, ab in blocks:
            if ab is not None:
                _check_shapes(adapters[s], module, p, *ab)
        plans.append((module, parts, blocks))
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"LoRA adapters adapt modules this model has no linear layer for: {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} (supported: the decoder layers' attention and MLP "
                         "projections)")
    batch = LoRABatch(per_step=device.type == "cpu")
    for module, parts, blocks in plans:
        cols = len(blocks) * rank
        a_all = torch.zeros(cols, module.in_features)
        b_all = torch.zeros(module.out_features, cols)
        col_slot = torch.full((cols,), -2, dtype=torch.int64)  # -2: a block no adapter fills
        for j, (s, p, ab) in enumerate(blocks):
            if ab is None:
                continue
            a, b = _local(module, p, *ab)
            c = j * rank
            a_all[c : c + a.shape[0]] = a
            b_all[p.offset : p.offset + p.size, c : c + a.shape[0]] = b
            col_slot[c : c + rank] = s
        module.quant_method = LoRAMethod(module.quant_method, a_all.to(device, dtype), b_all.to(device, dtype),
                                         col_slot.to(device), batch, len(parts) * rank)
    return batch
