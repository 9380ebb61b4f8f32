"""AsyncLLMEngine in process on the real SmolLM2: streams, errors, abort, admission by sequences,
bounded delta streams, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from flashserve.engine.async_engine import AsyncLLMEngine, EngineOverloaded, EngineShutdown, StreamOverflow
from flashserve.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def llm():
    from flashserve.engine.llm import LLM

    return LLM(max_model_len=512, kv_cache_bytes=50_000_000, max_num_seqs=2, verbose=False)


@pytest.fixture
def engine(llm):
    eng = AsyncLLMEngine(llm.engine, max_pending=1)
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive()


def test_stream_matches_offline_greedy(llm, engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def main() -> tuple[str, str]:
        deltas, text = [], ""
        async for out in engine.generate("a", "The capital of France is", params):
            deltas.append(out.outputs[0].text_delta)
            text = out.outputs[0].text
        assert out.finished and out.outputs[0].finish_reason == "length"
        return "".join(deltas), text

    streamed, final = asyncio.run(main())
    engine.shutdown()  # the offline LLM must not run while the engine thread owns the engine
    assert streamed == final == llm.generate("The capital of France is", params, use_tqdm=False)[0].text


def test_errors_abort_and_admission(engine):
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main() -> None:
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad", "", SamplingParams(max_tokens=4))
        gens = [engine.generate(f"r{i}", "Once upon a time", long) for i in range(3)]  # 2 running + 1 pending
        firsts = [await g.__anext__() for g in gens[:2]]
        assert all(not f.finished for f in firsts)
        third = asyncio.ensure_future(gens[2].__anext__())
        await asyncio.sleep(0.2)
        with pytest.raises(EngineOverloaded) as e:
            await engine.add_request("r3", "Once upon a time", long)
        assert e.value.retry_after > 0
        assert engine.num_in_flight == 3
        for g in gens[:2]:
            await g.aclose()  # leaving a stream early aborts it
        await third
        await gens[2].aclose()
        for _ in range(100):
            stats = engine.stats()
            if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
        assert engine.num_in_flight == 0
        assert await engine.abort("r0") is False

    asyncio.run(main())


def test_shutdown_aborts_in_flight_and_refuses_new(engine):
    async def main() -> None:
        gen = engine.generate("s", "Hello", SamplingParams(max_tokens=400, ignore_eos=True))
        await gen.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineShutdown):
            async for _ in gen:
                pass
        with pytest.raises(EngineShutdown):
            await engine.add_request("t", "Hello", SamplingParams(max_tokens=2))

    asyncio.run(main())
    assert engine.engine.stats().kv_blocks_used == 0


def test_admission_counts_sequences_not_requests(llm):
    eng = AsyncLLMEngine(llm.engine, max_pending=1)  # 2 running + 1 pending = 3 sequences
    params = SamplingParams(max_tokens=200, temperature=0.8, seed=1, ignore_eos=True)

    async def main() -> None:
        with pytest.raises(ValueError, match=r"n: the request needs 4 sequences .* at most 3 in flight"):
            eng.check_capacity(4)
        gen = eng.generate("three", "Once upon a time", SamplingParams(n=3, max_tokens=200, ignore_eos=True))
        first = await gen.__anext__()
        assert len(first.outputs) == 3 and eng.num_seqs_in_flight == 3 and eng.num_in_flight == 1
        with pytest.raises(EngineOverloaded, match="3 sequences in flight, 1 more asked for, at most 3"):
            await eng.add_request("one", "Hi", params)
        await gen.aclose()
        assert eng.num_seqs_in_flight == 0
        eng.check_capacity(3)

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_unread_stream_holds_deltas_then_is_dropped(llm):
    eng = AsyncLLMEngine(llm.engine, max_pending=1, max_stream_buffer=4)

    async def main() -> None:
        stream = await eng.add_request("slow", "Once upon a time", SamplingParams(max_tokens=300, temperature=0,
                                                                                   ignore_eos=True))
        await asyncio.wait_for(stream.dropped.wait(), 120)  # nobody reads: the buffer fills, the request is aborted
        buffered = list(stream.items)
        assert len(buffered) == 5 and isinstance(buffered[-1], StreamOverflow)
        # The buffer holds each step's new tokens only, not growing copies of the whole output.
        assert [len(o.outputs[0].token_ids) for o in buffered[:-1]] == [1, 1, 1, 1]
        assert all(o.outputs[0].text == "" and o.outputs[0].text_delta for o in buffered[:-1])
        for _ in range(100):
            if eng.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        assert eng.stats().kv_blocks_used == 0 and eng.stats().num_running == 0

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_iterate_rebuilds_cumulative_outputs_and_abort_all_ends_streams(llm):
    eng = AsyncLLMEngine(llm.engine, max_pending=1)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)

    async def main() -> None:
        outs = [out async for out in eng.generate("a", "The capital of France is", params)]
        final = outs[-1].outputs[0]
        assert final.text == "".join(o.outputs[0].text_delta for o in outs)
        assert len(final.token_ids) == len(final.logprobs) == 6
        gen = eng.generate("b", "Hello", SamplingParams(max_tokens=300, ignore_eos=True))
        await gen.__anext__()
        eng.abort_all("going away")
        with pytest.raises(EngineShutdown, match="going away"):
            async for _ in gen:
                pass

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_deltas_that_piled_up_come_as_one_output(llm):
    eng = AsyncLLMEngine(llm.engine, max_pending=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def main() -> list[tuple[int, int, str, str]]:
        stream = await eng.add_request("late", "The capital of France is", params)
        while len(stream.items) < 3:  # nobody reads yet: three steps' deltas wait in the buffer
            await asyncio.sleep(0.01)
        # (new tokens, tokens so far, text delta, text so far); the outputs share growing lists
        return [(c.num_new_tokens, len(c.token_ids), c.text_delta, c.text)
                async for out in eng.iterate("late", stream) for c in out.outputs]

    try:
        seen = asyncio.run(main())
    finally:
        eng.shutdown()
    assert seen[0][0] >= 3 and seen[0][1] == seen[0][0] and seen[0][2] == seen[0][3]
    assert len(seen) < 8 and sum(s[0] for s in seen) == seen[-1][1] == 8
    assert seen[-1][3] == "".join(s[2] for s in seen)
    assert seen[-1][3] == llm.generate("The capital of France is", params, use_tqdm=False)[0].text


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    """``LLMEngine.add_request(delta=True)`` (what AsyncLLMEngine asks for): each step's output
    holds only its new tokens, logprobs and text, and they add up to the outputs of the same
    request without ``delta``, step by step (n = 2 seeded samples, logprobs, a stop string)."""
    engine = llm.engine
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=14, logprobs=2, stop=[" soc"])

    def run(delta: bool) -> list[list[tuple]]:
        engine.add_request("d", "Once upon a time there", params, delta=delta)
        steps = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                steps.append([(c.index, c.text, list(c.token_ids), c.logprobs and list(c.logprobs), c.text_delta,
                               c.num_new_tokens, c.finish_reason) for c in out.outputs])
        return steps

    cumulative, deltas = run(False), run(True)
    assert len(cumulative) == len(deltas) > 2
    totals: dict[int, list] = {}
    for cum, dlt in zip(cumulative, deltas):
        for c, d in zip(cum, dlt):
            index, text, ids, lps, text_delta, num_new, reason = d
            assert text == "" and len(ids) == num_new and (lps is None or len(lps) == num_new)
            t = totals.setdefault(index, ["", [], []])
            t[0] += text_delta
            t[1] += ids
            t[2] += lps
            assert (c[0], c[1], c[2], c[3], c[4], c[5], c[6]) == (index, t[0], t[1], t[2], text_delta, num_new, reason)
    assert any(c[6] == "stop" for c in cumulative[-1])
