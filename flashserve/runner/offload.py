"""Weight offloading: decoder layers whose weights live in host memory and are streamed in.

``cpu_offload_gb`` (vLLM's meaning) keeps that many GiB of the weights in host memory (pinned on
CUDA, so copies are asynchronous DMA) and copies each such layer to the device right before it
runs. It lets a model larger than the device run, at the cost of moving the offloaded bytes over
the host link once per forward pass: a decode step cannot beat ``offloaded bytes / host-to-device
bandwidth``, whatever the batch, so large batches amortise the copy.

Plugged in at the edge, after the model is built and loaded (``offload_weights``); the model's
code is unchanged:

* **which weights**: whole decoder layers, as few as reach ``cpu_offload_gb``, spread evenly over
  the depth (with every other layer offloaded, each copy overlaps a resident layer's compute).
  Only tensors reachable through that layer alone move (a rope cache the model also holds, or
  one shared by several layers, stays); the embedding, final norm and head stay on the device.
* **where they live**: per offloaded layer one contiguous host buffer (``HostWeights.host``) with
  its parameters and buffers (quantized weights are buffers) at 64-byte aligned offsets.
* **on the device**: two reusable staging buffers, each the size of the largest offloaded layer.
  Offloaded layer ``j`` (in depth order) always uses buffer ``j % 2``, so its parameters are
  permanently *views* into that buffer (``param.data = view``): nothing about the module changes
  between steps, only the buffer's contents.
* **when**: a forward pre-hook on each offloaded layer waits for its copy, then starts copying the
  next offloaded layer into the other buffer on a side stream, after an event that marks the end
  of that buffer's previous user. The first offloaded layer's copy starts in a pre-hook of the
  first decoder layer (not earlier: the buffer's last user was the previous pass), so the
  resident layers before it overlap it.

CUDA graphs stay on: every copy is a device-side ``cudaMemcpyAsync`` from pinned memory with
fixed addresses and the side stream is forked from and joined back to the capturing stream with
events inside each pass, so a captured graph contains the copies and replays them. On CPU the
"device" is host memory: the same hooks copy host buffer -> staging buffer without a stream
(``tests/test_offload.py`` checks tokens and where the bytes live).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

_ALIGN = 64  # bytes: every tensor starts on a cache line


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (``model.model.layers`` in every registered model)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"cpu_offload_gb: {type(model).__name__} has no decoder layers at model.layers to offload")
    return layers


def _owned_tensors(model: nn.Module, layers: nn.ModuleList) -> list[list[torch.Tensor]]:
    """Per layer, the parameters and buffers reachable only through that layer (each tensor once),
    contiguous and non-empty. A tensor also reachable elsewhere stays where it is: a rope cache
    that the model reads before any layer runs, or one shared by several layers."""
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    owners: dict[int, set[int | None]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        rest = (path + ".")[len(prefix):] if path.startswith(prefix) else None
        owner = int(rest.split(".", 1)[0]) if rest else None  # the layer index, or None outside the layers
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            owners.setdefault(id(t), set()).add(owner)
            tensors[id(t)] = t
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    for key, who in owners.items():
        t = tensors[key]
        if len(who) == 1 and None not in who and t.numel() > 0 and t.is_contiguous():
            per_layer[next(iter(who))].append(t)
    return per_layer


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned byte offset of each tensor in one buffer, and the buffer's size."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, total


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    n = like.numel() * like.element_size()
    return buf[offset : offset + n].view(like.dtype).view(like.shape)


def layer_sizes(model: nn.Module) -> list[int]:
    """Bytes each decoder layer would move to the host store (its own tensors, aligned)."""
    return [_layout(ts)[1] for ts in _owned_tensors(model, decoder_layers(model))]


def choose_layers(layer_bytes: Sequence[int], nbytes: int) -> list[int]:
    """The fewest layers, spread evenly over the depth, whose bytes reach ``nbytes``."""
    n = len(layer_bytes)
    for k in range(1, n + 1):
        chosen = [math.floor((j + 0.5) * n / k) for j in range(k)]  # the middle of k equal spans
        if sum(layer_bytes[i] for i in chosen) >= nbytes:
            return chosen
    return list(range(n))


@dataclass
class HostWeights:
    """The offloaded layers' host copies, the device staging buffers and the copy schedule."""

    layer_indices: list[int]  # decoder layers offloaded, in depth order
    host: list[torch.Tensor]  # per offloaded layer: its bytes, uint8 [layer bytes] (pinned on CUDA)
    staging: list[torch.Tensor]  # device uint8 buffers [max layer bytes], used alternately
    stream: torch.cuda.Stream | None = None  # side stream of the copies (CUDA)
    ready: list = field(default_factory=list)  # per offloaded layer: its copy is done (side stream)
    released: list = field(default_factory=list)  # per offloaded layer: its buffer's last user is done
    copies: int = 0  # layer copies issued (eager passes and graph captures)

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() for h in self.host)

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() for s in self.staging)

    def _copy(self, j: int) -> None:
        """Start copying offloaded layer ``j`` into its staging buffer."""
        dst = self.staging[j % len(self.staging)][: self.host[j].numel()]
        self.copies += 1
        if self.stream is None:
            dst.copy_(self.host[j])
            return
        main = torch.cuda.current_stream(self.staging[0].device)
        self.released[j].record(main)  # everything before this point (the buffer's last user) is done
        self.stream.wait_event(self.released[j])
        with torch.cuda.stream(self.stream):
            dst.copy_(self.host[j], non_blocking=True)
            self.ready[j].record(self.stream)

    def start_pass(self) -> None:
        """Pre-hook of the first decoder layer: start copying the first offloaded layer, so the
        resident layers before it overlap the copy."""
        self._copy(0)

    def before_layer(self, j: int) -> None:
        """Pre-hook of offloaded layer ``j``: its weights are in place when it runs, and the next
        offloaded layer's copy is under way."""
        if self.stream is not None:
            torch.cuda.current_stream(self.staging[0].device).wait_event(self.ready[j])
        if j + 1 < len(self.host):
            self._copy(j + 1)


def offload_weights(model: nn.Module, cpu_offload_gb: float, device: torch.device) -> HostWeights:
    """Move at least ``cpu_offload_gb`` GiB of ``model``'s decoder-layer weights to host memory
    and install the hooks that stream them in (see the module docstring). ValueError when the
    model's decoder layers hold less than that."""
    if cpu_offload_gb <= 0:
        raise ValueError(f"cpu_offload_gb must be > 0 GiB to offload anything, got {cpu_offload_gb}")
    layers = decoder_layers(model)
    owned = _owned_tensors(model, layers)
    layer_bytes = [_layout(ts)[1] for ts in owned]
    nbytes = int(cpu_offload_gb * 2**30)
    total = sum(layer_bytes)
    if nbytes > total:
        everything = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                                [*model.parameters(), *model.buffers()]}.values())
        raise ValueError(f"cpu_offload_gb={cpu_offload_gb} is more than this model's {len(layers)} decoder layers hold "
                         f"({total / 2**30:.4f} GiB of {everything / 2**30:.4f} GiB of weights; the embedding, head "
                         f"and norms stay on the device); give at most {total / 2**30:.4f}")
    chosen = choose_layers(layer_bytes, nbytes)
    cuda = device.type == "cuda"
    host, staging_size = [], max(layer_bytes[i] for i in chosen)
    staging = [torch.empty(staging_size, dtype=torch.uint8, device=device) for _ in range(min(2, len(chosen)))]
    for j, i in enumerate(chosen):
        offsets, size = _layout(owned[i])
        buf = torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=cuda)
        slot = staging[j % len(staging)]
        for t, off in zip(owned[i], offsets):
            _view(buf, off, t).copy_(t.data)
            t.data = _view(slot, off, t)  # the layer now computes from the staging buffer
        host.append(buf)
    weights = HostWeights(chosen, host, staging)
    if cuda:
        weights.stream = torch.cuda.Stream(device)
        weights.ready = [torch.cuda.Event() for _ in chosen]
        weights.released = [torch.cuda.Event() for _ in chosen]
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the layers' old device storage goes back before the KV pool is sized
    layers[0].register_forward_pre_hook(lambda _module, _args: weights.start_pass())  # runs first
    for j, i in enumerate(chosen):
        layers[i].register_forward_pre_hook(lambda _module, _args, j=j: weights.before_layer(j))
    model._host_weights = weights  # lives as long as the model
    return weights

