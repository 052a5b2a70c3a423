"""Moving a stream of items between a worker thread and its reader, blocking or asyncio.

- `Channel`: the one hand-off. A writer thread puts items; one reader gets them, blocking or,
  bound to its event loop, with `await`. The scheduler's requests are channels, and so are the two
  uses below.
- `iterate_in_thread`: a blocking generator (transformers' decode loop) consumed from asyncio;
  the generator runs in a worker thread and writes a channel.
- `LoopThread`: an asyncio engine (vLLM, LMDeploy) that must live on one event loop of its own,
  consumed from blocking code (the CLI, the batch runner) or from another event loop (the server).

In all of them, a reader that goes away (a client disconnect, Ctrl-C) or whose event loop is
closed cancels the writer: nothing keeps generating for a reader that is gone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Mailbox:
    """Items bound for one event loop's channels. Writer threads post them; the loop is woken
    once for however many arrive before it gets to run (with many streams on one engine thread:
    one wakeup per step, not one per token of every stream), then hands each to its channel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the registry below holds mailboxes by their loop, weakly; a strong reference here
        # would keep every loop that ever read a channel alive.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []

    def post(self, inbox: asyncio.Queue, item: object) -> None:
        """Raises RuntimeError when the loop is closed: nobody will ever read the item."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((inbox, item))
            wake = len(self._items) == 1  # otherwise a wakeup is already on its way
        if wake:
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                with self._lock:
                    self._items.clear()
                raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for inbox, item in items:
            inbox.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class Channel(Generic[T]):
    """Items from a writer thread to one reader. The writer `put`s items (an exception is raised
    in the reader) and then `end`s; the reader calls `get()` (blocking) or, once the channel is
    `bind`-ed to its event loop, `await aget()`. Both return None at the end, and keep returning it.

    `cancelled` is set when the reader calls `cancel` or its event loop is closed; the writer
    checks it and stops. `fold` (async reading only) merges a run of items that were all waiting
    when the reader came for one: a reader that fell behind catches up in fewer, larger pieces.
    Runs never span an end or an exception."""

    def __init__(self, fold: Callable[[list[T]], list[T]] | None = None) -> None:
        self.cancelled = threading.Event()
        self._fold = fold
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._mailbox: _Mailbox | None = None
        self._inbox: asyncio.Queue | None = None
        self._ready: deque = deque()  # items taken from the inbox and folded, not yet returned

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to `loop` for `aget` (before the first `put`)."""
        self._mailbox = _mailbox(loop)
        self._inbox = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def unread(self) -> int:
        """Items delivered to the reader's side and not taken yet (the end marker counts)."""
        return self._inbox.qsize() if self._inbox is not None else self._queue.qsize()

    # -- the writer's side

    def put(self, item: T | BaseException) -> None:
        if self._mailbox is None:
            self._queue.put(item)
            return
        try:
            self._mailbox.post(self._inbox, item)
        except RuntimeError:  # the reader's event loop is gone: nobody is listening
            self.cancelled.set()

    def end(self) -> None:
        self.put(_END)

    # -- the reader's side

    def get(self) -> T | None:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def aget(self) -> T | None:
        if not self._ready:
            self._take_backlog(await self._inbox.get())
        item = self._ready[0]
        if item is _END:
            return None  # stay exhausted
        self._ready.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def _take_backlog(self, first: object) -> None:
        """Take `first` and whatever else is already waiting, each run between ends and
        exceptions folded."""
        run: list = []
        item = first
        while True:
            if item is _END or isinstance(item, BaseException):
                self._ready.extend(self._folded(run))
                run = []
                self._ready.append(item)
            else:
                run.append(item)
            if self._inbox.empty():
                break
            item = self._inbox.get_nowait()
        self._ready.extend(self._folded(run))

    def _folded(self, run: list) -> list:
        return self._fold(run) if self._fold is not None and len(run) > 1 else run


async def iterate_in_thread(produce: Callable[[threading.Event], Iterator[T]]) -> AsyncIterator[T]:
    """Run `produce(cancel)` in a worker thread and yield its items; the producer must stop soon
    after `cancel` is set (it is set when this iterator is closed or its event loop is)."""
    channel: Channel[T] = Channel()
    channel.bind(asyncio.get_running_loop())

    def work() -> None:
        try:
            iterator = produce(channel.cancelled)
            try:
                for item in iterator:
                    channel.put(item)
                    if channel.cancelled.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the reader, raised there
            channel.put(exc)
        finally:
            channel.end()

    thread = threading.Thread(target=work, name="edge-llm-generate", daemon=True)
    thread.start()
    try:
        while (item := await channel.aget()) is not None:
            yield item
    finally:
        channel.cancel()


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
        channel: Channel[T] = Channel()
        future = asyncio.run_coroutine_threadsafe(self._pump(agen_factory, channel), self.loop)
        try:
            while (item := channel.get()) is not None:
                yield item
        finally:
            future.cancel()  # CancelledError inside the generator: the engine aborts the request

    async def stream_async(self, agen_factory: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iteration from another event loop (the server's) over a generator on the engine's loop."""
        channel: Channel[T] = Channel()
        channel.bind(asyncio.get_running_loop())
        future = asyncio.run_coroutine_threadsafe(self._pump(agen_factory, channel), self.loop)
        try:
            while (item := await channel.aget()) is not None:
                yield item
        finally:
            future.cancel()

    async def _pump(self, agen_factory: Callable[[], AsyncIterator[T]], channel: Channel[T]) -> None:
        try:
            async for item in agen_factory():
                channel.put(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            channel.put(exc)
        finally:
            channel.end()

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
