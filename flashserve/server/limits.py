"""Connection- and request-level protections that sit in front of the routes.

``RequestGuard`` (an ASGI middleware) gives every request an id (the client's ``X-Request-Id``
when it is sane, else a fresh one), echoes it in the response headers and in the log, and reads
the body up front under two limits: ``max_body_bytes`` (413; a ``Content-Length`` above it is
refused before a byte is read) and ``body_timeout`` seconds for the whole body (408, against
clients that trickle it). A request with both ``Transfer-Encoding`` and ``Content-Length`` is
refused (400): the two disagreeing is how request smuggling works.

``guarded_protocol`` is uvicorn's h11 protocol with a deadline for the request head: uvicorn has
none (only a keep-alive timeout that any byte resets), so a client sending its headers one byte
at a time (slowloris) would hold a connection forever. It can also cap each connection's kernel
send buffer (``SO_SNDBUF``), which otherwise grows to megabytes for a client that stops reading
(and hides that client from the server's own backpressure for as long), and it offers the app a
way to reset a connection (``ABORT_EXTENSION`` in the scope's extensions): a graceful close
would wait forever to flush data to a client that never reads. For streamed bodies it offers
``BODY_EXTENSION``: an awaitable writer of one body piece straight to the connection (framed as
h11 frames it: chunked for HTTP/1.1, raw for 1.0, with the same flow control as uvicorn's
``send``), which skips the middlewares' send wrappers and h11's event machinery for each token of
a stream; the response's start and its end still go through ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashserve.server.errors import error_response

logger = logging.getLogger("flashserve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ABORT_EXTENSION = "flashserve.abort_connection"  # scope["extensions"][...]: a callable resetting the connection
BODY_EXTENSION = "flashserve.write_body"  # scope["extensions"][...]: async (bytes) -> None, a started response's body


def request_id_of(scope: Scope) -> str:
    """The id ``RequestGuard`` gave this request ("-" outside one)."""
    return str((scope.get("state") or {}).get("request_id", "-"))


class RequestGuard:
    """Request ids, body-size and body-time limits, and the Transfer-Encoding/Content-Length check."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.lower(), value)
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.monotonic()
        status_seen: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                status_seen.append(message["status"])
                if message["status"] >= 400:
                    logger.info("request %s: %s %s -> %d", rid, scope.get("method"), scope.get("path"), message["status"])
            await send(message)

        async def refuse(status: int, message: str, close: bool = True) -> None:
            extra = {"Connection": "close"} if close else None
            await error_response(status, message, headers=extra)(scope, receive, send_with_id)

        if b"transfer-encoding" in headers and b"content-length" in headers:
            await refuse(400, "a request may not carry both Transfer-Encoding and Content-Length")
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await refuse(400, "Content-Length is not a number")
                return
            if declared > self.max_body_bytes:
                await refuse(413, f"the request body has {declared} bytes; at most {self.max_body_bytes} are allowed")
                return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send_with_id)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except TimeoutError:
            await refuse(408, f"the request body did not arrive within {self.body_timeout:g} seconds")
            return
        except _TooLarge:
            await refuse(413, f"the request body exceeds {self.max_body_bytes} bytes")
            return
        except _Disconnected:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_with_id)
        finally:
            if status_seen and status_seen[0] >= 500:
                logger.warning("request %s failed after %.1fs", rid, time.monotonic() - started)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def guarded_protocol(timeout: float, send_buffer_bytes: int | None = None) -> type:
    """uvicorn's h11 protocol, closing connections whose request head takes over ``timeout`` s,
    with each socket's send buffer set to ``send_buffer_bytes`` when given."""
    import socket
    import struct

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("closing a connection from %s: no complete request head within %gs", self.client, timeout)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if send_buffer_bytes is not None and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.scope is not None and self.transport is not None:  # the request just parsed, if any
                extensions = self.scope.setdefault("extensions", {})
                extensions[ABORT_EXTENSION] = self._reset
                if self.cycle is not None and self.cycle.scope is self.scope and self.scope["method"] != "HEAD":
                    extensions[BODY_EXTENSION] = self._body_writer(self.cycle)

        def _body_writer(self, cycle: Any) -> Any:
            """What uvicorn's ``send`` does for a body message with more to come, minus the
            h11 event: wait while the transport is paused, drop the data once the client is
            gone, frame it as the response's chunked (HTTP/1.1) or close-delimited (1.0) body
            (an empty piece writes nothing: an empty chunk would end a chunked body)."""
            transport = self.transport
            chunked = self.conn.their_http_version is not None and self.conn.their_http_version >= b"1.1"

            async def write(data: bytes) -> None:
                if cycle.flow.write_paused and not cycle.disconnected:
                    await cycle.flow.drain()
                if cycle.disconnected or not data:
                    return
                if not cycle.response_started or cycle.response_complete:
                    raise RuntimeError("a body piece is written only between the response's start and its end")
                transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

            return write

        def _reset(self) -> None:
            """Close with a TCP reset: a plain close would queue the FIN behind data that a client
            which stopped reading never takes, keeping the socket and its buffers alive."""
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on a kept-alive connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
