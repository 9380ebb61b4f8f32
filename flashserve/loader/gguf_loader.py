"""Load a GGUF file (llama.cpp format): ModelConfig from metadata, HF-named tensors.

Tensors are renamed to Hugging Face names and either handed over packed (the file's blocks,
memory-mapped; ``flashserve.quant.gguf``) or dequantized to fp32 with ``gguf.quants.dequantize``
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants ... whatever the installed gguf package supports). llama.cpp permutes the rows of llama q/k weights for its rope layout; that permutation
is undone here (qwen2/qwen3 GGUFs are stored unpermuted).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashserve.config import AttentionSpec, LayerSpec, ModelConfig

# GGUF general.architecture -> ModelConfig.architecture
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
                      "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # Mixtral: "llama" with experts

# per-layer GGUF tensor name -> HF name (within model.layers.N.)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts (flashserve.layers.moe): router, shared expert, and the experts stacked
    # [E, out, in] (split per expert by iterate_gguf)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(\w+)\.weight$")

# Gemma 3 names its norms around the blocks differently (``ffn_norm`` is the pre-MLP norm).
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0  # not in the file; llama.cpp fixes it too
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp's first Mixtral files (before the stacked ``ffn_*_exps``): one tensor per expert
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


# The last file opened, keyed by (path, size, mtime): a load reads the directory twice (config,
# then weights) and walking the tokenizer's 10^5 metadata strings costs ~0.2 s each time.
_LAST_OPENED: dict[tuple[str, int, int], Any] = {}


def open_gguf(path: str | Path) -> Any:
    """The GGUF file's metadata and tensor directory (``flashserve.loader.gguf_file``, memory-mapped,
    read-only); clear errors for missing/corrupt files."""
    from flashserve.loader.gguf_file import GGUFFile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _LAST_OPENED:
        return _LAST_OPENED[key]
    try:
        reader = GGUFFile(path)
    except Exception as e:  # ValueError / struct errors / IndexError on truncated files
        raise ValueError(f"cannot read GGUF file {path} (corrupt or truncated?): {type(e).__name__}: {e}") from e
    _LAST_OPENED.clear()
    _LAST_OPENED[key] = reader
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF parameter name of a GGUF tensor, or None for tensors we do not load (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    m = _EXPERT_RE.match(gguf_name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    return None


def _gemma3_layers(num_layers: int, window: int) -> tuple[LayerSpec, ...]:
    """Gemma 3: layer i is local (sliding window, rope base 10,000) when i % 6 < 5, else global."""
    local = LayerSpec(AttentionSpec("sliding", window, rope_theta=_GEMMA3_LOCAL_ROPE_BASE), "gated_gelu_tanh")
    return tuple(local if i % 6 < 5 else LayerSpec(AttentionSpec(), "gated_gelu_tanh") for i in range(num_layers))


def gguf_model_config(reader: Any, path: str | Path = "<gguf>") -> ModelConfig:
    """ModelConfig from GGUF metadata."""
    arch_name = _field(reader, "general.architecture")
    if arch_name not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch_name!r} in {path}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    arch = GGUF_ARCHITECTURES[arch_name]

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch_name}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF file {path} lacks metadata key {arch_name}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    num_kv_heads = int(meta("attention.head_count_kv", num_heads))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # its length only: no need to decode 10^5 strings
    vocab = len(tokens) if tokens is not None else int(meta("vocab_size"))
    rope_scaling: dict[str, Any] | None = None
    scaling_type = _field(reader, f"{arch_name}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} in {path} is not supported")
    if "rope_freqs.weight" in tensor_names:  # Llama 3.1: per-frequency divisors stored as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "freq_factors", "freq_factors": np.asarray(t.data, dtype=np.float32).tolist()}
    eos = [int(_field(reader, "tokenizer.ggml.eos_token_id"))] if _field(reader, "tokenizer.ggml.eos_token_id") is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    num_layers = int(meta("block_count"))
    window = _field(reader, f"{arch_name}.attention.sliding_window")
    gemma = arch == "gemma3"
    if gemma and window is None:
        raise ValueError(f"GGUF file {path} lacks metadata key gemma3.attention.sliding_window")
    moe = _moe_fields(reader, arch_name, arch, num_layers, tensor_names)
    if moe:
        arch = moe.pop("architecture")
    else:
        moe = {"layer_types": _gemma3_layers(num_layers, int(window)) if gemma else None}
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=int(window) if gemma else None,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        **moe,
    )


def _moe_fields(reader: Any, arch_name: str, arch: str, num_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    """ModelConfig fields of a GGUF mixture of experts ({} for a dense model). A layer is sparse
    when it has a router tensor; renormalisation follows ``expert_weights_norm`` when the file
    has it, else the architecture (Mixtral and Qwen3-MoE renormalise, Qwen2-MoE does not)."""
    num_experts = int(_field(reader, f"{arch_name}.expert_count", 0) or 0)
    if num_experts == 0:
        return {}
    arch = "mixtral" if arch in ("llama", "mistral") else arch
    inter = _field(reader, f"{arch_name}.expert_feed_forward_length")
    norm = _field(reader, f"{arch_name}.expert_weights_norm")
    gating = int(_field(reader, f"{arch_name}.expert_gating_func", 1) or 1)  # llama.cpp: 1 softmax, 2 sigmoid
    shared = _field(reader, f"{arch_name}.expert_shared_feed_forward_length")
    return dict(
        architecture=arch,
        num_experts=num_experts,
        num_experts_per_tok=int(_field(reader, f"{arch_name}.expert_used_count", 0) or 0),
        moe_intermediate_size=int(inter if inter is not None else _field(reader, f"{arch_name}.feed_forward_length")),
        moe_scoring="sigmoid" if gating == 2 else "softmax",
        norm_topk_prob=bool(norm) if norm is not None else arch != "qwen2_moe",
        shared_expert_intermediate_size=int(shared or 0) if "blk.0.ffn_gate_shexp.weight" in tensor_names else 0,
        layer_types=tuple(LayerSpec(mlp="moe" if f"blk.{i}.ffn_gate_inp.weight" in tensor_names else "gated_silu")
                          for i in range(num_layers)),
    )


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rope row permutation of a q or k weight/bias.

    llama.cpp stores, per head, the rows interleaved (pairs (i, i + D/2) adjacent); HF keeps the
    two halves contiguous. weight: [n_head * D, ...] -> same shape.
    """
    shape = weight.shape
    return weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """fp32 torch tensor in torch (row-major) order from a GGUF ReaderTensor."""
    from gguf.quants import dequantize

    raw = np.asarray(tensor.data)  # plain ndarray view of the memmap: avoids memmap slicing overhead
    array = np.asarray(dequantize(raw, tensor.tensor_type), dtype=np.float32)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    array = array.reshape(shape)
    if not array.flags.writeable or not array.flags.c_contiguous:  # F32 tensors still view the mmap
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def gguf_tensor_types(reader: Any) -> dict[str, str]:
    """HF tensor name -> GGUF type name (e.g. ``Q4_1``) of every model tensor of the file."""
    arch = str(_field(reader, "general.architecture"))
    return {name: t.tensor_type.name for t in reader.tensors if (name := hf_tensor_name(t.name, arch)) is not None}


def iterate_gguf(
    reader: Any, config: ModelConfig, arch_name: str, keep_packed: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every model tensor of the GGUF file: fp32, or for names
    ``keep_packed`` accepts the stored blocks as uint8 ``[rows, row_bytes]`` (a view of the
    mapped file; llama q/k rows are still un-permuted, which moves whole rows)."""
    permute = arch_name in ("llama", "mistral")
    for t in reader.tensors:
        name = hf_tensor_name(t.name, arch_name)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            raise ValueError(f"unexpected tensor {t.name!r} in GGUF file")
        try:
            if keep_packed is not None and keep_packed(name):
                from flashserve.quant.gguf import raw_tensor

                tensor = raw_tensor(t)
            else:
                tensor = dequantize_tensor(t)
        except Exception as e:
            raise ValueError(f"cannot read GGUF tensor {t.name} ({t.tensor_type.name}): {e}") from e
        if arch_name == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # stored as 1 + w; the model adds the 1 back at load (HF layout)
        if permute and ".self_attn.q_proj." in name:
            tensor = unpermute_qk(tensor, config.num_heads)
        elif permute and ".self_attn.k_proj." in name:
            tensor = unpermute_qk(tensor, config.num_kv_heads)
        stacked = _STACKED_EXPERTS.match(name)
        if stacked is not None:  # [E, out, in] -> one tensor per expert, as in HF checkpoints
            for expert, part in enumerate(tensor):
                yield f"{stacked[1]}.{expert}.{stacked[2]}.weight", part
            continue
        yield name, tensor
