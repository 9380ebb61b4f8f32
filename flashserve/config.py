"""Configuration dataclasses, validated once at engine start.

``ModelConfig`` describes the architecture (filled by a loader from config.json or GGUF
metadata); ``CacheConfig``, ``SchedulerConfig`` and ``EngineConfig`` describe how the engine runs.
This module imports only the standard library.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
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
    "Gemma3ForCausalLM": "gemma3",
}


# Attention kinds (``AttentionSpec.kind``); ``flashserve.layers.sparse_attention`` defines each.
ATTENTION_KINDS = ("full", "sliding", "h2o", "quest", "lsh")


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends. ``kind`` names a variant the attention backends implement:

    * ``full``: causal attention over the whole context;
    * ``sliding``: the last ``sliding_window`` tokens (itself included), every ``dilation``-th
      one (the window then spans ``(sliding_window - 1) * dilation + 1`` positions), plus the
      first ``num_sinks`` tokens (StreamingLLM's attention sinks / global tokens);
    * ``h2o``: heavy hitters: keeps ``kv_budget`` of the context per KV head, the recent half
      and the tokens with the most accumulated attention, plus the sinks; evicted ones are gone;
    * ``quest``: per step and KV head, reads the ``kv_budget`` share of the context's pages
      with the highest upper bound of q.k (per-page key minima and maxima), plus the sinks;
    * ``lsh``: tokens whose key hashes (random rotations) into the query's bucket among
      ``num_buckets``, plus the sinks and the last ``sliding_window`` tokens.
    """

    kind: str = "full"
    sliding_window: int | None = None  # tokens a query sees (itself included), for windowed kinds
    rope_theta: float | None = None  # this layer's rope base (None: the model's)
    dilation: int = 1
    num_sinks: int = 0
    kv_budget: float | None = None
    num_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.kind!r}; known: {', '.join(ATTENTION_KINDS)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"the attention window must be >= 1 token, got {self.sliding_window}")
        if self.kind == "sliding" and self.sliding_window is None:
            raise ValueError("sliding attention needs a window (sliding_window >= 1)")
        if self.dilation < 1:
            raise ValueError(f"the window dilation must be >= 1, got {self.dilation}")
        if self.num_sinks < 0:
            raise ValueError(f"the number of sink tokens must be >= 0, got {self.num_sinks}")
        if self.kind in ("h2o", "quest"):
            if self.kv_budget is None or not 0.0 < self.kv_budget <= 1.0:
                raise ValueError(f"{self.kind} attention needs a KV budget in (0, 1], got {self.kv_budget}")
        elif self.kv_budget is not None:
            raise ValueError(f"kv_budget applies to h2o and quest attention, not {self.kind!r}")
        if self.kind == "lsh" and (self.num_buckets is None or not 2 <= self.num_buckets <= 64
                                   or self.num_buckets % 2):
            raise ValueError(f"lsh attention needs an even number of buckets in [2, 64], got {self.num_buckets}")

    @property
    def span(self) -> int | None:
        """Positions from the oldest windowed key a query sees to the query itself, inclusive."""
        if self.sliding_window is None:
            return None
        return (self.sliding_window - 1) * self.dilation + 1


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
    sliding_window: int | None = None  # the window of the model's sliding layers (Mistral, Gemma 3)
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
    attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)

    def layer_spec(self, index: int) -> LayerSpec:
        return self.layer_types[index] if self.layer_types is not None else LayerSpec()

    def with_attention(self, attention: AttentionSpec | None) -> ModelConfig:
        """This config with ``attention`` in every layer the model itself gives full attention
        (its own windowed layers keep their window; each layer keeps its rope base)."""
        if attention is None:
            return self
        specs = []
        for i in range(self.num_layers):
            spec = self.layer_spec(i)
            if spec.attention.kind == "full":
                spec = replace(spec, attention=replace(attention, rope_theta=spec.attention.rope_theta))
            specs.append(spec)
        return replace(self, layer_types=tuple(specs))

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "swish", "gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported activation {self.hidden_act!r}; silu and tanh-approximated gelu "
                             f"are implemented")
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
    # GiB of host memory (pinned on CUDA) that keeps prefix-cache blocks evicted from the device pool;
    # a later prefix hit copies them back instead of recomputing (flashserve.cache.host_tier). 0: off.
    kv_host_cache_gb: float = 0.0

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
        if self.kv_host_cache_gb < 0:
            raise ValueError(f"kv_host_cache_gb must be >= 0 GiB, got {self.kv_host_cache_gb}")
        if self.kv_host_cache_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_host_cache_gb keeps evicted prefix-cache blocks, so it needs prefix caching; "
                             "drop --no-prefix-caching or set kv_host_cache_gb=0")


MAX_SCHEDULER_STEPS = 16  # model steps per plan (never more than block_size: one new block per request)


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
    # Model steps one plan runs while every running request decodes, none needs the host between
    # its tokens (a grammar, say) and nothing waits for a free seat (multi-step decoding: the
    # host's turn is paid once per that many tokens).
    num_scheduler_steps: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ValueError(f"num_scheduler_steps must be in [1, {MAX_SCHEDULER_STEPS}], got {self.num_scheduler_steps}")
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
    decode step does (docs/server.md: an 8k prompt next to 8 streams on engine core v2, p99 ITL
    x1.47 at 32 tokens per step, x3.0 at 64, x27 at 512 before v2)."""
    return 8192 if device_type == "cuda" else 32


# Weight quantization modes (flashserve.quant.config says what each does): "auto" takes the
# checkpoint's own (GGUF tensors packed unless a dtype is given, GPTQ, AWQ), "none" is dense.
QUANTIZATION_MODES = (
    "auto", "none", "gguf", "gptq", "awq", "int8", "int4",
    "int4-g32", "int4-g64", "int4-g128", "int4-g32-zp", "int4-g64-zp", "int4-g128-zp", "fp8", "fp8-w8a8",
)
SPECULATIVE_METHODS = ("ngram", "draft", "layers", "heads")
MAX_SPECULATIVE_TOKENS = 16  # a chain of drafts per step
MAX_TREE_TOKENS = 63  # draft nodes of a token tree (the root makes 64: one bit each in an int64 mask)


def _config_from(cls: type, value: Any, what: str) -> Any:
    """A config dataclass from a dict or its JSON text; unknown keys name the valid ones."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} must be a JSON object, got {value!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict or a JSON object, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in value]
    if missing:
        raise ValueError(f"{what} needs the key(s) {', '.join(missing)}")
    return cls(**value)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (``flashserve.spec``): a proposer drafts tokens, one target pass verifies.

    method: "ngram" (prompt lookup), "draft" (another model with the same vocabulary, ``model``),
    "layers" (the target's first ``num_layers`` layers and its LM head) or "heads" (Medusa-style
    heads from ``flashserve train-heads``, ``heads``). ``num_speculative_tokens`` (k): drafts per
    step, or with ``tree_width`` > 1 the draft nodes of a token tree (SpecInfer). ``disable_by_cost``:
    switch a request back to plain decoding while its measured acceptance makes it slower.
    ``adapt_length`` (opt-in, with the off-switch on): give each request of a chain method the
    number of drafts (1..k) that its measured acceptance and the measured step periods say pays
    most (pays on the CPU; lost on the H200, whose step cost is flat in the rows: docs/decoding.md).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft: a model folder or .gguf with the target's vocabulary
    load_format: str = "auto"  # of the draft model
    num_layers: int | None = None  # layers: how many of the target's first layers draft (default: a quarter)
    heads: str | None = None  # heads: safetensors from `flashserve train-heads` (default: beside the model)
    prompt_lookup_max: int = 4  # ngram: longest suffix matched in the context
    prompt_lookup_min: int = 1  # ngram: shortest
    tree_width: int = 1  # > 1: branches per draft position merged into a token tree
    disable_by_cost: bool = True  # the automatic off-switch
    adapt_length: bool = False  # drafts per request chosen by measured acceptance and step periods (chains)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        limit = MAX_TREE_TOKENS if self.tree_width > 1 else MAX_SPECULATIVE_TOKENS
        if not isinstance(k, int) or not 1 <= k <= limit:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {limit}]"
                             f"{' for a token tree' if self.tree_width > 1 else ''}, got {k!r}")
        if not isinstance(self.tree_width, int) or not 1 <= self.tree_width <= 8:
            raise ValueError(f"tree_width must be an integer in [1, 8], got {self.tree_width!r}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs 'model': a draft model folder or .gguf "
                             "with the target's vocabulary")
        if self.method != "draft" and self.model is not None:
            raise ValueError(f"'model' is the draft model of method 'draft', not of {self.method!r}")
        if self.num_layers is not None and (self.method != "layers" or self.num_layers < 1):
            raise ValueError(f"num_layers (>= 1) applies to method 'layers' only, got {self.num_layers!r} "
                             f"with method {self.method!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        return None if value is None else _config_from(cls, value, "speculative_config")


EARLY_EXIT_MEASURES = ("softmax", "hidden")


@dataclass(frozen=True)
class EarlyExitConfig:
    """Confidence-based early exit (``flashserve.spec.early_exit``), a lossy decoding mode.

    A decode token leaves the network at the first layer of ``exit_layers`` (default: every
    second layer from the middle on) where it is confident: ``measure`` "softmax" = the max
    probability of the LM head on that layer's state >= ``threshold``; "hidden" = the cosine
    similarity of the layer's state with the previous layer's >= ``threshold`` (cheap: no LM head
    per check). The later layers' K/V of an exited token are computed from its exit state.
    """

    threshold: float = 0.9
    measure: str = "softmax"
    exit_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"early exit threshold must be in (0, 1], got {self.threshold}")
        if self.measure not in EARLY_EXIT_MEASURES:
            raise ValueError(f"early exit measure must be one of {', '.join(EARLY_EXIT_MEASURES)}, got {self.measure!r}")
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(sorted(set(self.exit_layers))))
            if not self.exit_layers or any(not isinstance(i, int) or i < 1 for i in self.exit_layers):
                raise ValueError(f"exit_layers must be layer counts >= 1, got {self.exit_layers!r}")

    @classmethod
    def parse(cls, value: Any) -> EarlyExitConfig | None:
        return None if value is None else _config_from(cls, value, "early_exit_config")


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
    attention: AttentionSpec | None = None  # replaces the model's full attention layers (None: the model's own)
    speculative: SpeculativeConfig | None = None  # speculative decoding (flashserve.spec)
    early_exit: EarlyExitConfig | None = None  # confidence-based early exit (flashserve.spec.early_exit)
    tensor_parallel_size: int = 1  # ranks one model is split over (flashserve.distributed)
    pipeline_parallel_size: int = 1  # stages of consecutive layers, each of tensor_parallel_size ranks
    distributed_timeout_s: float = 300.0  # a rank silent this long is reported as hung
    # GiB of decoder-layer weights kept in host memory (pinned on CUDA) and streamed to the device
    # layer by layer before use (flashserve.runner.offload). 0: every weight on the device.
    cpu_offload_gb: float = 0.0
    disaggregated: bool = False  # prefill and decode Workers in two processes, KV sent between them
    batch_invariant: bool = False  # GPU: a token's logits independent of its step's other rows
    # LoRA adapters served beside the base model, (name, PEFT folder) each (flashserve.lora)
    lora_modules: tuple[tuple[str, str], ...] = ()
    # adapter slots (None: one per lora_modules entry); given, every attention and MLP projection is
    # adapted and adapters can be loaded while serving (LLMEngine.add_lora)
    max_loras: int | None = None
    max_lora_rank: int | None = None  # the slots' rank (None: the largest of lora_modules')
    # adapters served at most (None: max_loras); more than the slots: host copies move into slots
    # as requests need them (flashserve.lora.registry)
    max_cpu_loras: int | None = None
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
        if self.speculative is not None and self.early_exit is not None:
            raise ValueError("speculative decoding and early exit are separate modes; choose one")
        if self.speculative is not None and self.attention is not None and self.attention.kind == "h2o":
            raise ValueError("h2o attention evicts and compacts the KV after every step, which rejected "
                             "speculative drafts would corrupt; use speculative decoding or h2o, not both")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0 GiB, got {self.cpu_offload_gb}")
        if self.batch_invariant:
            self._check_batch_invariant()
        if self.lora_modules or self.max_loras is not None or self.max_cpu_loras is not None:
            self._check_lora()
        if self.scheduler.num_scheduler_steps > 1:
            self._check_multi_step()

    def _check_lora(self) -> None:
        """What serving LoRA adapters does not combine with, refused before loading."""
        if self.batch_invariant:
            raise ValueError("LoRA adapters (lora_modules, max_loras) do not combine with batch_invariant=True")
        if self.max_loras is not None and self.max_loras < max(1, len(self.lora_modules)):
            raise ValueError(f"max_loras={self.max_loras} must be at least 1 and hold the {len(self.lora_modules)} "
                             "adapters of lora_modules")
        if self.max_cpu_loras is not None and not (self.max_loras or self.lora_modules):
            raise ValueError("max_cpu_loras needs max_loras (the adapter slots)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < (self.max_loras or len(self.lora_modules)):
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be at least max_loras (the adapter slots, "
                             f"{self.max_loras or len(self.lora_modules)})")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if not self.lora_modules and self.max_lora_rank is None:
            raise ValueError("max_loras without lora_modules needs max_lora_rank (the largest rank to load)")

    def _check_multi_step(self) -> None:
        """What multi-step decoding (``num_scheduler_steps`` > 1) does not combine with, refused before loading."""
        others = [name for name, on in (("speculative decoding", self.speculative is not None),
                                        ("early exit", self.early_exit is not None),
                                        ("an attention option other than a sliding window",
                                         self.attention is not None and self.attention.kind != "sliding"),
                                        ("pipeline parallelism", self.pipeline_parallel_size > 1),
                                        ("disaggregated prefill", self.disaggregated)) if on]
        if others:
            raise ValueError(f"num_scheduler_steps > 1 does not combine with {' or '.join(others)}")
        if self.scheduler.num_scheduler_steps > self.cache.block_size:
            raise ValueError(f"num_scheduler_steps ({self.scheduler.num_scheduler_steps}) must not exceed "
                             f"block_size ({self.cache.block_size}): a plan adds at most one block per request")

    def _check_batch_invariant(self) -> None:
        """What ``flashserve.layers.batch_invariant`` does not cover, refused before loading."""
        if self.speculative is not None and self.speculative.tree_width > 1:
            raise ValueError("batch_invariant=True covers speculative chains, not token trees (tree_width "
                             f"{self.speculative.tree_width}): a tree verifies through the tree kernel")
        if self.attention is not None and self.attention.kind not in ("full", "sliding"):
            raise ValueError(f"batch_invariant=True covers full and sliding attention, not {self.attention.kind!r}")
        if self.quantization == "fp8-w8a8":
            raise ValueError("batch_invariant=True does not cover fp8-w8a8 (torch._scaled_mm picks its kernel by "
                             "row count); use fp8 (weight-only)")

    @property
    def world_size(self) -> int:
        """Ranks in all: tensor-parallel ranks times pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def parse_lora_modules(spec: list[str] | dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    """``lora_modules`` as (name, path) pairs: from ``["name=path", ...]`` (the CLI's form) or a
    mapping; ValueError naming a malformed entry or a repeated name."""
    if not spec:
        return ()
    if isinstance(spec, str):
        spec = [spec]
    pairs = list(spec.items()) if isinstance(spec, dict) else [
        tuple(s.split("=", 1)) if isinstance(s, str) and "=" in s else (s, None) for s in spec]
    for name, path in pairs:
        if not isinstance(name, str) or not name or name != name.strip() or any(c.isspace() for c in name) \
                or not isinstance(path, str) or not path:
            raise ValueError(f"lora_modules entry {name!r}: give NAME=PATH (a name without spaces and the "
                             "adapter's PEFT folder)")
    names = [n for n, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"lora_modules names the adapter {repeated[0]!r} twice; names must be unique")
    return tuple(pairs)


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
    kv_host_cache_gb: float = _arg(0.0, "GiB of host memory that keeps prefix-cache KV blocks evicted from the "
                                        "device; a later hit copies them back instead of recomputing")
    max_num_seqs: int = _arg(256, "requests running at once")
    max_num_batched_tokens: int | None = _arg(None, "tokens computed in one step, prefill + decode (default: 8192 on "
                                                    "GPU, 64 on CPU, where a bigger step stalls every stream)")
    max_model_len: int | None = _arg(None, "context length (default: the model's)")
    enable_chunked_prefill: bool = _arg(True, "split long prompts over steps", flag="--no-chunked-prefill")
    policy: str = _arg("fcfs", "scheduling policy", choices=("fcfs", "priority", "sjf", "mlfq"))
    preemption_mode: str = _arg("auto", "how to free KV for a preempted request",
                                choices=("auto", "recompute", "swap"))
    num_scheduler_steps: int = _arg(1, "model steps one plan runs while every running request decodes without "
                                       "a grammar and nothing waits for a free seat (multi-step "
                                       "decoding: the host's scheduling and output work once per that many "
                                       f"tokens; 1-{MAX_SCHEDULER_STEPS})")
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
    attention: str = _arg("auto", "attention of the model's full-attention layers: the model's own, a sliding window, "
                                  "window + sink tokens (StreamingLLM), H2O heavy hitters, Quest page selection or "
                                  "LSH buckets", choices=("auto", "full", "sliding", "sinks", "h2o", "quest", "lsh"))
    attention_window: int | None = _arg(None, "sliding / sinks: tokens a query sees, itself included; lsh: local "
                                              "window (default 1)")
    attention_dilation: int = _arg(1, "sliding / sinks: attend to every n-th token of the window")
    attention_sinks: int | None = _arg(None, "first tokens every query also sees and that are never evicted "
                                             "(default 4 for sinks, else 0)")
    kv_budget: float | None = _arg(None, "h2o / quest: fraction of the context kept / read, in (0, 1]")
    lsh_buckets: int = _arg(8, "lsh: hash buckets (even, 2-64)")
    speculative_config: str | dict | None = _arg(
        None, "speculative decoding as JSON, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
              "(methods: ngram, draft, layers, heads; tree_width > 1 for a token tree)")
    early_exit_config: str | dict | None = _arg(
        None, "confidence-based early exit (lossy) as JSON, e.g. '{\"threshold\": 0.9, \"measure\": \"softmax\"}'")
    tensor_parallel_size: int = _arg(1, "split the model over this many ranks (one GPU, or CPU process, each; "
                                        "docs/distributed.md)")
    pipeline_parallel_size: int = _arg(1, "split the layers into this many pipeline stages (each of "
                                          "--tensor-parallel-size ranks)")
    distributed_timeout_s: float = _arg(300.0, "seconds a silent rank may take before the engine reports it hung "
                                               "and shuts down")
    cpu_offload_gb: float = _arg(0.0, "GiB of the decoder-layer weights kept in host memory and streamed to the "
                                      "device layer by layer before use (frees device memory; the model is still "
                                      "loaded onto the device first)")
    disaggregated: bool = _arg(False, "disaggregated prefill and decode: a prefill Worker and a decode Worker in "
                                      "their own processes, each prompt's KV blocks sent from one to the other "
                                      "(docs/distributed.md)", flag="--disaggregated")
    batch_invariant: bool = _arg(False, "GPU: compute every token's logits independently of the other rows of its "
                                        "step (fixed kernel configurations), so speculative decoding gives plain "
                                        "decoding's tokens bit for bit; slower products (docs/decoding.md)",
                                 flag="--batch-invariant")
    lora_modules: list[str] | dict[str, str] | None = _arg(
        None, "LoRA adapters to serve beside the base model, as NAME=PATH (a PEFT adapter folder), one or more; a "
              "request picks one by name (SamplingParams.lora, or the server's model field; docs/lora.md)",
        nargs="+")
    max_loras: int | None = _arg(None, "LoRA adapter slots (default: one per --lora-modules entry); given, every "
                                       "attention and MLP projection is adapted and adapters can be loaded and removed "
                                       "while serving (docs/lora.md)")
    max_lora_rank: int | None = _arg(None, "the largest LoRA rank the slots take (default: the largest of "
                                           "--lora-modules)")
    max_cpu_loras: int | None = _arg(None, "LoRA adapters served at most (default: --max-loras); above the slots, "
                                           "adapters wait in host memory and move into a slot when requests need "
                                           "them (docs/lora.md)")

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
            attention=self.attention_spec(),
            speculative=SpeculativeConfig.parse(self.speculative_config),
            early_exit=EarlyExitConfig.parse(self.early_exit_config),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_timeout_s=self.distributed_timeout_s,
            cpu_offload_gb=self.cpu_offload_gb,
            disaggregated=self.disaggregated,
            batch_invariant=self.batch_invariant,
            lora_modules=parse_lora_modules(self.lora_modules),
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_bytes=self.kv_cache_bytes,
                kv_cache_memory_fraction=self.kv_cache_memory_fraction,
                enable_prefix_caching=self.enable_prefix_caching,
                swap_space_bytes=self.swap_space_bytes,
                kv_cache_dtype=self.kv_cache_dtype,
                kv_host_cache_gb=self.kv_host_cache_gb,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                policy=self.policy,
                preemption_mode=self.preemption_mode,
                num_scheduler_steps=self.num_scheduler_steps,
            ),
        )

    def attention_spec(self) -> AttentionSpec | None:
        """The ``attention*`` options as one AttentionSpec (ValueError naming a bad value)."""
        kind = self.attention
        if kind == "auto":
            if self.attention_window is not None or self.kv_budget is not None or self.attention_sinks is not None:
                raise ValueError("attention_window, attention_sinks and kv_budget need an attention kind "
                                 "(sliding, sinks, h2o, quest, lsh)")
            return None
        sinks = self.attention_sinks if self.attention_sinks is not None else (4 if kind == "sinks" else 0)
        if kind in ("sliding", "sinks") and self.attention_window is None:
            raise ValueError(f"attention={kind!r} needs attention_window (tokens a query sees, >= 1)")
        if kind == "sinks" and sinks < 1:
            raise ValueError(f"attention='sinks' needs attention_sinks >= 1, got {sinks}")
        return AttentionSpec(
            kind="sliding" if kind == "sinks" else kind,
            sliding_window=self.attention_window if kind != "lsh" else (self.attention_window or 1),
            dilation=self.attention_dilation,
            num_sinks=sinks,
            kv_budget=self.kv_budget,
            num_buckets=self.lsh_buckets if kind == "lsh" else None,
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
