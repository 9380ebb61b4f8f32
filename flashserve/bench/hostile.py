"""Hostile clients for ``flashserve bench serve --hostile``: requests that once hurt everyone else.

Each is an honest attack on the server's protections, run next to the well-behaved load:

- ``huge_body``: a 50 MB chat body (refused with 413 before it is read);
- ``huge_n``: a 100-byte request asking for n = 10^6 sequences (400);
- ``long_prompt``: a legitimate prompt of ``prompt_len`` token ids (prefilled in chunks);
- ``stalled_reader``: a stream whose client stops reading (dropped when its buffer fills).

Each returns a one-line outcome for the report; none raises.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit


def _address(base_url: str) -> tuple[str, int, str]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")


def _request(method: str, path: str, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    if "Content-Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _status(reader: asyncio.StreamReader, timeout: float) -> str:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, ConnectionError):
        return "no answer"
    return line.decode(errors="replace").strip() or "connection closed"


async def huge_body(base_url: str, auth: dict[str, str], size: int = 50 << 20, timeout: float = 60.0) -> str:
    host, port, root = _address(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.perf_counter()
    writer.write(_request("POST", f"{root}/chat/completions", host, {**auth, "Content-Length": str(size)}))
    status = asyncio.ensure_future(_status(reader, timeout))
    await asyncio.wait({status}, timeout=1.0)  # a server may refuse on the length alone: read that first
    chunk = b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20)
    sent = 0
    try:
        while sent < size and not status.done():
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        pass
    answer = await status
    writer.close()
    return f"50 MB body: {answer} after {time.perf_counter() - t0:.2f}s ({sent >> 20} MB sent)"


async def huge_n(client: Any, base_url: str, model: str) -> str:
    t0 = time.perf_counter()
    r = await client.post(f"{base_url}/completions", json={"model": model, "prompt": "hi", "n": 10**6, "max_tokens": 1})
    return f"n=10^6: HTTP {r.status_code} after {time.perf_counter() - t0:.2f}s"


async def long_prompt(client: Any, base_url: str, model: str, prompt_len: int) -> str:
    ids = [(i * 7919) % 30000 + 100 for i in range(prompt_len)]
    t0 = time.perf_counter()
    r = await client.post(f"{base_url}/completions", json={"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0})
    return f"{prompt_len}-token prompt: HTTP {r.status_code} after {time.perf_counter() - t0:.1f}s"


async def stalled_reader(base_url: str, auth: dict[str, str], model: str, deadline_s: float) -> str:
    """Streams 8 choices with top-20 logprobs (big chunks) and never reads; reports whether the
    server dropped the connection (seen in the socket's TCP state, without reading) in time."""
    host, port, root = _address(base_url)
    body = json.dumps({"model": model, "prompt": "Tell me a long story.", "max_tokens": 100_000, "n": 8, "logprobs": 20,
                       "temperature": 1.0, "ignore_eos": True, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, _request("POST", f"{root}/completions", host, auth, body))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < deadline_s:
            await asyncio.sleep(0.25)
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state in _CLOSED_STATES:
                return f"stalled reader: dropped by the server after {time.perf_counter() - t0:.1f}s"
        return f"stalled reader: still connected after {deadline_s:.0f}s"
    finally:
        sock.close()


_CLOSED_STATES = (7, 8)  # Linux tcp_info.tcpi_state: TCP_CLOSE (reset), TCP_CLOSE_WAIT (FIN received)


async def run_all(client: Any, base_url: str, model: str, auth: dict[str, str], prompt_len: int,
                  duration_s: float) -> list[str]:
    """All four, concurrently; the stalled reader stops waiting after ``duration_s``."""
    jobs = [huge_body(base_url, auth), huge_n(client, base_url, model), long_prompt(client, base_url, model, prompt_len),
            stalled_reader(base_url, auth, model, duration_s)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    return [r if isinstance(r, str) else f"{type(r).__name__}: {r}" for r in results]
