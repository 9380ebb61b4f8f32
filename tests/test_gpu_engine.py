"""The v2 engine on the GPU: mixed-step CUDA graphs equal eager steps, and launching a step never
synchronises the host with the device (checked with CUDA's sync debug mode, which catches every
synchronising call: .item(), .tolist(), bool(), int(), .cpu(), blocking copies). Skipped
without a CUDA device."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_tiny")
    make_tiny_checkpoint("qwen3_qknorm", folder, seed=8)
    return str(folder)


def _workload(n=12, seed=4):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 90))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=4, repetition_penalty=1.2, frequency_penalty=0.2, max_tokens=16,
                             ignore_eos=True, logprobs=3),
              SamplingParams(n=2, temperature=0.7, seed=5, max_tokens=12, ignore_eos=True)]
    return prompts, [params[i % len(params)] for i in range(n)]


def _engine(folder, **kw):
    kw.setdefault("kv_cache_bytes", 64 << 20)
    return LLM(folder, device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
               max_num_batched_tokens=64, verbose=False, **kw)


def _never_synchronising(launch):
    """``launch`` run under CUDA's sync-debug mode: any synchronising call in it raises."""
    def checked(plan):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


def test_mixed_step_graphs_equal_eager(tiny):
    prompts, params = _workload()
    eager = _engine(tiny, cuda_graphs=False)
    graphs = _engine(tiny, cuda_graphs=True, max_mixed_graph_tokens=64)
    graphs.engine.worker.timings = []
    ref = [[c.token_ids for c in o.outputs] for o in eager.generate(prompts, params, use_tqdm=False)]
    got = [[c.token_ids for c in o.outputs] for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert got == ref
    steps = graphs.engine.worker.timings
    assert any(t.graph and not t.is_decode for t in steps) and any(t.graph and t.is_decode for t in steps)


@pytest.mark.parametrize("overlap", [True, False])
def test_launching_a_step_never_synchronises(tiny, overlap):
    prompts, params = _workload(seed=9)
    block = 2 * 2 * 16 * 2 * 16 * 4  # fp32 bytes of one block: layers x K/V x tokens x kv heads x head dim
    llm = _engine(tiny, cuda_graphs=True, async_scheduling=overlap, preemption_mode="swap",
                  kv_cache_bytes=40 * block, swap_space_bytes=200 * block)  # preemptions swap: async copies too
    llm.engine.warm_up()
    worker = llm.engine.worker
    worker.execute = _never_synchronising(worker.execute)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(c.token_ids) == p.max_tokens for o, p in zip(outs, params) for c in o.outputs)
    assert llm.engine.scheduler.num_swap_outs > 0


def test_multi_step_plans_on_graphs_equal_one_step_plans_and_never_synchronise(tiny):
    """Multi-step plans (``num_scheduler_steps`` 4) replay the decode graphs once per model step,
    each step's input tokens the previous step's on the device: the same tokens as one-step plans
    (greedy, and seeded sampling with a penalty and min_tokens; a greedy and a sampled row with
    logprobs, whose logprobs match too), and launching a plan never waits for the device."""
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 90))] for _ in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 60), ignore_eos=i % 2 == 0,
                             stop_token_ids=[] if i % 2 == 0 else [rng.randrange(3, 512) for _ in range(30)])
              if i % 3 else SamplingParams(temperature=0.8, top_p=0.9, seed=i, repetition_penalty=1.2, min_tokens=3,
                                           max_tokens=rng.randint(10, 60))
              for i in range(12)]
    params[4] = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=3)
    params[6] = SamplingParams(temperature=0.7, seed=6, max_tokens=40, ignore_eos=True, logprobs=1)
    ref_outs = _engine(tiny).generate(prompts, params, use_tqdm=False)
    ref = [[c.token_ids for c in o.outputs] for o in ref_outs]
    llm = _engine(tiny, num_scheduler_steps=4)
    llm.engine.warm_up()
    worker, steps = llm.engine.worker, []
    launch = _never_synchronising(worker.execute)

    def counted(plan):
        steps.append(plan.decodes.num_steps if plan.decodes is not None else 1)
        return launch(plan)

    worker.execute = counted
    worker.timings = []
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [[c.token_ids for c in o.outputs] for o in outs]
    assert got == ref
    assert steps.count(4) >= 5 and all(t.graph for t in worker.timings if t.is_decode)
    for i in (4, 6):
        for (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) in zip(ref_outs[i].outputs[0].logprobs,
                                                              outs[i].outputs[0].logprobs, strict=True):
            assert tok_a == tok_b and abs(lp_a - lp_b) < 1e-4
            assert [t for t, _ in top_a] == [t for t, _ in top_b] and len(top_b) == params[i].logprobs


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_greedy_graphs_equal_eager_and_never_synchronise(tiny, num_scheduler_steps):
    """Decode steps whose rows are all plain greedy replay a greedy graph (the decode graph plus
    the LM head and the argmax): the tokens of eager steps, with one-step and multi-step plans,
    and launching never waits for the device. A greedy row with logprobs, and a sampled row,
    send the steps they are in to the plain decode graphs."""
    rng = random.Random(12)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 90))] for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(8, 48), ignore_eos=True) for _ in range(10)]
    params[3] = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    params[7] = SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in _engine(tiny, cuda_graphs=False).generate(prompts, params, use_tqdm=False)]
    llm = _engine(tiny, num_scheduler_steps=num_scheduler_steps)
    llm.engine.warm_up()
    worker, kinds = llm.engine.worker, []
    assert worker.graphs.greedy_sizes == worker.graphs.decode_sizes
    replay = worker.graphs.replay

    def recorded(key, num_tokens):
        kinds.append(key[0])
        return replay(key, num_tokens)

    worker.graphs.replay = recorded
    worker.execute = _never_synchronising(worker.execute)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == ref
    assert "greedy" in kinds and "decode" in kinds
