"""The engine loop on a tiny model: the overlapped loop (step N+1 planned before step N's tokens
are read) gives the same tokens as the serial loop, under batching, chunking, preemption by
recompute and by swap, and prefix caching; a Worker in another process (torch.distributed, gloo)
gives the same tokens as an in-process one, and its death is a clear error, not a hang."""

import os
import random
import signal

import pytest

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one fp32 block of the tiny model: layers x K/V x 4 tokens x 2 heads x 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_gqa_loop")
    make_tiny_checkpoint("llama3_gqa", folder, seed=6)
    return str(folder)


def workload():
    """Prompts sharing prefixes, and a mix of greedy, seeded sampling, penalties, n > 1 and stops."""
    rng = random.Random(3)
    stem = [rng.randrange(3, 500) for _ in range(24)]
    prompts = [stem[: rng.randrange(8, 24)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))]
               for _ in range(10)]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=12, max_tokens=18, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(n=2, temperature=0.7, seed=13, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[7, 11, 13, 17, 19], min_tokens=3),
    ]
    return prompts, [params[i % len(params)] for i in range(len(prompts))]


def generate(folder, **kw):
    prompts, params = workload()
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=128, verbose=False, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]
    logprobs = [lp for o in outs for c in o.outputs if c.logprobs for _, lp, _ in c.logprobs]
    return (got, logprobs), llm


CASES = {
    "batching": dict(kv_cache_bytes=1 << 21),
    "chunking": dict(kv_cache_bytes=1 << 21, max_num_batched_tokens=20),
    "recompute": dict(kv_cache_bytes=40 * BLOCK, preemption_mode="recompute", max_num_batched_tokens=40),
    "swap": dict(kv_cache_bytes=40 * BLOCK, preemption_mode="swap", swap_space_bytes=64 * BLOCK,
                 max_num_batched_tokens=40),
    "no-prefix-cache": dict(kv_cache_bytes=1 << 21, enable_prefix_caching=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_loop_equals_serial_loop(tiny, case):
    serial, s_llm = generate(tiny, async_scheduling=False, **CASES[case])
    overlapped, o_llm = generate(tiny, async_scheduling=True, **CASES[case])
    assert overlapped[0] == serial[0]
    assert overlapped[1] == pytest.approx(serial[1], abs=1e-4) and len(serial[1]) > 0
    sched = o_llm.engine.scheduler
    if case in ("recompute", "swap"):
        assert sched.num_preemptions > 0 and s_llm.engine.scheduler.num_preemptions > 0
    if case == "swap":
        assert sched.num_swap_outs > 0
    if case == "batching":
        assert o_llm.engine.block_manager.prefix_hits > 0
    assert o_llm.engine.block_manager.num_used_blocks == 0
    o_llm.engine.block_manager.check_invariants()


def test_worker_in_another_process_gives_the_same_tokens(tiny):
    ref, _ = generate(tiny, kv_cache_bytes=40 * BLOCK, preemption_mode="swap", swap_space_bytes=64 * BLOCK,
                      max_num_batched_tokens=40)
    got, llm = generate(tiny, kv_cache_bytes=40 * BLOCK, preemption_mode="swap", swap_space_bytes=64 * BLOCK,
                        max_num_batched_tokens=40, executor="process")
    try:
        assert got[0] == ref[0] and got[1] == pytest.approx(ref[1], abs=1e-4)
        assert llm.engine.scheduler.num_swap_outs > 0
        scored = list(llm.engine.score(list(range(3, 60)), chunk_size=16))  # scoring crosses the boundary too
        assert sum(c.shape[0] for c in scored) == 56
    finally:
        llm.engine.shutdown()
    assert not llm.engine.executor.process.is_alive()


def test_killed_worker_process_is_a_clear_error(tiny):
    llm = LLM(model=tiny, device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=1 << 21, verbose=False,
              executor="process")
    engine = llm.engine
    engine.add_request("a", list(range(3, 20)), SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    engine.step()
    os.kill(engine.executor.process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker process \(pid \d+\) exited with code -9"):
        for _ in range(5):
            engine.step()
    with pytest.raises(RuntimeError, match="worker process is gone"):
        engine.step()


def test_plain_steps_record_the_tokens_the_general_path_records(tiny):
    """A step whose rows each take one token without logprobs writes its tokens to the Worker's
    token table at once (``Worker._record_plain``); a request asking for logprobs sends every
    step through the general path. The serial loop reads each next input from that table, so a
    wrong write would change the tokens."""
    prompts, _ = workload()
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)  # outlasts the others

    def run(extra: list[list[int]]):
        llm = LLM(model=tiny, device="cpu", block_size=4, max_model_len=128, verbose=False, kv_cache_bytes=1 << 21,
                  async_scheduling=False)
        outs = llm.generate(prompts + extra, [greedy] * len(prompts) + [with_logprobs] * len(extra), use_tqdm=False)
        return [o.token_ids for o in outs[: len(prompts)]]

    assert run([]) == run([[5, 6, 7]])


def test_worker_step_timings_split_the_launch(tiny):
    """Each engine step that launched work made one Worker step (the throughput bench pairs them
    in order); the Worker's host preparation and its model / sampler time add up to its host time."""
    from flashserve.bench.throughput import launch_split

    prompts, params = workload()
    llm = LLM(model=tiny, device="cpu", block_size=4, max_model_len=128, verbose=False, kv_cache_bytes=1 << 21)
    engine = llm.engine
    engine.timings, engine.worker.timings = [], []
    llm.generate(prompts, params, use_tqdm=False)
    steps = engine.worker.timings
    assert len(steps) == sum(t.num_seqs > 0 for t in engine.timings) > 0
    assert all(0 < t.compute_s <= t.host_s for t in steps)
    split = launch_split(engine.timings, steps, min_seqs=1)
    assert set(split) == {"worker_prep", "model_and_sampler"} and split["model_and_sampler"] > 0
    assert launch_split(engine.timings, steps[1:], min_seqs=1) is None  # not one Worker step per launch
    assert launch_split(engine.timings, steps, min_seqs=10**6) is None


def test_a_token_of_a_request_that_left_never_lands_in_its_reused_slot(tiny):
    """A request aborted while its step runs: the next plan drops it and gives its Worker slot to
    a new request before that step's token is read; the token must not be written there."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def fresh():
        return LLM(model=tiny, device="cpu", block_size=4, max_model_len=128, verbose=False,
                   kv_cache_bytes=1 << 21).engine

    alone = fresh()
    alone.add_request("b", list(range(30, 41)), greedy)
    want = [o for _ in range(40) for o in alone.step() if o.finished][0].outputs[0].token_ids
    engine = fresh()
    engine.add_request("a", list(range(3, 20)), greedy)
    engine.step()
    engine.step()  # a's second step is in flight
    engine.abort_request("a")
    engine.add_request("b", list(range(30, 41)), greedy)
    got = [o for _ in range(40) for o in engine.step() if o.finished]
    assert got[0].request_id == "b" and got[0].outputs[0].token_ids == want


@pytest.mark.parametrize("case", ["batching", "chunking", "recompute", "swap"])
def test_decodes_claimed_at_once_give_the_per_request_paths_tokens(tiny, monkeypatch, case):
    """Decodes claimed at once travel as a ``DecodeBatch`` (columns, no entry per request) and a
    plain step's result is paired with them as a list; with every running request eligible
    (``bulk_claim_min`` 1) the tokens, finish reasons and outputs equal those of the per-request
    claim, under preemption, chunked prompts, shared prefixes, aborts while steps are in flight,
    requests that stop on a token id, streamed and unstreamed requests (``LLMEngine._outputs``
    visits only finished requests when nobody streams)."""
    from flashserve.sched.scheduler import Scheduler

    prompts, params = workload()

    def run(bulk: bool, stream: bool):
        plans, batches = [], []
        with monkeypatch.context() as m:
            m.setattr(Scheduler, "bulk_claim_min", 1)
            if not bulk:
                m.setattr(Scheduler, "_claim_decodes", lambda *a: 0)
            engine = LLM(model=tiny, device="cpu", block_size=4, max_model_len=128, verbose=False,
                         **CASES[case]).engine
            schedule = engine.core.schedule

            def recorded():
                plan = schedule()
                plans.append((plan.entries, plan.new_requests, plan.finished_ids, plan.preempted_ids))
                batches.append(plan.decodes is not None)
                return plan

            engine.core.schedule = recorded
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                engine.add_request(str(i), prompt, p, stream=stream and i % 2 == 0)
            done, streamed = {}, []
            for step in range(400):
                if step == 6:
                    engine.abort_request("1")  # sampling, with a step in flight
                if step == 9:
                    engine.abort_request("4")  # greedy with stop ids
                for out in engine.step():
                    streamed.append((out.request_id, [c.token_ids for c in out.outputs], out.finished))
                    if out.finished:
                        done[out.request_id] = [(c.token_ids, c.finish_reason, c.text) for c in out.outputs]
                if not engine.has_unfinished_requests():
                    break
            assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
            stats = engine.stats()
        assert any(batches) == bulk
        return done, streamed, plans, stats.num_preemptions, stats.generation_tokens_total

    for stream in (False, True):
        bulk, loop = run(True, stream), run(False, stream)
        assert bulk[0] == loop[0] and len(bulk[0]) == len(prompts) - 2
        assert bulk[1] == loop[1]  # every output, in order
        assert bulk[2] == loop[2]  # every plan, the decodes' columns as entries
        assert bulk[3:] == loop[3:]
        if case in ("recompute", "swap"):
            assert bulk[3] > 0
