"""A second server with an API key (from $FLASHSERVE_API_KEY), the key required on /metrics and
/openapi.json, and a tiny admission bound (4 sequences): 401 without the key, 429 + Retry-After
beyond the bound (counted in sequences: n counts) while /health keeps answering, 400 for a request
that can never fit, and a graceful SIGTERM that lets an in-flight stream finish, exits 0 and
leaves no orphan."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flashserve.server.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["--max-model-len", "512", "--kv-cache-bytes", str(50_000_000), "--max-num-seqs", "2",
                          "--max-pending", "2", "--shutdown-timeout", "30", "--metrics-require-key", "--enable-openapi",
                          "--log-level", "warning"],
                         env={"FLASHSERVE_API_KEY": KEY})
    with proc:
        yield proc


def test_api_key_required_on_v1_only(server):
    body = {"prompt": "Hi", "max_tokens": 2}
    assert httpx.get(server.url("/health")).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url("/v1/completions"), json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url("/v1/models"), headers=headers).status_code == 401
    assert httpx.post(server.url("/v1/completions"), json=body, headers=AUTH).status_code == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="nope", max_retries=0).models.list()


def test_metrics_and_openapi_need_the_key(server):
    for path in ("/metrics", "/openapi.json"):
        assert httpx.get(server.url(path)).status_code == 401
        assert httpx.get(server.url(path), headers=AUTH).status_code == 200
    assert "/v1/chat/completions" in httpx.get(server.url("/openapi.json"), headers=AUTH).json()["paths"]
    assert httpx.get(server.url("/"), timeout=10).status_code == 200  # the chat page itself is public


def test_admission_counts_sequences(server):
    body = {"prompt": "Count to ten:", "max_tokens": 200, "temperature": 0.5, "ignore_eos": True, "stream": True, "n": 3}
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                if release.is_set():
                    return  # leaving aborts the request

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(60)
    try:
        r = httpx.post(server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 2, "n": 2}, headers=AUTH)
        assert r.status_code == 429, r.text
        assert "3 sequences in flight, 2 more asked for, at most 4" in r.json()["error"]["message"]
        r = httpx.post(server.url("/v1/completions"), json={"prompt": ["a", "b", "c"], "max_tokens": 2, "n": 2}, headers=AUTH)
        assert r.status_code == 400 and "needs 6 sequences" in r.json()["error"]["message"]  # never fits: not 429
    finally:
        release.set()
        holder.join(60)


def rejected(server) -> float:
    text = httpx.get(server.url("/metrics"), headers=AUTH).text
    return float(re.search(r"^flashserve_requests_rejected_total (\S+)$", text, re.M).group(1))


def test_overload_gets_429_and_health_still_answers(server):
    body = {"prompt": "Count to ten:", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    before = rejected(server)

    async def main() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as http:
            tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(10)]
            await asyncio.sleep(0.5)
            health = [(await http.get("/health")).status_code for _ in range(3)]
            return list(await asyncio.gather(*tasks)), health

    responses, health = asyncio.run(main())
    assert health == [200, 200, 200]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 4 and codes.count(429) == 6, codes  # 2 running + 2 waiting admitted
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    assert rejected(server) == before + 6
    # Once the load is gone, requests are accepted again.
    assert httpx.post(server.url("/v1/completions"), json={**body, "max_tokens": 2}, headers=AUTH).status_code == 200


def test_sigterm_finishes_in_flight_stream_and_exits_0(server):
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    lines: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
    t0 = time.monotonic()
    code = server.stop(timeout=60)
    reader.join(60)
    assert code == 0, server.read_log()[-3000:]
    assert server.orphans() == []
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in lines[-2]
    assert time.monotonic() - t0 < 60
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/health"), timeout=2)
