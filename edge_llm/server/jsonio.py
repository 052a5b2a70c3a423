"""JSON out, safe for any text a model or a client can produce.

A JSON string may carry a lone surrogate ("\\ud800"); Python keeps it, UTF-8 cannot encode it,
and starlette's JSONResponse would fail with a 500. Such characters become "?" instead.
NaN and infinities are refused by the JSON spec; they never reach here (logprobs are clamped).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", errors="replace").decode("utf-8")


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


async def json_response(build: Callable[[], Any]) -> JSONResponse:
    """`build()` and its JSON encoding in a worker thread. A body can be large (logprobs of every
    token, embeddings, token pieces of a long text): built and encoded on the event loop, it would
    stall every other request for as long. Returned as a Response, FastAPI passes it on as is."""
    return await asyncio.to_thread(lambda: JSONResponse(build()))


class AssumeJSONMiddleware:
    """Every POST body here is JSON. vLLM and the FastAPI demos read it whatever the Content-Type
    says, and their documented `curl -d '{...}'` sends application/x-www-form-urlencoded: treat
    such bodies (and bodies without a type) as JSON so those commands work unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if not content_type or content_type.startswith(b"application/x-www-form-urlencoded"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
