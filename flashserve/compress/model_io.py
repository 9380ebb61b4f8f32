"""Read a source model for the compression tools and write the result as a model directory.

A source is anything ``LLM(...)`` loads (a Hugging Face directory, a GGUF file such as the
embedded SmolLM2, ``None`` for that default). It is loaded as a flashserve model with the torch
attention backend (``flashserve.compress.packed`` runs it without a KV cache), plus its
tokenizer and a ``config.json`` dict.

The output is a Hugging Face-style directory: ``model.safetensors`` (HF tensor names: the fused
``qkv_proj`` / ``gate_up_proj`` are split back into q/k/v and gate/up, so a dense result loads in
transformers too), ``config.json`` (the source's, or one written from the GGUF metadata, with the
new shapes and a ``compression`` entry: flashserve.compress.layers) and the source's tokenizer
files with its chat template. No pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashserve.config import SUPPORTED_ARCHITECTURES, ModelConfig
from flashserve.compress.layers import compression_spec
from flashserve.layers.linear import MergedLinear
from flashserve.layers.norm import RMSNorm

# Architectures whose loader adds a constant to every norm weight (Gemma's RMSNorm multiplies by
# 1 + w and flashserve stores 1 + w): subtracted again when writing Hugging Face tensors.
_NORM_OFFSET = {"gemma3": 1.0}
# fused flashserve module -> HF module of each shard
_UNFUSED = {"qkv_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj"}, "gate_up_proj": {0: "gate_proj", 1: "up_proj"}}
_ARCH_CLASS = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass
class SourceModel:
    """A loaded source: the flashserve model (eval, no grad), its config, config.json dict, tokenizer."""

    path: str
    model: Any  # LlamaForCausalLM
    config: ModelConfig
    config_json: dict[str, Any]
    tokenizer: Any | None


def hf_config_json(config: ModelConfig) -> dict[str, Any]:
    """A transformers-readable config.json dict for a ModelConfig (used for GGUF sources)."""
    out: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_act": config.hidden_act,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else (config.eos_token_ids or None),
        "torch_dtype": "float32",
    }
    if config.architecture == "qwen2":
        out["use_sliding_window"] = False
    if config.architecture == "gemma3":
        out.update(_gemma3_fields(config))
    return out


def _gemma3_fields(config: ModelConfig) -> dict[str, Any]:
    """What Gemma 3's config.json says beyond the Llama fields: transformers' text-only model
    type, the activation under Gemma's key, the query scale, and each layer's attention (local
    layers: the window and their own rope base)."""
    specs = [config.layer_spec(i).attention for i in range(config.num_layers)]
    local = [s for s in specs if s.kind == "sliding"]
    scale = config.attention_scale
    return {
        "model_type": "gemma3_text",
        "hidden_activation": config.hidden_act,
        "query_pre_attn_scalar": round(scale**-2) if scale is not None else config.head_dim,  # an int in transformers
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention" if s.kind == "sliding" else "full_attention" for s in specs],
        "rope_local_base_freq": (local[0].rope_theta or config.rope_theta) if local else config.rope_theta,
    }


def load_source(source: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SourceModel:
    """Load ``source`` (None: the embedded SmolLM2) for compression."""
    from flashserve.layers.attention import get_attention_backend
    from flashserve.loader import load_model, load_tokenizer, resolve_load_format
    from flashserve.loader.hf_config import read_config_json

    path, fmt = resolve_load_format(source)
    if fmt not in ("safetensors", "gguf"):
        raise ValueError(f"cannot compress {path}: expected a model directory or a .gguf file")
    model, config = load_model(path, fmt, dtype, torch.device(device), get_attention_backend("torch"))
    config_json = read_config_json(path) if fmt == "safetensors" else hf_config_json(config)
    return SourceModel(path, model, config, config_json, load_tokenizer(path, fmt))


def check_output(output: str | Path, *sources: str) -> None:
    """Refuse to write over a model the tool reads."""
    out = Path(output).expanduser().resolve()
    for src in sources:
        if out == Path(src).expanduser().resolve():
            raise ValueError(f"--output {output} is the source model itself; write to a new directory")


def refuse_low_rank(src: SourceModel, tool: str) -> None:
    """The pruning and low-rank tools work on dense linears; a factorised source is refused."""
    if compression_spec(src.config_json).get("low_rank"):
        raise ValueError(f"{src.path} is already factorised (low rank); run {tool} on the dense model it came from")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (fused projections split), contiguous CPU copies.

    Low-rank modules keep their own names (``<flashserve module>.weight_a`` / ``.weight_b``); a
    tied LM head is written once, as the embedding; norm weights are written as the checkpoint
    stores them (Gemma: ``w``, where the model holds ``1 + w``)."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    norm_offset = _NORM_OFFSET.get(model.config.architecture, 0.0)
    for name, param in model.named_parameters():  # tied parameters appear once
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        tensor = param.detach().to("cpu").contiguous()
        if norm_offset and isinstance(module, RMSNorm):
            tensor = tensor - norm_offset
        short = module_name.rpartition(".")[2]
        if isinstance(module, MergedLinear) and short in _UNFUSED and leaf in ("weight", "bias"):
            prefix = module_name.rpartition(".")[0]
            for sid, (offset, size) in module.shard_offsets.items():
                out[f"{prefix}.{_UNFUSED[short][sid]}.{leaf}"] = tensor.narrow(0, offset, size).clone()
        else:
            out[name] = tensor.clone()
    return out


def write_model_dir(
    output: str | Path,
    tensors: dict[str, torch.Tensor],
    config_json: dict[str, Any],
    tokenizer: Any | None,
    compression: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write safetensors + config.json (+ tokenizer files) to ``output``; returns its path.

    ``config_json`` is the source's dict with the new shapes already set; ``compression`` is
    stored under its ``compression`` key (the loader reads ``low_rank`` and ``semi_structured``).
    Refuses a non-empty folder that does not already hold a model."""
    from safetensors.torch import save_file

    out = Path(output)
    if out.is_file():
        raise ValueError(f"--output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"--output {out} is a non-empty folder that holds no model; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    cfg = dict(config_json)
    cfg.pop("compression", None)
    if compression:
        cfg["compression"] = compression
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def count_parameters(model: nn.Module, decoder_linears_only: bool = False) -> int:
    """Parameters of the model (tied ones once), or of its decoder layers' linear projections."""
    if not decoder_linears_only:
        return sum(p.numel() for p in model.parameters())
    return sum(p.numel() for name, p in model.named_parameters()
               if ".layers." in name and "_proj." in name and not name.endswith("bias"))
