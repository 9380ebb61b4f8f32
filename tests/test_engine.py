"""The whole engine (scheduler + runner + sampler) against transformers, on tiny random checkpoints.

Greedy decoding through the engine must equal transformers' greedy ``generate`` token for token:
one prompt, 8 prompts of different lengths in one batch, batch invariance, and preemption under a
KV pool too small for the load.
"""

import random
import zlib

import pytest
import torch

from conftest_models import TINY_ARCHS, make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.runner.kv_cache import bytes_per_block

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in TINY_ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (str(folder), make_tiny_checkpoint(arch, folder, seed=1))
    return out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers, EOS allowed like any token (as with ignore_eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def prompts(n: int, seed: int, lo=3, hi=40, vocab=512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def engine(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_bytes", 8 << 20)
    return LLM(model=folder, device="cpu", block_size=4, max_model_len=256, verbose=False, **kw)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_greedy_matches_transformers_one_and_eight_prompts(checkpoints, arch):
    folder, hf = checkpoints[arch]
    llm = engine(folder)
    batch = prompts(8, seed=zlib.crc32(arch.encode()) % 1000)  # fixed per architecture (hash() is salted per process)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for p, o in zip(batch, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)
        assert o.finish_reason == "length"
    single = llm.generate([batch[3]], GREEDY, use_tqdm=False)[0]
    assert single.token_ids == outs[3].token_ids


def test_batch_invariance_sixteen_mixed_lengths(checkpoints):
    folder, _ = checkpoints["llama3_gqa"]
    llm = engine(folder, max_num_batched_tokens=64)  # prompts also get chunked across steps
    batch = prompts(16, seed=7, lo=1, hi=120)
    together = llm.generate(batch, GREEDY, use_tqdm=False)
    for i in (0, 5, 15):
        alone = llm.generate([batch[i]], GREEDY, use_tqdm=False)[0]
        assert alone.token_ids == together[i].token_ids


def test_preemption_all_finish_with_unconstrained_outputs(checkpoints):
    folder, _ = checkpoints["qwen3_qknorm"]
    batch = prompts(32, seed=11, lo=5, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy_llm = engine(folder)
    roomy = roomy_llm.generate(batch, params, use_tqdm=False)
    assert roomy_llm.engine.scheduler.num_preemptions == 0
    # A pool of 64 blocks x 4 tokens = 256 tokens: one max-length sequence fits, 32 requests do not.
    per_block = bytes_per_block(roomy_llm.engine.model_config, 4, torch.float32)
    tight_llm = engine(folder, kv_cache_bytes=64 * per_block)
    tight = tight_llm.generate(batch, params, use_tqdm=False)
    assert tight_llm.engine.block_manager.num_blocks == 64
    assert tight_llm.engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, tight):
        assert a.token_ids == b.token_ids
    assert tight_llm.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_reproducible_through_the_engine(checkpoints):
    folder, _ = checkpoints["llama_mha_tied"]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    batch = prompts(6, seed=3)
    a = engine(folder, seed=1).generate(batch, params, use_tqdm=False)
    b = engine(folder, seed=2).generate(list(reversed(batch)), params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in reversed(b)]
    n2 = engine(folder).generate([batch[0]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16), use_tqdm=False)[0]
    assert len(n2.outputs) == 3 and len({tuple(c.token_ids) for c in n2.outputs}) > 1
