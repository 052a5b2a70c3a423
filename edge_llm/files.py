"""The files a user names on the command line: one-line errors instead of tracebacks.

Every OS error (permission, missing folder, is-a-folder, disk full, read-only file system) on a
file becomes one EdgeLLMError line that names the file; every input file is read as bytes that
may not be UTF-8. Commands that write files check the output path before their long work, then
write under a temporary name and rename (see ARCHITECTURE.md).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_llm.errors import EdgeLLMError


def os_error_line(exc: OSError, path: str | Path | None = None, action: str | None = None) -> str:
    """'cannot write out.jsonl: Read-only file system' (the path given, else the error's own)."""
    path = path if path is not None else exc.filename
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT and action == "write" and path is not None:
        reason = f"folder {Path(path).parent} does not exist"
    elif exc.errno == errno.ENOTDIR and path is not None:
        reason = f"a part of {Path(path).parent} is a file, not a folder"
    what = f"cannot {action} {path}" if action and path is not None else (str(path) if path is not None else "")
    return f"{what}: {reason}" if what else reason


@contextmanager
def os_errors(path: str | Path, action: str) -> Iterator[None]:
    """Turn an OSError raised inside into one line: 'cannot {action} {path}: {reason}'."""
    try:
        yield
    except OSError as exc:
        raise EdgeLLMError(os_error_line(exc, path, action)) from None


def decode_utf8(data: bytes, where: str) -> str:
    """Strict UTF-8 (a leading BOM dropped), or one line saying where the first bad byte is."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgeLLMError(f"{where} is not UTF-8 text: {utf8_error_position(data, exc)}") from None


def utf8_error_position(data: bytes, exc: UnicodeDecodeError) -> str:
    """'invalid byte 0xff at line 3, column 7' (columns count bytes, from 1)."""
    start = data.rfind(b"\n", 0, exc.start) + 1
    line = data.count(b"\n", 0, exc.start) + 1
    return f"invalid byte 0x{data[exc.start]:02x} at line {line}, column {exc.start - start + 1}"


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents, or one error line naming it (`what`: 'prompt file', ...)."""
    with os_errors(path, f"read {what}"):
        data = Path(path).read_bytes()
    return decode_utf8(data, f"{what} {path}")


def json_bytes(value: object, **dumps: Any) -> bytes:
    """JSON in UTF-8, non-ASCII text as is; a string that is not valid Unicode (a lone surrogate
    such as "\\ud800", which JSON input can carry, or undecodable bytes from a terminal) is
    written as its \\u escape instead of failing, so the file reads back as the same value."""
    try:
        return json.dumps(value, ensure_ascii=False, **dumps).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, **dumps).encode("ascii")


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any long work, an output that cannot be written: a folder, a missing folder,
    a folder this process may not create files in (permissions, read-only file system). The check
    creates and removes a hidden file beside the target, as the real write will."""
    path = Path(path)
    if path.is_dir():
        raise EdgeLLMError(f"cannot write {path}: it is a folder")
    parent = path.parent
    if not parent.is_dir():
        reason = "is a file, not a folder" if parent.exists() else "does not exist"
        raise EdgeLLMError(f"cannot write {path}: folder {parent} {reason}")
    probe = parent / f".{path.name}.{os.getpid()}.probe"
    with os_errors(path, "write"):
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    return path
