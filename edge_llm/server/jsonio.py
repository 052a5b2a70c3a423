"""JSON out, safe for any text a model or a client can produce.

A JSON string may carry a lone surrogate ("\\ud800"); Python keeps it, UTF-8 cannot encode it,
and starlette's JSONResponse would fail with a 500. Such characters become "?" instead.
NaN and infinities are refused by the JSON spec; they never reach here (logprobs are clamped).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send


def dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", errors="replace").decode("utf-8")


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


# Elements per call of the C encoder when a large body is encoded a slice at a time, and the size
# of the pieces a large body is sent in.
SLICE = 256
SEND_CHUNK = 256 * 1024


class RawJSON(list):
    """Pieces of text that are already JSON, written by encode_in_slices one after another as they are."""


def encode_in_slices(value: Any) -> list[bytes]:
    """The bytes JSONResponse would send, as a list of pieces, none of them large.

    json.dumps holds the GIL for its whole call, and so does copying a large string: one call on a
    50 MB body (the token pieces of a 7 MB text), or joining it into one, stalls the event loop's
    thread for a large part of a second even when it runs in a worker thread."""
    parts: list[bytes] = []

    def add(text: str) -> None:
        parts.append(text.encode("utf-8", errors="replace"))

    def encode(node: Any) -> None:
        if isinstance(node, RawJSON):
            for piece in node:
                add(piece)
        elif isinstance(node, dict):
            parts.append(b"{")
            for i, (key, item) in enumerate(node.items()):
                add(("," if i else "") + dumps(key if isinstance(key, str) else dumps(key)) + ":")
                encode(item)
            parts.append(b"}")
        elif isinstance(node, list) and len(node) > SLICE:
            parts.append(b"[")
            for start in range(0, len(node), SLICE):
                add(("," if start else "") + dumps(node[start:start + SLICE])[1:-1])
            parts.append(b"]")
        elif isinstance(node, list) and any(isinstance(item, (dict, list)) for item in node):
            parts.append(b"[")
            for i, item in enumerate(node):
                if i:
                    parts.append(b",")
                encode(item)
            parts.append(b"]")
        else:
            add(dumps(node))

    encode(value)
    return parts


async def json_response(build: Callable[[], Any]) -> Response:
    """`build()` and its JSON encoding in a worker thread. A body can be large (logprobs of every
    token, embeddings, token pieces of a long text): built and encoded on the event loop, it would
    stall every other request for as long. Returned as a Response, FastAPI passes it on as is.

    A large body is sent in pieces of about SEND_CHUNK bytes: handed over whole, the server would
    copy all of it into the socket's send buffer on the event loop (0.7 s for 86 MB)."""
    parts = await asyncio.to_thread(lambda: encode_in_slices(build()))
    size = sum(len(part) for part in parts)
    if size <= SEND_CHUNK:
        return Response(b"".join(parts), media_type="application/json")

    async def pieces() -> AsyncIterator[bytes]:
        group: list[bytes] = []
        grouped = 0
        for part in parts:
            group.append(part)
            grouped += len(part)
            if grouped >= SEND_CHUNK:
                yield b"".join(group)
                group, grouped = [], 0
        if group:
            yield b"".join(group)

    return StreamingResponse(pieces(), media_type="application/json", headers={"content-length": str(size)})


# Where AssumeJSONMiddleware leaves the Content-Type a request declared, for the error that names it.
DECLARED_CONTENT_TYPE = "edge_llm.declared_content_type"


class AssumeJSONMiddleware:
    """Every POST body here is JSON, and is read as JSON whatever its Content-Type says, as
    llama-server, vLLM and the FastAPI demos do: their documented `curl -d '{...}'` sends
    application/x-www-form-urlencoded, and litellm's async Ollama calls send application/octet-stream
    or text/plain. The declared type is kept in the scope, so a body that is not JSON gets a 400 that
    names it (errors.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")],
                     DECLARED_CONTENT_TYPE: content_type.decode("latin-1")}
        await self.app(scope, receive, send)
