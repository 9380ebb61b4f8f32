"""GGUF loader on tiny GGUF files written from HF models: names, shapes, q/k un-permutation,
dequantization (F32/F16/BF16/Q8_0/Q4_0/Q4_1), tied/untied heads, llama3 rope_freqs."""

from __future__ import annotations

import pytest
import torch

from conftest_models import PagedKVCache, make_tiny_checkpoint, write_tiny_gguf
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import load_model, resolve_load_format

CASES = [
    ("llama_mha_tied", "F32"),
    ("llama3_gqa", "Q8_0"),
    ("llama_mqa_linear", "F16"),
    ("qwen2_bias", "Q4_0"),
    ("qwen3_qknorm", "Q4_1"),
    ("llama_mha_tied", "BF16"),
]


@pytest.mark.parametrize("arch,qtype", CASES)
def test_gguf_matches_hf(tmp_path, arch, qtype):
    hf = make_tiny_checkpoint(arch, tmp_path / "hf", seed=3)
    path = tmp_path / f"{arch}.{qtype}.gguf"
    oracle = write_tiny_gguf(hf, path, qtype)
    assert resolve_load_format(str(path), "auto") == (str(path), "gguf")
    model, config = load_model(str(path), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend())
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.qk_norm == (arch == "qwen3_qknorm") and config.attention_bias == (arch == "qwen2_bias")
    ids = torch.randint(3, config.vocab_size, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = PagedKVCache(config, num_blocks=8, block_size=4)
    ours = cache.step(model, [(0, ids)])[0]
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
