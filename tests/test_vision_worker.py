"""The vision worker's thread (engines/projector.VisionWorker), without a model: images are encoded
in order off the caller's thread, and the thread ends once nothing is queued (with llama.cpp's
OpenMP, a long-lived second thread that ever ran parallel work keeps every barrier of the process
spinning short: see the class's docstring), then starts again for the next image."""

from __future__ import annotations

import threading
import time

import numpy as np

from edge_llm.engines.media import ImageSpan
from edge_llm.engines.projector import VisionWorker
from edge_llm.errors import EdgeLLMError


class FakeChunk:
    """Stands for an mtmd image chunk: records which thread encoded it."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate, self.fail, self.thread = gate, fail, None

    def encode(self) -> np.ndarray:
        self.thread = threading.current_thread()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("tower on fire")
        return np.ones((2, 3), dtype=np.float32)

    def close(self) -> None:
        pass


def span(chunk: FakeChunk) -> ImageSpan:
    return ImageSpan(start=0, n_tokens=2, n_pos=2, digest="d", chunk=chunk)


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_images_are_encoded_in_order_on_a_thread_that_ends_when_the_queue_is_empty():
    done = []
    worker = VisionWorker(lambda: done.append(1))
    gate = threading.Event()
    chunks = [FakeChunk(gate), FakeChunk(), FakeChunk()]
    spans = [span(c) for c in chunks]
    for s in spans:
        worker.submit(s, lambda: False)
    assert worker.alive and all(s.queued for s in spans)
    gate.set()
    assert wait_until(lambda: len(done) == 3)
    assert wait_until(lambda: not worker.alive, 1), "the thread outlived its queue"
    threads = {c.thread for c in chunks}
    assert len(threads) == 1 and threading.current_thread() not in threads
    assert not next(iter(threads)).is_alive()
    assert all(s.embeddings is not None and s.embeddings.shape == (2, 3) for s in spans)
    # the next image starts a new thread
    later = FakeChunk()
    worker.submit(span(later), lambda: False)
    assert wait_until(lambda: len(done) == 4 and not worker.alive)
    assert later.thread is not None and later.thread not in threads
    worker.close()


def test_a_cancelled_image_is_not_encoded_and_a_failure_reaches_its_span():
    worker = VisionWorker(lambda: None)
    skipped, broken = FakeChunk(), FakeChunk(fail=True)
    s1, s2 = span(skipped), span(broken)
    worker.submit(s1, lambda: True)
    worker.submit(s2, lambda: False)
    assert wait_until(lambda: not worker.alive and s2.error is not None)
    assert skipped.thread is None and s1.embeddings is None
    assert isinstance(s2.error, EdgeLLMError) and "tower on fire" in str(s2.error)
    worker.close()


def test_close_waits_for_the_image_being_encoded_and_drops_the_rest():
    worker = VisionWorker(lambda: None)
    gate = threading.Event()
    first, second = FakeChunk(gate), FakeChunk()
    worker.submit(span(first), lambda: False)
    worker.submit(span(second), lambda: False)
    assert wait_until(lambda: first.thread is not None)
    closer = threading.Thread(target=worker.close)
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive()  # the encoder is not interrupted mid-image
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and not worker.alive and second.thread is None
