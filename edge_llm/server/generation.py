"""One engine request as the HTTP routes use it: prompt checks against the context, the first
delta awaited before any byte is sent (so engine errors become proper status codes), metrics fed
on the way, and cancellation when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from edge_llm.engines.base import Delta, Engine, Usage, merge_delta
from edge_llm.errors import InvalidParameterError, OverloadedError
from edge_llm.sampling import SamplingParams
from edge_llm.server.errors import ClientDisconnected
from edge_llm.server.metrics import RequestObserver

T = TypeVar("T")
logger = logging.getLogger(__name__)
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
SEND_TIMEOUT_SECONDS = 120.0


def context_size(engine: Engine) -> int:
    """Tokens one request may hold (prompt + output): one slot's share of the context."""
    return engine.n_ctx_seq


def capped_max_tokens(engine: Engine, n_prompt: int, requested: int | None, *, param: str) -> int:
    """The output budget: the request's max_tokens, never more than what the context has left.
    A prompt that leaves no room is refused here, with OpenAI's error code."""
    engine.check_prompt_length(n_prompt, param=param)
    room = context_size(engine) - n_prompt
    if requested is None:
        return room
    if requested < 1:
        raise InvalidParameterError(f"max_tokens must be at least 1 (got {requested})", param="max_tokens")
    return min(requested, room)


class Generation:
    """Deltas of one engine request; closing it (or the client leaving) cancels the request.

    `closing` is the server's signal that its shutdown drain is over: a request still waiting for
    its first token is refused (503), and a running one ends at its next delta, each unfinished
    choice with a last delta of its own (finish_reason "length": cut at that point), so streams
    end on whole events and non-streamed answers are still sent."""

    def __init__(self, engine: Engine, tokens: list[int], params: SamplingParams,
                 observer: RequestObserver, closing: asyncio.Event | None = None) -> None:
        self.params = params
        self._closing = closing
        self.n_prompt = len(tokens)
        self._source = engine.generate(tokens, params)
        self._observer = observer
        self._first: Delta | None = None
        self._exhausted = False
        self._started = False  # admitted: only admitted requests count in /metrics
        self._closed = False

    async def start(self) -> None:
        """Submit and wait for the first delta; queueing and prompt errors are raised here."""
        try:
            self._first = await self._first_delta()
        except StopAsyncIteration:
            self._exhausted = True
        except BaseException:
            await self.aclose()
            raise
        self._started = True

    async def _first_delta(self) -> Delta:
        if self._closing is None:
            return await self._source.__anext__()
        first = asyncio.ensure_future(self._source.__anext__())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({first, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
        if first.cancelled():
            raise OverloadedError("the server is shutting down")
        return first.result()

    async def deltas(self) -> AsyncIterator[Delta]:
        finished: set[int] = set()
        generated = [0] * self.params.n

        def seen(delta: Delta) -> Delta:
            self._observer.see(delta)
            generated[delta.index] += len(delta.token_ids)
            if delta.finish_reason is not None:
                finished.add(delta.index)
            return delta

        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield seen(first)
            cut = False
            if not self._exhausted:
                async for delta in self._source:
                    yield seen(delta)
                    if self._closing is not None and self._closing.is_set() and len(finished) < self.params.n:
                        cut = True
                        break
            if cut:
                await self.aclose()
                for i in sorted(set(range(self.params.n)) - finished):
                    yield seen(Delta(index=i, finish_reason="length",
                                     usage=Usage(prompt_tokens=self.n_prompt, completion_tokens=generated[i])))
        finally:
            await self.aclose()

    async def collect(self) -> list[Delta]:
        choices = [Delta(index=i) for i in range(self.params.n)]
        async for delta in self.deltas():
            merge_delta(choices, delta)
        return choices

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._source.aclose()
            if self._started:
                self._observer.finish()


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await, but give up (cancelling the work) as soon as the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def merged(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several generations as they come, tagged with the generation's position."""
    if len(streams) == 1:  # the usual case: read it directly (no task and queue hop per token)
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _CleansUp:
    """Runs `cleanup` once the streamed response is over, however it ends (done, client gone,
    server shutting down), even if its body generator never started."""

    cleanup: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            if self.cleanup is not None:
                await self.cleanup()


class SSEResponse(_CleansUp, EventSourceResponse):
    """Server-sent events as OpenAI sends them ("data: ...\n\n"). A client that stops reading
    without disconnecting is dropped after SEND_TIMEOUT_SECONDS, so it cannot hold a connection."""

    def __init__(self, content: AsyncIterator[str], **kwargs) -> None:  # noqa: ANN003
        kwargs.setdefault("sep", "\n")
        kwargs.setdefault("send_timeout", SEND_TIMEOUT_SECONDS)
        super().__init__(_event_bytes(content), **kwargs)


async def _event_bytes(events: AsyncIterator[str]) -> AsyncIterator[bytes | str]:
    """Each one-line event as its finished bytes, in one step: sse-starlette would build a
    ServerSentEvent and split it into lines for every token. Anything else goes through it."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, str) and "\n" not in event and "\r" not in event:
                yield b"data: " + event.encode("utf-8") + b"\n\n"
            else:
                yield event


class StreamResponse(_CleansUp, StreamingResponse):
    """A streamed body (Ollama's NDJSON, the simple APIs). As with SSEResponse, a client that
    stops reading without disconnecting is dropped after SEND_TIMEOUT_SECONDS: its request is
    cancelled and its slot and lease given back (the cleanup), instead of held while the
    server's writes wait for it."""

    _timed_out = False

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message: dict) -> None:
            with anyio.move_on_after(SEND_TIMEOUT_SECONDS) as scope:
                await send(message)
            if scope.cancelled_caught:
                self._timed_out = True
                raise _SendTimeout()

        await super().stream_response(timed_send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            if not self._timed_out:
                raise
            # uvicorn closes the connection of a response left unfinished (one line in its log)
            logger.info("a client stopped reading its stream for %.0f s: dropped", SEND_TIMEOUT_SECONDS)


class _SendTimeout(Exception):
    pass
