"""Every failure as an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}.

OpenAI's clients read `error.message` and the status code; vLLM and llama-server answer in the
same shape, so a script written against either sees the errors it expects.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from edge_llm.errors import EdgeLLMError, OverloadedError
from edge_llm.server.jsonio import JSONResponse

log = logging.getLogger(__name__)
# Seconds a client should wait before retrying a 503; short, since slots free up within a generation.
RETRY_AFTER_SECONDS = 2

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; nothing is sent back."""


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | int | None = None, headers: dict | None = None) -> JSONResponse:
    type = type or _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, type=type, param=param, code=code), status_code=status,
                        headers=headers)


def edge_error_response(exc: EdgeLLMError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(exc, OverloadedError) else None
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, like SamplingParams' errors."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if first.get("type") == "missing" and param is None:
        return "the request needs a JSON body", None
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return (f"invalid {param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeLLMError)
    async def _edge(request: Request, exc: EdgeLLMError) -> JSONResponse:
        return edge_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI and vLLM answer a malformed body with 400, not FastAPI's 422.
        message, param = validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")
