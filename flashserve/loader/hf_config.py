"""Hugging Face ``config.json`` -> ModelConfig.

Handles both rope formats: transformers < 5 (top-level ``rope_theta`` + ``rope_scaling``) and
transformers >= 5 (``rope_parameters`` holding ``rope_type``, ``rope_theta`` and the scaling keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flashserve.config import SUPPORTED_ARCHITECTURES, AttentionSpec, LayerSpec, ModelConfig
from flashserve.layers.rotary import SUPPORTED_ROPE_TYPES, rope_type_of


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config.json not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"corrupt config file {path}: expected a JSON object")
    return data


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised rope_scaling or None for plain rope)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    merged.pop("rope_theta", None)
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    rope_type = rope_type_of(merged)
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return float(theta), merged


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _gemma3_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(global rope base, global scaling or None, local rope base) of a Gemma 3 config: either
    per layer type in ``rope_parameters`` (transformers >= 5) or ``rope_theta`` /
    ``rope_scaling`` / ``rope_local_base_freq``."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = _rope({"rope_parameters": params["full_attention"]})
        local = float((params.get("sliding_attention") or {}).get("rope_theta", 10000.0))
        return theta, scaling, local
    theta, scaling = _rope({k: v for k, v in cfg.items() if k in ("rope_theta", "rope_scaling")})
    return theta, scaling, float(cfg.get("rope_local_base_freq", 10000.0))


def _layer_types(cfg: dict[str, Any], arch: str, num_layers: int, window: int | None,
                 local_theta: float | None = None) -> tuple[LayerSpec, ...] | None:
    """Per-layer specs from ``layer_types`` ("sliding_attention" / "full_attention") or the
    architecture's rule: Gemma 3 layer i is local when i % 6 < 5; Mistral's window covers every
    layer; Qwen2/3 (``use_sliding_window``) window the layers from ``max_window_layers`` on."""
    mlp = "gated_gelu_tanh" if arch == "gemma3" else "gated_silu"
    names = cfg.get("layer_types")
    if names is None:
        if arch == "gemma3":
            pattern = int(cfg.get("sliding_window_pattern", 6))
            names = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        elif window is not None and arch == "mistral":
            names = ["sliding_attention"] * num_layers
        elif window is not None:
            first = int(cfg.get("max_window_layers", 0))
            names = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            return None
    if len(names) != num_layers:
        raise ValueError(f"layer_types lists {len(names)} layers, the model has {num_layers}")
    specs = []
    for name in names:
        if name == "sliding_attention" and window is not None:
            specs.append(LayerSpec(AttentionSpec("sliding", window, rope_theta=local_theta), mlp))
        elif name in ("full_attention", "sliding_attention"):
            specs.append(LayerSpec(AttentionSpec(), mlp))
        else:
            raise ValueError(f"unsupported layer type {name!r}; supported: sliding_attention, full_attention")
    return None if all(spec == LayerSpec() for spec in specs) else tuple(specs)


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json dict (ValueError on anything unsupported)."""
    archs = cfg.get("architectures") or []
    arch_name = archs[0] if archs else None
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch_name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = SUPPORTED_ARCHITECTURES[arch_name]
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        local_theta = None
        if arch == "gemma3":
            rope_theta, rope_scaling, local_theta = _gemma3_rope(cfg)
        else:
            rope_theta, rope_scaling = _rope(cfg)
        if arch in ("qwen2", "qwen2_moe"):
            attention_bias = True
        else:
            attention_bias = bool(cfg.get("attention_bias", False))
        sliding_window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if arch == "llama":
            sliding_window = None
        num_layers = int(cfg["num_hidden_layers"])
        if sliding_window is not None and arch != "gemma3" \
                and int(sliding_window) >= int(cfg.get("max_position_embeddings", 2048)):
            sliding_window = None  # a window as long as the context is full attention
        window = int(sliding_window) if sliding_window is not None else None
        hidden_act = str(cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"))
        scalar = cfg.get("query_pre_attn_scalar") if arch == "gemma3" else None
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=attention_bias,
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
            hidden_act=hidden_act,
            attention_scale=float(scalar) ** -0.5 if scalar else None,
            **_layer_fields(cfg, arch, num_layers, window, local_theta),
        )
    except KeyError as e:
        raise ValueError(f"config.json of {arch_name} lacks the required key {e.args[0]!r}") from e


def _layer_fields(cfg: dict[str, Any], arch: str, num_layers: int, window: int | None,
                  local_theta: float | None) -> dict[str, Any]:
    """``layer_types`` (each layer's attention from ``_layer_types``, its MLP kind from the
    experts' layout) and the expert fields."""
    attention = _layer_types(cfg, arch, num_layers, window, local_theta)
    moe = _moe_fields(arch, cfg)
    mlps = moe.pop("layer_types", None)
    if mlps is None:
        return {**moe, "layer_types": attention}
    specs = tuple(LayerSpec(attention[i].attention if attention else AttentionSpec(), mlps[i].mlp)
                  for i in range(num_layers))
    return {**moe, "layer_types": specs}


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a mixture-of-experts architecture (none for a dense one): the expert
    counts and sizes, the routing, and which layers are sparse (Qwen's ``mlp_only_layers`` and
    ``decoder_sparse_step``; every layer in Mixtral)."""
    if arch not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    num_layers = int(cfg["num_hidden_layers"])
    # the expert count is "num_experts" in Qwen checkpoints, "num_local_experts" in Mixtral's and
    # in what transformers >= 5 writes for Qwen3-MoE
    num_experts = int(cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"])
    if arch == "mixtral":
        inter, sparse = int(cfg["intermediate_size"]), range(num_layers)
    else:
        inter = int(cfg["moe_intermediate_size"])
        step, dense = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
        sparse = [i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0]
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=inter,
        norm_topk_prob=True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if arch == "qwen2_moe" else 0,
        layer_types=tuple(LayerSpec(mlp="moe" if i in sparse else "gated_silu") for i in range(num_layers)),
    )


def load_hf_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a HF model directory (or a config.json path)."""
    return model_config_from_hf(read_config_json(path))
