"""-kvu: one KV pool of -c cells that any slot may fill, on the real bundled model."""

import threading
import time

import pytest

from edge_llm.engines.base import collect
from edge_llm.errors import ContextLengthError
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.model


def make(demo_path, **options):
    from edge_llm.api import load

    return load(str(demo_path), **{"n_ctx": 1024, "n_parallel": 4, **options})


def greedy(n):
    return SamplingParams.create(temperature=0, max_tokens=n, ignore_eos=True)


def words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def test_one_conversation_may_use_the_whole_context(demo_path):
    split = make(demo_path)
    long_prompt = split.tokenize(words(200, "w"))
    assert 256 < len(long_prompt) < 1000
    with pytest.raises(ContextLengthError, match="maximum context length is 256"):
        split.stream(long_prompt, greedy(4))
    split.close()
    unified = make(demo_path, kv_unified=True)
    try:
        out = collect(unified.stream(long_prompt, greedy(8)))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 8
    finally:
        unified.close()


def test_idle_slots_give_their_cells_up_and_resume_from_the_prompt_cache(demo_path):
    engine = make(demo_path, kv_unified=True)
    try:
        first = engine.tokenize(words(150, "a"))
        answer = collect(engine.stream(first, greedy(8)))[0]
        long_one = engine.tokenize(words(200, "b"))
        assert len(first) + 8 + len(long_one) > 1024  # the first one's cells are needed
        collect(engine.stream(long_one, greedy(8)))
        assert engine.prompt_cache.stats.stored >= 1
        again = collect(engine.stream(first + answer.token_ids, greedy(8)))[0]
        assert again.usage.restored_tokens == len(first) + len(answer.token_ids) - 1
    finally:
        engine.close()


def test_when_running_streams_fill_the_pool_the_newest_ends_with_length(demo_path):
    engine = make(demo_path, kv_unified=True)
    try:
        older_prompt, newer_prompt = engine.tokenize(words(80, "o")), engine.tokenize(words(80, "n"))
        assert len(older_prompt) + 300 <= 1024 < len(older_prompt) + len(newer_prompt) + 2 * 300
        older = engine.stream(older_prompt, greedy(300))
        first = next(older)  # admitted and generating
        newer = engine.stream(newer_prompt, greedy(300))
        newer_out = collect(newer)[0]
        older_ids = first.token_ids + [t for d in older for t in d.token_ids]
        # The pool holds both prompts and some of both answers; the newer stream gave way, the
        # older one ran to its max_tokens.
        assert newer_out.finish_reason == "length" and len(newer_out.token_ids) < 300
        assert len(older_ids) == 300
    finally:
        engine.close()


def test_a_prompt_waits_while_the_running_streams_hold_the_pool(demo_path):
    engine = make(demo_path, kv_unified=True)
    try:
        small = engine.tokenize(words(70, "s"))
        alone = collect(engine.stream(small, greedy(16)))[0].token_ids
        big_prompt = engine.tokenize(words(240, "g"))
        assert len(big_prompt) + 120 <= 1024 < len(big_prompt) + len(small) + 2
        big = engine.stream(big_prompt, greedy(120))
        next(big)
        got = {}

        def run_small():
            got["out"] = collect(engine.stream(small, greedy(16)))[0]

        waiter = threading.Thread(target=run_small)
        waiter.start()
        time.sleep(0.5)
        assert engine.scheduler.waiting == 1  # admitted only when there is room
        rest = [d for d in big]
        waiter.join(timeout=120)
        assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == 120
        assert got["out"].finish_reason == "length" and len(got["out"].token_ids) == 16
        assert got["out"].token_ids == alone  # the small prompt's cells came back from the cache
    finally:
        engine.close()
