"""A thread that runs llama.cpp's compute while there is work, and ends when there is none.

Why it ends: llama-cpp-python builds ggml with OpenMP, and libgomp keeps a pool of worker threads
for every thread that has started parallel work, counting them all. Once they outnumber the cores
(two such threads with a pool each, on 2 cores), libgomp spins only 100 times at each barrier
before sleeping on a futex (its "throttled" spin count, not settable on its own), in every pool of
the process, for as long as the pools live; a pool is freed only when its thread exits. Measured on
the 2-core VM: with an embedding model loaded beside SmolLM2, chat decoding fell from 84-92 to
38-42 tokens/s after the first embedding request, and stayed there; with a vision projector, from
71-81 to 50-53 after the first image. So each engine's compute thread (the scheduler's, the pooled
worker's, the vision encoder's) lives only while it has work: two of them overlap only while both
are busy, which is when short spins are right (the cores are shared), and an idle one costs the
others nothing.

The owner keeps its queue under its own lock and calls `start` and `ended` under that lock: the
thread ends only when the queue is empty, and whoever queues work next starts another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class WorkThread:
    def __init__(self, name: str, body: Callable[[], None]) -> None:
        self._name = name
        self._body = body
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """A thread runs `body` unless one does already (the owner's lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._body, name=self._name, daemon=True)
            self._thread.start()

    def ended(self) -> None:
        """Called by `body` as it returns, under the lock it found the queue empty with."""
        self._thread = None

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running thread (not from itself); whether none is running now."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return thread is None
