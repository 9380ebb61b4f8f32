"""Server options of this feature, in process on a tiny model: beam search through
/v1/completions (``use_beam_search``, ``n`` beams, the same hypotheses and text as ``LLM.beam_search``),
per-request ``num_speculative_tokens``, and the speculative-decoding counters in /metrics."""

import asyncio

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest_models import copy_smollm2_tokenizer, make_tiny_checkpoint  # noqa: E402
from flashserve import LLM, BeamSearchParams  # noqa: E402


def test_beam_search_and_spec_metrics_over_http(tmp_path):
    from flashserve.engine.async_engine import AsyncLLMEngine
    from flashserve.server.app import build_app

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=3, vocab_size=49152)
    copy_smollm2_tokenizer(tmp_path)  # so the hypotheses have text
    kw = dict(device="cpu", block_size=4, max_model_len=96, kv_cache_bytes=1 << 22, verbose=False)
    prompt = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8]
    ref = LLM(model=str(tmp_path), **kw).beam_search([prompt], BeamSearchParams(3, 10), use_tqdm=False)[0]
    llm = LLM(model=str(tmp_path), **kw, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                             "disable_by_cost": False})
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(engine, "tiny")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            beams = await c.post("/v1/completions", json={"prompt": prompt, "n": 3, "use_beam_search": True,
                                                          "max_tokens": 10})
            plain = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0})
            off = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 32, "temperature": 0,
                                                        "num_speculative_tokens": 0})
            streamed = await c.post("/v1/completions", json={"prompt": prompt, "n": 2, "use_beam_search": True,
                                                             "stream": True})
            metrics = await c.get("/metrics")
        return beams, plain, off, streamed, metrics

    try:
        beams, plain, off, streamed, metrics = asyncio.run(go())
    finally:
        engine.shutdown()
    assert beams.status_code == 200, beams.text
    body = beams.json()
    assert len(body["choices"]) == 3
    assert body["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in ref.outputs)
    assert [c["finish_reason"] for c in body["choices"]] == [c.finish_reason for c in ref.outputs]
    assert [c["text"] for c in body["choices"]] == [c.text for c in ref.outputs]
    assert all(c.text for c in ref.outputs)
    assert plain.status_code == 200 and off.status_code == 200
    assert streamed.status_code == 400 and "does not stream" in streamed.text
    text = metrics.text
    assert 'flashserve_spec_decode_acceptance_length{method="ngram"}' in text
    steps = float(text.split('flashserve_spec_decode_num_steps_total{method="ngram"} ')[1].split()[0])
    assert steps > 0
