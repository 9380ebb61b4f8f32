"""Shutdown endings of a real ``flashserve serve`` process: at --shutdown-timeout, a running stream
ends with an error event and [DONE] and a non-streaming request gets a JSON 503, then the process
exits 0; a second SIGTERM exits at once."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flashserve.server.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ARGS = ["--max-model-len", "1024", "--kv-cache-bytes", str(100_000_000), "--log-level", "warning"]
LONG = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "ignore_eos": True}


def in_flight(server: ServerProcess) -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("flashserve_num_requests_in_flight ")))


def test_timeout_ends_streams_with_an_error_event_and_requests_with_503():
    server = ServerProcess([*ARGS, "--shutdown-timeout", "2"]).start()
    lines: list[str] = []
    plain: list[httpx.Response] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.url("/v1/completions"), json={**LONG, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    started.set()

    def non_stream() -> None:
        plain.append(httpx.post(server.url("/v1/completions"), json=LONG, timeout=120))

    threads = [threading.Thread(target=stream), threading.Thread(target=non_stream)]
    for t in threads:
        t.start()
    assert started.wait(60)
    deadline = time.monotonic() + 30
    while in_flight(server) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    code = server.stop(timeout=60)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert code == 0, server.read_log()[-3000:]
    assert server.orphans() == []
    assert elapsed < 12, elapsed  # 2 s to finish, then the endings
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]
    assert all("error" not in json.loads(x[6:]) for x in lines[:-2])  # tokens streamed until then
    (response,) = plain
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "shutting_down"


def test_second_signal_exits_at_once():
    server = ServerProcess([*ARGS, "--shutdown-timeout", "120"]).start()
    started = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", server.url("/v1/completions"), json={**LONG, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass  # cut when the process exits

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert server.proc.poll() is None  # draining: the stream may run for up to 120 s
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(15)
    assert time.monotonic() - t0 < 5
    assert code == 128 + signal.SIGTERM
    reader.join(30)
    server.stop()
