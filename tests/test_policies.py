"""Scheduling policies on hand-built queues: order, victim choice, MLFQ skip-join, demotion and
starvation guard, priority ties by arrival, and rank preemption through the scheduler."""

import pytest

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import RunnerOutput, SampledToken
from flashserve.sched.policy import POLICIES, MLFQPolicy, make_policy
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
    s.update(plan, RunnerOutput({r.request_id: SampledToken(7) for r in plan.requests if r.sample}))
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
    assert plan.preempted_ids == ["low"] and s.requests["low"].status == RequestStatus.WAITING


def test_higher_ranked_arrival_preempts_running_request_for_its_seat():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, preemption_mode="recompute")
    s = Scheduler(cfg, BlockManager(32, 2), make_policy("priority"), max_model_len=32)
    s.add_request(req("a", t=0, priority=3))
    s.add_request(req("b", t=1, priority=1))
    _step(s)
    s.add_request(req("vip", t=2, priority=0))
    plan = _step(s)
    assert plan.preempted_ids == ["a"] and set(ids(plan.requests)) == {"b", "vip"}
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
    s = Scheduler(cfg, BlockManager(64, 4), make_policy("mlfq", prefill_tokens_per_unit=8), max_model_len=128)
    s.add_request(req("long", n_prompt=100, t=0))
    _step(s)  # long takes the whole budget (chunk of 16)
    s.add_request(req("short", n_prompt=3, t=1))
    plan = _step(s)
    assert ids(plan.requests)[0] == "short"  # skip-join put long at a lower level
