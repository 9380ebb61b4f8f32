"""Scheduling policies on hand-built queues: order, victim choice, MLFQ skip-join, demotion and
starvation guard, priority ties by arrival, and rank preemption through the scheduler."""

import pytest

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from sched_testing import apply_tokens
from flashserve.sched.policy import POLICIES, MLFQPolicy, make_policy
from flashserve.sched.preemption import RankPreemptionRule
from flashserve.sched.scheduler import Scheduler


def req(rid, n_prompt=4, t=0.0, priority=0, max_tokens=8):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, priority=priority)
    return Request(rid, list(range(1, n_prompt + 1)), sp, [0], arrival_time=t)


def ids(requests):
    return [r.request_id for r in requests]


def test_registry_and_unknown_name():
    assert set(POLICIES) == {"fcfs", "priority", "sjf", "mlfq"}
    with pytest.raises(ValueError, match="unknown scheduling policy 'lifo'"):
        make_policy("lifo")


def test_fcfs_and_priority_ties_by_arrival():
    q = [req("c", t=3, priority=1), req("a", t=1, priority=1), req("b", t=2, priority=-5), req("d", t=0, priority=9)]
    assert ids(make_policy("fcfs").order(q)) == ["d", "a", "b", "c"]
    assert ids(make_policy("priority").order(q)) == ["b", "a", "c", "d"]  # lower value first, ties by arrival


def test_sjf_by_predicted_length():
    q = [req("long", n_prompt=10, t=0, max_tokens=500), req("short", n_prompt=2000, t=1, max_tokens=10),
         req("mid", n_prompt=4, t=2, max_tokens=100), req("mid2", n_prompt=4, t=3, max_tokens=100)]
    assert ids(make_policy("sjf").order(q)) == ["short", "mid", "mid2", "long"]


def test_mlfq_skip_join_demotion_and_starvation_guard():
    p = MLFQPolicy(num_levels=4, base_quantum=2, prefill_tokens_per_unit=10, starvation_steps=5)
    short, long = req("short", n_prompt=5, t=1), req("long", n_prompt=70, t=0)
    p.begin_step([short, long])
    assert p.state(short).level == 0  # 1 unit <= quantum 2
    assert p.state(long).level == 2  # 7 units: skips levels 0 (2) and 1 (4), joins level 2 (8)
    assert ids(p.order([long, short])) == ["short", "long"]
    p.on_scheduled(short, 5)  # 1 unit
    assert p.state(short).level == 0
    p.begin_step([short, long])
    p.on_scheduled(short, 1)  # 2 units used: demoted
    assert (p.state(short).level, p.state(short).attained) == (1, 0.0)
    for _ in range(4):
        p.begin_step([short, long])
        p.on_scheduled(short, 1)
    assert p.state(short).level == 2  # quantum 4 at level 1 used up
    assert ids(p.order([long, short])) == ["long", "short"]  # same level: arrival order
    # long has not been served for more than 5 steps: promoted to the top level.
    p.begin_step([short, long])
    assert p.state(long).level == 0 and p.num_promotions == 1
    p.on_finished(long)
    assert "long" not in p.states


def _step(s):
    plan = s.schedule()
    apply_tokens(s, plan, 7)
    s.block_manager.check_invariants()
    return plan


def test_victim_is_lowest_ranked_running_request():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="recompute")
    s = Scheduler(cfg, BlockManager(6, 2), make_policy("priority"), max_model_len=16)
    s.add_request(req("low", t=0, priority=5))
    s.add_request(req("high", t=1, priority=0))
    s.add_request(req("mid", t=2, priority=2))
    plan = _step(s)
    assert ids(plan.requests) == ["high", "mid", "low"]
    plan = _step(s)  # all three need a third block; 0 free: the lowest priority goes
    assert plan.preempted_ids == ("low",) and s.requests["low"].status == RequestStatus.WAITING


def test_higher_ranked_arrival_preempts_running_request_for_its_seat():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, preemption_mode="recompute")
    s = Scheduler(cfg, BlockManager(32, 2), make_policy("priority"), max_model_len=32,
                  rank_rule=RankPreemptionRule(min_run_steps=1))
    s.add_request(req("a", t=0, priority=3))
    s.add_request(req("b", t=1, priority=1))
    _step(s)
    s.add_request(req("vip", t=2, priority=0))
    plan = _step(s)
    assert plan.preempted_ids == ("a",) and set(ids(plan.requests)) == {"b", "vip"}
    # FCFS never preempts for a newcomer: the newcomer simply waits for a seat.
    s2 = Scheduler(cfg, BlockManager(32, 2), make_policy("fcfs"), max_model_len=32)
    for r in (req("a", t=0), req("b", t=1)):
        s2.add_request(r)
    _step(s2)
    s2.add_request(req("c", t=2))
    plan = _step(s2)
    assert not plan.preempted_ids and ids(plan.requests) == ["a", "b"]


def test_mlfq_short_job_overtakes_long_prompt():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16)
    s = Scheduler(cfg, BlockManager(64, 4), make_policy("mlfq", base_quantum=4, prefill_tokens_per_unit=8), max_model_len=128)
    s.add_request(req("long", n_prompt=100, t=0))
    _step(s)  # long takes the whole budget (chunk of 16)
    s.add_request(req("short", n_prompt=3, t=1))
    plan = _step(s)
    assert ids(plan.requests)[0] == "short"  # skip-join put long at a lower level


# ----------------------------------------------------------------- rank preemption rule
def _prio_sched(max_seqs=2, num_blocks=32, host=0, mode="auto", budget=64, **rule):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, preemption_mode=mode)
    return Scheduler(cfg, BlockManager(num_blocks, 2, num_host_blocks=host), make_policy("priority"), max_model_len=64,
                     rank_rule=RankPreemptionRule(**rule))


def test_rank_victim_is_swapped_after_its_protected_run_even_when_auto_prefers_recompute():
    s = _prio_sched(host=16, min_run_steps=2)  # no cost model: auto alone would recompute
    s.add_request(req("a", t=0, priority=3))
    s.add_request(req("b", t=1, priority=1))
    _step(s)
    s.add_request(req("vip", t=2, priority=0))
    plan = _step(s)  # a has run 1 step < 2 since admission: protected, vip waits
    assert not plan.preempted_ids and ids(plan.requests) == ["b", "a"]
    plan = _step(s)
    assert plan.preempted_ids == ("a",) and s.num_rank_preemptions == 1
    a = s.requests["a"]
    assert a.status == RequestStatus.SWAPPED and a.num_computed_tokens == 5 and plan.block_copies.swap_out
    assert set(ids(plan.requests)) == {"b", "vip"}


def test_rank_preemption_skips_victims_too_costly_to_recompute():
    s = _prio_sched(min_run_steps=1)  # no host space; recompute limit = 64 // 8 = 8 tokens
    s.add_request(req("heavy", n_prompt=12, t=0, priority=5))
    s.add_request(req("light", n_prompt=4, t=1, priority=3))
    _step(s)
    s.add_request(req("vip", t=2, priority=0))
    plan = _step(s)  # heavy ranks lowest but holds 12 computed tokens: light goes instead
    assert plan.preempted_ids == ("light",)
    light = s.requests["light"]
    assert light.status == RequestStatus.WAITING and light.num_computed_tokens == 0
    assert ids(plan.requests) == ["heavy", "vip"]


def test_rank_preemption_does_not_swap_long_contexts():
    # Host space is ample, but "heavy" holds 20 computed tokens > the swap limit of 16: copying
    # it out and back would cost more than the newcomer gains, so "light" (4 tokens) goes.
    s = _prio_sched(host=64, min_run_steps=1, max_swap_tokens=16)
    s.add_request(req("heavy", n_prompt=20, t=0, priority=5))
    s.add_request(req("light", n_prompt=4, t=1, priority=3))
    _step(s)
    s.add_request(req("vip", t=2, priority=0))
    plan = _step(s)
    assert plan.preempted_ids == ("light",) and s.requests["light"].status == RequestStatus.SWAPPED
    assert s.requests["heavy"].status == RequestStatus.RUNNING


def test_rank_preemption_needs_victims_that_make_room():
    def run(max_per_step):
        s = _prio_sched(max_seqs=8, num_blocks=7, host=16, min_run_steps=1, max_per_step=max_per_step)
        s.add_request(req("y", n_prompt=7, t=0, priority=3))  # 4 blocks
        s.add_request(req("x", n_prompt=3, t=1, priority=5))  # 2 blocks: 1 left
        _step(s)
        s.add_request(req("vip", n_prompt=8, t=2, priority=0))  # needs 4 blocks
        return s, _step(s)

    s, plan = run(1)  # freeing x alone (2 blocks) is not enough: nobody is preempted for nothing
    assert not plan.preempted_ids and ids(plan.requests) == ["y", "x"] and s.num_rank_preemptions == 0
    s, plan = run(2)
    assert plan.preempted_ids == ("x", "y") and ids(plan.requests) == ["vip"]
    assert all(s.requests[r].status == RequestStatus.SWAPPED for r in ("x", "y"))


def test_protected_steps_back_off_exponentially():
    rule = RankPreemptionRule(min_run_steps=8)
    assert [rule.protected_steps(k) for k in range(4)] == [8, 16, 32, 64]
    assert RankPreemptionRule(min_run_steps=8, backoff=False).protected_steps(3) == 8
    assert rule.may_preempt(1, 16) and not rule.may_preempt(1, 15)
    assert not RankPreemptionRule(max_per_request=2).may_preempt(2, 10**6)


def test_mlfq_long_job_is_not_thrashed_by_a_stream_of_short_ones():
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, preemption_mode="swap")
    s = Scheduler(cfg, BlockManager(64, 4, num_host_blocks=64), make_policy("mlfq"), max_model_len=256,
                  rank_rule=RankPreemptionRule(min_run_steps=2))
    long = req("long", t=0, max_tokens=200)
    s.add_request(long)
    for i in range(96):
        if i % 3 == 0:
            s.add_request(req(f"short{i}", t=1 + i, max_tokens=1))
        _step(s)
    # Every short arrival outranks the demoted long job, but after each preemption it is
    # protected twice as long: log2-many preemptions, and it keeps most of the steps.
    assert 1 <= long.metrics.num_preemptions <= 5
    assert long.num_output_tokens >= 50


def test_sjf_ranks_by_remaining_work_so_a_nearly_done_job_is_not_preempted():
    p = make_policy("sjf")
    old, new = req("old", t=0, max_tokens=10), req("new", t=1, max_tokens=5)
    assert p.outranks(new, old)
    old.num_computed_tokens = 4 + 7
    old.output_token_ids.extend([7] * 8)  # 2 outputs left: now it outranks the newcomer
    assert ids(p.order([new, old])) == ["old", "new"] and not p.outranks(new, old)
    assert ids(make_policy("sjf", remaining=False).order([new, old])) == ["new", "old"]
