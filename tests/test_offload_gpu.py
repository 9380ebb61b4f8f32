"""Offloading on CUDA: weights streamed from pinned host memory on a side stream, inside captured
CUDA graphs and eager, give the tokens of the engine without offloading; the host KV tier's
asynchronous saves and loads give the tokens of the engine without the tier."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_offload_gpu")
    make_tiny_checkpoint("llama3_gqa", folder, seed=31, num_hidden_layers=5)
    return str(folder)


def engine(folder, **kw):
    return LLM(folder, device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
               verbose=False, **kw)


def prompts(n=12, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 60))] for _ in range(n)]


def tokens(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_offloaded_weights_on_cuda_give_identical_tokens(deep, cuda_graphs):
    from flashserve.runner.offload import layer_sizes

    ref_llm = engine(deep, cuda_graphs=cuda_graphs)
    ps = prompts()
    ref = tokens(ref_llm, ps)
    total = sum(layer_sizes(ref_llm.engine.worker.model))
    for fraction in (0.5, 1.0):
        llm = engine(deep, cuda_graphs=cuda_graphs, cpu_offload_gb=fraction * total / 2**30)
        worker = llm.engine.worker
        assert (worker.graphs is not None) == cuda_graphs
        assert all(h.is_pinned() for h in worker.offload.host)
        assert tokens(llm, ps) == ref, fraction
        assert tokens(llm, ps[::-1]) == ref[::-1]  # other batch shapes (other graphs)


def test_host_tier_on_cuda_gives_identical_tokens(deep):
    block = 5 * 2 * 16 * 2 * 16 * 4  # fp32 bytes of one block: layers x K/V x 16 tokens x 2 heads x 16
    kw = dict(kv_cache_bytes=40 * block, max_num_batched_tokens=128)
    rng = random.Random(4)
    stems = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(3)]
    waves = [[s + [rng.randrange(3, 500)] for s in stems], prompts(16, seed=5), [s + [7, 8, 9] for s in stems]]
    plain = engine(deep, **kw)
    ref = [tokens(plain, w) for w in waves]
    tiered = engine(deep, kv_host_cache_gb=64 * block / 2**30, **kw)
    assert [tokens(tiered, w) for w in waves] == ref
    bm = tiered.engine.block_manager
    assert bm.host_tier_hits >= 3 * 96 and tiered.engine.worker.swap_space.pinned
