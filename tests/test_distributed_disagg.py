"""Disaggregated prefill/decode on CPU (gloo, a prefill and a decode Worker process): the same tokens
as one process under batching, chunked prefill, prefix sharing and decode-side preemption; a
first token that stops the request never reaches the decode side; a killed Worker is named and
the engine shuts down; combinations it does not support are clear errors before any process
starts."""

import random
import time

import pytest

from conftest_models import make_tiny_checkpoint
from process_faults import assert_killed_process_is_named, assert_stopped_process_times_out
from flashserve import LLM, SamplingParams
from flashserve.config import EngineArgs
from flashserve.distributed.disagg import DECODE, PREFILL
from flashserve.engine.llm_engine import LLMEngine

BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one fp32 block of llama3_gqa: layers x K/V x 4 tokens x 2 KV heads x 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_gqa")
    make_tiny_checkpoint("llama3_gqa", folder, seed=7)
    return str(folder)


def workload(n=10):
    rng = random.Random(5)
    stem = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [stem[: rng.randrange(6, 20)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 24))]
               for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=9, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]  # done at the prefill side
    return prompts, [params[i % 3] for i in range(n)]


def run(folder, max_model_len=96, **kw):
    prompts, params = workload()
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=max_model_len, verbose=False, **kw)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine
    finally:
        llm.engine.shutdown()


def test_disaggregated_gives_the_tokens_of_one_process(ckpt):
    kw = dict(kv_cache_bytes=1 << 20, max_num_batched_tokens=24)  # prompts are chunked and batched
    ref, _ = run(ckpt, **kw)
    got, engine = run(ckpt, disaggregated=True, **kw)
    assert got == ref
    core = engine.core
    # every request that decodes past its first token went through a hand-off (cached prefix
    # blocks already on the decode side are not sent)
    assert core.num_transfers == sum(1 for t in got if len(t) > 1)
    assert 0 < core.blocks_transferred <= sum(-(-len(p) // 4) for p in workload()[0])
    assert not core.requests and core.decode_blocks.num_used_blocks == 0 and core.prefill_blocks.num_used_blocks == 0


def test_disaggregated_under_decode_preemption(ckpt):
    # 16 blocks of 4 tokens per side (one 64-token sequence): the decode side runs out while its
    # requests grow
    kw = dict(kv_cache_bytes=16 * BLOCK, max_model_len=64, max_num_batched_tokens=40, preemption_mode="recompute")
    ref, _ = run(ckpt, **kw)
    got, engine = run(ckpt, disaggregated=True, **kw)
    assert engine.core.decode.num_preemptions > 0
    assert got == ref


def _started(folder, **kw):
    engine = LLMEngine(EngineArgs(model=folder, device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 20,
                                  disaggregated=True, **kw).engine_config(), verbose=False)
    prompts, params = workload(4)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    engine.step()
    return engine


@pytest.mark.parametrize("rank", [PREFILL, DECODE])
def test_killed_worker_is_named_and_the_engine_shuts_down(ckpt, rank):
    engine = _started(ckpt)
    proc = engine.executor.processes[rank]
    other = engine.executor.processes[DECODE if rank == PREFILL else PREFILL]
    name = "prefill" if rank == PREFILL else "decode"
    assert_killed_process_is_named(engine, proc, rf"the {name} worker \(pid {proc.pid}\) was killed by SIGKILL",
                                   f"the disaggregated engine is down: the {name} worker")
    assert engine.executor.dead_reason.startswith(f"the {name} worker")
    assert not other.is_alive()  # both Workers are gone


def test_stopped_worker_times_out_with_a_clear_error(ckpt):
    engine = _started(ckpt, distributed_timeout_s=3.0)
    proc = engine.executor.processes[DECODE]
    assert_stopped_process_times_out(engine, proc, rf"the decode worker \(pid {proc.pid}\) is stopped")


def _phase(core, rid):
    if any(r.request_id == rid for r in core.queue):
        return "queued"
    if rid in core._prefilling:
        return "prefilling"
    if any(r.request_id == rid for r, _ in core._ready):
        return "handing off"
    return "decoding" if rid in core.decode.requests else "done"


def test_aborts_in_every_phase_free_both_pools(ckpt):
    """Requests aborted while queued for a decode reservation, prefilling, or decoding leave no
    block behind on either side, and the others get the tokens they get alone."""
    prompts, _ = workload(8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engine = LLMEngine(EngineArgs(model=ckpt, device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 20,
                                  max_num_seqs=3, max_num_batched_tokens=16, disaggregated=True).engine_config(),
                       verbose=False)
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        phases, done = {}, {}
        for step in range(200):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            now = {str(i): _phase(engine.core, str(i)) for i in range(8) if str(i) not in done and str(i) not in phases}
            for phase in ("queued", "prefilling", "handing off", "decoding"):
                rid = next((r for r, ph in now.items() if ph == phase), None)
                if phase not in phases.values() and rid is not None and len(phases) < 4:
                    phases[rid] = phase
                    assert engine.abort_request(rid)
                    break
            if not engine.has_unfinished_requests():
                break
        core = engine.core
        assert {"queued", "prefilling", "decoding"} <= set(phases.values()), phases
        assert not core.requests and not core._prefilling and not core._ready
        assert core.prefill_blocks.num_used_blocks == 0 and core.decode_blocks.num_used_blocks == 0
        assert len(done) == 8 - len(phases)
    finally:
        engine.shutdown()
    llm = LLM(model=ckpt, device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 20, verbose=False)
    ids = sorted(done, key=int)
    ref = llm.generate([prompts[int(i)] for i in ids], params, use_tqdm=False)
    assert [done[i] for i in ids] == [o.outputs[0].token_ids for o in ref]


@pytest.mark.parametrize("bad, message", [
    (dict(tensor_parallel_size=2), "does not combine with tensor_parallel_size=2"),
    (dict(executor="process"), "starts its own Worker processes; leave executor='inproc'"),
    (dict(kv_cache_dtype="int8"), r"cannot hand off an 8-bit KV cache \(kv_cache_dtype='int8'"),
    (dict(attention="sliding", attention_window=8), "hands off full-attention KV only; attention='sliding'"),
    (dict(kv_host_cache_gb=0.01), r"kv_host_cache_gb=0.01 is not supported with it"),
])
def test_unsupported_combinations_are_clear_errors(ckpt, bad, message):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=message):
        LLM(model=ckpt, device="cpu", disaggregated=True, verbose=False, **bad)
    assert time.monotonic() - t0 < 5  # refused before any process starts


def test_beam_search_is_refused(ckpt):
    from flashserve.spec.beam import BeamSearchParams

    engine = LLMEngine(EngineArgs(model=ckpt, device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 20,
                                  disaggregated=True).engine_config(), verbose=False)
    try:
        with pytest.raises(ValueError, match="beam search is not supported with disaggregated"):
            engine.add_beam_request("b", [5, 6, 7, 8], BeamSearchParams(beam_width=2, max_tokens=4))
        assert not engine.has_unfinished_requests()
        out = None  # the engine still serves plain requests
        engine.add_request("p", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            out = engine.step() or out
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        engine.shutdown()


def test_cli_flag():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli(parser.parse_args(["--disaggregated"])).engine_config().disaggregated
    assert not EngineArgs.from_cli(parser.parse_args([])).engine_config().disaggregated


def test_gather_and_scatter_blocks_round_trip():
    import torch

    from flashserve.distributed.disagg import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 2, 10, 4, 2, 8, generator=g)
    dst = torch.randn(3, 2, 12, 4, 2, 8, generator=g)
    before = dst.clone()
    data = gather_blocks(src, (7, 2, 5))
    assert torch.equal(data, src[:, :, [7, 2, 5]])
    scatter_blocks(dst, (0, 11, 3), data)
    assert torch.equal(dst[:, :, [0, 11, 3]], src[:, :, [7, 2, 5]])
    untouched = [b for b in range(12) if b not in (0, 11, 3)]
    assert torch.equal(dst[:, :, untouched], before[:, :, untouched])


def test_router_recomputes_on_the_decode_side_a_prompt_preempted_on_the_prefill_side():
    """The router alone (pure Python, its plans answered with fixed tokens, one step in flight as
    in the engine's loop). A prompt whose last chunk is in flight is preempted on the prefill side
    (forced here; a full prefill pool or a higher-ranked prompt does it in the engine). Its first
    token still arrives, but its KV is gone: the decode side recomputes it instead of receiving
    it, and every request gets all its tokens with both pools empty at the end."""
    from flashserve.cache.block_manager import BlockManager
    from flashserve.config import SchedulerConfig
    from flashserve.distributed.disagg import DisaggOutput, DisaggregatedCore
    from flashserve.request import Request
    from flashserve.sched.plan import SampledTokens, WorkerOutput

    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=9, preemption_mode="recompute")
    core = DisaggregatedCore(config, BlockManager(8, 4), BlockManager(64, 4), max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    requests = [Request(str(i), [20 + i] * 9, params, [0]) for i in range(3)]
    for r in requests:
        core.add_request(r)

    def answer(plan):
        def out(sub):
            return WorkerOutput(sub.step_id, {e.request_id: SampledTokens((7,)) for e in sub.requests if e.sample})
        return DisaggOutput(plan.step_id, out(plan.prefill), out(plan.decode))

    inflight, transfers, decode_prompt_tokens = None, [], 0
    for step in range(100):
        plan = core.schedule()
        if step == 0:
            assert [e.request_id for e in plan.prefill.requests] == ["0"]
        if step == 1:  # as if this plan preempted request 0, whose only chunk is still in flight
            core.prefill._preempt(core.prefill.requests["0"], [], [])
        transfers += [t.request_id for t in plan.transfers]
        decode_prompt_tokens += sum(e.num_new_tokens for e in plan.decode.requests if e.request_id == "0"
                                    and e.start_pos < 10)
        if inflight is not None:
            for r, _ in core.update(inflight, answer(inflight)):
                if r.is_finished:
                    core.finish_request(r.request_id, r.status)
        inflight = None if plan.is_empty else plan
        if not core.has_unfinished() and inflight is None:
            break
    assert all(r.output_token_ids == [7] * 4 for r in requests)
    assert transfers == ["1", "2"] and requests[0].metrics.num_preemptions == 1
    assert decode_prompt_tokens == 10  # request 0's prompt and first token, recomputed on the decode side
    assert core.prefill_blocks.num_used_blocks == 0 and core.decode_blocks.num_used_blocks == 0
