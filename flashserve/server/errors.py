"""OpenAI-style error bodies and the exception handlers that produce them.

Every error the server returns looks like ``{"error": {"message", "type", "param", "code"}}``.
Client mistakes get 4xx (400 for malformed JSON and wrong types too, instead of FastAPI's 422);
only a server-side failure gets a 5xx.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("flashserve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
# Request fields whose name (or dotted path, e.g. messages.0.content) may start a ValueError message.
_FIELDS = re.compile(
    r"^((?:n|temperature|top_p|top_k|min_p|presence_penalty|frequency_penalty|repetition_penalty|seed|"
    r"max_tokens|max_completion_tokens|min_tokens|logprobs|top_logprobs|stop|stop_token_ids|prompt|messages|"
    r"logit_bias|response_format|tools|tool_choice|stream_options|best_of|echo|suffix|functions|function_call|"
    r"audio|prediction|web_search_options|modalities|structured_output)(?:\.\w+)*)\b"
)


class APIError(Exception):
    """Raised by handlers; turned into an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bad_request(error: ValueError) -> APIError:
    """A 400 for a ValueError raised by validation; ``param`` is the field the message names."""
    message = str(error)
    m = _FIELDS.match(message)
    param = m.group(1) if m else ("prompt" if "prompt" in message else None)
    return APIError(400, message, param=param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # Drop pydantic's union-member tags (e.g. "str", "list[int]") from the location.
    fields = [x for x in loc if not (x[:1].isalpha() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(fields) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    if param is None:
        return f"the request body is invalid: {msg}", None
    return f"invalid value for {param!r}: {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("flashserve: unhandled error", exc_info=exc)
        return error_response(500, f"internal server error: {type(exc).__name__}")
