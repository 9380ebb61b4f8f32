"""From the user's ``quantization`` option and the checkpoint to a ``QuantConfig``.

Every check that can fail runs here, before the model allocates anything: an unknown mode, a
mode the checkpoint cannot take, an int4 group size that does not divide a layer's in_features,
a GGUF tensor type without a kernel, fp8 on a GPU without fp8 support, a GPTQ / AWQ checkpoint
that lacks a tensor.

Modes: ``auto`` (the checkpoint's own: GGUF tensors packed, GPTQ / AWQ as stored, otherwise
dense), ``none`` (dense; a GGUF file is dequantized), ``gguf``, ``gptq``, ``awq`` (a checkpoint
stored that way), and the online schemes ``int8``, ``int4`` (symmetric, group 128 or the largest
of 64 / 32 that divides every layer), ``int4-g{32,64,128}`` (symmetric), ``int4-g{32,64,128}-zp``
(zero points), ``fp8`` (weight-only) and ``fp8-w8a8``.
"""

from __future__ import annotations

from typing import Any

import torch

from flashserve.quant.base import QuantConfig
from flashserve.quant.online import INT4_GROUPS, OnlineQuantConfig, Scheme, auto_int4_group, check_int4_groups

from flashserve.config import QUANTIZATION_MODES

ONLINE_SCHEMES: dict[str, Scheme | None] = {
    "int8": Scheme("int8"),
    "int4": None,  # symmetric, group picked per model
    **{f"int4-g{g}": Scheme("int4", g) for g in INT4_GROUPS},
    **{f"int4-g{g}-zp": Scheme("int4", g, zero_point=True) for g in INT4_GROUPS},
    "fp8": Scheme("fp8"),
    "fp8-w8a8": Scheme("fp8", w8a8=True),
}
CHECKPOINT_MODES = ("gguf", "gptq", "awq")
assert set(QUANTIZATION_MODES) == {"auto", "none", *CHECKPOINT_MODES, *ONLINE_SCHEMES}


def check_mode(mode: str) -> None:
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")


def fp8_support_error(device: torch.device, capability: tuple[int, int] | None, name: str = "") -> str | None:
    """Why fp8 cannot run on ``device`` (None if it can). CUDA needs compute capability 8.9+
    (Ada, Hopper); the CPU runs fp8 emulated (dense matmul on fp8-rounded values)."""
    if device.type == "cuda":
        if capability is None or tuple(capability) < (8, 9):
            cap = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
            return (f"fp8 quantization needs a GPU with fp8 support (compute capability 8.9 or newer: Ada, "
                    f"Hopper); {name or device} has compute capability {cap}; use int8 or int4 instead")
        return None
    if device.type != "cpu":
        return f"fp8 quantization is not supported on device type {device.type!r}"
    return None


def _check_fp8(device: torch.device) -> None:
    capability = name = None
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
    err = fp8_support_error(device, capability, name or "")
    if err:
        raise ValueError(err)


def make_quant_config(
    mode: str,
    source_format: str,
    model_config: Any,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    gguf_types: dict[str, str] | None = None,
    checkpoint_quant: dict[str, Any] | None = None,
    tensor_names: set[str] | None = None,
    dense_gguf: bool = False,
) -> QuantConfig:
    """The config for loading ``source_format`` (gguf | safetensors | dummy) with ``mode``.

    ``gguf_types``: HF tensor name -> GGUF type of a GGUF file. ``checkpoint_quant``: the
    ``quantization_config`` a safetensors checkpoint declares; ``tensor_names`` its tensors.
    ``dense_gguf``: with ``auto``, dequantize a GGUF file (set when a dtype was asked for).
    """
    check_mode(mode)
    device = torch.device(device)
    declared = (checkpoint_quant or {}).get("quant_method")
    if declared is not None and declared not in ("gptq", "awq"):
        raise ValueError(f"checkpoint quantization {declared!r} is not supported; supported: gptq, awq")
    if mode == "auto":
        if source_format == "gguf":
            mode = "none" if dense_gguf else "gguf"
        else:
            mode = declared or "none"
    if declared and mode != declared:
        raise ValueError(f"this checkpoint is {declared.upper()}-quantized; load it with quantization={declared!r} "
                         f"(or 'auto'), not {mode!r}")
    if mode in ("gptq", "awq") and declared is None:
        raise ValueError(f"quantization={mode!r} needs a checkpoint whose config.json declares "
                         f"quantization_config.quant_method={mode!r}")
    if mode == "gguf":
        if source_format != "gguf" or gguf_types is None:
            raise ValueError("quantization='gguf' needs a .gguf file")
        from flashserve.quant.gguf import GGUFQuantConfig, check_gguf_types

        check_gguf_types(gguf_types)
        return GGUFQuantConfig(gguf_types, device, dtype)
    if mode in ("gptq", "awq"):
        from flashserve.quant.gptq import checkpoint_config

        return checkpoint_config(mode, checkpoint_quant or {}, tensor_names or set(), model_config)
    if mode == "none":
        return QuantConfig()
    scheme = ONLINE_SCHEMES[mode]
    if scheme is None:
        scheme = Scheme("int4", auto_int4_group(model_config))
    if scheme.kind == "int4" and getattr(model_config, "num_experts", 0):
        raise ValueError(f"int4 experts are not implemented (quantization={mode!r}); MoE models take int8 or fp8 "
                         "(or 'none')")
    if scheme.kind == "int4":
        check_int4_groups(scheme.group, model_config)
    if scheme.kind == "fp8":
        _check_fp8(device)
    if scheme.w8a8 and device.type == "cuda":
        from flashserve.quant.online import linear_in_features

        c = model_config
        outs = [c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, 2 * c.intermediate_size, c.vocab_size]
        sizes = list(linear_in_features(c).values()) + outs
        if any(s % 16 for s in sizes):
            raise ValueError("fp8-w8a8 (torch._scaled_mm) needs every layer's in and out features to be multiples of 16")
    return OnlineQuantConfig(scheme)
