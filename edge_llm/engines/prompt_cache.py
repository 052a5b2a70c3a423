"""The prompt cache beyond the slots: KV states of conversations that lost their slot.

A slot holds one conversation's KV cache. When the scheduler gives a slot to another
conversation, what the slot held is saved here first (llama.cpp's `llama_state_seq_get_data`
bytes and the token ids they stand for); a later request that starts with those tokens gets the
bytes restored into a slot and evaluates only its new tokens.

Two tiers over one index of entries, each entry keyed by its token ids:
  - host memory, bounded by a byte budget (`--cache-ram`): least recently used states go first;
  - a directory (`--cache-dir`), optional: the same entries as files, so a restarted server or
    REPL resumes without re-reading its history; least recently used files go beyond
    `--cache-disk`. Files are written by a background thread, never by the engine thread.

A lookup finds the entry sharing the longest token prefix with a prompt. An entry whose tokens
are a prefix of a newer one is obsolete and dropped; a state already covered by an entry is not
stored twice. For a model with a sliding attention window (`prefix_reuse=False`) a state cannot
be cut back (llama_runtime.SequenceMemory): an entry serves only prompts that start with all of
its tokens, and covers only exactly its own.

A state is only valid for the model file and context settings that produced it, so each file
carries a fingerprint of them (see `fingerprint`); files with another one are ignored with a
warning, never loaded.

File format, little endian: MAGIC, u32 header length, a JSON header (fingerprint, n_tokens,
state_bytes, crc32), n_tokens int32 token ids, the state. A file is written under a temporary
name in the same directory and renamed when whole. The CRC covers ids and state: a torn or
corrupt file is deleted when read and the prompt is evaluated as if it had never been cached.
A write that fails (disk full, read-only) turns the disk tier off with one warning; serving goes on.

Plain Python and bytes: nothing here calls llama.cpp, so it is tested without a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_llm.errors import EdgeLLMError

log = logging.getLogger(__name__)

MAGIC = b"EDGE-LLM-KV\x01"
SUFFIX = ".kvc"
_HEADER_LEN = struct.Struct("<I")
# States waiting for the disk writer are held in memory beyond the host budget; past this much
# the next ones are not written (the host tier still has them). One is always accepted.
PENDING_WRITE_LIMIT = 256 * 2**20
# A temporary file older than this was left by a process that died while writing.
STALE_TMP_SECONDS = 600


class CacheFileError(Exception):
    """A cache file that cannot be used: foreign, torn or corrupt."""


# -- keys and fingerprints --------------------------------------------------------------------------


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading token ids two arrays share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def entry_key(fingerprint: str, tokens: np.ndarray) -> str:
    return hashlib.sha256(fingerprint.encode() + tokens.tobytes()).hexdigest()[:40]


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a model file. Hashing a multi-GB file takes seconds, so the digest is remembered
    in `memo_dir` by path, size, mtime and inode: any change to the file hashes it again."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo = memo_dir / "model-digests.json" if memo_dir is not None else None
    known: dict[str, str] = {}
    if memo is not None:
        try:
            known = json.loads(memo.read_text(encoding="utf-8"))
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(ident), str):
            return known[ident]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None:
        known[ident] = digest
        try:
            _write_atomic(memo, json.dumps(known, indent=1).encode())
        except OSError:
            pass  # only a memo: the next start hashes again
    return digest


def fingerprint(model_digest: str, settings: dict[str, object]) -> str:
    """What a KV state is bound to: the model file's digest and the context settings that shape
    the state (cells per sequence, KV types, unified or not, llama.cpp's version)."""
    text = json.dumps({"model_sha256": model_digest, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(target: Path, data: bytes | list) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    try:
        with open(tmp, "wb") as f:
            for part in data if isinstance(data, list) else [data]:
                f.write(part)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


# -- the disk tier ----------------------------------------------------------------------------------


@dataclass
class DiskEntry:
    path: Path
    tokens: np.ndarray
    nbytes: int  # the file's size
    mtime: float


def check_cache_dir(root: str | Path, budget: int | None = None) -> Path:
    """--cache-dir made if needed and proven writable by writing a file there (a directory can look
    writable and take no files: /proc/self, a read-only mount seen by root); --cache-disk > 0."""
    import tempfile

    if budget is not None and budget <= 0:
        raise EdgeLLMError("--cache-disk must be a positive size (leave --cache-dir out to keep nothing on disk)")
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeLLMError(f"cannot use the cache directory {root}: {exc.strerror or exc}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".edge-llm-probe-"):
            pass
    except OSError as exc:
        raise EdgeLLMError(f"cannot use the cache directory {root}: no file can be written there "
                           f"({exc.strerror or exc})") from None
    return root


class DiskStore:
    """Entry files in one directory, for one fingerprint. Other files are left alone."""

    def __init__(self, root: Path, fingerprint: str, budget: int) -> None:
        self.root = check_cache_dir(root, budget)
        self.fingerprint = fingerprint
        self.budget = budget

    def path_for(self, key: str) -> Path:
        return self.root / (key + SUFFIX)

    def scan(self) -> list[DiskEntry]:
        """This fingerprint's entries, from their headers; the rest counted and warned about."""
        found: list[DiskEntry] = []
        foreign = unreadable = 0
        now = time.time()
        try:
            names = list(os.scandir(self.root))
        except OSError as exc:
            log.warning("prompt cache: cannot list %s (%s); the disk cache starts empty", self.root, exc.strerror)
            return found
        for item in names:
            if item.name.endswith(".tmp"):
                try:
                    if now - item.stat().st_mtime > STALE_TMP_SECONDS:
                        os.unlink(item.path)
                except OSError:
                    pass
                continue
            if not item.name.endswith(SUFFIX) or not item.is_file():
                continue
            path = Path(item.path)
            try:
                with open(path, "rb") as f:
                    header = _read_header(f)
                    if header["fingerprint"] != self.fingerprint:
                        foreign += 1
                        continue
                    tokens = _read_tokens(f, header["n_tokens"])
                st = path.stat()
            except CacheFileError:
                unreadable += 1
                continue
            except OSError:
                unreadable += 1
                continue
            expected = _file_size(header)
            if st.st_size != expected:
                unreadable += 1
                continue
            found.append(DiskEntry(path, tokens, st.st_size, st.st_mtime))
        if foreign:
            log.warning("prompt cache: ignored %d file(s) in %s made for another model file or other context "
                        "settings", foreign, self.root)
        if unreadable:
            log.warning("prompt cache: ignored %d unreadable or truncated file(s) in %s", unreadable, self.root)
        return found

    def write(self, key: str, tokens: np.ndarray, state: bytes | bytearray) -> DiskEntry:
        ids = tokens.astype("<i4").tobytes()
        crc = zlib.crc32(state, zlib.crc32(ids))
        header = json.dumps({"fingerprint": self.fingerprint, "n_tokens": int(len(tokens)),
                             "state_bytes": len(state), "crc32": crc}).encode()
        path = self.path_for(key)
        _write_atomic(path, [MAGIC, _HEADER_LEN.pack(len(header)), header, ids, state])
        st = path.stat()
        return DiskEntry(path, tokens, st.st_size, st.st_mtime)

    def read(self, path: Path, tokens: np.ndarray) -> bytearray:
        """The state in a file; CacheFileError when it is not exactly what the index says."""
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                if header["fingerprint"] != self.fingerprint:
                    raise CacheFileError("made for another model or settings")
                # The header's sizes are checked against the file before anything is allocated:
                # a file replaced since the scan may claim any size.
                if os.fstat(f.fileno()).st_size != _file_size(header):
                    raise CacheFileError("truncated or overlong")
                ids = f.read(4 * header["n_tokens"])
                if len(ids) != 4 * header["n_tokens"] or not np.array_equal(np.frombuffer(ids, "<i4"), tokens):
                    raise CacheFileError("its token ids changed")
                state = bytearray(header["state_bytes"])
                if f.readinto(state) != len(state) or f.read(1):
                    raise CacheFileError("truncated or overlong")
        except OSError as exc:
            raise CacheFileError(exc.strerror or str(exc)) from None
        if zlib.crc32(state, zlib.crc32(ids)) != header["crc32"]:
            raise CacheFileError("checksum mismatch")
        try:
            os.utime(path)  # its mtime is the least-recently-used order across restarts
        except OSError:
            pass
        return state

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("prompt cache: cannot delete %s: %s", path, exc.strerror)


def _read_header(f) -> dict:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise CacheFileError("not an edge-llm cache file")
    raw = f.read(_HEADER_LEN.size)
    if len(raw) != _HEADER_LEN.size:
        raise CacheFileError("truncated header")
    (size,) = _HEADER_LEN.unpack(raw)
    if size > 4096:
        raise CacheFileError("oversized header")
    try:
        header = json.loads(f.read(size))
    except (ValueError, UnicodeDecodeError):
        raise CacheFileError("unreadable header") from None
    if not (isinstance(header, dict) and isinstance(header.get("fingerprint"), str)
            and all(isinstance(header.get(k), int) and header[k] >= 0 for k in ("n_tokens", "state_bytes", "crc32"))):
        raise CacheFileError("unreadable header")
    header["_size"] = size
    return header


def _read_tokens(f, n: int) -> np.ndarray:
    ids = f.read(4 * n)
    if len(ids) != 4 * n:
        raise CacheFileError("truncated token ids")
    return np.frombuffer(ids, "<i4").astype(np.int32)


def _file_size(header: dict) -> int:
    return len(MAGIC) + _HEADER_LEN.size + header["_size"] + 4 * header["n_tokens"] + header["state_bytes"]


# -- the cache --------------------------------------------------------------------------------------


@dataclass(eq=False)
class CacheEntry:
    tokens: np.ndarray
    key: str
    state: bytes | bytearray | None = None  # in host memory
    pending: bytes | bytearray | None = None  # queued for the disk writer
    disk: DiskEntry | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def available(self) -> bool:
        return self.state is not None or self.pending is not None or self.disk is not None

    @property
    def ram_bytes(self) -> int:
        return len(self.state) + self.tokens.nbytes if self.state is not None else 0


@dataclass
class CacheStats:
    """Counters for /metrics and the tests."""

    stored: int = 0  # states saved when their slot was given to another conversation
    hits: int = 0  # requests that resumed from a saved state
    restored_tokens: int = 0  # prompt tokens those requests did not evaluate thanks to it
    evictions: int = 0  # states dropped from host memory for the budget
    disk_evictions: int = 0  # files deleted for the disk budget
    disk_errors: int = 0  # unreadable files skipped, failed writes


class PromptCache:
    """The index over both tiers. The engine thread looks up, loads and stores; a writer thread
    owns the files. One lock guards the index."""

    def __init__(self, ram_budget: int, disk: DiskStore | None = None, *, prefix_reuse: bool = True) -> None:
        self.ram_budget = ram_budget
        self.disk = disk
        self.prefix_reuse = prefix_reuse  # a state stands for every prefix of its tokens too
        self.stats = CacheStats()
        self._entries: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._disk_on = False  # off when there is no disk tier, or after a failed write
        if disk is not None:
            now_mono, now_wall = time.monotonic(), time.time()
            for found in disk.scan():
                key = found.path.name[: -len(SUFFIX)]
                # Older files rank as less recently used, in the order their mtimes give.
                self._entries[key] = CacheEntry(found.tokens, key, disk=found,
                                                last_used=now_mono - max(0.0, now_wall - found.mtime))
            self._writer = threading.Thread(target=self._write_forever, name="edge-llm-cache-writer", daemon=True)
            self._writer.start()
            self._disk_on = True

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        with self._lock:
            return sum(e.ram_bytes for e in self._entries.values())

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return sum(e.disk.nbytes for e in self._entries.values() if e.disk is not None)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.available)

    @property
    def persistent(self) -> bool:
        return self.disk is not None

    # -- engine thread --------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int]) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that prefix's length."""
        ids = as_tokens(tokens)
        best, best_len = None, 0
        with self._lock:
            for entry in self._entries.values():
                if not entry.available:
                    continue
                n = common_prefix(entry.tokens, ids)
                if n < entry.n_tokens and not self.prefix_reuse:
                    continue
                # Among equals, one in memory (no file to read), then the most recently used.
                if n > best_len or (n == best_len and best is not None and n > 0
                                    and (entry.state is not None, entry.last_used)
                                    > (best.state is not None, best.last_used)):
                    best, best_len = entry, n
        return best, best_len

    def covers(self, tokens: Sequence[int], *, tier: str = "any") -> bool:
        """Whether an entry already holds a state for all of `tokens`, in host memory ("ram"),
        on disk ("disk", written or queued) or either ("any"): saving it there again is waste."""
        ids = as_tokens(tokens)
        with self._lock:
            return any(self._holds(e, tier) and self._stands_for(e, ids) for e in self._entries.values())

    def _stands_for(self, entry: CacheEntry, ids: np.ndarray) -> bool:
        """Whether the entry's state can be restored as a state of exactly `ids`."""
        if entry.n_tokens < len(ids) or (entry.n_tokens > len(ids) and not self.prefix_reuse):
            return False
        return common_prefix(entry.tokens, ids) == len(ids)

    @staticmethod
    def _holds(entry: CacheEntry, tier: str) -> bool:
        if tier == "ram":
            return entry.state is not None
        if tier == "disk":
            return entry.disk is not None or entry.pending is not None
        return entry.available

    def load(self, entry: CacheEntry) -> bytes | bytearray | None:
        """The entry's state bytes (from memory, or read from its file), or None if the entry
        turned out unusable (it is dropped, and the caller evaluates the prompt instead)."""
        with self._lock:
            entry.last_used = time.monotonic()
            state = entry.state if entry.state is not None else entry.pending
            disk = entry.disk
        if state is not None:
            return state
        if disk is None or self.disk is None:
            return None
        try:
            return self.disk.read(disk.path, entry.tokens)
        except CacheFileError as exc:
            log.warning("prompt cache: skipped %s (%s)", disk.path, exc)
            self.discard(entry)
            return None

    def discard(self, entry: CacheEntry) -> None:
        """Forget an entry whose state turned out unusable (its file is deleted), so no later
        request tries it again."""
        with self._lock:
            if entry.disk is not None:
                self.stats.disk_errors += 1
            if self._entries.get(entry.key) is entry:
                self._drop(entry)

    def note_restore(self, n_tokens: int) -> None:
        self.stats.hits += 1
        self.stats.restored_tokens += n_tokens

    def store(self, tokens: Sequence[int], state: bytes | bytearray, *, in_memory: bool = True) -> bool:
        """Keep a state for `tokens`: in host memory (when `in_memory` and it fits the budget)
        and on disk (when there is a disk tier and no file covers these tokens yet). False when
        nothing was kept."""
        ids = as_tokens(tokens).copy()
        if len(ids) == 0:
            return False
        key = entry_key(self.disk.fingerprint if self.disk else "", ids)
        keep_ram = in_memory and len(state) + ids.nbytes <= self.ram_budget
        with self._lock:
            to_disk = self._disk_on and not any(self._holds(e, "disk") and self._stands_for(e, ids)
                                                for e in self._entries.values())
            if to_disk and self._pending_bytes and self._pending_bytes + len(state) > PENDING_WRITE_LIMIT:
                to_disk = False  # the disk is behind: this one lives in memory only, if at all
            if not keep_ram and not to_disk:
                return False
            entry = self._entries.get(key)
            if entry is None:
                for old in [e for e in self._entries.values()
                            if e.n_tokens < len(ids) and common_prefix(e.tokens, ids) == e.n_tokens]:
                    self._drop(old)  # a prefix of this one: obsolete
                entry = self._entries[key] = CacheEntry(ids, key)
            entry.last_used = time.monotonic()
            if keep_ram and entry.state is None:
                entry.state = state
                self._evict_ram(keep=entry)
            if to_disk:
                entry.pending = state
                self._pending_bytes += len(state)
                self._writes.put(("write", entry))
            self.stats.stored += 1
        return True

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until every queued file operation is done (shutdown, tests)."""
        if self._writer is None or not self._writer.is_alive():
            return
        done = threading.Event()
        self._writes.put(("signal", done))
        done.wait(timeout)

    def close(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            self._writes.put(("stop", None))
            self._writer.join(timeout=120)
        with self._lock:
            for entry in self._entries.values():
                entry.state = entry.pending = None
            self._entries.clear()

    # -- internals ------------------------------------------------------------------------------

    def _drop(self, entry: CacheEntry) -> None:
        """Forget an entry in both tiers (lock held)."""
        self._entries.pop(entry.key, None)
        entry.state = None
        if entry.disk is not None:
            self._writes.put(("delete", entry.disk.path))
            entry.disk = None

    def _evict_ram(self, keep: CacheEntry) -> None:
        """Drop least recently used states from memory until the budget holds (lock held)."""
        held = sum(e.ram_bytes for e in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if held <= self.ram_budget:
                break
            if entry is keep or entry.state is None:
                continue
            held -= entry.ram_bytes
            entry.state = None
            self.stats.evictions += 1
            if not entry.available:
                self._entries.pop(entry.key, None)

    def _evict_disk(self) -> list[Path]:
        """Forget least recently used files until the disk budget holds (lock held); returns
        the files for the writer to delete."""
        assert self.disk is not None
        on_disk = [e for e in self._entries.values() if e.disk is not None]
        held = sum(e.disk.nbytes for e in on_disk)
        gone = []
        for entry in sorted(on_disk, key=lambda e: e.last_used):
            if held <= self.disk.budget:
                break
            held -= entry.disk.nbytes
            gone.append(entry.disk.path)
            entry.disk = None
            self.stats.disk_evictions += 1
            if not entry.available:
                self._entries.pop(entry.key, None)
        return gone

    def _write_forever(self) -> None:
        assert self.disk is not None
        failed = False  # the disk failed: the tier is off, queued writes are only released
        while True:
            op, arg = self._writes.get()
            if op == "stop":
                return
            if op == "signal":
                arg.set()
            elif op == "delete":
                self.disk.remove(arg)
            elif op == "write" and failed:
                with self._lock:
                    self._settle(arg)
            elif op == "write":
                failed = not self._write_entry(arg)

    def _write_entry(self, entry: CacheEntry) -> bool:
        """Write one entry's file; False when the disk failed and the tier is now off."""
        assert self.disk is not None
        with self._lock:
            state = entry.pending
            live = self._entries.get(entry.key) is entry
            if not live or state is None:
                self._settle(entry)
                return True
        try:
            written = self.disk.write(entry.key, entry.tokens, state)
        except OSError as exc:
            log.warning("prompt cache: cannot write to %s (%s); the disk cache is off until restart, "
                        "host memory still caches", self.disk.root, exc.strerror or exc)
            with self._lock:
                self.stats.disk_errors += 1
                self._settle(entry)
                self._disk_on = False  # store() queues nothing more
            return False
        with self._lock:
            if self._entries.get(entry.key) is entry:
                entry.disk = written
                self._settle(entry)
                gone = self._evict_disk()
            else:  # dropped as obsolete while being written
                self._settle(entry)
                gone = [written.path]
        for path in gone:
            self.disk.remove(path)
        return True

    def _settle(self, entry: CacheEntry) -> None:
        """The entry's queued bytes are no longer waiting (lock held)."""
        if entry.pending is not None:
            self._pending_bytes -= len(entry.pending)
            entry.pending = None
        if not entry.available and self._entries.get(entry.key) is entry:
            self._entries.pop(entry.key, None)


# -- construction -----------------------------------------------------------------------------------

def open_prompt_cache(model_path: Path, settings: dict[str, object], *, ram_budget: int,
                      cache_dir: str | Path | None, disk_budget: int, prefix_reuse: bool = True) -> PromptCache | None:
    """The cache an engine asked for, or None when both tiers are off (`--cache-ram 0`, no dir).
    `ram_budget`, `disk_budget`: the resolved --cache-ram and --cache-disk (their defaults and bounds
    are the options', load_options.py); `prefix_reuse`: PromptCache's."""
    ram = ram_budget
    disk = None
    if cache_dir:
        root = Path(cache_dir).expanduser()
        disk = DiskStore(root, "", disk_budget)  # checks the folder before the model is hashed
        try:
            digest = file_digest(Path(model_path), root)
        except OSError as exc:
            raise EdgeLLMError(f"cannot read {model_path} to fingerprint the prompt cache: {exc.strerror}") from None
        disk.fingerprint = fingerprint(digest, settings)
    if ram == 0 and disk is None:
        return None
    return PromptCache(ram, disk, prefix_reuse=prefix_reuse)
