"""Gemma 3 (text): local sliding-window and global layers, four norms per layer, GeGLU.

Differences from the Llama decoder (``flashserve.models.llama``, whose attention block and
weight loading this reuses):

* layers alternate 5 local (sliding window, rope base 10,000) : 1 global (the file's rope base),
  as ``ModelConfig.layer_types`` says (``flashserve.loader.hf_config`` / ``gguf_loader``);
* q and k are RMS-normalised per head before rotary; the softmax scale is
  ``query_pre_attn_scalar ** -0.5`` (``ModelConfig.attention_scale``);
* norms around both blocks: ``x + post_attn_norm(attn(input_norm(x)))``, then
  ``x + post_ffw_norm(mlp(pre_ffw_norm(x)))``;
* Gemma's RMSNorm multiplies by ``1 + w``: the ``1`` is added to every norm weight at load, so
  the shared ``RMSNorm`` (and its fused kernels) compute ``x * rstd * w'`` with ``w' = 1 + w``
  (a GGUF stores ``1 + w`` already; its loader subtracts the 1 so both formats load alike);
* GeGLU MLP with tanh-approximated GELU (``blocks.GatedGeluTanhMLP``);
* embeddings scaled by ``sqrt(hidden)`` (rounded to the model dtype, as transformers does);
  the LM head is tied to the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.config import LayerSpec, ModelConfig
from flashserve.distributed.parallel_state import current_parallel
from flashserve.layers.attention_metadata import AttentionBackend
from flashserve.layers.embedding import LMHead, VocabEmbedding
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RopeInputs, RotaryEmbedding
from flashserve.models.blocks import MLP_TYPES, BlockNorms, LayerStack, build_layers
from flashserve.models.llama import KVCache, LlamaAttention, LlamaForCausalLM, make_rotary
from flashserve.models.registry import register_model


def _plus_one_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Load a Gemma norm weight ``w`` as ``1 + w`` (in fp32, then the parameter's dtype)."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded.float() + 1.0)


def gemma_norm(size: int, eps: float) -> RMSNorm:
    norm = RMSNorm(size, eps)
    norm.weight.weight_loader = _plus_one_loader
    return norm


class Gemma3DecoderLayer(nn.Module):
    """Attention and MLP blocks, each between a pre-norm and a post-norm; the residual adds are
    fused into the pre-norms."""

    block_norms = BlockNorms("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm")

    def __init__(self, config: ModelConfig, spec: LayerSpec, attn_backend: AttentionBackend,
                 rotary_emb: RotaryEmbedding, prefix: str = "") -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, spec.attention, attn_backend, rotary_emb, prefix=f"{prefix}.self_attn")
        self.self_attn.q_norm = gemma_norm(config.head_dim, eps)
        self.self_attn.k_norm = gemma_norm(config.head_dim, eps)
        self.mlp = MLP_TYPES[spec.mlp](config, prefix=f"{prefix}.mlp")
        self.input_layernorm = gemma_norm(config.hidden_size, eps)
        self.post_attention_layernorm = gemma_norm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = gemma_norm(config.hidden_size, eps)
        self.post_feedforward_layernorm = gemma_norm(config.hidden_size, eps)

    def forward(self, rope: RopeInputs, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, residual stream); the sum of the two is the layer's output."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(rope, hidden, kv_cache))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module, LayerStack):
    """Scaled embedding, decoder layers (one rope table per base), final norm."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.pp = current_parallel()
        if self.pp.world_size > 1:
            raise ValueError("gemma3 runs on one rank: tensor and pipeline parallelism are not implemented for it")
        self.start = 0  # first layer of this stage (one stage)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, prefix="model.embed_tokens")
        # sqrt(hidden) rounded to the model's dtype, as transformers multiplies by it
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=torch.get_default_dtype()))
        specs = [config.layer_spec(i) for i in range(config.num_layers)]
        thetas = sorted({s.attention.rope_theta or config.rope_theta for s in specs})
        self.rotary = nn.ModuleList([make_rotary(config, t) for t in thetas])
        self._rope_index = [thetas.index(s.attention.rope_theta or config.rope_theta) for s in specs]
        self.layers = build_layers(len(specs), lambda i: Gemma3DecoderLayer(
            config, specs[i], attn_backend, self.rotary[self._rope_index[i]], prefix=f"model.layers.{i}"))
        self.norm = gemma_norm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled input embeddings [T, hidden] (also the first step of a ``layers`` draft)."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache] | None) -> torch.Tensor:
        hidden = self.embed(input_ids)  # [T, hidden]
        ropes = [emb.lookup(positions) for emb in self.rotary]
        residual: torch.Tensor | None = None
        hidden, residual = self.run_layers(ropes, hidden, residual, kv_caches)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@register_model("gemma3")
class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's causal LM; weight loading and the forward interface are the Llama decoder's."""

    @classmethod
    def check_supported(cls, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported activation {config.hidden_act!r} for gemma3; expected tanh GELU")
        cls.check_layers(config, attn_backend)

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        nn.Module.__init__(self)
        self.check_supported(config, attn_backend)
        self.config = config
        self.model = Gemma3Model(config, attn_backend)
        self.pp = self.model.pp
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied=tied, prefix="lm_head")
