"""Pre-quantized 4-bit GPTQ and AWQ safetensors checkpoints, read in their own packing.

Per linear layer ``name`` (K inputs, N outputs, groups of G inputs, ``G = K`` for group_size -1):

* GPTQ (AutoGPTQ / optimum): ``name.qweight`` int32 ``[K / 8, N]``, input column k of output n in
  bits ``4 * (k % 8)`` of ``qweight[k // 8, n]``; ``name.qzeros`` int32 ``[K / G, N / 8]``, output
  n in bits ``4 * (n % 8)``; ``name.scales`` fp16 ``[K / G, N]``; ``name.g_idx`` int32 ``[K]``, the
  group of each input column (act-order / ``desc_act`` checkpoints permute it). The stored zero
  is the zero point minus one in the original ``gptq`` format (``checkpoint_format: gptq``) and
  the zero point itself in ``gptq_v2``. ``w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.
* AWQ (AutoAWQ GEMM): ``name.qweight`` int32 ``[K, N / 8]`` packed along N with the interleaved
  order: nibble i of a word holds output ``8 * word + AWQ_ORDER[i]``; ``name.qzeros`` int32
  ``[K / G, N / 8]`` packed the same way; ``name.scales`` fp16 ``[K / G, N]``; contiguous groups.

Loading copies each checkpoint tensor into the layer's parameter of the same layout (shards of
a fused q/k/v or gate/up layer go to their output columns); ``finalize`` unpacks to the int4
layout of ``flashserve.quant.packed.Int4Weight``. An act-order checkpoint becomes contiguous
groups over permuted input columns: ``y = x[:, perm] @ W'^T`` with ``perm = argsort(g_idx)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flashserve.quant.base import LinearMethod, PackedLinearMethod, QuantConfig
from flashserve.quant.packed import Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output column AWQ_ORDER[i]
PACK = 8  # 4-bit values per int32


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, 4, device=device, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R / 8, C]`` packed along dim 0 (value r in bits ``4 * (r % 8)``) -> uint8 [R, C]."""
    v = (packed.unsqueeze(1) >> _shifts(packed.device)[None, :, None]) & 15  # [R/8, 8, C]
    return v.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[R, C / 8]`` packed along dim 1 -> uint8 [R, C]; nibble i holds column
    ``8 * word + order[i]`` (identity order for GPTQ zeros)."""
    v = (packed.unsqueeze(2) >> _shifts(packed.device)[None, None, :]) & 15  # [R, C/8, nibble]
    if order is not None:
        v = v[:, :, torch.argsort(torch.tensor(order, device=packed.device))]  # -> column order
    return v.reshape(packed.shape[0], -1).to(torch.uint8)


class CheckpointInt4Config(QuantConfig):
    """A GPTQ or AWQ checkpoint: which layers are quantized, their group size and packing."""

    def __init__(self, kind: str, group_size: int, zero_offset: int, tensor_names: set[str]) -> None:
        self.name = kind
        self.kind = kind
        self.group_size = group_size  # -1: one group per layer
        self.zero_offset = zero_offset  # GPTQ v1 stores zero - 1
        self.tensor_names = tensor_names

    def linear_method(self, layer: nn.Module) -> LinearMethod:
        names = [p.name for p in layer.partitions]
        quantized = [f"{n}.qweight" in self.tensor_names for n in names]
        if not any(quantized):
            return LinearMethod()  # e.g. an LM head the quantizer left in fp16
        if not all(quantized):
            raise ValueError(f"{self.kind.upper()} checkpoint mixes quantized and dense shards in {layer.prefix}")
        g_idx = self.kind == "gptq" and all(f"{n}.g_idx" in self.tensor_names for n in names)
        return CheckpointInt4Method(self, g_idx)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.kind, "group_size": self.group_size}


class CheckpointInt4Method(PackedLinearMethod):
    """Parameters in the checkpoint's packing, unpacked to ``Int4Weight`` at ``finalize``."""

    def __init__(self, config: CheckpointInt4Config, has_g_idx: bool) -> None:
        self.config = config
        self.has_g_idx = has_g_idx
        self.label = config.kind
        self.g_idx: dict[object, torch.Tensor] = {}

    def group(self, k: int) -> int:
        return k if self.config.group_size == -1 else self.config.group_size

    def create_weights(self, layer: nn.Module) -> None:
        k, n = layer.in_features, layer.out_features
        groups = k // self.group(k)
        gptq = self.config.kind == "gptq"
        shapes = {  # name -> (shape, dtype, output columns per element along dim 1)
            "qweight": ((k // PACK, n) if gptq else (k, n // PACK), torch.int32, 1 if gptq else PACK),
            "qzeros": ((groups, n // PACK), torch.int32, PACK),
            "scales": ((groups, n), torch.float16, 1),
        }
        for name, (shape, dtype, per) in shapes.items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.weight_loader = self._column_loader(layer, name, per)
            setattr(layer, name, param)
        if self.has_g_idx:
            param = nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False)
            param.weight_loader = lambda p, loaded, shard_id=None: self._stage_g_idx(layer, loaded, shard_id)
            layer.g_idx = param

    def _column_loader(self, layer: nn.Module, name: str, per: int):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            part = next((p for p in layer.partitions if p.shard_id == shard_id), None)
            if part is None:
                raise ValueError(f"unknown shard {shard_id!r} for {name}")
            if part.offset % per or part.size % per:
                raise ValueError(f"{name}: output size {part.size} of {part.name} is not a multiple of {per}")
            target = param.data.narrow(1, part.offset // per, part.size // per)
            if tuple(target.shape) != tuple(loaded.shape):
                raise ValueError(f"shape mismatch for {part.name}.{name}: expected {tuple(target.shape)}, "
                                 f"got {tuple(loaded.shape)}")
            target.copy_(loaded)
        return load

    def _stage_g_idx(self, layer: nn.Module, loaded: torch.Tensor, shard_id: object) -> None:
        if tuple(loaded.shape) != (layer.in_features,):
            raise ValueError(f"g_idx of {layer.prefix}: expected [{layer.in_features}], got {tuple(loaded.shape)}")
        self.g_idx[shard_id] = loaded

    def finalize(self, layer: nn.Module, tied: torch.Tensor | None = None) -> None:
        k = layer.in_features
        g = self.group(k)
        device = layer.qweight.device
        if self.config.kind == "gptq":
            u = unpack_rows(layer.qweight.data).t()  # [N, K]
            z = unpack_cols(layer.qzeros.data).to(torch.float32) + self.config.zero_offset  # [G, N]
        else:
            u = unpack_cols(layer.qweight.data, AWQ_ORDER).t()
            z = unpack_cols(layer.qzeros.data, AWQ_ORDER).to(torch.float32)
        s = layer.scales.data.float()  # [G, N]
        scales, zeros = s.t().contiguous(), ((8.0 - z) * s).t().contiguous()  # (u - z) s = (u - 8) s + (8 - z) s
        parts = []
        g_idx = [self.g_idx[p.shard_id].to(device) for p in layer.partitions] if self.g_idx else []
        if g_idx and not all(torch.equal(g_idx[0], x) for x in g_idx[1:]):  # shards with their own order
            for p, gi in zip(layer.partitions, g_idx):
                rows = slice(p.offset, p.offset + p.size)
                parts.append(self._weight(u[rows], scales[rows], zeros[rows], g, gi, p.name))
        else:
            parts.append(self._weight(u, scales, zeros, g, g_idx[0] if g_idx else None, layer.prefix))
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            layer._parameters.pop(name, None)
        self.g_idx = {}
        self.install(layer, parts)

    def _weight(self, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: int,
                g_idx: torch.Tensor | None, name: str) -> Int4Weight:
        k = u.shape[1]
        perm = None
        if g_idx is not None:
            g_idx = g_idx.long()
            if not torch.equal(g_idx, torch.arange(k, device=u.device) // g):
                counts = torch.bincount(g_idx, minlength=k // g)
                if g_idx.min() < 0 or len(counts) != k // g or bool((counts != g).any()):
                    raise ValueError(f"g_idx of {name} does not assign {g} input columns to each of {k // g} groups")
                perm = torch.argsort(g_idx, stable=True)
                u = u[:, perm]
        return Int4Weight(u.contiguous(), scales, zeros, g, perm=perm, label=f"{self.config.kind}-g{g}")


def checkpoint_config(kind: str, qc: dict[str, Any], tensor_names: set[str], model_config: Any) -> CheckpointInt4Config:
    """Validate a GPTQ / AWQ ``quantization_config`` and the checkpoint's tensors (before allocation)."""
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"only 4-bit {kind.upper()} checkpoints are supported, this one has bits={bits}")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if kind == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version {qc.get('version')!r} is not supported; supported: gemm")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if kind == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq, gptq_v2")
    modules = sorted({n.rsplit(".", 1)[0] for n in tensor_names if n.endswith(".qweight")})
    if not modules:
        raise ValueError(f"the checkpoint declares {kind.upper()} quantization but holds no .qweight tensors")
    for m in modules:
        for suffix in ("scales", "qzeros"):
            if f"{m}.{suffix}" not in tensor_names:
                raise ValueError(f"{kind.upper()} checkpoint is missing {m}.{suffix} (its qweight is present); "
                                 f"every quantized layer needs qweight, qzeros and scales")
    if group != -1:
        from flashserve.quant.online import linear_in_features

        for name, k in linear_in_features(model_config).items():
            if k % group:
                raise ValueError(f"{kind.upper()} group size {group} does not divide in_features {k} of {name}")
    return CheckpointInt4Config(kind, group, 1 if kind == "gptq" and fmt == "gptq" else 0, tensor_names)
