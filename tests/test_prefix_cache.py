"""Prefix caching: exact block reuse and eviction order, pool invariants every step, and greedy
outputs identical with and without the cache through the real engine (tiny model, CPU)."""

import random

import pytest

from flashserve.cache.block_manager import BlockManager, BlockPool, hash_block
from flashserve.config import SchedulerConfig
from flashserve.request import Request
from flashserve.sampling_params import SamplingParams
from sched_testing import apply_sampled, apply_tokens
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler


def req(rid, tokens, max_tokens=3, t=0.0):
    return Request(rid, list(tokens), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   eos_token_ids=[0], arrival_time=t)


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, host=0, mode="auto"):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True, num_host_blocks=host)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, preemption_mode=mode)
    return Scheduler(cfg, bm, FCFSPolicy(), max_model_len=256)


def step(s, token=7):
    plan = s.schedule()
    apply_tokens(s, plan, token)
    s.block_manager.check_invariants()
    return plan


def test_hash_chain_depends_on_the_whole_prefix():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == a
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [9, 2, 3, 4]), [5, 6, 7, 8])


def test_shared_prefix_reuses_exact_blocks_and_computes_only_the_rest():
    s = make()
    prefix = list(range(10, 22))  # 12 tokens = 3 full blocks
    s.add_request(req("a", prefix + [1, 2], t=0))
    plan = step(s)
    assert plan.requests[0].new_block_ids == (0, 1, 2, 3)
    s.add_request(req("b", prefix + [5, 6, 7], t=1))
    plan = step(s)
    b = next(r for r in plan.requests if r.request_id == "b")
    assert tuple(b.new_block_ids[:3]) == (0, 1, 2) and b.start_pos == 12 and b.num_new_tokens == 3
    assert s.block_manager.pool.ref_counts[:3] == [2, 2, 2]
    assert s.requests["b"].metrics.num_cached_prompt_tokens == 12
    assert (s.block_manager.prefix_queries, s.block_manager.prefix_hits) == (14 + 15, 12)


def test_last_prompt_token_is_always_computed():
    s = make()
    prompt = list(range(30, 38))  # exactly 2 full blocks
    s.add_request(req("a", prompt, max_tokens=1))
    step(s)
    assert "a" not in s.requests  # finished; both blocks now cached and evictable
    assert s.block_manager.pool.evictable_order() == [1, 0]
    s.add_request(req("b", prompt, max_tokens=1))
    plan = step(s)
    # Only the first block is reused: the second would leave nothing to compute and no logits.
    assert plan.requests[0].start_pos == 4 and plan.requests[0].num_new_tokens == len(prompt) - 4
    assert plan.requests[0].new_block_ids[0] == 0 and plan.requests[0].new_block_ids[1] != 0


def test_eviction_is_lru_tail_first_and_only_when_needed():
    pool_blocks = 6
    s = make(num_blocks=pool_blocks)
    s.add_request(req("a", list(range(100, 109)), max_tokens=1, t=0))  # 9 tokens: blocks 0,1,2
    step(s)
    assert s.block_manager.pool.evictable_order() == [1, 0]  # block 2 (partial) went to the free list
    s.add_request(req("b", list(range(200, 209)), max_tokens=1, t=1))  # blocks 3,4,5
    step(s)
    bm = s.block_manager
    assert bm.pool.evictable_order() == [1, 0, 4, 3]
    assert bm.num_free_blocks == pool_blocks  # cached blocks still count as free memory
    # a's prefix is hit again: its blocks leave the LRU list while in use.
    s.add_request(req("c", list(range(100, 108)) + [1], max_tokens=1, t=2))
    plan = step(s)
    assert plan.requests[0].new_block_ids[:2] == (0, 1)
    assert bm.pool.evictable_order() == [4, 3, 1, 0]  # reused blocks come back most recent
    # A new request needing 4 blocks takes the 2 plain free blocks (5, freed by b, then 2, freed
    # by c), then evicts least recently used first: 4, then 3.
    s.add_request(req("d", list(range(300, 316)), max_tokens=1, t=3))
    plan = step(s)
    assert plan.requests[0].new_block_ids == (5, 2, 4, 3)
    assert bm.pool.num_evictions == 2 and bm.pool.evictable_order()[:2] == [1, 0]


def test_pool_counts_and_errors():
    pool = BlockPool(3)
    [b0, b1] = pool.allocate(2)
    assert pool.register(b0, b"h0") and not pool.register(b1, b"h0")  # same content, other block
    pool.free([b0, b1])
    assert pool.num_free == 3 and pool.num_evictable == 1
    pool.check_invariants()
    pool.touch(b0)
    assert pool.ref_counts[b0] == 1 and pool.num_evictable == 0
    with pytest.raises(RuntimeError, match="neither in use nor cached"):
        pool.touch(b1)
    pool.free([b0])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([b0])


def test_shared_blocks_are_never_written():
    s = make()
    s.add_request(req("a", list(range(8)) + [9]))
    step(s)
    with pytest.raises(AssertionError):
        s.block_manager.pool.incref(0)  # pretend block 0 is shared, then write into it
        s.block_manager.assert_writable("a", 3, 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_invariants_under_random_load_with_preemption(seed):
    rng = random.Random(seed)
    s = make(num_blocks=16, block_size=4, budget=24, host=10, mode="swap")
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.choice([4, 8, 12]))] for _ in range(3)]
    n = 0
    for it in range(300):
        if n < 30 and rng.random() < 0.6:
            toks = rng.choice(prefixes) + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 10))]
            s.add_request(req(f"r{n}", toks, max_tokens=rng.randrange(1, 30), t=it))
            n += 1
        step(s, token=rng.randrange(3, 50))
        if not s.has_unfinished() and n >= 30:
            break
    assert not s.has_unfinished()
    assert s.block_manager.prefix_hits > 0 and s.num_swap_outs > 0 and s.num_recomputes > 0
    assert all(r == 0 for r in s.block_manager.pool.ref_counts)


# ------------------------------------------------------------------- through the real engine
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest_models import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama3_gqa", folder, seed=1)
    return str(folder)


def test_greedy_outputs_identical_with_and_without_prefix_cache(tiny_model):
    from flashserve.engine.llm import LLM

    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(37)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    prompts.append(list(system[:32]))  # exactly a cached prefix: the last token is still computed
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(model=tiny_model, kv_cache_bytes=1 << 21, max_model_len=128, block_size=4, verbose=False,
                  enable_prefix_caching=caching, max_num_batched_tokens=64)
        first = [o.token_ids for o in llm.generate(prompts[:1], sp, use_tqdm=False)]
        rest = [o.token_ids for o in llm.generate(prompts[1:], sp, use_tqdm=False)]
        results[caching] = first + rest
        stats = llm.engine.stats()
        if caching:
            # 4 prompts hit the 9 full system blocks; system[:32] hits 7 (its last token is computed).
            assert stats.prefix_cache_hits == 4 * 36 + 28 and stats.prefix_cache_queries == sum(map(len, prompts))
        else:
            assert stats.prefix_cache_hits == 0
    assert results[True] == results[False]


@pytest.mark.parametrize("plain", [True, False])
def test_blocks_completed_by_generated_tokens_are_shared_under_overlap(plain):
    """With step N+1 planned before step N's tokens are back, a block that a generated token
    completes is registered when that token arrives (a plain token list or the sampled dict),
    so a later prompt extending the output shares it."""
    s = make(num_blocks=32)
    s.add_request(req("a", range(10, 16), max_tokens=7))
    inflight, out_tokens = [], iter(range(100, 200))
    for _ in range(40):
        if not (s.has_unfinished() or inflight):
            break
        plan = s.schedule()
        inflight.append(plan)
        if len(inflight) == 2 or not plan.requests:
            apply_sampled(s, inflight.pop(0), lambda n: [next(out_tokens) for _ in range(n)], plain)
        s.block_manager.check_invariants()
    assert not s.has_unfinished()
    # a's tokens: 6 prompt + 7 generated (100 ... 106); its computed K/V covers the first 12
    hit = s.block_manager.lookup_prefix("b", list(range(10, 16)) + list(range(100, 107)) + [1])
    assert hit.num_tokens == 12
