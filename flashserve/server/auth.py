"""Bearer-token check for the protected routes (a pure ASGI middleware, so streaming is untouched)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from flashserve.server.errors import error_response


class APIKeyMiddleware:
    """Answer 401 on routes under any of ``protected`` unless ``Authorization: Bearer <api_key>`` is sent."""

    def __init__(self, app: ASGIApp, api_key: str, protected: tuple[str, ...] = ("/v1",)) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and scope["path"].startswith(self.protected):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(header.strip(), self.expected):
                response = error_response(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
