"""Multi-step decoding (``num_scheduler_steps`` > 1): one plan runs several model steps while every
running request decodes, none needs the host between its tokens and nothing waits. The tokens and
finish reasons equal one-step plans' under batching, chunked prompts, preemption (recompute and
swap), prefix caching, stop ids met in the middle of a plan, ``max_tokens`` and the context cutting
a plan short, seeded sampling with penalties and min_tokens, aborts, and a Worker in another
process; logprobs computed at every model step; a request waiting for a free seat, or one that
needs the host between tokens (a per-request attention option), brings one-step plans back."""

import os
import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.config import EngineArgs
from flashserve.sched.scheduler import Scheduler

BLOCK = 2 * 2 * 8 * 2 * 16 * 4  # bytes of one fp32 block of the tiny model: layers x K/V x 8 tokens x 2 heads x 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_gqa_steps")
    make_tiny_checkpoint("llama3_gqa", folder, seed=8)
    return str(folder)


def workload(n: int = 10, seed: int = 5):
    """Requests sharing prefixes: lengths that are not multiples of the step count, some stopping on
    token ids (greedy), some running into the 96-token context, some seeded sampling with penalties
    and min_tokens."""
    rng = random.Random(seed)
    stem = [rng.randrange(3, 500) for _ in range(24)]
    prompts = [stem[: rng.randrange(0, 24)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))]
               for _ in range(n)]
    params = []
    for i in range(n):
        if i % 4 == 3:
            params.append(SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=rng.randint(3, 30),
                                         repetition_penalty=1.2, frequency_penalty=0.3, min_tokens=2,
                                         stop_token_ids=[rng.randrange(3, 500) for _ in range(60)]))
        elif i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(5, 40),
                                         stop_token_ids=[rng.randrange(3, 500) for _ in range(60)]))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, 45), ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))  # the context ends it
    return prompts, params


CASES = {
    "batching": dict(kv_cache_bytes=1 << 21),
    "chunking": dict(kv_cache_bytes=1 << 21, max_num_batched_tokens=24),
    "recompute": dict(kv_cache_bytes=24 * BLOCK, preemption_mode="recompute", max_num_batched_tokens=40),
    "swap": dict(kv_cache_bytes=24 * BLOCK, preemption_mode="swap", swap_space_bytes=64 * BLOCK,
                 max_num_batched_tokens=40),
    "no-prefix-cache": dict(kv_cache_bytes=1 << 21, enable_prefix_caching=False),
}


def run(folder, monkeypatch, steps: int, prompts, params, aborts=(), late=(), **kw):
    """Every request's (tokens, finish reason), the plans' model-step counts, and the engine.
    ``aborts``: (step, request id) pairs; ``late``: requests added at a given step."""
    monkeypatch.setattr(Scheduler, "bulk_claim_min", 1)  # a dozen requests take the bulk claim
    engine = LLM(model=folder, device="cpu", block_size=8, max_model_len=96, verbose=False,
                 num_scheduler_steps=steps, **kw).engine
    schedule, plans = engine.core.schedule, []

    def recorded():
        plan = schedule()
        plans.append((plan.decodes.num_steps if plan.decodes is not None else 1, engine.scheduler.num_waiting))
        return plan

    engine.core.schedule = recorded
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    done = {}
    for step in range(1000):
        for at, rid in aborts:
            if step == at:
                engine.abort_request(rid)
        for at, rid, prompt, p in late:
            if step == at:
                engine.add_request(rid, prompt, p)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
        if not engine.has_unfinished_requests() and step > max((at for at, *_ in late), default=0):
            break
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()
    return done, plans, engine


@pytest.mark.parametrize("case", list(CASES))
def test_multi_step_plans_give_one_step_plans_tokens(tiny, monkeypatch, case):
    prompts, params = workload()
    want, one, _ = run(tiny, monkeypatch, 1, prompts, params, **CASES[case])
    got, plans, engine = run(tiny, monkeypatch, 4, prompts, params, **CASES[case])
    assert got == want and len(got) == len(prompts)
    reasons = {c[1] for v in got.values() for c in v}
    assert reasons == {"stop", "length"}
    assert all(n == 1 for n, _ in one)
    assert sum(n == 4 for n, _ in plans) >= 3, plans  # the plans did run four model steps
    assert all(n == 1 for n, waiting in plans if waiting)  # never while a request waits for a free seat
    assert len(plans) < len(one)
    if case in ("recompute", "swap"):
        assert engine.scheduler.num_preemptions > 0
    if case == "batching":
        assert engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("steps", [2, 3, 8])
def test_any_step_count_up_to_the_block_size(tiny, monkeypatch, steps):
    prompts, params = workload(8, seed=steps)
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, kv_cache_bytes=1 << 21)
    got, plans, _ = run(tiny, monkeypatch, steps, prompts, params, kv_cache_bytes=1 << 21)
    assert got == want and any(n == steps for n, _ in plans)


def test_a_plan_runs_its_model_steps_and_answers_every_token(tiny, monkeypatch):
    """One multi-step plan: ``num_steps`` forwards on the Worker, ``lens`` tokens per row (cut at
    max_tokens), and each request's output as long as its plan said."""
    monkeypatch.setattr(Scheduler, "bulk_claim_min", 1)
    engine = LLM(model=tiny, device="cpu", block_size=8, max_model_len=96, kv_cache_bytes=1 << 21, verbose=False,
                 num_scheduler_steps=5, async_scheduling=False).engine
    worker = engine.executor.worker
    forwards = []
    forward = worker._forward
    monkeypatch.setattr(worker, "_forward", lambda inp, *a, **k: forwards.append(inp.num_tokens) or forward(inp, *a, **k))
    engine.add_request("a", list(range(3, 20)), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    engine.add_request("b", list(range(40, 47)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()  # both prompts, one model step: the first tokens
    assert forwards == [24]
    plan = engine.core.schedule()
    assert plan.decodes.num_steps == 5 and plan.decodes.lens.tolist() == [5, 2] and plan.num_tokens == 7
    assert plan.decodes.start_pos.tolist() == [17, 7]
    out = engine.executor.execute(plan).result()
    assert forwards == [24, 2, 2, 2, 2, 2] and len(out.tokens) == 7
    progress = engine.core.update(plan, out)
    assert [(r.request_id, len(r.output_token_ids)) for r in progress.requests] == [("a", 6), ("b", 3)]
    assert [r.request_id for r in progress.finished] == ["b"]
    a = engine.scheduler.requests["a"]
    assert a.num_computed_tokens == 17 + 5 and a.num_pending_tokens == 0
    assert engine.core.schedule().decodes.lens.tolist() == [3]  # a's max_tokens cuts the next plan


def test_seeded_sampling_with_penalties_in_multi_step_plans(tiny, monkeypatch):
    """Sampled rows move one output position per model step (a seeded row's draw, min_tokens bans)
    and their penalty counts grow on the device as each step samples: every request here samples,
    the plans run four steps, and the tokens equal one-step plans'."""
    prompts, _ = workload(6, seed=2)
    params = [SamplingParams(temperature=0.7 + 0.1 * i, top_k=50, seed=40 + i, max_tokens=20 + i,
                             presence_penalty=0.4, repetition_penalty=1.3, min_tokens=6, ignore_eos=i % 2 == 0)
              for i in range(6)]
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, kv_cache_bytes=1 << 21)
    got, plans, _ = run(tiny, monkeypatch, 4, prompts, params, kv_cache_bytes=1 << 21)
    assert got == want and sum(n == 4 for n, _ in plans) >= 3


def test_requests_that_need_the_host_between_tokens_take_one_step_plans(tiny, monkeypatch):
    """A per-request attention option (or a grammar) needs the host after every token: while such
    a request runs every plan is one step, and the requests beside it get the same tokens."""
    prompts, params = workload(6)
    params[1] = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True,
                               attention={"kind": "sinks", "window": 32, "sinks": 4})
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, kv_cache_bytes=1 << 21)
    got, plans, _ = run(tiny, monkeypatch, 4, prompts, params, kv_cache_bytes=1 << 21)
    assert got == want
    # multi-step plans only once that request is gone
    first_multi = next(i for i, (n, _) in enumerate(plans) if n > 1)
    assert len(got["1"][0][0]) == 30 and first_multi > 30


def test_logprobs_in_multi_step_plans(tiny, monkeypatch):
    """Every model step of a plan computes the logprobs of the rows that ask for them (sampled and
    greedy, different widths, a stop id met inside a plan): tokens, finish reasons and logprobs
    equal one-step plans', and the plans did run four steps."""
    prompts, params = workload(6, seed=7)
    params[0] = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, logprobs=2)
    params[2] = SamplingParams(temperature=0, max_tokens=25, logprobs=0, stop_token_ids=list(range(3, 500, 7)))
    params[4] = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=5)
    kw = dict(kv_cache_bytes=1 << 21)
    got, plans, _ = run(tiny, monkeypatch, 4, prompts, params, **kw)
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, **kw)
    assert got == want and sum(n == 4 for n, _ in plans) >= 3, plans
    assert got["2"][0][1] == "stop" and len(got["2"][0][0]) < 25  # a stop id ended it
    lps, steps_run = {}, []
    for steps in (1, 4):
        llm = LLM(model=tiny, device="cpu", block_size=8, max_model_len=96, verbose=False, num_scheduler_steps=steps,
                  **kw)
        schedule = llm.engine.core.schedule

        def recorded(schedule=schedule, steps=steps):
            plan = schedule()
            if steps == 4:
                steps_run.append(plan.decodes.num_steps if plan.decodes is not None else 1)
            return plan

        llm.engine.core.schedule = recorded
        lps[steps] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert 4 in steps_run[:8], steps_run  # while the 30-token request with logprobs runs
    for one, many, p in zip(lps[1], lps[4], params):
        assert one.token_ids == many.token_ids
        if p.logprobs is None:
            assert many.logprobs is None
            continue
        assert len(many.logprobs) == len(one.logprobs) == len(many.token_ids)
        for (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) in zip(one.logprobs, many.logprobs):
            assert tok_a == tok_b and abs(lp_a - lp_b) < 1e-5 and lp_b < 0
            assert [t for t, _ in top_a] == [t for t, _ in top_b] and len(top_b) == p.logprobs
            assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(top_a, top_b))


def test_arrivals_and_aborts_between_multi_step_plans(tiny, monkeypatch):
    prompts, params = workload(8, seed=9)
    late = [(6, "late", list(range(5, 30)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    aborts = [(4, "2")]  # its plan in flight has four steps
    kw = dict(kv_cache_bytes=1 << 21, max_num_batched_tokens=512)
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, aborts=aborts, late=late, **kw)
    got, plans, _ = run(tiny, monkeypatch, 4, prompts, params, aborts=aborts, late=late, **kw)
    assert "2" not in got and got == want and len(got["late"][0][0]) == 12
    # multi-step before the arrival; the arrival's own plan (its prompt) is one step; multi-step after it
    assert [n for n, _ in plans[1:6]] == [4] * 5 and plans[6][0] == 1 and 4 in [n for n, _ in plans[7:]], plans


def test_a_queue_without_a_free_seat_keeps_multi_step_plans(tiny, monkeypatch):
    """With every seat taken, waiting requests cannot start anyway: plans stay multi-step while they
    wait, one-step once a seat frees (the next request's prompt), and the tokens are unchanged."""
    prompts, params = workload(10, seed=4)
    kw = dict(kv_cache_bytes=1 << 21, max_num_seqs=4, max_num_batched_tokens=512)
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, **kw)
    got, plans, _ = run(tiny, monkeypatch, 4, prompts, params, **kw)
    assert got == want
    assert any(n == 4 and waiting for n, waiting in plans) and any(n == 1 and waiting for n, waiting in plans)


def test_a_worker_in_another_process_runs_multi_step_plans(tiny, monkeypatch):
    prompts, params = workload(6)
    want, _, _ = run(tiny, monkeypatch, 1, prompts, params, kv_cache_bytes=1 << 21)
    got, plans, engine = run(tiny, monkeypatch, 4, prompts, params, kv_cache_bytes=1 << 21, executor="process")
    try:
        assert got == want and any(n == 4 for n, _ in plans)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kw, message", [
    (dict(num_scheduler_steps=0), r"num_scheduler_steps must be in \[1, 16\], got 0"),
    (dict(num_scheduler_steps=17), r"num_scheduler_steps must be in \[1, 16\], got 17"),
    (dict(num_scheduler_steps=8, block_size=4), r"num_scheduler_steps \(8\) must not exceed block_size \(4\)"),
    (dict(num_scheduler_steps=4, speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
     "does not combine with speculative decoding"),
    (dict(num_scheduler_steps=4, pipeline_parallel_size=2), "does not combine with pipeline parallelism"),
    (dict(num_scheduler_steps=4, attention="quest", kv_budget=0.2), "an attention option other than a sliding window"),
])
def test_bad_step_counts_and_combinations_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kw).engine_config()


@pytest.mark.parametrize("arch,kw,steps", [
    ("llama3_gqa", dict(attention="sliding", attention_window=16), 1),  # every layer windowed: WindowedBlockManager
    ("llama3_gqa", dict(attention="sinks", attention_window=12, attention_sinks=2), 4),  # the engine's window option
    ("llama3_gqa", dict(attention="h2o", kv_budget=0.5, attention_sinks=2), 1),  # an EvictingBlockManager
    ("mistral_swa", {}, 1),  # the model's own window
    ("mistral_swa", {}, 4),
    ("gemma3", {}, 1),  # windowed and full layers: one table per group
    ("gemma3", {}, 4),
    # pools small enough to preempt, swapping or recomputing
    ("mistral_swa", dict(kv_cache_bytes=90000, preemption_mode="swap", swap_space_bytes=1 << 22), 4),
    ("gemma3", dict(kv_cache_bytes=90000, preemption_mode="recompute"), 4),
])
def test_windowed_and_grouped_caches_under_the_bulk_claim(tmp_path, monkeypatch, arch, kw, steps):
    """Block managers that trim per request (sliding windows, H2O, one table per layer group) under
    the bulk path: a dozen running requests past ``bulk_claim_min`` run (they once raised a
    TypeError there) and the tokens equal the loop's. A model's own window (Mistral) and one table
    per group of layers (Gemma 3) take the bulk claim with per-request calls and so multi-step
    plans, trimmed at each plan's first position, as does the engine's window option; H2O's
    manager declines it (and its engine option refuses multi-step plans outright)."""
    make_tiny_checkpoint(arch, tmp_path, seed=3)
    prompts, params = workload(12, seed=11)

    def tokens(bulk_min):
        monkeypatch.setattr(Scheduler, "bulk_claim_min", bulk_min)
        llm = LLM(**{**dict(model=str(tmp_path), device="cpu", block_size=8, max_model_len=96, kv_cache_bytes=1 << 21,
                            verbose=False, num_scheduler_steps=steps if bulk_min == 1 else 1), **kw})
        plans, schedule = [], llm.engine.core.schedule
        llm.engine.core.schedule = lambda: plans.append(plan := schedule()) or plan
        outs = llm.generate(prompts, params, use_tqdm=False)
        preempted.append(llm.engine.scheduler.num_preemptions)
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], plans

    preempted = []
    want, _ = tokens(10**9)  # the per-request loop claims every decode
    got, plans = tokens(1)
    assert got == want
    assert all(preempted) == ("kv_cache_bytes" in kw)
    multi = max((p.decodes.num_steps for p in plans if p.decodes is not None), default=1)
    assert multi == (1 if "kv_budget" in kw else steps)
    # the bulk path was asked with many running (the windowed manager's claims them in bulk)
    assert max(len(p.requests) + (len(p.decodes.request_ids) if p.decodes else 0) for p in plans) >= 8
    assert any(p.decodes is not None for p in plans) == ("kv_budget" not in kw)


@pytest.mark.parametrize("arch", ["mistral_swa", "gemma3"])
def test_windows_in_multi_step_plans_with_the_triton_kernels(tmp_path, arch):
    """Sliding windows of 8 tokens in 8-token blocks (blocks are released as requests grow) on
    every layer (Mistral) or in one table per group of layers (Gemma 3), with the Triton backend
    (its kernels in the interpreter on the CPU, CUDA graphs on a GPU): plans of four model steps
    give the tokens of one-step plans."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run in the interpreter only with TRITON_INTERPRET=1 (tests/kernels)")
    make_tiny_checkpoint(arch, tmp_path, seed=3)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 30))] for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, steps_seen = [], []
    for steps in (1, 4):
        llm = LLM(model=str(tmp_path), device=device, dtype="float32", block_size=8, max_model_len=96,
                  kv_cache_bytes=1 << 21, verbose=False, attention_backend="triton", num_scheduler_steps=steps)
        schedule = llm.engine.core.schedule
        llm.engine.core.schedule = lambda: steps_seen.append((plan := schedule()).decodes and plan.decodes.num_steps) or plan
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert tokens[0] == tokens[1]
    assert 4 in steps_seen
