"""The one thread -> reader hand-off (threadbridge.Channel) and what is built on it: the scheduler's
requests, iterate_in_thread and LoopThread. No model."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edge_llm.engines.base import Delta
from edge_llm.engines.scheduler import fold_deltas
from edge_llm.engines.threadbridge import Channel, LoopThread, iterate_in_thread


def write_in_thread(write) -> None:
    """Run `write` in another thread and wait for it (the caller's event loop, if any, is blocked
    meanwhile, as it is while the engine thread runs ahead of a busy server)."""
    thread = threading.Thread(target=write)
    thread.start()
    thread.join()


def counting_wakeups(loop: asyncio.AbstractEventLoop) -> list[int]:
    calls = [0]
    real = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    return calls


def test_a_blocking_reader_gets_every_item_then_stays_at_the_end():
    channel: Channel[int] = Channel()

    def write():
        for i in range(3):
            channel.put(i)
        channel.put(ValueError("boom"))
        channel.end()

    write_in_thread(write)
    assert [channel.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="boom"):
        channel.get()
    assert channel.get() is None
    assert channel.get() is None


def test_many_streams_written_while_the_loop_is_busy_wake_it_once():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = counting_wakeups(loop)
        channels = [Channel() for _ in range(4)]
        for channel in channels:
            channel.bind(loop)

        def write():  # one engine step: a token for each of four streams, twice
            for step in range(2):
                for i, channel in enumerate(channels):
                    channel.put(f"{i}.{step}")

        write_in_thread(write)
        assert wakeups[0] == 1
        await asyncio.sleep(0)  # the one wakeup delivers everything
        assert wakeups[0] == 1
        assert [channel.unread for channel in channels] == [2, 2, 2, 2]
        assert [await channel.aget() for channel in channels] == ["0.0", "1.0", "2.0", "3.0"]

    asyncio.run(main())


def test_a_reader_that_fell_behind_gets_the_backlog_folded_but_not_across_an_end_or_error():
    async def main():
        channel: Channel[str] = Channel(fold=lambda run: ["".join(run)])
        channel.bind(asyncio.get_running_loop())

        def write():
            for piece in "abc":
                channel.put(piece)
            channel.put(ValueError("boom"))
            channel.put("d")
            channel.put("e")
            channel.end()

        write_in_thread(write)
        await asyncio.sleep(0)  # the loop delivers what arrived
        assert channel.unread == 7
        assert await channel.aget() == "abc"
        with pytest.raises(ValueError, match="boom"):
            await channel.aget()
        assert await channel.aget() == "de"
        assert await channel.aget() is None
        assert await channel.aget() is None

    asyncio.run(main())


def test_a_closed_reader_loop_cancels_the_writer():
    loop = asyncio.new_event_loop()
    channel: Channel[int] = Channel()
    channel.bind(loop)
    loop.close()
    channel.put(1)
    assert channel.cancelled.is_set()


def test_a_loop_that_read_channels_is_not_kept_alive():
    import gc
    import weakref

    async def main():
        channel: Channel[int] = Channel()
        channel.bind(asyncio.get_running_loop())
        write_in_thread(lambda: (channel.put(1), channel.end()))
        assert await channel.aget() == 1
        return weakref.ref(asyncio.get_running_loop())

    loop = asyncio.run(main())
    gc.collect()
    assert loop() is None


def test_a_request_folds_each_choice_on_its_own():
    deltas = [Delta(text="a", token_ids=[1], index=0), Delta(text="x", token_ids=[7], index=1),
              Delta(text="b", token_ids=[2], index=0),
              Delta(text="c", token_ids=[3], index=0, finish_reason="length"),
              Delta(text="y", token_ids=[8], index=1)]
    folded = fold_deltas(deltas)
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in folded] == [
        (0, "abc", [1, 2, 3], "length"), (1, "xy", [7, 8], None)]


def test_a_choice_is_not_folded_past_its_final_delta():
    deltas = [Delta(text="a", token_ids=[1], index=0, finish_reason="stop"), Delta(text="b", token_ids=[2], index=0)]
    assert fold_deltas(deltas) == deltas


def test_iterate_in_thread_yields_the_producers_items_and_raises_its_error():
    def produce(cancel):
        yield 1
        yield 2
        raise KeyError("bad")

    async def main():
        got = []
        with pytest.raises(KeyError, match="bad"):
            async for item in iterate_in_thread(produce):
                got.append(item)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_closing_iterate_in_thread_stops_the_producer():
    stopped = threading.Event()

    def produce(cancel):
        try:
            i = 0
            while not cancel.is_set():
                yield i
                i += 1
        finally:
            stopped.set()

    async def main():
        items = iterate_in_thread(produce)
        got = [await anext(items) for _ in range(3)]
        await items.aclose()
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert stopped.wait(30)


@pytest.fixture
def loop_thread():
    thread = LoopThread("test-loop")
    yield thread
    thread.close()


async def _counting(n: int, fail: bool = False):
    for i in range(n):
        await asyncio.sleep(0)
        yield i
    if fail:
        raise KeyError("bad")


def test_loop_thread_streams_to_blocking_code(loop_thread):
    assert list(loop_thread.stream(lambda: _counting(4))) == [0, 1, 2, 3]
    got = []
    with pytest.raises(KeyError, match="bad"):
        for item in loop_thread.stream(lambda: _counting(2, fail=True)):
            got.append(item)
    assert got == [0, 1]


def test_loop_thread_streams_to_another_event_loop(loop_thread):
    async def main():
        return [item async for item in loop_thread.stream_async(lambda: _counting(4))]

    assert asyncio.run(main()) == [0, 1, 2, 3]
