"""Configuration dataclasses, validated once at engine start.

``ModelConfig`` describes the architecture (filled by a loader from config.json or GGUF
metadata); ``CacheConfig``, ``SchedulerConfig`` and ``EngineConfig`` describe how the engine runs.
This module imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Architectures one decoder implementation covers, keyed by the Hugging Face class name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends. ``kind`` names a variant the attention backends implement
    ("full": causal attention over the whole context); the other fields parameterise variants."""

    kind: str = "full"
    sliding_window: int | None = None  # tokens a query sees (itself included), for windowed kinds
    rope_theta: float | None = None  # this layer's rope base (None: the model's)


@dataclass(frozen=True)
class LayerSpec:
    """The parts of one decoder layer, by name: its attention and its MLP
    (a key of ``flashserve.models.blocks.MLP_TYPES``)."""

    attention: AttentionSpec = AttentionSpec()
    mlp: str = "gated_silu"


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
    layer_types: tuple[LayerSpec, ...] | None = None  # per layer; None: every layer is LayerSpec()
    # Mixture of experts (layers whose LayerSpec.mlp is "moe"; flashserve.layers.moe).
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # per expert
    moe_scoring: str = "softmax"  # router gating: softmax | sigmoid
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert with a sigmoid gate

    def layer_spec(self, index: int) -> LayerSpec:
        return self.layer_types[index] if self.layer_types is not None else LayerSpec()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {self.hidden_act!r}; only silu is implemented")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_layers}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok (top-k) must be between 1 and num_experts ({self.num_experts}), "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
            if self.moe_scoring not in ("softmax", "sigmoid"):
                raise ValueError(f"moe_scoring must be softmax or sigmoid, got {self.moe_scoring!r}")


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
    # auto: the model's dtype; int8 / fp8 (e4m3): 8-bit K/V with a scale per token and head
    # (flashserve.kernels.kv_quant), about twice the tokens for the same bytes.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.kv_cache_memory_fraction is not None and not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
        if self.kv_cache_dtype not in ("auto", "int8", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or fp8, got {self.kv_cache_dtype!r}")


@dataclass
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 256  # requests running at once
    # Tokens (prefill + decode) computed in one step; None: default_max_num_batched_tokens(device).
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # defaults to the model's context length
    enable_chunked_prefill: bool = True  # split long prompts to fit the per-step token budget
    policy: str = "fcfs"  # see flashserve.sched.policy.POLICIES
    preemption_mode: str = "auto"  # recompute | swap | auto (swap when cheaper; flashserve.sched.preemption)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ValueError(f"preemption_mode must be recompute, swap or auto, got {self.preemption_mode!r}")


def default_max_num_batched_tokens(device_type: str) -> int:
    """The step budget when the user gives none. A GPU computes 8192 prompt tokens in well under
    a second; a CPU takes minutes, and every running stream waits for the whole step, so CPU steps
    stay small: chunked prefill spreads a long prompt over many steps, each costing about what a
    decode step does (docs/server.md: an 8k prompt next to 8 streams, p99 ITL x1.6 at 64 tokens
    per step, x27 at 512)."""
    return 8192 if device_type == "cuda" else 64


# Weight quantization modes (flashserve.quant.config says what each does): "auto" takes the
# checkpoint's own (GGUF tensors packed unless a dtype is given, GPTQ, AWQ), "none" is dense.
QUANTIZATION_MODES = (
    "auto", "none", "gguf", "gptq", "awq", "int8", "int4",
    "int4-g32", "int4-g64", "int4-g128", "int4-g32-zp", "int4-g64-zp", "int4-g128-zp", "fp8", "fp8-w8a8",
)


@dataclass
class EngineConfig:
    """Everything the engine needs to start, as the user gave it (built by ``EngineArgs``)."""

    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    tokenizer: str | None = None  # HF tokenizer folder or .gguf; None: the model's own
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    attention_backend: str = "auto"  # auto | torch | triton
    cuda_graphs: bool = True
    max_mixed_graph_tokens: int = 512  # largest mixed (prefill + decode) step replayed as a CUDA graph
    async_scheduling: bool = True  # plan step N+1 while step N runs
    executor: str = "inproc"  # inproc | process (the Worker in its own process, over torch.distributed)
    quantization: str = "auto"  # one of QUANTIZATION_MODES (flashserve.quant)
    tensor_parallel_size: int = 1  # ranks one model is split over (flashserve.distributed)
    pipeline_parallel_size: int = 1  # stages of consecutive layers, each of tensor_parallel_size ranks
    distributed_timeout_s: float = 300.0  # a rank silent this long is reported as hung
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.executor not in ("inproc", "process"):
            raise ValueError(f"executor must be inproc or process, got {self.executor!r}")
        if self.max_mixed_graph_tokens < 0:
            raise ValueError(f"max_mixed_graph_tokens must be >= 0, got {self.max_mixed_graph_tokens}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {self.quantization!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")

    @property
    def world_size(self) -> int:
        """Ranks in all: tensor-parallel ranks times pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def _arg(default: Any, help: str, **cli: Any) -> Any:
    """A field of EngineArgs: its default, its help text, and argparse extras (choices, flag)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class EngineArgs:
    """Every engine option, in one place: the ``LLM(...)`` keywords and the CLI flags
    (``--max-num-seqs`` for ``max_num_seqs``) are generated from these fields, and
    ``engine_config()`` validates them into the nested configs."""

    model: str | None = _arg(None, "HF model directory, .gguf file, or a bundled config name with "
                                   "--load-format dummy (default: the embedded SmolLM2-135M-Instruct)")
    tokenizer: str | None = _arg(None, "tokenizer to use instead of the model's own: an HF tokenizer folder or a "
                                       ".gguf (e.g. with dummy weights)")
    load_format: str = _arg("auto", "weights format", choices=("auto", "safetensors", "gguf", "dummy"))
    dtype: str = _arg("auto", "activation and weight dtype (auto: bfloat16 on CUDA, float32 on CPU)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N")
    seed: int = _arg(0, "seed of weights for dummy models and of unseeded sampling")
    block_size: int = _arg(16, "tokens per KV-cache block")
    kv_cache_bytes: int | None = _arg(None, "absolute KV pool size in bytes")
    kv_cache_memory_fraction: float | None = _arg(None, "fraction of free device memory for the KV pool "
                                                        "(default 0.9 on GPU, 0.2 of host memory on CPU)")
    enable_prefix_caching: bool = _arg(True, "reuse the KV of cached prompt prefixes", flag="--no-prefix-caching")
    swap_space_bytes: int = _arg(0, "host memory for swapped-out KV blocks")
    kv_cache_dtype: str = _arg("auto", "KV cache element type: the model's dtype, or 8 bits with an fp16 scale "
                                       "per token and head (about twice the tokens)", choices=("auto", "int8", "fp8"))
    max_num_seqs: int = _arg(256, "requests running at once")
    max_num_batched_tokens: int | None = _arg(None, "tokens computed in one step, prefill + decode (default: 8192 on "
                                                    "GPU, 64 on CPU, where a bigger step stalls every stream)")
    max_model_len: int | None = _arg(None, "context length (default: the model's)")
    enable_chunked_prefill: bool = _arg(True, "split long prompts over steps", flag="--no-chunked-prefill")
    policy: str = _arg("fcfs", "scheduling policy", choices=("fcfs", "priority", "sjf", "mlfq"))
    preemption_mode: str = _arg("auto", "how to free KV for a preempted request",
                                choices=("auto", "recompute", "swap"))
    attention_backend: str = _arg("auto", "attention kernels (auto: triton on CUDA, torch on CPU)",
                                  choices=("auto", "torch", "triton"))
    cuda_graphs: bool = _arg(True, "replay decode and small mixed steps as CUDA graphs", flag="--no-cuda-graphs")
    max_mixed_graph_tokens: int = _arg(512, "largest mixed (prefill + decode) step replayed as a CUDA graph")
    async_scheduling: bool = _arg(True, "plan step N+1 while step N runs on the device",
                                  flag="--no-async-scheduling")
    executor: str = _arg("inproc", "run the Worker in this process or in its own process",
                         choices=("inproc", "process"))
    quantization: str = _arg("auto", "weights: auto (the checkpoint's own: GGUF blocks kept packed unless --dtype "
                                     "is given, GPTQ, AWQ), none (dense), or online int8 / int4 / fp8 "
                                     "(docs/quantization.md)", choices=QUANTIZATION_MODES)
    tensor_parallel_size: int = _arg(1, "split the model over this many ranks (one GPU, or CPU process, each; "
                                        "docs/distributed.md)")
    pipeline_parallel_size: int = _arg(1, "split the layers into this many pipeline stages (each of "
                                          "--tensor-parallel-size ranks)")
    distributed_timeout_s: float = _arg(300.0, "seconds a silent rank may take before the engine reports it hung "
                                               "and shuts down")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            load_format=self.load_format,
            dtype=self.dtype,
            device=self.device,
            seed=self.seed,
            attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs,
            max_mixed_graph_tokens=self.max_mixed_graph_tokens,
            async_scheduling=self.async_scheduling,
            executor=self.executor,
            quantization=self.quantization,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_timeout_s=self.distributed_timeout_s,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_bytes=self.kv_cache_bytes,
                kv_cache_memory_fraction=self.kv_cache_memory_fraction,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space_bytes=self.swap_space_bytes,
                kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                policy=self.policy,
                preemption_mode=self.preemption_mode,
            ),
        )

    @classmethod
    def add_cli_args(cls, parser: Any) -> None:
        """Add one flag per field to an argparse parser."""
        for f in fields(cls):
            meta = dict(f.metadata)
            flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
            if f.type in ("bool", bool):
                action = "store_false" if f.default else "store_true"
                parser.add_argument(flag, dest=f.name, action=action, help=meta["help"])
                continue
            kind = {"int": int, "int | None": int, "float | None": float, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, **meta)

    @classmethod
    def from_cli(cls, namespace: Any) -> EngineArgs:
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Like the constructor, but an unknown keyword names the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}")
        return cls(**kwargs)
