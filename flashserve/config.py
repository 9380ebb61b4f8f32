"""Configuration dataclasses, validated once at engine start.

``ModelConfig`` describes the architecture (filled by a loader from config.json or GGUF
metadata); ``CacheConfig``, ``SchedulerConfig`` and ``EngineConfig`` describe how the engine runs.
This module imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures one decoder implementation covers, keyed by the Hugging Face class name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder. Shapes only; no weights, no device."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES's values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None  # Mistral v0.1: refused unless it covers the whole context
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {self.hidden_act!r}; only silu is implemented")


@dataclass
class CacheConfig:
    """Paged KV cache: block size and the memory budget for the pool.

    Give either ``kv_cache_bytes`` (absolute) or ``kv_cache_memory_fraction`` (a fraction of the
    device memory that is free after the weights are loaded). On CPU the fraction applies to the
    available system memory.
    """

    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float | None = None  # None: 0.9 on GPU, 0.2 of host memory on CPU
    # Reuse the KV of full blocks of earlier prompts with the same prefix (flashserve.cache.block_manager).
    enable_prefix_caching: bool = True
    swap_space_bytes: int = 0  # host memory for swap preemption (pinned on CUDA); 0: recompute only

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.kv_cache_memory_fraction is not None and not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")


@dataclass
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 8192  # tokens (prefill + decode) computed in one step
    max_model_len: int | None = None  # defaults to the model's context length
    enable_chunked_prefill: bool = True  # split long prompts to fit the per-step token budget
    policy: str = "fcfs"  # see flashserve.sched.policy.POLICIES
    preemption_mode: str = "auto"  # recompute | swap | auto (swap when cheaper; flashserve.sched.preemption)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ValueError(f"preemption_mode must be recompute, swap or auto, got {self.preemption_mode!r}")


@dataclass
class EngineConfig:
    """Everything the engine needs to start, as the user gave it."""

    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    attention_backend: str = "auto"  # auto | torch | triton
    cuda_graphs: bool = True
    # auto | none | gguf | gptq | awq | int8 | int4[-gN[-zp]] | fp8 | fp8-w8a8; checked when the model
    # loads (flashserve.quant.config): "auto" keeps a GGUF file packed unless a dtype is given
    quantization: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
