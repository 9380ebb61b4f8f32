"""The embedded GGUF's cached tokenizer, loaded without AutoTokenizer, behaves exactly as
AutoTokenizer's load of the same cache: same class, token ids, special tokens, chat prompt."""

from __future__ import annotations

from transformers import AutoTokenizer

from flashserve.loader import default_model_path
from flashserve.loader.tokenizer import gguf_tokenizer_cache_dir, load_gguf_tokenizer


def test_cached_gguf_tokenizer_equals_autotokenizer():
    path = default_model_path()
    load_gguf_tokenizer(path)  # converts and caches on a fresh machine
    fast = load_gguf_tokenizer(path)  # from the cache
    auto = AutoTokenizer.from_pretrained(str(gguf_tokenizer_cache_dir(path)))
    assert type(fast) is type(auto)
    text = "Quantized weights: ünïcode, numbers 12345, code `x = y[0]`\n\tand spaces."
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    assert fast.all_special_ids == auto.all_special_ids and fast.eos_token_id == auto.eos_token_id
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = fast.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
