"""Model architectures register themselves here by ``ModelConfig.architecture`` name.

    @register_model("llama", "mistral")
    class LlamaForCausalLM(nn.Module): ...

``model_class(name)`` imports the model modules (so their registrations run) and returns the
class; an unknown name is a clear error listing what is supported. A model class provides
``__init__(config, attn_backend)``, ``forward(input_ids, positions, kv_caches)``,
``compute_logits(hidden)`` and ``load_weights(named_tensors)``, and may define a classmethod
``check_supported(config, attn_backend)`` that refuses configurations it would compute wrongly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_MODELS: dict[str, type] = {}
_MODULES = ("flashserve.models.llama", "flashserve.models.moe", "flashserve.models.gemma3")  # modules whose import registers architectures


def register_model(*architectures: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        for name in architectures:
            if name in _MODELS and _MODELS[name] is not cls:
                raise ValueError(f"architecture {name!r} is registered twice ({_MODELS[name].__name__}, {cls.__name__})")
            _MODELS[name] = cls
        return cls

    return add


def model_class(architecture: str) -> type:
    for module in _MODULES:
        importlib.import_module(module)
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(f"no model implements architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(_MODELS))}") from None
