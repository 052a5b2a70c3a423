"""The prompt cache beyond the slots, on the real bundled model: a conversation that lost its slot
resumes from host memory or, after a restart, from disk, and evaluates only its new tokens."""

import json
import logging
import os
import struct

import pytest

from edge_llm.engines.base import collect
from edge_llm.engines.prompt_cache import MAGIC, SUFFIX
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.model

QUESTIONS = ["Tell me about owls.", "What is the capital of Peru?", "Write a haiku about rain."]
FOLLOW = "<|im_end|>\n<|im_start|>user\nAnd why is that?<|im_end|>\n<|im_start|>assistant\n"


def make(demo_path, **options):
    from edge_llm.api import load

    return load(str(demo_path), **{"n_ctx": 2048, "n_parallel": 2, **options})


def greedy(n):
    return SamplingParams.create(temperature=0, max_tokens=n)


def first_turn(engine, question):
    """One exchange; returns the prompt of the next turn (history + answer ids + new user turn)."""
    prompt = engine.prompt_tokens(engine.chat_prompt([{"role": "user", "content": question}]))
    answer = collect(engine.stream(prompt, greedy(24)))[0]
    return prompt + answer.token_ids + engine.tokenize(FOLLOW, add_bos=False)


def second_turn(engine, prompt):
    """(answer ids, usage, prompt tokens the engine evaluated for it)."""
    before = engine.scheduler.stats.prompt_tokens_evaluated
    out = collect(engine.stream(prompt, greedy(48)))[0]
    return out.token_ids, out.usage, engine.scheduler.stats.prompt_tokens_evaluated - before


def new_tokens(engine):
    # The history's last token (the answer's last, sampled but never evaluated) and the new turn.
    return len(engine.tokenize(FOLLOW, add_bos=False)) + 1


def finish(engine, prompt):
    """Close the engine; return what the next turn must evaluate (read before the model goes)."""
    n = new_tokens(engine)
    engine.close()
    return n


@pytest.mark.parametrize("flash_attn", ["off", "on"])
def test_a_conversation_continues_identically_from_its_slot_host_memory_or_disk(demo_path, tmp_path, flash_attn):
    # From its slot: nothing else ran in between.
    engine = make(demo_path, flash_attn=flash_attn, cache_ram=0)
    prompt = first_turn(engine, QUESTIONS[0])
    from_slot, usage, _ = second_turn(engine, prompt)
    n_new = finish(engine, prompt)
    assert usage.restored_tokens == 0 and usage.cached_tokens == len(prompt) - n_new

    # From host memory: two other conversations took both slots in between.
    engine = make(demo_path, flash_attn=flash_attn)
    assert first_turn(engine, QUESTIONS[0]) == prompt
    first_turn(engine, QUESTIONS[1])
    first_turn(engine, QUESTIONS[2])
    from_ram, usage, evaluated = second_turn(engine, prompt)
    assert engine.prompt_cache.stats.hits == 1
    engine.close()
    assert from_ram == from_slot
    assert evaluated == n_new
    assert usage.restored_tokens == usage.cached_tokens == len(prompt) - evaluated

    # From disk, after a restart: the first engine wrote the evicted conversation and, at close,
    # what its slots held; the second one has no host-memory cache at all.
    engine = make(demo_path, flash_attn=flash_attn, cache_dir=str(tmp_path))
    first_turn(engine, QUESTIONS[0])
    first_turn(engine, QUESTIONS[1])
    first_turn(engine, QUESTIONS[2])
    engine.close()
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 3
    engine = make(demo_path, flash_attn=flash_attn, cache_dir=str(tmp_path), cache_ram=0)
    from_disk, usage, evaluated = second_turn(engine, prompt)
    engine.close()
    assert from_disk == from_slot
    assert evaluated == n_new
    assert usage.restored_tokens == len(prompt) - evaluated


def test_a_history_read_from_scratch_continues_as_the_restored_one(demo_path, tmp_path):
    # The cache restores the exact KV bytes; against re-reading the history from scratch the
    # output is the same wherever llama.cpp's kernels give the same numbers for a token read in
    # a batch of any size. That holds without flash attention for a history that was read as a
    # prompt (a generated answer was evaluated one token at a time, which rounds differently).
    history = make(demo_path, flash_attn="off", cache_dir=str(tmp_path))
    text = history.chat_prompt([{"role": "system", "content": "You are a terse assistant."},
                                {"role": "user", "content": "Name three rivers of Europe."},
                                {"role": "assistant", "content": "The Danube, the Rhine and the Loire."},
                                {"role": "user", "content": "Which is the longest?"}])
    prompt = history.prompt_tokens(text)
    collect(history.stream(prompt[:-12], greedy(1)))  # read the history; keep it on disk at close
    history.close()

    restored = make(demo_path, flash_attn="off", cache_dir=str(tmp_path), cache_ram=0)
    from_disk, usage, evaluated = second_turn(restored, prompt)
    restored.close()
    assert usage.restored_tokens == len(prompt) - 12 and evaluated == 12

    scratch = make(demo_path, flash_attn="off", cache_ram=0)
    from_scratch, usage, evaluated = second_turn(scratch, prompt)
    scratch.close()
    assert evaluated == len(prompt) and usage.cached_tokens == 0
    assert from_disk == from_scratch


def test_the_byte_budget_holds_while_many_conversations_pass_through_two_slots(demo_path):
    # Each conversation's state is about 7 MB (about 300 tokens x 23 KB per token for this
    # model); the 12 below would hold about 80 MB without a budget.
    budget = 24 * 2**20
    margin = 16 * 2**20  # allocator slack, llama.cpp's buffers and Python objects
    engine = make(demo_path, cache_ram=budget)
    try:
        def conversation(i):
            text = f"Conversation {i}. " + " ".join(f"word{i}x{j}" for j in range(36))
            collect(engine.stream(engine.tokenize(text), greedy(2)))

        for i in range(4):  # warm up the compute buffers and the allocator before measuring
            conversation(1000 + i)
        rss_before = _rss()
        for i in range(12):
            conversation(i)
        growth = _rss() - rss_before
        print(f"RSS growth {growth / 2**20:.1f} MiB, cache {engine.prompt_cache.ram_bytes / 2**20:.1f} MiB")
        cache = engine.prompt_cache
        assert cache.stats.stored >= 12  # each conversation was saved when its slot was taken
        assert cache.stats.evictions >= 8
        assert cache.ram_bytes <= budget
        assert growth <= budget + margin, f"RSS grew by {growth / 2**20:.0f} MiB"
        # The most recently evicted conversation is still there; the oldest is not.
        assert cache.lookup(engine.tokenize("Conversation 9. word9x0"))[1] > 5
        assert cache.lookup(engine.tokenize("Conversation 0. word0x0"))[1] < 5
    finally:
        engine.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_corrupt_or_foreign_cache_file_is_ignored(demo_path, tmp_path, caplog):
    engine = make(demo_path, cache_dir=str(tmp_path))
    prompt = first_turn(engine, QUESTIONS[0])
    second_turn(engine, prompt)
    engine.close()
    # Another context size makes other states: its files are not this engine's.
    other = make(demo_path, cache_dir=str(tmp_path), n_ctx=1024)
    first_turn(other, QUESTIONS[1])
    other.close()
    # And the file this engine would restore from gets one flipped byte.
    files = list(tmp_path.glob("*" + SUFFIX))
    assert len(files) == 2
    for path in files:
        data = bytearray(path.read_bytes())
        data[-1000] ^= 0x40
        path.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = make(demo_path, cache_dir=str(tmp_path))
        got, usage, evaluated = second_turn(engine, prompt)
        engine.close()
    assert "another model file or other context settings" in caplog.text
    assert "checksum mismatch" in caplog.text
    # Answered all the same, from the prompt read again; the corrupt file is gone.
    assert usage.restored_tokens == 0 and evaluated == len(prompt) and got
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 2  # the foreign file stays, ours was rewritten at close


def _rewrite(path, *, state=None, tokens=None, fingerprint=None):
    """Rewrite a cache file as a forger would: a valid header and checksum around other contents."""
    import zlib

    import numpy as np

    from edge_llm.engines.prompt_cache import _read_header, _read_tokens, _write_atomic

    with open(path, "rb") as f:
        header = _read_header(f)
        ids = _read_tokens(f, header["n_tokens"])
        old_state = f.read()
    state = old_state if state is None else state
    ids = ids if tokens is None else np.asarray(tokens, np.int32)
    raw_ids = ids.astype("<i4").tobytes()
    text = json.dumps({"fingerprint": fingerprint or header["fingerprint"], "n_tokens": len(ids),
                       "state_bytes": len(state), "crc32": zlib.crc32(state, zlib.crc32(raw_ids))}).encode()
    _write_atomic(path, [MAGIC, struct.pack("<I", len(text)), text, raw_ids, state])
    return header["fingerprint"], old_state


@pytest.mark.parametrize("forgery", ["garbage", "truncated", "mislabelled", "other_kv_type"])
def test_a_forged_cache_file_with_a_valid_checksum_is_refused_and_the_prompt_read(demo_path, tmp_path, caplog,
                                                                                   forgery):
    # Files in --cache-dir are input like any other: one that passes the header, fingerprint and
    # checksum checks may still hold bytes llama.cpp cannot use, or a state for fewer tokens
    # than it claims. Restoring it must fail cleanly: the prompt is read instead, the answer is
    # the from-scratch one, the file is deleted, and the engine serves on.
    history = make(demo_path, flash_attn="off", cache_dir=str(tmp_path))
    prompt = history.prompt_tokens(history.chat_prompt([{"role": "user", "content": "Name three rivers of Europe."}]))
    collect(history.stream(prompt[:-4], greedy(1)))
    history.close()
    (path,) = tmp_path.glob("*" + SUFFIX)
    if forgery == "garbage":
        ours, state = _rewrite(path)
        _rewrite(path, state=os.urandom(len(state)))
    elif forgery == "truncated":
        ours, state = _rewrite(path)
        _rewrite(path, state=state[: len(state) // 2])
    elif forgery == "mislabelled":  # claims the whole prompt; holds the cells of prompt[:-4]
        ours, _ = _rewrite(path, tokens=prompt)
    else:  # a state made with a q8_0 K cache, relabelled as this engine's
        ours, _ = _rewrite(path)
        path.unlink()
        other = make(demo_path, flash_attn="off", cache_dir=str(tmp_path), cache_type_k="q8_0")
        collect(other.stream(prompt[:-4], greedy(1)))
        other.close()
        (path,) = tmp_path.glob("*" + SUFFIX)
        _rewrite(path, fingerprint=ours)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = make(demo_path, flash_attn="off", cache_dir=str(tmp_path), cache_ram=0)
        assert engine.prompt_cache.lookup(prompt)[1] >= len(prompt) - 4  # it passed every file check
        got, usage, evaluated = second_turn(engine, prompt)
        again, _, _ = second_turn(engine, prompt)  # the model still serves
        engine.prompt_cache.flush()
        stats = engine.prompt_cache.stats
        engine.close()
    assert "could not restore" in caplog.text
    assert usage.restored_tokens == 0 and evaluated == len(prompt) and stats.hits == 0
    assert not path.exists()  # refused once, then forgotten

    scratch = make(demo_path, flash_attn="off", cache_ram=0)
    reference, _, _ = second_turn(scratch, prompt)
    scratch.close()
    assert got == reference and again == reference
