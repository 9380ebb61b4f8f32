"""Pipeline micro-batches: several plans in flight on disjoint requests, stages that overlap.

The scheduler's share of it runs without a model; the engine tests run 2 gloo processes on CPU
(tiny random Llama, one layer per stage). The token comparisons of PP=2 and TP=2 x PP=2 under
batching, chunked prefill and preemption are in test_distributed_tp.py."""

import os
import signal
import time

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request
from flashserve.sampling_params import SamplingParams as SP
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler
from sched_testing import apply_tokens


def _scheduler(micro_batches, budget=16, max_seqs=8):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, BlockManager(64, 4), FCFSPolicy(), max_model_len=128, micro_batches=micro_batches)


def _req(rid, n_prompt, max_tokens=6):
    return Request(rid, list(range(3, 3 + n_prompt)), SP(temperature=0, max_tokens=max_tokens), eos_token_ids=[0])


def test_plans_in_flight_hold_disjoint_even_shares():
    s = _scheduler(micro_batches=3)
    for i in range(7):
        s.add_request(_req(f"r{i}", 2))
    inflight = [s.schedule() for _ in range(3)]  # three plans before any token comes back
    ids = [{r.request_id for r in p.requests} for p in inflight]
    assert [len(x) for x in ids] == [3, 3, 1]  # ceil(7 / 3) each, the rest in the last
    assert set.union(*ids) == {f"r{i}" for i in range(7)} and sum(map(len, ids)) == 7
    assert s.schedule().requests == ()  # every request waits for its token
    apply_tokens(s, inflight[0])
    nxt = s.schedule()
    assert {r.request_id for r in nxt.requests} == ids[0]  # the first micro-batch's requests, and only they
    assert all(r.num_new_tokens == 1 and r.sample for r in nxt.requests)


def test_a_long_prompt_flows_through_the_stages_chunk_by_chunk():
    s = _scheduler(micro_batches=2, budget=8)
    s.add_request(_req("long", 30))
    plans = [s.schedule() for _ in range(4)]  # chunks sample nothing: each plan takes the next one
    assert [(p.requests[0].start_pos, p.requests[0].num_new_tokens, p.requests[0].sample) for p in plans] == \
        [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]
    assert s.schedule().requests == ()  # its first token is on its way


def test_one_micro_batch_plans_as_before():
    """micro_batches=1 changes nothing: no cap, tokens of a step in flight are pending, not awaited."""
    s = _scheduler(micro_batches=1)
    for i in range(7):
        s.add_request(_req(f"r{i}", 2))
    first = s.schedule()
    assert len(first.requests) == 7
    second = s.schedule()  # planned before the first's tokens came back
    assert [r.start_pos for r in second.requests] == [2] * 7
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        _scheduler(micro_batches=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_mha_tied")
    make_tiny_checkpoint("llama_mha_tied", folder, seed=7)
    return str(folder)


PROMPTS = [[5, 9, 200, 31, 7, 77, 12, 40, 3, 8, 150, 2], [300, 2, 8], [41, 42, 43, 44, 45], [7, 7, 9, 11]]
PARAMS = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
          SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=9, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, logprobs=0)]


def _run(engine):
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0]
    return [outs[str(i)] for i in range(len(PROMPTS))]


def test_stage_zero_runs_ahead_while_the_last_stage_is_stopped(ckpt):
    """With the last stage's process stopped, the driver (stage 0) still launches a micro-batch:
    its execute returns once its activations are sent, it does not wait for the last stage. Once
    the stage runs again, every request gets the tokens (and logprobs) of one process, and
    ``score`` afterwards the log-probabilities of one process."""
    kw = dict(model=ckpt, device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=1 << 20,
              max_num_batched_tokens=8, verbose=False)
    ref = LLM(**kw)
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
        ref.engine.add_request(str(i), p, sp)
    want = _run(ref.engine)
    want_scores = torch.cat(list(ref.engine.score(PROMPTS[0] + PROMPTS[1], chunk_size=8)))
    llm = LLM(pipeline_parallel_size=2, distributed_timeout_s=60, **kw)
    engine = llm.engine
    try:
        # on CPU one micro-batch per stage (execute() computes the stage: no extra one to hide the host)
        assert engine.info.pipeline_stages == 2 and engine._depth == 2
        for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
            engine.add_request(str(i), p, sp)
        last = engine.executor.processes[0]
        os.kill(last.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert engine.step() == []  # launched: stage 0 ran it and posted its activations
            assert len(engine._inflight) == 1 and time.monotonic() - t0 < 20
            (plan, _), = engine._inflight
            assert 0 < len(plan.requests) <= 2  # ceil(4 / 2) sequences
        finally:
            os.kill(last.pid, signal.SIGCONT)
        got = _run(engine)
        # scoring between generations: one micro-batch at a time, the logits shared by every stage
        scores = torch.cat(list(engine.score(PROMPTS[0] + PROMPTS[1], chunk_size=8)))
    finally:
        engine.shutdown()
    assert torch.allclose(scores, want_scores, atol=1e-4)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert (g.logprobs is None) == (w.logprobs is None)
        for (gt, glp, gtop), (wt, wlp, wtop) in zip(g.logprobs or [], w.logprobs or []):
            assert gt == wt and glp == pytest.approx(wlp, abs=1e-4)
            assert [t for t, _ in gtop] == [t for t, _ in wtop]


def test_speculation_keeps_one_micro_batch_at_a_time(ckpt):
    """n-gram drafts need every rank to sample: the stages run in lockstep, tokens unchanged."""
    kw = dict(model=ckpt, device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=1 << 20, verbose=False)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = LLM(**kw)
    want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(pipeline_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **kw)
    try:
        assert llm.engine.info.pipeline_stages == 1 and llm.engine._depth == 2
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == want
