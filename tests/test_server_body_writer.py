"""The guarded protocol's body writer (``BODY_EXTENSION``): a streamed response written through it
has the bytes the ASGI ``send`` path gives (chunked for HTTP/1.1, close-delimited for 1.0), an
empty piece in the middle does not end the body, and behind a server without the extension the
response falls back to ``send``. A real uvicorn server in a thread, read over raw sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from flashserve.server.limits import BODY_EXTENSION, RequestGuard, guarded_protocol  # noqa: E402
from flashserve.server.streaming import SSEResponse  # noqa: E402
from flashserve.server.testing import free_port  # noqa: E402

PIECES = ["data: one\n\n", "", "data: \u00e9t\u00e9 two\n\n", b"data: three\n\n", "x" * 70000]
EXPECTED = b"".join(p if isinstance(p, bytes) else p.encode() for p in PIECES)


def _app(seen: list[bool]):
    async def inner(scope, receive, send):
        seen.append(BODY_EXTENSION in (scope.get("extensions") or {}))

        async def pieces():
            for p in PIECES:
                await asyncio.sleep(0)
                yield p

        await SSEResponse(pieces())(scope, receive, send)

    return RequestGuard(inner, max_body_bytes=1 << 20, body_timeout=10)


@pytest.fixture(params=["guarded", "h11"])
def served(request):
    seen: list[bool] = []
    port = free_port()
    http = guarded_protocol(10.0) if request.param == "guarded" else "h11"
    server = uvicorn.Server(uvicorn.Config(_app(seen), host="127.0.0.1", port=port, http=http, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started and time.monotonic() - t0 < 20:
        time.sleep(0.02)
    assert server.started
    yield request.param, port, seen
    server.should_exit = True
    thread.join(10)


def _exchange(port: int, version: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"POST /v1/completions HTTP/{version}\r\nHost: x\r\nContent-Length: 2\r\n"
                  "Connection: close\r\n\r\n{}".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            assert body == b"\r\n", "the body must end with the last chunk and nothing after it"
            return out
        out += body[:n]
        assert body[n:n + 2] == b"\r\n"
        body = body[n + 2:]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_streamed_body_bytes(served, version):
    kind, port, seen = served
    head, _, body = _exchange(port, version).partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/{version} 200".encode()) or head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head and b"x-request-id" in head.lower()
    if version == "1.1":
        assert b"transfer-encoding: chunked" in head.lower()
        assert _dechunk(body) == EXPECTED
    else:  # close-delimited
        assert b"transfer-encoding" not in head.lower()
        assert body == EXPECTED
    assert seen == [kind == "guarded"]
