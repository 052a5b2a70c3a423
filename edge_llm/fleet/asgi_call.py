"""One HTTP request run through an ASGI app in this process, its answer streamed back as it comes.

A Ray Serve replica hosts the whole edge-llm app (every API, auth, limits, streaming, drains) and
receives requests as method calls from the ingress, not as HTTP. `call_app` plays the HTTP server's
part: it hands the app the request and yields the response start (status and headers) and then
each body chunk as the app sends it, so a token stream stays a stream across the hop. When the
caller stops reading (the client left, or Serve cancelled the call), the app is told the client
disconnected, so the engine frees the slot at once, as it does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# After the reader left, how long the app has to notice the disconnect and end on its own before its
# task is cancelled (an app stuck past this is a bug; cancelling is the backstop).
APP_EXIT_SECONDS = 5.0


@dataclass
class HTTPRequest:
    """What the ingress passes to a replica: plain data, picklable."""

    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)
    server: tuple[str, int] = ("127.0.0.1", 8080)


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[str, str]]


def _scope(request: HTTPRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.path.encode("utf-8"), "query_string": request.query.encode("latin-1"),
        "root_path": "", "client": request.client, "server": request.server, "state": {},
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
    }


async def call_app(app: Any, request: HTTPRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Yields one ResponseStart, then the body's chunks (none empty), until the app is done."""
    sent: asyncio.Queue[dict] = asyncio.Queue()
    left = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(_scope(request), receive, send))
    try:
        while True:
            message = await _next_message(sent, task)
            if message is None:
                return
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ResponseStart(message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        left.set()  # the reader is gone (or the answer is complete): the app sees a disconnect
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=APP_EXIT_SECONDS)
            task.cancel()


async def _next_message(sent: asyncio.Queue[dict], task: asyncio.Task) -> dict | None:
    """The app's next message; None once the app returned without sending more. An app that
    raised re-raises here (an exception escaping an app is a bug: the caller answers 500)."""
    if not sent.empty():
        return sent.get_nowait()
    getter = asyncio.ensure_future(sent.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    task.result()
    return sent.get_nowait() if not sent.empty() else None
