"""The OpenAI-compatible server, end to end: a real ``flashserve serve`` process with SmolLM2.

One server per module; the official ``openai`` client for the happy paths, raw httpx for bad
input, disconnects and metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flashserve.server.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_MODEL_LEN = 1024
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is"]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-bytes", str(200_000_000),
                          "--max-num-seqs", "64", "--max-pending", "64", "--log-level", "warning"])
    with proc:
        yield proc
    assert proc.returncode == 0, proc.read_log()[-3000:]
    assert proc.orphans() == []


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    m = re.search(rf"^flashserve_{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_kv_free(server: ServerProcess, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    used = metric(server, "kv_cache_blocks_used")
    while used and time.monotonic() < deadline:
        time.sleep(0.1)
        used = metric(server, "kv_cache_blocks_used")
    return used


def test_health_and_models(server, client, model):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    assert model == "SmolLM2-135M-Instruct"
    assert client.models.retrieve(model).id == model
    card = httpx.get(server.url(f"/v1/models/{model}")).json()
    assert card["max_model_len"] == MAX_MODEL_LEN and card["vocab_size"] == 49152


def test_server_is_ready_before_it_listens(server):
    # The warm-up (GPU: Triton compiles; CPU: nothing to compile) runs before the port opens, so
    # its line is in the log once /health answers, and nothing is left in the KV pool.
    log = server.read_log()
    ready = r"flashserve: (warmed up in \d+\.\ds \(Triton cache was (cold|warm)\)|nothing to compile on cpu); serving"
    assert re.search(ready, log), log[-2000:]
    assert wait_kv_free(server) == 0


def test_completion_stream_equals_non_stream_and_usage(client, model):
    full = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].text
    assert finish == "length"
    assert usage is not None and usage.model_dump() == full.usage.model_dump()


def test_chat_stream_equals_non_stream(client, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    assert 0 < full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 10  # system + user + template
    pieces, roles, usage = [], [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            pieces.append(c.delta.content or "")
    assert roles == ["assistant"]
    assert "".join(pieces) == text
    assert usage.model_dump() == full.usage.model_dump()


def test_stop_strings(client, model):
    base = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 4, base
    stop = words[2]
    cut = base[: base.index(stop)]
    out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_seed_reproducible_with_temperature(client, model):
    def sample(seed: int) -> str:
        return client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    a, b = sample(1234), sample(1234)
    assert a == b
    assert len({a, sample(1), sample(2), sample(3)}) > 1
    chat = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a word."}],
                                           max_tokens=8, temperature=0.9, top_p=0.95, seed=7,
                                           extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1]


def test_n_and_logprobs(client, model):
    out = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=4, temperature=0.8, n=2, seed=3,
                                    logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 8
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert "".join(lp.tokens) == c.text
        assert all(len(t) <= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-5 for t in content)
    # Streamed logprobs add up to the same tokens.
    toks = []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                                temperature=0, logprobs=True, top_logprobs=1, stream=True):
        for c in chunk.choices:
            toks += [t.token for t in (c.logprobs.content if c.logprobs else [])]
    assert toks == [t.token for t in content]


TOO_LONG = "hello " * 1500

BAD_INPUTS = [
    # (path, body (dict or raw str), status, param or None, message fragment)
    ("/v1/completions", '{"prompt": "hi", ', 400, None, "JSON"),
    ("/v1/completions", "[1, 2]", 400, None, ""),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", ""),
    ("/v1/completions", {"prompt": "hi", "stream": "maybe"}, 400, "stream", ""),
    ("/v1/completions", {"prompt": "hi", "stop": [1, 2]}, 400, "stop", ""),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-17"}, 404, "model", "gpt-17"),
    ("/v1/completions", {"prompt": TOO_LONG, "max_tokens": 4}, 400, "prompt", str(MAX_MODEL_LEN)),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 4}, 400, None, "vocabulary"),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p", "min_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "n must"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty", "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", "echo"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "temperature": -2}, 400, "temperature", "temperature"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", ""),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes please"}, 400, "logprobs", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "prompt", str(MAX_MODEL_LEN)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope", "stream": True}, 404, "model", ""),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD_INPUTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}-{s}" for i, (p, _, s, *_rest) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_openai_error(server, path, body, status, param, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url(path), content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert fragment in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_errors_through_openai_client_and_unknown_route(server, client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    r = httpx.get(server.url("/v1/nothing-here"))
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url("/v1/completions"))
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url("/health")).status_code == 200


def test_64_concurrent_streams(server, client, model):
    reference = {p: client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS}
    aclient = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=180)

    async def one(i: int) -> tuple[str, str, str | None]:
        prompt = PROMPTS[i % len(PROMPTS)]
        text, finish = [], None
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.text)
                finish = c.finish_reason or finish
        return prompt, "".join(text), finish

    async def main() -> list[tuple[str, str, str | None]]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 240)
        finally:
            await aclient.close()

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == 64
    assert all(finish == "length" for _, _, finish in results)
    mismatches = [(p, t) for p, t, _ in results if t != reference[p]]
    assert not mismatches, f"{len(mismatches)} of 64 differ from the unbatched greedy output: {mismatches[:3]}"
    assert wait_kv_free(server) == 0
    print(f"64 concurrent streams of 8 tokens in {elapsed:.1f}s")


def test_disconnect_mid_stream_frees_kv(server, model):
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url("/v1/completions"), json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept referenced: dropping the iterator would close the connection
            data = [line for line, _ in zip(filter(lambda x: x.startswith("data: "), lines), range(3))]
            assert len(data) == 3
            assert metric(server, "kv_cache_blocks_used") > 0
            assert metric(server, "num_requests_running") == 1
    assert wait_kv_free(server) == 0
    assert metric(server, "num_requests_running") == 0


def test_disconnect_non_streaming_frees_kv(server, model):
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        # Well under the time 900 tokens take even on a GPU, so the client always leaves mid-request.
        httpx.post(server.url("/v1/completions"), json=body, timeout=httpx.Timeout(10, read=0.5))
    assert wait_kv_free(server) == 0
    assert metric(server, "num_requests_in_flight") == 0


def test_metrics_exposition(server, client, model):
    # What it reads is made here (pytest-xdist may give this test a server of its own): one
    # finished request, and one stream the client leaves after its first chunk (an abort).
    done = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url("/v1/completions"), json=body) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    assert wait_kv_free(server) == 0
    text = httpx.get(server.url("/metrics")).text
    assert httpx.get(server.url("/metrics")).headers["content-type"].startswith("text/plain; version=")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "kv_cache_blocks_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total"):
        assert re.search(rf"^flashserve_{name} \d", text, re.M), name
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert f"# TYPE flashserve_{hist} histogram" in text
        count = float(re.search(rf"^flashserve_{hist}_count (\S+)$", text, re.M).group(1))
        assert count > 0, hist
        assert f'flashserve_{hist}_bucket{{le="+Inf"}} {count}' in text
    assert metric(server, "kv_cache_blocks_total") > 0
    assert metric(server, "generation_tokens_total") >= done.usage.completion_tokens == 8
    assert float(re.search(r'^flashserve_request_success_total\{finished_reason="abort"\} (\S+)$', text, re.M).group(1)) >= 1


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 24},
        "likes": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 2},
    },
    "required": ["name", "age", "city", "likes"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Quito", "Perth", "Cairo", "Seoul", "Dakar"]


def check_person(value: object) -> None:
    """PERSON's constraints, checked by hand."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "city", "likes"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 24
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 150
    assert isinstance(value["city"], str) and len(value["city"]) <= 24
    assert isinstance(value["likes"], list) and len(value["likes"]) <= 2
    assert all(isinstance(x, str) and len(x) <= 16 for x in value["likes"])


def test_json_schema_output_parses_and_validates_on_20_prompts(server, model):
    aclient = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=240)
    prompts = [f"Invent a person who lives in {city}. Answer in JSON." for city in CITIES] + [
        f"Describe a {job} as a JSON object." for job in ("baker", "pilot", "nurse", "poet", "farmer", "judge", "chef",
                                                          "diver", "miner", "tailor")]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def one(prompt: str) -> tuple[str, str]:
        r = await aclient.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=120, temperature=0.7, seed=1, response_format=response_format)
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def main() -> list[tuple[str, str]]:
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 20
    for text, finish in results:
        assert finish == "stop", text
        check_person(json.loads(text))
    # json_object mode and streaming give an object too.
    pieces = []
    for chunk in openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Give me a JSON object about cats."}], max_tokens=120,
            temperature=0, stream=True, response_format={"type": "json_object"},
            extra_body={"logit_bias": {"90": -5}}):
        pieces += [c.delta.content or "" for c in chunk.choices]
    text = "".join(pieces)
    if text.endswith("}"):  # a free-form object may not close within 120 tokens; when it does, it parses
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 30},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_tool_calls_come_back_in_openai_format(client, model):
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
        else:
            assert call.function.name == "get_time" and set(args) == {"zone"}
    named = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=60, temperature=0)
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
    # Streamed: the call arrives whole in one delta, then finish_reason "tool_calls".
    deltas, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], stream=True,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                max_tokens=60, temperature=0):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert set(json.loads(deltas[0].function.arguments)) == {"city", "unit"}
    # The conversation goes on with the tool's answer.
    follow = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        *messages, {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls[:1]]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}])
    assert follow.choices[0].message.content


def test_logit_bias_changes_the_greedy_choice(client, model):
    def first_token(bias: dict[str, float] | None) -> tuple[str, int]:
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=1, temperature=0, logprobs=1,
                                      logit_bias=bias)
        return r.choices[0].text, r.choices[0].logprobs.tokens[0]

    from flashserve.loader import default_model_path, load_tokenizer

    tok = load_tokenizer(default_model_path(), "auto")
    top, _ = first_token(None)
    top_id = tok.encode(top, add_special_tokens=False)[0]
    banned, _ = first_token({str(top_id): -100})
    assert banned != top
    forced_id = tok.encode(" zebra", add_special_tokens=False)[0]
    forced, _ = first_token({str(forced_id): 100})
    assert forced == tok.decode([forced_id])


def test_request_id_is_echoed(server):
    r = httpx.get(server.url("/v1/models"), headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "hi", "n": 0}, headers={"X-Request-Id": "bad id!"})
    assert r.status_code == 400 and len(r.headers["x-request-id"]) == 32  # not echoed as given: a fresh one
    assert httpx.get(server.url("/openapi.json")).status_code == 404  # off unless --enable-openapi


def test_chat_page_streams_and_stop_aborts_in_chromium(server, tmp_path):
    """GET / in a real headless Chromium: type, see tokens stream, stop, see the abort in /metrics."""
    from flashserve.server.testing import HeadlessChromium

    page = httpx.get(server.url("/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no third-party resources
    try:
        browser = HeadlessChromium()
    except FileNotFoundError:
        pytest.skip("chromium is not installed")

    def aborted() -> float:
        text = httpx.get(server.url("/metrics")).text
        return float(re.search(r'^flashserve_request_success_total\{finished_reason="abort"\} (\S+)$', text, re.M).group(1))

    with browser:
        browser.navigate(server.url("/"))
        browser.wait_for("document.getElementById('model').textContent.includes('SmolLM2')")
        browser.evaluate("document.getElementById('temperature').value = '0'; document.getElementById('max_tokens').value = '24'")
        browser.evaluate("document.getElementById('input').focus()")
        browser.type_text("Name three colours.")
        browser.evaluate("document.getElementById('send').click()")
        browser.wait_for("document.querySelector('.msg.assistant')?.dataset.state === 'done'", timeout=120)
        first = browser.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
        assert first and first == client_reply(server, "Name three colours.", 24)
        before = aborted()
        browser.evaluate("document.getElementById('max_tokens').value = '600'")
        browser.evaluate("document.getElementById('input').focus()")
        browser.type_text("Write a long story about a dragon who learns to cook.")
        browser.evaluate("document.getElementById('send').click()")
        browser.wait_for("document.querySelectorAll('.msg.assistant')[1]?.textContent.length > 80", timeout=120)
        assert browser.evaluate("document.getElementById('stop').disabled") is False
        shot = os.environ.get("FLASHSERVE_SCREENSHOT") or str(tmp_path / "chat.png")
        browser.screenshot(shot)
        browser.evaluate("document.getElementById('stop').click()")
        browser.wait_for("document.querySelectorAll('.msg.assistant')[1].dataset.state === 'stopped'")
        deadline = time.monotonic() + 10
        while aborted() < before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert aborted() == before + 1
        assert wait_kv_free(server) == 0
        assert browser.evaluate("document.getElementById('send').disabled") is False
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def client_reply(server: ServerProcess, content: str, max_tokens: int) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, "top_p": 1}
    return httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60).json()["choices"][0]["message"]["content"]
