"""EngineCore's plans, asserted exactly: new-request data once, then only deltas; overlapped
planning (a step planned before the previous one's tokens are back); same-step prefix sharing."""

import pickle
import random

from sched_testing import apply_tokens, fake_output, run_step
from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import NewRequest, ScheduledRequest
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler
from flashserve.sched.stop import StopChecker

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make(num_blocks=32, block_size=4, budget=64, prefix=False, max_len=2048, **cfg):
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, **cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching=prefix), FCFSPolicy(),
                     max_model_len=max_len)


def req(rid, prompt, params=SP, t=0.0):
    return Request(rid, list(prompt), params, eos_token_ids=[0], arrival_time=t)


def test_new_request_data_once_then_only_deltas():
    s = make()
    s.add_request(req("a", range(1, 7), t=0))  # 6 tokens: 2 blocks
    s.add_request(req("b", range(1, 4), t=1))  # 3 tokens: 1 block
    p1 = run_step(s, token=9)
    assert p1.new_requests == (NewRequest("a", (1, 2, 3, 4, 5, 6), (), SP), NewRequest("b", (1, 2, 3), (), SP))
    assert p1.requests == (ScheduledRequest("a", 0, 6, (0, 1), True), ScheduledRequest("b", 0, 3, (2,), True))
    p2 = run_step(s, token=9)  # a: 7 tokens (fits), b: 4 tokens (fits)
    assert p2.new_requests == () and p2.finished_ids == ()
    assert p2.requests == (ScheduledRequest("a", 6, 1, (), True), ScheduledRequest("b", 3, 1, (), True))
    p3 = run_step(s, token=9)  # a: 8 tokens (fits), b: its 5th token needs a new block
    assert p3.requests == (ScheduledRequest("a", 7, 1, (), True), ScheduledRequest("b", 4, 1, (3,), True))
    assert p3.step_id == 3


def test_decode_plans_stay_small_whatever_the_history():
    s = make(num_blocks=300, budget=2048)
    s.add_request(req("long", range(1, 1001), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    first = run_step(s)
    decode = run_step(s)
    assert len(pickle.dumps(first)) > 3000  # the prompt travels once
    assert len(pickle.dumps(decode)) < 400 and decode.requests == (ScheduledRequest("long", 1000, 1, (250,), True),)


def test_finished_and_preempted_requests_are_dropped_then_resent_whole():
    s = make(num_blocks=4, block_size=2, max_len=8, preemption_mode="recompute")
    long = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    s.add_request(req("a", [1, 2, 3, 4], long, t=0))  # 2 blocks
    s.add_request(req("b", [5, 6, 7, 8], long, t=1))  # 2 blocks: the pool is full
    run_step(s, token=9)
    p = run_step(s, token=9)  # a needs a 3rd block: b is preempted and dropped in the same plan
    assert p.preempted_ids == ("b",) and p.finished_ids == ("b",)
    while "a" in s.requests:
        p = run_step(s, token=9)
    p = run_step(s, token=9)  # a finished in the last update: its id is dropped now; b comes back whole
    assert p.finished_ids == ("a",)
    assert p.new_requests == (NewRequest("b", (5, 6, 7, 8), (9,), long),)
    assert p.requests[0].request_id == "b" and p.requests[0].start_pos == 0 and p.requests[0].num_new_tokens == 5
    assert p.requests[0].new_block_ids == tuple(s.block_manager.block_table("b"))


def test_overlapped_planning_counts_pending_tokens_and_stops_at_max_tokens():
    s = make()
    s.add_request(req("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    p1 = s.schedule()  # prefill, samples token 1
    p2 = s.schedule()  # planned before p1's token is back: decodes that pending token
    assert p2.requests == (ScheduledRequest("a", 3, 1, (), True),)
    a = s.requests["a"]
    assert a.num_pending_tokens == 2 and a.num_computed_tokens == 4 and a.output_token_ids == []
    apply_tokens(s, p1, token=5)
    p3 = s.schedule()  # third and last output token, in a new block
    assert p3.requests == (ScheduledRequest("a", 4, 1, (1,), True),)
    assert s.schedule().requests == ()  # max_tokens reached by pending tokens: nothing more is planned
    apply_tokens(s, p2, token=6)
    apply_tokens(s, p3, token=7)
    assert a.output_token_ids == [5, 6, 7] and a.is_finished and not s.has_unfinished()


def test_tokens_of_a_request_gone_while_its_step_ran_are_dropped():
    s = make()
    s.add_request(req("a", [1, 2, 3]))
    p1 = s.schedule()
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.add_request(req("a", [4, 5]))  # the id is free again: a new request
    assert list(s.update(p1, fake_output(p1, token=9))) == []  # the old request's token goes nowhere
    p2 = s.schedule()
    assert p2.finished_ids == ("a",) and p2.new_requests[0].prompt_token_ids == (4, 5)
    assert s.requests["a"].output_token_ids == []


def test_same_step_children_share_the_prompt_blocks():
    s = make(prefix=True)
    prompt = list(range(100, 117))  # 17 tokens = 4 full blocks + 1
    for i in range(4):
        s.add_request(req(f"p#{i}", prompt, t=0))
    plan = run_step(s)
    tables = {r.request_id: r.new_block_ids for r in plan.requests}
    assert tables == {"p#0": (0, 1, 2, 3, 4), "p#1": (0, 1, 2, 3, 5), "p#2": (0, 1, 2, 3, 6), "p#3": (0, 1, 2, 3, 7)}
    assert [(r.start_pos, r.num_new_tokens) for r in plan.requests] == [(0, 17), (16, 1), (16, 1), (16, 1)]
    assert s.block_manager.prefix_hits == 48 and s.block_manager.pool.ref_counts[:4] == [4, 4, 4, 4]
    assert [s.requests[f"p#{i}"].metrics.num_cached_prompt_tokens for i in range(4)] == [0, 16, 16, 16]
    s.block_manager.check_invariants()


def test_a_block_is_shared_only_once_its_tokens_are_known():
    s = make(prefix=True)
    s.add_request(req("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    p1 = s.schedule()  # 3 prompt tokens, sampling the 4th
    s.schedule()  # computes position 3 (block 0's last slot) while its token is still pending
    assert s.block_manager.pool.block_hash == {} and s.requests["a"].num_computed_tokens == 4
    apply_tokens(s, p1, token=4)  # the token is known now: block 0 is registered
    assert list(s.block_manager.pool.block_hash) == [0]


def test_plans_send_every_block_once_over_random_steps():
    """Plan entries are built as each request is claimed: over random arrivals, stops, aborts and
    preemptions with prefix caching, the block ids a Worker would have collected for each request
    since it (re)entered are exactly its table, and it holds only the running requests."""
    rng = random.Random(5)
    s = make(num_blocks=14, block_size=4, budget=24, prefix=True, enable_chunked_prefill=True)
    held: dict[str, list[int]] = {}  # what a Worker keeps: request id -> block table
    inflight = []
    stem = [rng.randrange(1, 50) for _ in range(8)]
    for step in range(300):
        if rng.random() < 0.4:
            params = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24), stop_token_ids=[rng.randrange(1, 50)])
            s.add_request(req(f"r{step}", stem[: rng.randrange(1, 9)] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 10))],
                              params, t=step))
        if s.running and rng.random() < 0.05:
            s.finish_request(rng.choice(s.running).request_id, RequestStatus.FINISHED_ABORTED)
        plan = s.schedule()
        for rid in plan.finished_ids:
            held.pop(rid, None)
        for new in plan.new_requests:
            assert new.request_id not in held
            held[new.request_id] = []
        for e in plan.requests:
            held[e.request_id] += e.new_block_ids
            assert held[e.request_id] == s.block_manager.block_table(e.request_id)
        inflight.append(plan)
        if len(inflight) == 2:  # overlapped: a plan's tokens come back after the next is planned
            apply_tokens(s, inflight.pop(0), token=rng.randrange(1, 50))
        assert set(held) >= {r.request_id for r in s.running}
        s.block_manager.check_invariants()
    assert s.num_preemptions > 0


def test_stop_check_follows_the_rules_token_by_token():
    """``StopChecker.check`` (one set lookup per token, a shortcut for one plain token) against the
    rules written out: EOS unless ignore_eos and stop ids end with "stop" once min_tokens are
    there, max_tokens and the context with "length"; tokens after the first stop are dropped."""
    rng = random.Random(9)
    max_len = 40
    checker = StopChecker(max_len)
    for _ in range(3000):
        params = SamplingParams(max_tokens=rng.choice([None, rng.randrange(1, 30)]), min_tokens=0,
                                stop_token_ids=rng.sample(range(1, 8), rng.randrange(0, 3)), ignore_eos=rng.random() < 0.3)
        if params.max_tokens is not None:
            params.min_tokens = rng.randrange(0, params.max_tokens + 1)
        prompt = list(range(rng.randrange(1, 20)))
        r = Request("x", prompt, params, eos_token_ids=[0, 1])
        before = rng.randrange(0, 10)
        n = rng.randrange(1, 4)
        r.output_token_ids = [rng.randrange(0, 12) for _ in range(before + n)]
        r.output_logprobs = [(0.0, [])] * len(r.output_token_ids)
        expect_status, expect_len, expect_reason = None, len(r.output_token_ids), None
        for i in range(before, before + n):
            count, token = i + 1, r.output_token_ids[i]
            stops = (set() if params.ignore_eos else {0, 1}) | set(params.stop_token_ids)
            if count >= params.min_tokens and token in stops:
                expect_status, expect_len, expect_reason = RequestStatus.FINISHED_STOPPED, count, token
                break
            if (params.max_tokens is not None and count >= params.max_tokens) or len(prompt) + count >= max_len:
                expect_status, expect_len = RequestStatus.FINISHED_LENGTH, count
                break
        assert checker.check(r, n) == expect_status
        assert len(r.output_token_ids) == len(r.output_logprobs) == expect_len and r.stop_reason == expect_reason
