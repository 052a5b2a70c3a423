"""Moving a stream of deltas between a worker thread and asyncio, in both directions.

- `iterate_in_thread`: a blocking generator (transformers' decode loop) consumed from asyncio;
  the generator runs in a worker thread and hands items over through an asyncio queue.
- `LoopThread`: an asyncio engine (vLLM, LMDeploy) that must live on one event loop of its own,
  consumed from blocking code (the CLI, the batch runner) or from another event loop (the server).

In both, closing the consumer's iterator (a client disconnect, Ctrl-C) cancels the producer:
nothing keeps generating for a reader that is gone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(produce: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
    """Run `produce(cancel)` in a worker thread and yield its items; the producer must stop soon
    after `cancel` is set (it is set when this iterator is closed)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            cancel.set()

    def work() -> None:
        try:
            iterator = produce(cancel)
            try:
                for item in iterator:
                    put(item)
                    if cancel.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            put(_END)

    thread = threading.Thread(target=work, name="edge-llm-generate", daemon=True)
    thread.start()
    try:
        while not _ended(item := await items.get()):
            yield item
    finally:
        cancel.set()


def _ended(item: object) -> bool:
    """True at the end marker; an exception from the producer is raised in the consumer."""
    if isinstance(item, BaseException):
        raise item
    return item is _END


class LoopThread:
    """One event loop in a daemon thread, owning an asyncio engine."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the engine's loop and wait for it (from a thread outside it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stream(self, agen_factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Blocking iteration over an async generator that runs on the engine's loop."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._pump(agen_factory, items.put), self.loop)
        try:
            while not _ended(item := items.get()):
                yield item
        finally:
            future.cancel()  # CancelledError inside the generator: the engine aborts the request

    async def stream_async(self, agen_factory: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iteration from another event loop (the server's) over a generator on the engine's loop."""
        caller = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                caller.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:
                pass

        future = asyncio.run_coroutine_threadsafe(self._pump(agen_factory, put), self.loop)
        try:
            while not _ended(item := await items.get()):
                yield item
        finally:
            future.cancel()

    async def _pump(self, agen_factory: Callable[[], AsyncIterator[T]], put: Callable[[object], None]) -> None:
        try:
            async for item in agen_factory():
                put(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            put(exc)
        finally:
            put(_END)

    def close(self, shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        if self.loop.is_closed():
            return
        if shutdown is not None:
            try:
                self.run(shutdown(), timeout=60)
            except Exception:  # best effort: the process may be exiting anyway
                pass
        try:
            self.run(_cancel_pending(), timeout=30)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_pending() -> None:
    """Cancel the engine's background tasks (output handlers) so the loop stops cleanly."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
