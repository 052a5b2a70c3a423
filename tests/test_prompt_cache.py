"""The prompt cache's index, budgets and files, without a model (engines/prompt_cache.py)."""

import errno
import logging
import os

import numpy as np
import pytest

from edge_llm.engines.prompt_cache import (
    SUFFIX,
    DiskStore,
    PromptCache,
    common_prefix,
    file_digest,
    fingerprint,
    open_prompt_cache,
)
from edge_llm.errors import EdgeLLMError

FP = fingerprint("0" * 64, {"n_ctx": 4096})


def state(n: int, seed: int = 0) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


def disk_cache(tmp_path, ram=10**6, budget=10**7, fp=FP) -> PromptCache:
    return PromptCache(ram, DiskStore(tmp_path, fp, budget))


def test_common_prefix():
    a = np.array([1, 2, 3, 4], np.int32)
    assert common_prefix(a, np.array([1, 2, 9], np.int32)) == 2
    assert common_prefix(a, np.array([1, 2], np.int32)) == 2
    assert common_prefix(a, np.array([7], np.int32)) == 0
    assert common_prefix(a, a) == 4


def test_lookup_finds_the_longest_shared_prefix():
    cache = PromptCache(10**6)
    cache.store([1, 2, 3, 4, 5], state(100, 1))
    cache.store([1, 2, 9, 9], state(100, 2))
    cache.store([7, 8], state(100, 3))
    entry, n = cache.lookup([1, 2, 3, 4, 6, 7])
    assert n == 4 and entry.tokens.tolist() == [1, 2, 3, 4, 5]
    entry, n = cache.lookup([1, 2, 9, 9, 9])
    assert n == 4 and entry.tokens.tolist() == [1, 2, 9, 9]
    assert cache.lookup([5, 5]) == (None, 0)
    assert cache.load(entry) == state(100, 2)


def test_an_entry_extended_later_replaces_its_prefix_and_a_covered_one_is_not_stored_twice():
    cache = PromptCache(10**6)
    cache.store([1, 2, 3], state(100))
    cache.store([1, 2, 3, 4, 5], state(100, 1))  # the same conversation, one turn later
    assert len(cache) == 1
    assert cache.covers([1, 2, 3]) and cache.covers([1, 2, 3, 4, 5]) and not cache.covers([1, 2, 3, 4, 5, 6])
    cache.store([1, 2], state(100, 2))  # already covered: kept as a separate, shorter entry only if asked
    assert cache.lookup([1, 2, 3, 4, 5, 6])[1] == 5


def test_without_prefix_reuse_an_entry_serves_only_prompts_that_extend_it():
    """A sliding-window model's state holds only its window: it cannot be cut back to a prefix."""
    cache = PromptCache(10**6, prefix_reuse=False)
    cache.store([1, 2, 3, 4, 5], state(100, 1))
    assert cache.lookup([1, 2, 3, 4, 6, 7]) == (None, 0)  # would need a cut back to 4
    entry, n = cache.lookup([1, 2, 3, 4, 5, 6])
    assert n == 5 and entry.tokens.tolist() == [1, 2, 3, 4, 5]
    assert cache.covers([1, 2, 3, 4, 5]) and not cache.covers([1, 2, 3])
    assert cache.store([1, 2, 3], state(100, 2))  # not covered: kept beside the longer one
    assert len(cache) == 2 and cache.lookup([1, 2, 3, 7])[1] == 3


def test_the_byte_budget_holds_and_least_recently_used_states_go_first():
    cache = PromptCache(ram_budget=1000)
    for i in range(5):
        cache.store([i, i, i], state(300, i))  # 300 bytes + 12 of ids each: three fit
    assert cache.ram_bytes <= 1000
    assert cache.stats.evictions == 2
    assert cache.lookup([0, 0, 0])[0] is None and cache.lookup([1, 1, 1])[0] is None
    # Using an entry makes it the most recent: the next eviction takes another one.
    entry, _ = cache.lookup([2, 2, 2])
    cache.load(entry)
    cache.store([9, 9, 9], state(300, 9))
    assert cache.lookup([2, 2, 2])[1] == 3 and cache.lookup([3, 3, 3])[0] is None
    # A state larger than the whole budget is not kept (and evicts nothing).
    assert not cache.store([5, 5, 5], state(2000))
    assert cache.stats.evictions == 3


def test_a_zero_budget_and_no_folder_means_no_cache(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    assert open_prompt_cache(model, {}, ram_budget=0, cache_dir=None, disk_budget=2**30) is None
    cache = open_prompt_cache(model, {}, ram_budget=0, cache_dir=tmp_path / "kv", disk_budget=2**30)
    assert cache is not None and cache.persistent
    cache.close()


def test_entries_survive_a_restart_on_disk(tmp_path):
    cache = disk_cache(tmp_path)
    cache.store([1, 2, 3, 4], state(5000))
    cache.flush()
    files = list(tmp_path.glob("*" + SUFFIX))
    assert len(files) == 1 and cache.disk_bytes == files[0].stat().st_size
    cache.close()
    again = disk_cache(tmp_path, ram=0)
    entry, n = again.lookup([1, 2, 3, 4, 5])
    assert n == 4
    assert again.load(entry) == state(5000)
    again.close()


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    cache = disk_cache(tmp_path)
    for i in range(3):
        cache.store([i] * 10, state(1000, i))
    cache.flush()
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name != "model-digests.json") == [SUFFIX] * 3
    cache.close()


def test_a_file_for_another_model_or_settings_is_ignored_with_a_warning(tmp_path, caplog):
    cache = disk_cache(tmp_path, fp=fingerprint("1" * 64, {"n_ctx": 4096}))
    cache.store([1, 2, 3], state(100))
    cache.close()
    with caplog.at_level(logging.WARNING):
        ours = disk_cache(tmp_path)
    assert ours.lookup([1, 2, 3]) == (None, 0)
    assert "another model file or other context settings" in caplog.text
    ours.close()
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 1  # someone else's file is left alone


def test_a_corrupt_file_is_skipped_deleted_and_serving_goes_on(tmp_path, caplog):
    cache = disk_cache(tmp_path)
    cache.store([1, 2, 3], state(4000))
    cache.flush()
    cache.close()
    (path,) = tmp_path.glob("*" + SUFFIX)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in the state
    path.write_bytes(bytes(data))
    again = disk_cache(tmp_path)
    entry, n = again.lookup([1, 2, 3])
    assert n == 3
    with caplog.at_level(logging.WARNING):
        assert again.load(entry) is None
    assert "checksum" in caplog.text
    assert again.lookup([1, 2, 3]) == (None, 0) and again.stats.disk_errors == 1
    again.flush()
    assert not path.exists()
    again.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_torn_or_foreign_files_are_ignored_at_start(tmp_path, caplog, damage):
    cache = disk_cache(tmp_path)
    cache.store([1, 2, 3], state(4000))
    cache.flush()
    cache.close()
    (path,) = tmp_path.glob("*" + SUFFIX)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        again = disk_cache(tmp_path)
    assert again.lookup([1, 2, 3]) == (None, 0)
    assert "ignored 1 unreadable or truncated file" in caplog.text
    again.close()


def test_the_disk_budget_deletes_the_least_recently_used_files(tmp_path):
    cache = disk_cache(tmp_path, ram=0, budget=3 * 1200)
    for i in range(5):
        cache.store([i] * 10, state(1000, i))
        cache.flush()
    assert cache.disk_bytes <= 3 * 1200
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 3
    assert cache.stats.disk_evictions == 2
    assert cache.lookup([0] * 10) == (None, 0) and cache.lookup([4] * 10)[1] == 10
    cache.close()


def test_a_full_disk_turns_the_disk_tier_off_and_memory_still_serves(tmp_path, monkeypatch, caplog):
    cache = disk_cache(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.disk, "write", full)
    with caplog.at_level(logging.WARNING):
        cache.store([1, 2, 3], state(1000))
        cache.flush()
    assert "No space left on device" in caplog.text and "disk cache is off" in caplog.text
    assert cache.stats.disk_errors == 1
    entry, n = cache.lookup([1, 2, 3])
    assert n == 3 and cache.load(entry) == state(1000)  # still in host memory
    cache.store([4, 5, 6], state(1000, 1))  # no more writes are even tried
    cache.flush()
    assert cache.stats.disk_errors == 1 and cache.lookup([4, 5, 6])[1] == 3
    cache.close()


def test_a_full_disk_during_a_real_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import edge_llm.engines.prompt_cache as pc

    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pc, "open", lambda p, mode="r", *a, **k: FullFile(real_open(p, mode, *a, **k))
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    cache = disk_cache(tmp_path)
    cache.store([1, 2, 3], state(1000))
    cache.flush()
    assert [p.name for p in tmp_path.iterdir()] == []
    cache.close()


def test_an_unusable_cache_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EdgeLLMError, match="cannot use the cache directory"):
        DiskStore(blocker / "kv", FP, 10**6)


def test_the_model_digest_is_remembered_until_the_file_changes(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"a" * 1000)
    first = file_digest(model, tmp_path)
    assert (tmp_path / "model-digests.json").exists()
    assert file_digest(model, tmp_path) == first
    model.write_bytes(b"GGUF" + b"b" * 1000)
    os.utime(model, ns=(1, 1))
    assert file_digest(model, tmp_path) != first


def test_a_file_replaced_after_the_scan_cannot_make_the_reader_allocate_what_it_claims(tmp_path, caplog):
    import json
    import struct

    from edge_llm.engines.prompt_cache import MAGIC

    cache = disk_cache(tmp_path)
    cache.store([1, 2, 3], state(4000))
    cache.flush()
    cache.close()
    again = disk_cache(tmp_path, ram=0)
    entry, n = again.lookup([1, 2, 3])
    assert n == 3
    # Swapped for a small file whose header claims a terabyte of state.
    (path,) = tmp_path.glob("*" + SUFFIX)
    header = json.dumps({"fingerprint": FP, "n_tokens": 3, "state_bytes": 2**40, "crc32": 0}).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(header)) + header + np.array([1, 2, 3], "<i4").tobytes())
    with caplog.at_level(logging.WARNING):
        assert again.load(entry) is None
    assert "truncated or overlong" in caplog.text
    assert again.lookup([1, 2, 3]) == (None, 0) and again.stats.disk_errors == 1
    again.close()
