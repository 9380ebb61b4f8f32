"""flashserve's Llama-family decoder vs Hugging Face transformers on tiny random checkpoints.

For each architecture: prefill logits (one prompt, and several prompts packed into one batch,
with chunked prefill and mixed prefill/decode steps) match within fp32 tolerance, and greedy
decoding through the paged cache reproduces ``generate`` token for token.
"""

from __future__ import annotations

import pytest
import torch

from conftest_models import TINY_ARCHS, PagedKVCache, build_metadata, make_tiny_checkpoint
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.layers.attention_metadata import forward_context
from flashserve.loader import load_model

ATOL = 1e-4
RTOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def pair(request, tmp_path_factory):
    """(flashserve model, its ModelConfig, HF oracle model) for one architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(request.param, folder, seed=hash(request.param) % 1000)
    model, config = load_model(str(folder), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend())
    return model, config, hf


def _prompt(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


@torch.no_grad()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:  # [L, vocab]
    return hf(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def _all_logits(model, cache: PagedKVCache, batch: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
    """Logits of every new token of every sequence in one packed step (through the paged cache)."""
    ids, positions, q_lens, s_lens, tables = [], [], [], [], []
    for seq_id, new in batch:
        start = cache.lens.get(seq_id, 0)
        end = start + len(new)
        tables.append(list(cache._reserve(seq_id, end)))
        ids += new
        positions += list(range(start, end))
        q_lens.append(len(new))
        s_lens.append(end)
        cache.lens[seq_id] = end
    meta = build_metadata(q_lens, s_lens, tables, cache.block_size)
    with forward_context(meta):
        hidden = model(torch.tensor(ids), torch.tensor(positions), cache.kv_caches)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), model.config.vocab_size)
    return list(logits.split(q_lens))


def test_config_matches_hf(pair):
    model, config, hf = pair
    assert config.vocab_size == hf.config.vocab_size
    assert config.num_kv_heads == hf.config.num_key_value_heads
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prefill_single_prompt(pair):
    model, config, hf = pair
    ids = _prompt(0, 13, config.vocab_size)
    cache = PagedKVCache(config, num_blocks=16, block_size=4)
    (ours,) = _all_logits(model, cache, [(0, ids)])
    torch.testing.assert_close(ours, _hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_prefill_packed_batch(pair):
    model, config, hf = pair
    prompts = [_prompt(s, n, config.vocab_size) for s, n in ((1, 5), (2, 17), (3, 1), (4, 8))]
    cache = PagedKVCache(config, num_blocks=32, block_size=4)
    outs = _all_logits(model, cache, list(enumerate(prompts)))
    for ids, ours in zip(prompts, outs):
        torch.testing.assert_close(ours, _hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_chunked_prefill_mixed_with_decode(pair):
    """A prompt split over three steps (chunks not aligned to blocks) next to a decoding sequence."""
    model, config, hf = pair
    long = _prompt(5, 19, config.vocab_size)
    short = _prompt(6, 6, config.vocab_size)
    cache = PagedKVCache(config, num_blocks=32, block_size=4)
    ref_long, ref_short = _hf_logits(hf, long), _hf_logits(hf, short + [7, 8])
    (a,) = _all_logits(model, cache, [(0, long[:7])])
    b, s1 = _all_logits(model, cache, [(0, long[7:10]), (1, short)])
    c, s2 = _all_logits(model, cache, [(0, long[10:]), (1, [7])])
    (s3,) = _all_logits(model, cache, [(1, [8])])
    torch.testing.assert_close(torch.cat([a, b, c]), ref_long, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([s1, s2, s3]), ref_short, atol=ATOL, rtol=RTOL)


def test_greedy_decode_matches_generate(pair):
    model, config, hf = pair
    prompts = [_prompt(10, 9, config.vocab_size), _prompt(11, 4, config.vocab_size)]
    steps = 24
    cache = PagedKVCache(config, num_blocks=64, block_size=4)
    logits = cache.step(model, list(enumerate(prompts)))
    generated: list[list[int]] = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(steps - 1):
        logits = cache.step(model, [(i, [g[-1]]) for i, g in enumerate(generated)])
        for g, t in zip(generated, logits.argmax(-1).tolist()):
            g.append(t)
    for ids, ours in zip(prompts, generated):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out[0, len(ids):].tolist() == ours
