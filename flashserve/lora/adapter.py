"""LoRA adapters read from PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``
or ``adapter_model.bin``).

``load_adapter(name, path)`` returns a ``LoRAAdapter``: per adapted linear module (named as in the
base checkpoint) the pair (A [r, in] fp32, B [out, r] fp32) with the module's scaling folded into
B, so the adapted layer computes ``x @ W.T + (x @ A.T) @ B.T``. Plain LoRA only: what would change
the model in any other way (DoRA, biases, extra trained modules, embeddings, ...) is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

SUPPORTED = "plain LoRA (peft_type LORA, optional rslora / rank_pattern / alpha_pattern) on linear layers"

# config fields that, when set, make the adapter something other than plain LoRA on linear layers
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "fan_in_fan_out": "transposed (Conv1D-style) weights (fan_in_fan_out)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
_EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})
# [base_model.model.]<module>.lora_A|lora_B[.<adapter name>].weight
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight")


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded LoRA adapter: for each adapted module, A [r, in] and B [out, r] (scaling in B)."""

    name: str
    path: str
    # checkpoint module name (e.g. "model.layers.0.self_attn.q_proj") -> (A fp32, B * scaling fp32)
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    def __reduce__(self):
        """Pickled with its weights as a plain dict (a read-only view again once unpickled), so it
        travels to Worker processes and parallel ranks."""
        return _unpickle, (self.name, self.path, dict(self.weights))

    @property
    def rank(self) -> int:
        """The largest rank over its modules."""
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def target_modules(self) -> frozenset[str]:
        """Leaf names of the modules it adapts, e.g. {"q_proj", "v_proj"}."""
        return frozenset(m.rsplit(".", 1)[-1] for m in self.weights)


def _unpickle(name: str, path: str, weights: dict) -> LoRAAdapter:
    return LoRAAdapter(name, path, MappingProxyType(weights))


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"LoRA adapter name {name!r} is invalid: it must be non-empty and contain no whitespace")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that the module name equals or ends with
    (after a '.'); patterns are regular expressions, as in PEFT."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _read_state_dict(name: str, folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"), device="cpu")
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"LoRA adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {folder}")


def _check_config(name: str, config: Mapping[str, Any]) -> None:
    def refuse(problem: str) -> ValueError:
        return ValueError(f"LoRA adapter {name!r}: {problem} is not supported (supported: {SUPPORTED})")

    if config.get("peft_type") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r}")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias={config['bias']!r} (trained biases; only bias='none')")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise refuse(what)
    targets = config.get("target_modules")
    if isinstance(targets, list) and _EMBEDDING_MODULES & set(targets):
        raise refuse(f"LoRA on the embeddings or the LM head (target_modules {sorted(targets)})")


def load_adapter(name: str, path: str | os.PathLike) -> LoRAAdapter:
    """Read the PEFT LoRA adapter in directory ``path`` as ``name``; see the module docstring."""
    _check_name(name)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter {name!r}: directory {folder} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"LoRA adapter {name!r}: no adapter_config.json in {folder}")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA adapter {name!r}: {folder / 'adapter_config.json'} is not valid JSON: {e}") from e
    _check_config(name, config)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_state_dict(name, folder).items():
        match = _KEY.fullmatch(key)
        if "lora_embedding_" in key or (match and match["module"].rsplit(".", 1)[-1] in _EMBEDDING_MODULES):
            raise ValueError(f"LoRA adapter {name!r}: weight {key!r} adapts the embeddings or the LM head, "
                             f"which is not supported (supported: {SUPPORTED})")
        if match is None:
            raise ValueError(f"LoRA adapter {name!r}: unexpected weight {key!r} (supported: {SUPPORTED})")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r}: {folder} holds no LoRA weights (lora_A / lora_B)")

    use_rslora = bool(config.get("use_rslora", False))
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise ValueError(f"LoRA adapter {name!r}: module {module!r} has no {missing} weight")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}; expected A [r, in_features] and B [out_features, r]")
        r = a.shape[0]
        config_r = _pattern_value(config.get("rank_pattern") or {}, module, default_r)
        if r != config_r:
            raise ValueError(f"LoRA adapter {name!r}: module {module!r} has rank {r} in its weights "
                             f"but r={config_r} in adapter_config.json (r / rank_pattern)")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, default_alpha)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weights[module] = (a.to(torch.float32).contiguous(), (b.to(torch.float32) * scaling).contiguous())

    return LoRAAdapter(name=name, path=str(folder), weights=MappingProxyType(weights))

