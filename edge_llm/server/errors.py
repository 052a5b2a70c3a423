"""Every failure as an error body in the shape of the API the client called.

One mechanism for every API: an error is built as (status, message, type, param, code) and
rendered when it is sent, by the shape its request path belongs to (ERROR_SHAPES):
  - OpenAI (the default): {"error": {"message", "type", "param", "code"}}; vLLM and llama-server
    answer in the same shape, so a script written against either sees the errors it expects;
  - Anthropic (/v1/messages): {"type": "error", "error": {"type", "message"}};
  - Ollama (/api/): {"error": "message"}.
So middleware (API key, body limit) and exception handlers need not know which API they refuse.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edge_llm.errors import EdgeLLMError, OverloadedError
from edge_llm.server.jsonio import DECLARED_CONTENT_TYPE, dumps

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


def stream_error(exc: EdgeLLMError) -> str:
    """An error after an OpenAI-shaped stream began: one last event with the error body (as vLLM
    sends), then the stream ends; the status line was sent long before."""
    return dumps(error_body(exc.message, type=exc.type, param=exc.param, code=exc.code))


# Anthropic's error types by status (its SDK maps the status to an exception class; the type is
# what its docs and agents show).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str, **_: object) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def ollama_error_body(status: int, message: str, **_: object) -> dict:
    return {"error": message}


def openai_error_body(status: int, message: str, *, type: str | None = None, param: str | None = None,
                      code: str | int | None = None) -> dict:
    type = type or _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return error_body(message, type=type, param=param, code=code)


# Request path prefix -> the error shape of that API; anything else answers as OpenAI does.
ERROR_SHAPES = (("/v1/messages", anthropic_error_body), ("/api/", ollama_error_body))


def error_shape(path: str):  # noqa: ANN201 - one of the *_error_body functions above
    return next((shape for prefix, shape in ERROR_SHAPES if path.startswith(prefix)), openai_error_body)


def shaped_error(path: str, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None) -> dict:
    return error_shape(path)(status, message, type=type, param=param, code=code)


def edge_error_body(path: str, exc: EdgeLLMError) -> dict:
    """An EdgeLLMError as the body the API at `path` uses (also inside streams)."""
    return shaped_error(path, exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


class ErrorResponse(Response):
    """A JSON error whose body takes its shape from the request path when it is sent."""

    media_type = "application/json"

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict | None = None) -> None:
        self.error = {"message": message, "type": type, "param": param, "code": code}
        super().__init__(b"", status_code=status, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.error
        body = shaped_error(scope.get("path", ""), self.status_code, error["message"], type=error["type"],
                            param=error["param"], code=error["code"])
        self.body = dumps(body).encode("utf-8")
        self.headers["content-length"] = str(len(self.body))
        await super().__call__(scope, receive, send)


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | int | None = None, headers: dict | None = None) -> ErrorResponse:
    return ErrorResponse(status, message, type=type, param=param, code=code, headers=headers)


def edge_error_response(exc: EdgeLLMError) -> ErrorResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(exc, OverloadedError) else None
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers)


def validation_message(exc: RequestValidationError, content_type: str | None = None) -> tuple[str, str | None]:
    """One line naming the first bad field, like SamplingParams' errors; `content_type`: what the
    request declared (every body is read as JSON whatever it says)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        declared = f"Content-Type {content_type}" if content_type else "no Content-Type"
        return (f"the request body is not valid JSON ({declared}; bodies are read as JSON whatever "
                f"the Content-Type): {first.get('ctx', {}).get('error', first['msg'])}"), None
    if first.get("type") == "missing" and param is None:
        return "the request needs a JSON body", None
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return (f"invalid {param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeLLMError)
    async def _edge(request: Request, exc: EdgeLLMError) -> Response:
        return edge_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # OpenAI and vLLM answer a malformed body with 400, not FastAPI's 422.
        message, param = validation_message(exc, request.scope.get(DECLARED_CONTENT_TYPE))
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")
