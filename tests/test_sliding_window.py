"""Sliding-window models keep only their window in the window layers' KV (llama-server's default),
and a cached sequence is reused only where that window is still held.

A tiny Gemma 3 (a 16-token window) with 16-token batches: llama.cpp then gives each sequence's
window layers 256 cells, so a sequence of ~350 tokens has dropped its first ~100 positions there.
A new prompt that shares only its first 30 tokens with that sequence must be read again from the
start: cut back to 30, the window layers would attend to positions they no longer hold. What is
compared is the first answer token's log-probabilities against a fresh engine's (a dropped window
changes them by far more than the rounding of another cell order).
"""

from __future__ import annotations

import pytest
from tiny_models import build_gemma, train_gemma_tokenizer

from edge_llm.engines.base import collect
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.slow

WINDOW = 16
LONG = SamplingParams.create(temperature=0, max_tokens=320, ignore_eos=True)
PROBE = SamplingParams.create(temperature=0, max_tokens=1, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from edge_llm.convert import convert

    root = tmp_path_factory.mktemp("sliding-window")
    model = build_gemma(root / "gemma3", train_gemma_tokenizer(root / "tokenizer"), version=3)
    return convert(model.path, root / "gemma3-q8_0.gguf", quant="q8_0")


def load(path, **options):
    from edge_llm.api import load as load_engine

    return load_engine(str(path), **{"n_ctx": 1024, "n_parallel": 1, "n_batch": 16, "n_threads": 2,
                                     "adapt_threads": False, "spec": "off", **options})


def prompts(engine):
    first = engine.tokenize("the quick brown fox jumps over the lazy dog and then " * 3)[:40]
    other = first[:30] + engine.tokenize(" a cat", add_bos=False)  # its last token sees 15 of the 30
    return first, other


def probe(engine, prompt):
    """(top log-probabilities of the first answer token, prompt tokens evaluated for it)."""
    before = engine.scheduler.stats.prompt_tokens_evaluated
    out = collect(engine.stream(prompt, PROBE))[0]
    top = dict(out.logprobs[0].top)
    return top, engine.scheduler.stats.prompt_tokens_evaluated - before


def assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for token, logprob in a.items():
        assert logprob == pytest.approx(b[token], abs=2e-3), token


@pytest.fixture(scope="module")
def fresh(gemma3):
    """The probe of the other prompt on an engine that never saw the first."""
    engine = load(gemma3)
    try:
        _, other = prompts(engine)
        return probe(engine, other)[0]
    finally:
        engine.close()


def test_the_window_layers_keep_only_the_window_by_default(gemma3):
    engine = load(gemma3)
    try:
        assert engine.scheduler.memory.window == WINDOW
        first, _ = prompts(engine)
        collect(engine.stream(first, LONG))
        low, high = engine.scheduler.memory.positions(0)
        assert high >= 350 and low > 50  # the window layers' cells were reused
    finally:
        engine.close()


def test_a_prompt_sharing_a_prefix_the_window_dropped_is_read_again(gemma3, fresh):
    engine = load(gemma3, cache_ram=0)
    try:
        first, other = prompts(engine)
        collect(engine.stream(first, LONG))
        top, evaluated = probe(engine, other)
        assert evaluated == len(other)  # nothing reused
        assert_close(top, fresh)
    finally:
        engine.close()


def test_with_swa_full_the_shared_prefix_is_reused(gemma3, fresh):
    engine = load(gemma3, cache_ram=0, swa_full=True)
    try:
        first, other = prompts(engine)
        collect(engine.stream(first, LONG))
        assert engine.scheduler.memory.positions(0)[0] == 0
        top, evaluated = probe(engine, other)
        assert evaluated == len(other) - 30
        assert_close(top, fresh)
    finally:
        engine.close()


@pytest.mark.parametrize("swa_full", [False, True])
def test_a_returning_conversation_reuses_its_slot_and_a_saved_state(gemma3, swa_full):
    """The next turn starts with all the slot holds: nothing is cut, so the window is enough; and
    the same from a state saved in the prompt cache after another conversation took the slot. A
    saved state holds only the window (positions from n - 16 on) with either layout: llama.cpp
    leaves out what the last position no longer sees (before edge-llm knew, such a restore was
    refused and the whole conversation read again)."""
    engine = load(gemma3, swa_full=swa_full)
    try:
        first, other = prompts(engine)
        answer = collect(engine.stream(first, LONG))[0].token_ids
        history = first + answer[:-1]  # the last answer token was sampled, never evaluated
        turn = history + engine.tokenize(" and then?", add_bos=False)
        top_slot, evaluated = probe(engine, turn)
        assert evaluated == len(turn) - len(history)

        collect(engine.stream(other, LONG))  # takes the only slot: the conversation is saved
        after = turn + engine.tokenize(" and after that?", add_bos=False)
        top_restored, evaluated = probe(engine, after)
        assert evaluated == len(after) - len(turn)
        assert engine.prompt_cache.stats.restored_tokens == len(turn)
    finally:
        engine.close()

    fresh_engine = load(gemma3, cache_ram=0)
    try:
        assert_close(probe(fresh_engine, turn)[0], top_slot)
        assert_close(probe(fresh_engine, after)[0], top_restored)
    finally:
        fresh_engine.close()
