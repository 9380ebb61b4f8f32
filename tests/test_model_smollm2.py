"""The real SmolLM2-135M-Instruct Q4_1 GGUF: flashserve's loader + model vs transformers' GGUF path.

Both dequantize the same Q4_1 weights to fp32, so prefill logits agree closely and greedy
decoding gives identical tokens. The GGUF is loaded once per module.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest_models import PagedKVCache
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import default_model_path, load_model, load_tokenizer

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
    model, config = load_model(gguf_path, "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend())
    return model, config


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(gguf_path) -> list[int]:
    tokenizer = load_tokenizer(gguf_path)
    assert tokenizer.chat_template, "chat template lost in the cached tokenizer"
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_config(ours):
    _, config = ours
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.eos_token_ids == [2] and config.bos_token_id == 1


def test_prefill_logits_close(ours, hf_model, prompt_ids):
    model, config = ours
    cache = PagedKVCache(config, num_blocks=64, block_size=16)
    logits = cache.step(model, [(0, prompt_ids)])[0]  # last token
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt_ids])).logits[0, -1].float()
    scale = ref.abs().max().item()
    assert (logits - ref).abs().max().item() < 1e-3 * max(scale, 1.0)
    assert logits.argmax().item() == ref.argmax().item()


def test_greedy_tokens_identical(ours, hf_model, prompt_ids):
    model, config = ours
    steps = 16
    cache = PagedKVCache(config, num_blocks=64, block_size=16)
    tokens = [int(cache.step(model, [(0, prompt_ids)]).argmax(-1))]
    for _ in range(steps - 1):
        tokens.append(int(cache.step(model, [(0, [tokens[-1]])]).argmax(-1)))
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    assert out[0, len(prompt_ids):].tolist() == tokens


CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three primary colours."}],
    [{"role": "user", "content": "Explain what a KV cache is in a transformer."}],
]


def test_engine_chat_batch_matches_transformers(hf_model):
    """The whole engine (chat template, batching, paged cache, sampler): 24 greedy tokens per
    conversation equal transformers' own greedy decoding of the same templated prompts."""
    from flashserve import LLM, SamplingParams

    # dtype float32: the exact dequantized path (the default runs the packed GGUF weights)
    llm = LLM(device="cpu", dtype="float32", max_model_len=512, kv_cache_bytes=64 << 20, verbose=False)
    steps = 24
    outs = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    for conv, out in zip(CHATS, outs):
        text = llm.engine.apply_chat_template(conv)
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    eos_token_id=None, pad_token_id=2)
        assert out.token_ids == ref[0, len(ids):].tolist()
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in outs[0].text
