"""One decoder for the Llama family: Llama 2/3/3.1, Mistral (sliding window), Qwen2/2.5 and Qwen3.

Differences are ModelConfig flags: ``attention_bias`` (Qwen2: bias on q/k/v), ``qk_norm``
(Qwen3: per-head RMSNorm on q and k before rope), ``tie_word_embeddings``, ``rope_scaling``.
Heads: MHA, GQA and MQA (``num_kv_heads`` divides ``num_heads``). Each decoder layer takes its
attention kind and its MLP from ``config.layer_spec(i)`` (``flashserve.models.blocks``), so new
layer kinds plug in without branches here.

Inputs are a flat batch of T new tokens (all sequences packed); the runner installs the
step's AttentionMetadata with ``forward_context`` before calling ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flashserve.config import AttentionSpec, LayerSpec, ModelConfig
from flashserve.distributed.parallel_state import current_parallel
from flashserve.layers.attention import Attention
from flashserve.layers.attention_metadata import AttentionBackend
from flashserve.layers.embedding import LMHead, VocabEmbedding
from flashserve.layers.linear import Linear, QKVLinear, default_weight_loader
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RopeInputs, RotaryEmbedding
from flashserve.models.blocks import MLP_TYPES, BlockNorms, LayerStack, build_layers
from flashserve.models.registry import register_model

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]

# HF checkpoint name fragment -> (fused parameter fragment, shard id)
STACKED_PARAMS: dict[str, tuple[str, object]] = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def make_rotary(config: ModelConfig, theta: float | None = None) -> RotaryEmbedding:
    """A rope module (one instance is shared by all layers with the same base)."""
    return RotaryEmbedding(config.head_dim, config.head_dim, config.max_position_embeddings,
                           theta if theta is not None else config.rope_theta, config.rope_scaling)


class LlamaAttention(nn.Module):
    """qkv projection -> (qk norm) -> rope -> paged attention -> output projection."""

    def __init__(self, config: ModelConfig, spec: AttentionSpec, attn_backend: AttentionBackend,
                 rotary_emb: RotaryEmbedding, prefix: str = "") -> None:
        super().__init__()
        self.qkv_proj = QKVLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, bias=config.attention_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        # this rank's heads (all of them without tensor parallelism)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        # Qwen2 has bias on q/k/v only; Llama/Qwen3 ``attention_bias`` also covers o_proj.
        o_bias = config.attention_bias and config.architecture not in ("qwen2", "qwen2_moe")
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=o_bias,
                             prefix=f"{prefix}.o_proj", parallel="row")
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary_emb = rotary_emb
        scale = config.attention_scale if config.attention_scale is not None else config.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, config.head_dim, scale, attn_backend, spec)

    def forward(self, rope: RopeInputs, hidden: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        T = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(rope, q, k, self.q_norm, self.k_norm)  # (qk norm +) rope: [T, H, D], [T, Hkv, D]
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v, k_cache, v_cache)  # [T, H D]
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual add is fused into the next norm call."""

    block_norms = BlockNorms("input_layernorm", None, "post_attention_layernorm", None)

    def __init__(self, config: ModelConfig, spec: LayerSpec, attn_backend: AttentionBackend,
                 rotary_emb: RotaryEmbedding, prefix: str = "") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, spec.attention, attn_backend, rotary_emb, prefix=f"{prefix}.self_attn")
        self.mlp = MLP_TYPES[spec.mlp](config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: RopeInputs,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, residual stream); the sum of the two is the layer's output."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module, LayerStack):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        # A pipeline stage holds its layers [start, end) only; the embedding on the first stage
        # (and on the last when the head is tied to it), the final norm on the last.
        self.pp = current_parallel()
        self.start, end = self.pp.layer_range(config.num_layers)
        self.hidden_size = config.hidden_size
        tied = config.tie_word_embeddings and self.pp.is_last_stage
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, prefix="model.embed_tokens") \
            if self.pp.is_first_stage or tied else None
        specs = [config.layer_spec(i) for i in range(self.start, end)]
        # One cos/sin cache per rope base, shared by the layers that use it.
        thetas = sorted({s.attention.rope_theta or config.rope_theta for s in specs})
        self.rotary = nn.ModuleList([make_rotary(config, t) for t in thetas])
        self._rope_index = [thetas.index(s.attention.rope_theta or config.rope_theta) for s in specs]
        self.layers = build_layers(len(specs), lambda i: LlamaDecoderLayer(
            config, specs[i], attn_backend, self.rotary[self._rope_index[i]], prefix=f"model.layers.{self.start + i}"))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.pp.is_last_stage else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings [T, hidden] (also the first step of a ``layers`` draft)."""
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache] | None
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (on a stage before the last: zeros, after handing its
        hidden states and residual to the next stage with sends that are not waited for: the
        caller collects them with ``ParallelContext.take_sends``). ``kv_caches``: this stage's layers."""
        residual: torch.Tensor | None = None
        if self.pp.is_first_stage:
            hidden = self.embed(input_ids)  # [T, hidden]
        else:
            like = torch.empty(input_ids.shape[0], self.hidden_size, dtype=self.layers[0].input_layernorm.weight.dtype,
                               device=input_ids.device)
            hidden, residual = self.pp.recv_prev_stage([like, like])
        ropes = [emb.lookup(positions) for emb in self.rotary]  # once per forward pass
        hidden, residual = self.run_layers(ropes, hidden, residual, kv_caches)
        if not self.pp.is_last_stage:
            self.pp.send_next_stage([hidden, residual])
            return torch.zeros_like(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@register_model("llama", "mistral", "qwen2", "qwen3")
class LlamaForCausalLM(nn.Module):
    """The full causal LM. ``forward`` returns final hidden states; ``compute_logits`` the fp32
    logits of the rows you ask for (usually each sequence's last token)."""

    @classmethod
    def check_supported(cls, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        """Refuse configurations this decoder would compute wrongly (before allocating anything)."""
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {config.hidden_act!r} for {config.architecture}; "
                             f"its MLP is SwiGLU (silu)")
        cls.check_layers(config, attn_backend)

    @staticmethod
    def check_layers(config: ModelConfig, attn_backend: AttentionBackend) -> None:
        """Every layer's MLP type is known and its attention kind implemented by the backend."""
        for i in range(config.num_layers):
            spec = config.layer_spec(i)
            if spec.mlp not in MLP_TYPES:
                raise ValueError(f"layer {i}: unknown MLP type {spec.mlp!r}; known: {', '.join(MLP_TYPES)}")
            if spec.attention.kind not in attn_backend.attention_kinds:
                raise ValueError(f"layer {i}: the {attn_backend.name} attention backend does not implement "
                                 f"{spec.attention.kind!r} attention (it implements {', '.join(attn_backend.attention_kinds)})")

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.check_supported(config, attn_backend)
        self.config = config
        self.model = LlamaModel(config, attn_backend)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.pp = self.model.pp
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied=tied, prefix="lm_head") \
            if self.pp.is_last_stage else None

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache] | None,  # one (k_cache, v_cache) per layer; None/[] = no cache
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        if self.pp.pp_size == 1:
            return self.lm_head(hidden)
        # pipeline, one micro-batch at a time (scoring, speculation): every stage gets the last
        # stage's logits, so all ranks sample alike
        logits = self.lm_head(hidden) if self.pp.is_last_stage else \
            torch.empty(hidden.shape[0], self.config.vocab_size, dtype=torch.float32, device=hidden.device)
        return self.pp.broadcast_from_last_stage(logits)

    def stage_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        """The logits on the last stage, shared with no other stage (pipeline micro-batches: the
        last stage samples and sends the tokens back, ``flashserve.distributed.pipeline``)."""
        if self.lm_head is None:
            raise RuntimeError(f"pipeline stage {self.pp.pp_rank} has no LM head; only the last stage computes logits")
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the set of loaded parameter names.

        Raises ValueError for an unknown name or a shape mismatch, and when a parameter was never
        loaded. Rotary ``inv_freq`` buffers are ignored; so is ``lm_head.weight`` when tied.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if not self.on_this_stage(name):
                continue
            if self.model.start and name.startswith("model.layers."):  # a later stage's layers count from 0
                i, rest = name[len("model.layers."):].split(".", 1)
                name = f"model.layers.{int(i) - self.model.start}.{rest}"
            target, shard_id = self.checkpoint_target(name)
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
            except ValueError as e:
                raise ValueError(f"cannot load {name!r}: {e}") from e
            loaded.add(target if shard_id is None else f"{target}:{shard_id}")
        self._check_all_loaded(params, loaded)
        return loaded

    def checkpoint_target(self, name: str) -> tuple[str, object]:
        """(parameter name, shard id or None) that checkpoint tensor ``name`` loads into."""
        for fragment, (fused, sid) in STACKED_PARAMS.items():
            if fragment in name:
                return name.replace(fragment, fused), sid
        return name, None

    def on_this_stage(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this pipeline stage."""
        if self.pp.pp_size == 1:
            return True
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            return self.model.start <= i < self.model.start + len(self.model.layers)
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if name.startswith("model.norm.") or name.startswith("lm_head."):
            return self.pp.is_last_stage
        return True

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name, param in params.items():
            module = self.get_submodule(name.rsplit(".", 1)[0])
            shard_ids = getattr(param, "shard_ids", None) or getattr(module, "shard_offsets", None)
            if shard_ids is not None and name not in loaded:
                missing += [f"{name}:{sid}" for sid in shard_ids if f"{name}:{sid}" not in loaded]
            elif shard_ids is None and name not in loaded:
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing weights for: {shown}")
