"""Packed GGUF models: tiny GGUF files with a different block type per tensor (Q4_K next to Q6_K
in one fused q/k/v layer, Q5_K, Q8_0, Q5_0, Q4_1, a packed Q8_0 embedding tied to the head) load
without dequantization and compute what the dequantized model computes; unsupported types fail
before anything is allocated, naming the tensor, its type and the supported list."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_models import PagedKVCache, _llamacpp_permute, gguf_tensor_name
from flashserve.kernels import quant_reference as ref
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.quant.packed import PackedWeight

MIXED = {  # HF module suffix -> GGUF type
    "q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q5_K",
    "gate_proj": "Q8_0", "up_proj": "Q5_0", "down_proj": "Q4_1", "embed_tokens": "Q8_0", "lm_head": "Q4_0",
}


def tiny_hf(arch: str, seed: int) -> torch.nn.Module:
    """A tiny random HF model (conftest_models' architectures) wide enough for 256-column K-quant
    super-blocks: hidden 256, intermediate 512, head_dim 64."""
    import transformers

    from conftest_models import _COMMON, TINY_ARCHS, _randomize

    config_cls, model_cls, extra = TINY_ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, "hidden_size": 256,
                                                   "intermediate_size": 512, "head_dim": 64})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    _randomize(model, seed)
    with torch.no_grad():  # keep activations O(1) at this width
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(0.25)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    return model


@torch.no_grad()
def write_mixed_gguf(hf, path: Path, types: dict[str, str]) -> torch.nn.Module:
    """Write ``hf`` as GGUF, each 2-D weight in ``types[module suffix]`` (default F32): blocks from
    gguf-py's quantizer where it has one, else random valid blocks (K-quants). Returns ``hf``
    with the GGUF's dequantized weights (the oracle)."""
    import gguf

    cfg = hf.config
    oracle = copy.deepcopy(hf)
    params = dict(oracle.named_parameters())
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_eos_token_id(cfg.eos_token_id)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama 3 rope scaling as divisors
        from flashserve.layers.rotary import base_inv_freq, llama3_inv_freq

        base = base_inv_freq(cfg.head_dim, float(rope["rope_theta"]))
        writer.add_tensor("rope_freqs.weight", (base / llama3_inv_freq(base, rope)).numpy().astype(np.float32))
    for seed, (name, p) in enumerate(hf.named_parameters()):
        w = p.detach().float()
        suffix = name.split(".")[-2]
        qtype = types.get(suffix, "F32") if w.ndim == 2 else "F32"
        if qtype == "F32":
            raw, value = w, w
        elif qtype not in ref.GGUF_BLOCKS:  # a type flashserve does not decode: random bytes, no oracle
            block_elems, block_bytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
            raw = torch.randint(0, 256, (w.shape[0], w.shape[1] // block_elems * block_bytes), dtype=torch.uint8)
            value = w
        else:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            try:
                raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), qt))
            except NotImplementedError:
                raw = ref.random_gguf_blocks(qtype, w.shape[0], w.shape[1], seed=seed, scale=0.005)
            value = ref.gguf_dequantize(raw, qtype)
        params[name].copy_(value)
        if cfg.model_type == "llama" and suffix in ("q_proj", "k_proj"):
            raw = _llamacpp_permute(raw, heads if suffix == "q_proj" else kv_heads)  # whole rows: packed bytes too
        arr = np.ascontiguousarray(raw.numpy())
        if qtype == "F32":
            writer.add_tensor(gguf_tensor_name(name), arr)
        else:
            writer.add_tensor(gguf_tensor_name(name), arr, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return oracle.eval()


def _load(path, quantization="auto"):
    from flashserve.loader import load_model

    return load_model(str(path), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend(),
                      quantization=quantization)


def _logits(model, config, ids):
    return PagedKVCache(config, num_blocks=16, block_size=4).step(model, [(0, ids)])[0]


@pytest.mark.parametrize("arch", ["llama_mha_tied", "llama3_gqa", "qwen2_bias"])
def test_mixed_block_types_match_the_dequantized_model(tmp_path, arch):
    hf = tiny_hf(arch, seed=11)
    types = dict(MIXED)
    if arch == "qwen2_bias":  # qkv bias, tied; every type in legacy 32-element blocks
        types.update(q_proj="Q4_0", k_proj="Q4_1", v_proj="Q4_1", o_proj="Q8_0")
    oracle = write_mixed_gguf(hf, tmp_path / "m.gguf", types)
    model, config = _load(tmp_path / "m.gguf")
    qkv = model.model.layers[0].self_attn.qkv_proj
    labels = [p.label for p in qkv.packed_parts]
    if arch != "qwen2_bias":
        assert labels == ["gguf-Q4_K", "gguf-Q6_K"]  # q+k fused; v apart (another type)
    assert model.model.embed_tokens.quant_method.label == "gguf-Q8_0"
    head = "gguf-Q8_0" if hf.config.tie_word_embeddings else "gguf-Q4_0"
    assert model.lm_head.quant_method.label == head
    ids = torch.randint(3, config.vocab_size, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = _logits(model, config, ids)
    with torch.no_grad():
        expect = oracle(torch.tensor([ids])).logits[0, -1]
    assert (ours - expect).abs().max() <= 0.03 * expect.abs().max()  # bf16 activations into the CPU kernels
    dense, _ = _load(tmp_path / "m.gguf", quantization="none")  # today's path: dequantized at load
    torch.testing.assert_close(_logits(dense, config, ids), expect, atol=1e-4, rtol=1e-4)
    for part in model.modules():  # the same arithmetic in dense torch ops (another summation order:
        if isinstance(part, PackedWeight):  # an fp32 sum can round to the neighbouring bf16 value)
            part.forward = part.reference
    torch.testing.assert_close(_logits(model, config, ids), ours, atol=0.01 * ours.abs().max().item(), rtol=0)


def test_packed_tensors_are_not_copied_to_fp32_at_load(tmp_path):
    write_mixed_gguf(tiny_hf("llama3_gqa", seed=1), tmp_path / "m.gguf", {k: "Q4_1" for k in MIXED})
    model, _ = _load(tmp_path / "m.gguf")
    floats = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t.dtype == torch.float32 and t.dim() == 2 and "rotary" not in n}
    assert not floats, sorted(floats)  # every matrix is packed (uint8 blocks or int4 + bf16 scales)


def test_unsupported_type_is_named_before_allocation(tmp_path, monkeypatch):
    import flashserve.loader as loader

    path = tmp_path / "q2k.gguf"
    write_mixed_gguf(tiny_hf("llama_mha_tied", seed=1), path, {"down_proj": "Q2_K"})

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before the error")

    monkeypatch.setattr(loader, "build_model", no_allocation)
    with pytest.raises(ValueError, match=r"GGUF tensor model\.layers\.0\.mlp\.down_proj\.weight .*has type Q2_K"
                                         r".*supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K"):
        _load(path)
