"""Weight offloading: decoder layers whose weights live in host memory and are streamed in.

``cpu_offload_gb`` (vLLM's meaning) keeps that many GiB of the weights in host memory (pinned on
CUDA, so copies are asynchronous DMA) and copies each such layer to the device right before it
runs. It lets a model larger than the device run, at the cost of moving the offloaded bytes over
the host link once per forward pass: a decode step cannot beat ``offloaded bytes / host-to-device
bandwidth``, whatever the batch, so large batches amortise the copy.

Plugged in at the edges: the loader (``flashserve.loader.load_model(..., cpu_offload_gb=)``)
builds the offloaded layers in host memory through the models' layer placement hook
(``flashserve.models.blocks.layer_placement``), and forward hooks stream them in; the model's
forward is unchanged. The device never holds an offloaded layer's weights outside the staging
buffers:

* **placement, dense weights**: the sizes are known before the build (a sizing build with the
  decoder layers on the meta device, nothing of them allocated), so the offloaded layers are
  chosen first (``plan_offload``), then built and filled from the checkpoint on the host.
* **placement, quantized weights** (online int8 / int4 / fp8, packed GGUF, GPTQ / AWQ): a layer's
  stored bytes are set by its method's ``finalize``, whose format is the device's (Triton layouts
  on CUDA, torch's packed CPU layouts on the CPU). Every decoder layer is built and loaded on the
  host; each is moved to the device alone, finalized there and moved back (one layer's transient
  stay on the device); then the offloaded layers are chosen from the final sizes and the others
  moved to the device (``finish_offload``). This path holds every decoder layer in host memory
  while loading.
* **ranks**: under tensor or pipeline parallelism each rank offloads ``cpu_offload_gb`` of its
  own decoder layers (its shards, its stage's layers) with the same machinery.
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
events inside each pass, so a captured graph contains the copies and replays them. A pass that
stops before the last offloaded layer (the first-layers draft of speculative decoding) leaves the
next layer's copy in flight: a pre-hook of the final norm joins it. Early exit is refused: it
computes later layers' K/V from their submodules without running the layer (no pre-hook). On CPU the
"device" is host memory: the same hooks copy host buffer -> staging buffer without a stream
(``tests/test_offload.py`` checks tokens and where the bytes live).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flashserve.models.blocks import layer_placement

_ALIGN = 64  # bytes: every tensor starts on a cache line
HOST = torch.device("cpu")


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
    tensors: list = field(default_factory=list)  # per offloaded layer: its module tensors (staging views)

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


    def end_pass(self) -> None:
        """Pre-hook of the final norm: the current stream waits for the side stream. A pass that
        stops before the last offloaded layer (the first-layers draft) leaves the next layer's
        copy in flight; joined here, a captured graph has no unjoined work."""
        if self.stream is not None:
            torch.cuda.current_stream(self.staging[0].device).wait_stream(self.stream)

    def streamed(self) -> set[int]:
        """Ids of the module tensors that are views of the staging buffers."""
        return {id(t) for ts in self.tensors for t in ts}


@dataclass(frozen=True)
class OffloadPlan:
    """Where the build puts each decoder layer (this rank's indices).

    ``chosen``: the offloaded layers, when their sizes are known before the build (dense weights:
    a sizing build with the layers on the meta device); None when the quantization method sets
    the stored bytes at ``finalize`` (online int8 / int4 / fp8, GGUF, GPTQ / AWQ): then every
    decoder layer is built and loaded in host memory and the offloaded ones are chosen from their
    final sizes (``finish_offload``)."""

    cpu_offload_gb: float
    chosen: tuple[int, ...] | None

    def on_host(self, i: int) -> bool:
        return self.chosen is None or i in self.chosen

    def device_of(self, device: torch.device) -> Callable[[int], torch.device]:
        """Layer index -> the device the build puts it on."""
        return lambda i: HOST if self.on_host(i) else device


def plan_offload(cpu_offload_gb: float, build: Callable[[], nn.Module], dense: bool) -> OffloadPlan:
    """The plan for ``cpu_offload_gb`` GiB. ``build()`` builds the model outside the device (the
    loader passes its ``build_model`` on the host); with ``dense`` it runs once with every decoder
    layer on the meta device (nothing of them allocated) to size the layers. ValueError when the
    decoder layers hold less than that."""
    if cpu_offload_gb <= 0:
        raise ValueError(f"cpu_offload_gb must be > 0 GiB to offload anything, got {cpu_offload_gb}")
    if not dense:
        return OffloadPlan(cpu_offload_gb, None)
    with layer_placement(lambda i: torch.device("meta")):
        sizing = build()
    return OffloadPlan(cpu_offload_gb, tuple(_choose(sizing, layer_sizes(sizing), cpu_offload_gb)))


def _choose(model: nn.Module, layer_bytes: list[int], cpu_offload_gb: float) -> list[int]:
    nbytes, total = int(cpu_offload_gb * 2**30), sum(layer_bytes)
    if nbytes > total:
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
        everything = sum(t.numel() * t.element_size() for t in tensors)
        raise ValueError(f"cpu_offload_gb={cpu_offload_gb} is more than this model's {len(layer_bytes)} decoder layers "
                         f"hold ({total / 2**30:.4f} GiB of {everything / 2**30:.4f} GiB of weights; the embedding, head "
                         f"and norms stay on the device); give at most {total / 2**30:.4f}")
    return choose_layers(layer_bytes, nbytes)


def _finalizes(layer: nn.Module) -> bool:
    """Whether some linear (or expert) method of ``layer`` builds its stored weights at finalize."""
    from flashserve.quant.base import ExpertMethod, LinearMethod

    plain = (LinearMethod.finalize, ExpertMethod.finalize)
    return any(type(m.quant_method).finalize not in plain for m in layer.modules()
               if getattr(m, "quant_method", None) is not None)


def _move(tensors: Sequence[torch.Tensor], device: torch.device) -> None:
    for t in tensors:
        if t.device != device:
            t.data = t.data.to(device)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@contextlib.contextmanager
def _detached(layers: nn.ModuleList, indices: Sequence[int]) -> Iterator[None]:
    """Layers ``indices`` replaced by placeholders inside the block (a pass over the model skips them)."""
    kept = {i: layers[i] for i in indices}
    for i in indices:
        layers[i] = nn.Identity()
    try:
        yield
    finally:
        for i, layer in kept.items():
            layers[i] = layer


def finish_offload(model: nn.Module, plan: OffloadPlan, device: torch.device) -> HostWeights:
    """Complete the load of a model built under ``plan`` once the checkpoint is in: finalize every
    weight (the host-built layers one at a time on ``device``, since a quantized layer's stored
    format is its device's, then back to the host), choose the offloaded layers if the plan left
    them open, move the other host-built layers to the device, and install the streaming."""
    from flashserve.quant import finalize_quantized

    layers = decoder_layers(model)
    device = torch.device(device)
    host = [i for i in range(len(layers)) if plan.on_host(i)]
    for i in host:
        if _finalizes(layers[i]):  # this layer's transient stay on the device
            _move([t for t in _tensors(layers[i]) if t.device == HOST], device)
            finalize_quantized(layers[i])
            _move(_owned_tensors(model, layers)[i], HOST)
    with _detached(layers, host):
        finalize_quantized(model)
    owned = _owned_tensors(model, layers)
    chosen = list(plan.chosen) if plan.chosen is not None else \
        _choose(model, [_layout(ts)[1] for ts in owned], plan.cpu_offload_gb)
    weights = _install(model, layers, [owned[i] for i in chosen], chosen, device)
    streamed = weights.streamed()
    _move([t for t in _tensors(model) if id(t) not in streamed], device)  # resident layers built on the host
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the quantized layers' transient storage goes back before the KV pool is sized
    return weights


def _point(t: torch.Tensor, view: torch.Tensor) -> None:
    """Make module tensor ``t`` (same object, same attributes) the tensor ``view``. ``.data``
    cannot go from the host to the meta device (a dry load, in tests): the tensors are swapped."""
    if torch._has_compatible_shallow_copy_type(t.data, view):
        t.data = view
        return
    attributes = dict(t.__dict__)
    torch.utils.swap_tensors(t, nn.Parameter(view, requires_grad=False) if isinstance(t, nn.Parameter) else view)
    t.__dict__.update(attributes)


def _install(model: nn.Module, layers: nn.ModuleList, owned: list[list[torch.Tensor]], chosen: list[int],
             device: torch.device) -> HostWeights:
    """Copy each chosen layer's tensors (``owned``) into its host store, make them views of the
    staging buffers, and register the hooks that stream them in."""
    cuda = device.type == "cuda"
    sizes = [_layout(ts)[1] for ts in owned]
    staging = [torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in range(min(2, len(chosen)))]
    host = []
    for j, tensors in enumerate(owned):
        offsets, size = _layout(tensors)
        buf = torch.empty(size, dtype=torch.uint8, device=HOST, pin_memory=cuda)
        slot = staging[j % len(staging)]
        for t, off in zip(tensors, offsets):
            _view(buf, off, t).copy_(t.data)
            _point(t, _view(slot, off, t))  # the layer now computes from the staging buffer
        host.append(buf)
    weights = HostWeights(chosen, host, staging, tensors=owned)
    if cuda:
        weights.stream = torch.cuda.Stream(device)
        weights.ready = [torch.cuda.Event() for _ in chosen]
        weights.released = [torch.cuda.Event() for _ in chosen]
    layers[0].register_forward_pre_hook(lambda _module, _args: weights.start_pass())  # runs first
    for j, i in enumerate(chosen):
        layers[i].register_forward_pre_hook(lambda _module, _args, j=j: weights.before_layer(j))
    norm = getattr(model.model, "norm", None)  # None on a pipeline stage before the last
    if norm is not None:
        norm.register_forward_pre_hook(lambda _module, _args: weights.end_pass())
    model._host_weights = weights  # lives as long as the model
    return weights


def check_offload_modes(config) -> None:
    """Refuse the engine modes that offloading would compute wrongly (an ``EngineConfig``)."""
    if config.early_exit is not None:
        raise ValueError("cpu_offload_gb does not work with early exit: a token that exits gets the later layers' "
                         "K/V from their norms and projections without running those layers, so an offloaded "
                         "layer's weights would not be streamed in; use one or the other")
