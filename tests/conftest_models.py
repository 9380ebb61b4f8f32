"""Test helpers for the model tests: tiny HF checkpoints, a simple paged KV cache, metadata.

Import from tests as ``from conftest_models import ...`` (tests/ is on sys.path under pytest's
rootdir-relative import mode) or ``from tests.conftest_models import ...``.

* ``make_tiny_checkpoint(arch, folder)`` writes a random-weight checkpoint with transformers'
  own config and model classes (safetensors) and returns the HF model (fp32, eval) as oracle.
* ``build_metadata(query_lens, seq_lens, block_tables, block_size, device)`` builds the
  AttentionMetadata the runner would, for sequences whose new tokens end their context.
* ``PagedKVCache`` allocates per-layer caches and hands out (deliberately non-contiguous) blocks;
  ``PagedKVCache.step(model, batch)`` runs one forward pass for a list of sequences.
* ``copy_smollm2_tokenizer(folder)`` copies the SmolLM2 GGUF's converted tokenizer into a folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashserve.config import ModelConfig
from flashserve.layers.attention_metadata import AttentionMetadata, forward_context

# name -> (HF config class name, HF model class name, config kwargs)
_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=512,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # GQA (4 q heads per kv head) + Llama 3.1 rope scaling, untied
    "llama3_gqa": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_mha_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "llama_mqa_linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False),
    ),
    # Mistral with a sliding window shorter than the test prompts
    "mistral_swa": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False),
    ),
    # Gemma 3: local (window 8, rope base 10k) and global layers, q/k norms, four norms per layer,
    # GeGLU, scaled embeddings; a query scale that is not head_dim ** -0.5
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3, sliding_window=8,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
             rope_theta=100000.0, tie_word_embeddings=True),
    ),
    "qwen2_bias": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False),
    ),
    "qwen3_qknorm": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        # head_dim * heads (8 * 16 = 128) != hidden (64), as in the real Qwen3 models
        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1_000_000.0),
    ),
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: N(0, 0.1) everywhere, norm weights around 1, biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_tiny_checkpoint(arch: str, folder: str | Path, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Write a tiny random checkpoint of ``arch`` (a TINY_ARCHS key) to ``folder``; ``overrides``
    replace config values (e.g. ``num_hidden_layers=5``).

    Returns the transformers model (fp32, eval, eager attention) that wrote it, as the oracle.
    """
    import transformers

    config_cls, model_cls, extra = TINY_ARCHS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    _randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def copy_smollm2_tokenizer(folder: str | Path) -> None:
    """Put the SmolLM2 tokenizer (from the bundled GGUF, cached conversion) into ``folder``.

    Its vocabulary has 49152 tokens: give the tiny checkpoint ``vocab_size >= 49152`` if the
    engine must decode every sampled id.
    """
    from flashserve.loader import default_model_path
    from flashserve.loader.tokenizer import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    tokenizer.save_pretrained(str(folder))


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """AttentionMetadata for sequences whose ``query_lens[i]`` new tokens are the last tokens of a
    context of ``seq_lens[i]`` tokens stored in blocks ``block_tables[i]``."""
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(1, max(len(t) for t in block_tables))
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
        is_decode=all(q == 1 for q in query_lens),
    )


@dataclass
class PagedKVCache:
    """Per-layer paged caches plus a trivial block allocator, for driving a model in tests."""

    config: ModelConfig
    num_blocks: int = 128
    block_size: int = 4
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False)
    tables: dict[int, list[int]] = field(init=False, default_factory=dict)
    lens: dict[int, int] = field(init=False, default_factory=dict)
    _free: list[int] = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        shape = (self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_layers)
        ]
        # hand blocks out in a scrambled order so block tables are not contiguous
        self._free = list(range(self.num_blocks - 1, -1, -2)) + list(range(self.num_blocks - 2, -1, -2))

    def _reserve(self, seq_id: int, total_len: int) -> list[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * self.block_size < total_len:
            table.append(self._free.pop())
        return table

    @torch.no_grad()
    def step(self, model: torch.nn.Module, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Run one forward pass. ``batch``: (seq_id, new token ids) per sequence, appended after
        the tokens the sequence already has in the cache. Returns fp32 logits of each
        sequence's last new token: [len(batch), vocab]."""
        ids, positions, q_lens, s_lens, tables = [], [], [], [], []
        for seq_id, new_tokens in batch:
            start = self.lens.get(seq_id, 0)
            end = start + len(new_tokens)
            tables.append(list(self._reserve(seq_id, end)))
            ids += new_tokens
            positions += list(range(start, end))
            q_lens.append(len(new_tokens))
            s_lens.append(end)
            self.lens[seq_id] = end
        meta = build_metadata(q_lens, s_lens, tables, self.block_size, self.device)
        with forward_context(meta):
            hidden = model(
                torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), self.kv_caches
            )
        last = torch.tensor([s - 1 for s in meta.query_start_loc.tolist()[1:]], device=self.device)
        return model.compute_logits(hidden[last])


# ----------------------------------------------------------------------------------------------
# Tiny GGUF files written from a tiny HF model (llama.cpp naming and q/k permutation)

_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name of an HF parameter of a dense decoder."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")  # model.layers.N.<module...>.<weight|bias>
    return f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's conversion of q/k rows (rotate-half halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@torch.no_grad()
def write_tiny_gguf(hf: torch.nn.Module, path: str | Path, qtype_name: str = "F32") -> torch.nn.Module:
    """Write ``hf`` (a tiny llama/qwen2/qwen3 model) as a GGUF file, 2-D weights in ``qtype_name``
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1), norms and biases in F32.

    Returns a deep copy of ``hf`` whose weights are the quantize->dequantize round trip, the
    exact oracle for the GGUF's contents.
    """
    import copy

    import gguf
    import numpy as np

    cfg = hf.config
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg.model_type]
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    oracle = copy.deepcopy(hf)
    oracle_params = dict(oracle.named_parameters())
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("rope_type") == "llama3":
        from flashserve.layers.rotary import base_inv_freq, llama3_inv_freq

        base = base_inv_freq(head_dim, float(rope["rope_theta"]))
        factors = (base / llama3_inv_freq(base, rope)).numpy().astype(np.float32)
        writer.add_tensor("rope_freqs.weight", factors)

    for name, param in hf.named_parameters():  # tied lm_head is deduplicated away
        w = param.detach().float()
        if w.ndim == 2 and qtype_name != "F32":
            raw = gguf.quants.quantize(w.numpy(), qtype)
            w = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(w.shape).astype(np.float32))
        else:
            raw = w.numpy()
        oracle_params[name].copy_(w)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = heads if ".q_proj." in name else kv_heads
            permuted = _llamacpp_permute(torch.from_numpy(np.asarray(raw).copy()), n).numpy()
            raw = permuted
        if raw.dtype == np.uint8:
            writer.add_tensor(gguf_tensor_name(name), raw, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(raw))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return oracle.eval()
