"""Chunked prefill: one token budget per step, decodes first, prompts split into chunks; greedy
outputs identical to unchunked runs (tiny model through the real engine, CPU)."""

import random

import pytest

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request
from flashserve.sampling_params import SamplingParams
from sched_testing import apply_tokens
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler


def test_decodes_go_first_and_prompts_share_the_remaining_budget():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10)
    s = Scheduler(cfg, BlockManager(64, 4), FCFSPolicy(), max_model_len=128)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    s.add_request(Request("a", [1, 2, 3], sp, [0], arrival_time=0))
    s.add_request(Request("b", [1, 2], sp, [0], arrival_time=1))

    def run():
        plan = s.schedule()
        apply_tokens(s, plan, 5)
        return [(r.request_id, r.num_new_tokens) for r in plan.requests]

    assert run() == [("a", 3), ("b", 2)]
    s.add_request(Request("long", list(range(1, 31)), sp, [0], arrival_time=2))
    assert run() == [("a", 1), ("b", 1), ("long", 8)]  # 2 decodes + an 8-token chunk = budget
    assert run() == [("a", 1), ("b", 1), ("long", 8)]
    s.add_request(Request("c", [1, 2, 3], sp, [0], arrival_time=3))
    assert run() == [("a", 1), ("b", 1), ("long", 8)]  # FCFS: long's chunk before c's prompt
    assert run() == [("a", 1), ("b", 1), ("long", 6), ("c", 2)]
    assert run() == [("a", 1), ("b", 1), ("long", 1), ("c", 1)]  # all decoding now


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest_models import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_qwen")
    make_tiny_checkpoint("llama3_gqa", folder, seed=2)
    return str(folder)


def _generate(model, prompts, sp, **kw):
    from flashserve.engine.llm import LLM

    llm = LLM(model=model, kv_cache_bytes=1 << 21, max_model_len=200, block_size=4, verbose=False,
              enable_prefix_caching=False, **kw)
    return [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], llm


def test_chunked_greedy_matches_unchunked_alone_and_mixed_with_decodes(tiny_model):
    rng = random.Random(3)
    long_prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (150, 97)]
    short = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 3)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref, _ = _generate(tiny_model, long_prompts + short, sp, enable_chunked_prefill=False)
    alone, _ = _generate(tiny_model, long_prompts[:1], sp, max_num_batched_tokens=16)  # 10 chunks
    assert alone == ref[:1]
    # Short requests start decoding first; the long prompts then arrive in chunks of what is left
    # of a 24-token budget, sharing every step with those decodes.
    from flashserve.engine.llm import LLM

    llm = LLM(model=tiny_model, kv_cache_bytes=1 << 21, max_model_len=200, block_size=4, verbose=False,
              enable_prefix_caching=False, max_num_batched_tokens=24)
    eng = llm.engine
    for i, p in enumerate(short):
        eng.add_request(f"s{i}", p, sp)
    eng.step()
    for i, p in enumerate(long_prompts):
        eng.add_request(f"l{i}", p, sp)
    plans = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    got = [outs["l0"], outs["l1"]] + [outs[f"s{i}"] for i in range(3)]
    assert got == ref
    mixed = [p for p in plans if any(r.num_new_tokens == 1 for r in p.requests) and any(r.num_new_tokens > 1 for r in p.requests)]
    assert len(mixed) >= 5 and all(p.num_tokens <= 24 for p in plans)
