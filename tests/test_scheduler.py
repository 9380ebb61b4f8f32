"""Scheduler: continuous batching, token budget, chunking and recompute preemption (no model)."""

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from sched_testing import run_step
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler


def make(num_blocks=8, block_size=4, budget=64, max_seqs=8, chunked=True, max_len=64):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), FCFSPolicy(), max_model_len=max_len)


def req(rid, n_prompt, max_tokens=4, t=0.0):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(temperature=0, max_tokens=max_tokens),
                   eos_token_ids=[0], arrival_time=t)


def test_prefill_then_decode_and_retire():
    s = make()
    s.add_request(req("a", 5, max_tokens=2, t=0))
    s.add_request(req("b", 3, max_tokens=3, t=1))
    plan = run_step(s)
    assert [(r.request_id, r.num_new_tokens, r.start_pos, r.sample) for r in plan.requests] == [
        ("a", 5, 0, True), ("b", 3, 0, True)]
    assert plan.requests[0].new_block_ids == (0, 1) and plan.requests[1].new_block_ids == (2,)
    plan = run_step(s)
    assert [(r.request_id, r.num_new_tokens, r.start_pos) for r in plan.requests] == [("a", 1, 5), ("b", 1, 3)]
    # a hit max_tokens=2 and was retired at once, its blocks freed.
    assert "a" not in s.requests and s.block_manager.num_free_blocks == 7
    run_step(s)
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 8


def test_token_budget_chunks_long_prompts():
    s = make(num_blocks=16, budget=6)
    s.add_request(req("a", 10, t=0))
    s.add_request(req("b", 2, t=1))
    plan = run_step(s)
    assert [(r.request_id, r.num_new_tokens, r.sample) for r in plan.requests] == [("a", 6, False)]
    plan = run_step(s)
    assert [(r.request_id, r.num_new_tokens, r.start_pos, r.sample) for r in plan.requests] == [
        ("a", 4, 6, True), ("b", 2, 0, True)]


def test_without_chunking_a_prompt_waits_for_a_whole_step():
    s = make(num_blocks=16, budget=12, chunked=False)
    s.add_request(req("a", 10, t=0))
    s.add_request(req("b", 5, t=1))
    plan = run_step(s)
    assert [r.request_id for r in plan.requests] == ["a"]


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 2, t=i))
    plan = run_step(s)
    assert [r.request_id for r in plan.requests] == ["r0", "r1"] and s.num_waiting == 1


def test_recompute_preemption_frees_last_request_and_resumes_it_first():
    s = make(num_blocks=4, block_size=2, max_len=8)
    s.add_request(req("a", 4, max_tokens=8, t=0))  # 2 blocks
    s.add_request(req("b", 4, max_tokens=8, t=1))  # 2 blocks: pool full
    run_step(s)
    plan = run_step(s)  # a needs a 3rd block: b (lowest FCFS rank) is preempted
    assert plan.preempted_ids == ("b",)
    assert [r.request_id for r in plan.requests] == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.metrics.num_preemptions == 1
    assert b.output_token_ids == [7]  # its sampled token is kept and recomputed as prompt
    while "a" in s.requests:
        run_step(s)
    plan = run_step(s)
    assert plan.requests[0].request_id == "b" and plan.requests[0].num_new_tokens == 5  # prompt + 1 output
    assert s.num_preemptions == 1


def test_stop_conditions_and_abort():
    s = make()
    r = Request("a", [1, 2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[9]), eos_token_ids=[5])
    s.add_request(r)
    run_step(s, token=5)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 5
    r2 = Request("b", [1, 2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[9]),
                 eos_token_ids=[5])
    s.add_request(r2)
    run_step(s, token=5)
    assert not r2.is_finished
    run_step(s, token=9)
    assert r2.status == RequestStatus.FINISHED_STOPPED and r2.stop_reason == 9
    s.add_request(req("c", 3))
    s.schedule()
    assert s.block_manager.num_used_blocks == 1
    s.finish_request("c", RequestStatus.FINISHED_ABORTED)
    assert s.block_manager.num_used_blocks == 0


def test_max_model_len_ends_with_length():
    s = make(max_len=6)
    r = req("a", 4, max_tokens=100)
    s.add_request(r)
    for _ in range(3):
        run_step(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_tokens == 6


def test_a_plain_token_list_updates_as_the_sampled_dict_does():
    """``WorkerOutput.tokens`` (one token per sampling row, in plan order) gives the same requests
    the same tokens as ``sampled`` keyed by id, with overlapped plans and a request that leaves
    while its step runs; a list of the wrong length is refused."""
    import pytest

    from flashserve.sched.plan import SampledTokens, WorkerOutput
    from flashserve.sched.stop import StopChecker

    def run(plain: bool):
        s = make(num_blocks=64, budget=16, max_seqs=8, max_len=64)
        for i in range(6):
            s.add_request(req(f"r{i}", 3 + 2 * i, max_tokens=6, t=i))
        stop, inflight, log = StopChecker(s.max_model_len), [], []
        for step in range(100):
            if not (s.has_unfinished() or inflight):
                break
            plan = s.schedule()
            inflight.append(plan)
            if step == 3:
                s.finish_request("r2", RequestStatus.FINISHED_ABORTED)
            if len(inflight) == 2 or not plan.requests:
                done = inflight.pop(0)
                rows = [r.request_id for r in done.requests if r.sample]
                tokens = [100 * step + j for j in range(len(rows))]
                out = WorkerOutput(done.step_id, {}, tokens=tokens) if plain else \
                    WorkerOutput(done.step_id, {rid: SampledTokens((t,)) for rid, t in zip(rows, tokens)})
                for r, n in s.update(done, out):
                    log.append((r.request_id, n, list(r.output_token_ids)))
                    status = stop.check(r, n)
                    if status is not None:
                        s.finish_request(r.request_id, status)
        assert not s.has_unfinished() and len(log) > 20
        return log

    assert run(plain=True) == run(plain=False)
    s = make()
    s.add_request(req("a", 3))
    plan = s.schedule()
    with pytest.raises(ValueError, match="sent 2 tokens for a step that samples 1"):
        s.update(plan, WorkerOutput(plan.step_id, {}, tokens=[1, 2]))
