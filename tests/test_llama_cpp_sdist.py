"""The llama-cpp-python sdist fetcher of the converter tests and the benchmarks
(tests/llama_cpp_sdist.py), against a package index on 127.0.0.1: the one file is downloaded from
the index pip is configured with, checked against the index's sha256, extracted once for every
process that asks at the same time, and nothing half-done is ever taken for the real thing. Also:
a reference conversion that is stopped (a test's timeout) leaves no process behind."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from llama_cpp_reference import run_in_own_group
from llama_cpp_sdist import SdistError, extracted, index_urls, pinned_version, sdist_tarball

TESTS = Path(__file__).resolve().parent
RELEASE = pinned_version()
TOP = f"llama_cpp_python-{RELEASE}"
WANTED = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/")


def _sdist() -> bytes:
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": b"# the converter\n",
             "vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
             "vendor/llama.cpp/ggml/src/ggml.c": b"/* not wanted */\n" * 1000,
             "pyproject.toml": b"[project]\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class FakeIndex:
    """A PEP 503 index with one project page and the sdist it links, counting file downloads.
    `cut`: the file's body stops halfway and the connection closes; `delay`: seconds before the body."""

    def __init__(self, data: bytes, sha256: str | None = None):
        self.data = data
        self.sha256 = sha256 or hashlib.sha256(data).hexdigest()
        self.file_gets = 0
        self.cut = False
        self.delay = 0.0
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/simple/llama-cpp-python/":
            body = (f'<html><body><a href="../../files/{TOP}.tar.gz#sha256={self.sha256}">{TOP}.tar.gz</a>'
                    "</body></html>").encode()
        elif handler.path == f"/files/{TOP}.tar.gz":
            self.file_gets += 1
            time.sleep(self.delay)
            body = self.data
        else:
            handler.send_error(404)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2] if self.cut and body is self.data else body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def index(monkeypatch, tmp_path):
    """A fake index as pip's only index, and an empty cache."""
    fake = FakeIndex(_sdist())
    monkeypatch.setenv("PIP_INDEX_URL", f"{fake.url}/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("EDGE_LLM_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGE_LLM_LLAMA_CPP_SDIST", raising=False)
    yield fake
    fake.close()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_fetched_once_from_pips_index_and_only_what_is_asked_for_extracted(index, tmp_path):
    folder = extracted(tmp_path / "cache" / TOP, WANTED)
    assert _files(folder) == {"vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/gguf/__init__.py"}
    tarball = sdist_tarball()
    assert tarball.read_bytes() == index.data
    assert extracted(tmp_path / "cache" / TOP, WANTED) == folder
    assert index.file_gets == 1
    # Nothing but the tarball in the downloads folder: no partial file, no lock left inside it.
    assert [p.name for p in tarball.parent.iterdir()] == [tarball.name]


def test_extra_index_urls_are_searched_after_the_index(index, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_INDEX_URL", f"{index.url}/nothing-here")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{index.url}/also-nothing {index.url}/simple")
    assert index_urls() == [f"{index.url}/nothing-here", f"{index.url}/also-nothing", f"{index.url}/simple"]
    assert sdist_tarball().read_bytes() == index.data


def test_a_hash_that_does_not_match_leaves_no_file(index, tmp_path):
    index.sha256 = "0" * 64
    with pytest.raises(SdistError, match="does not match"):
        sdist_tarball()
    downloads = tmp_path / "cache" / "downloads"
    assert list(downloads.iterdir()) == []


def test_a_cut_download_leaves_no_file_and_the_next_run_starts_clean(index, tmp_path):
    index.cut = True
    with pytest.raises(SdistError, match="failed"):
        sdist_tarball()
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    index.cut = False
    assert sdist_tarball().read_bytes() == index.data


def test_not_on_any_index_is_one_line_naming_the_way_out(index, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"{index.url}/nothing-here")
    with pytest.raises(SdistError) as error:
        sdist_tarball()
    assert "\n" not in str(error.value)
    assert "EDGE_LLM_LLAMA_CPP_SDIST" in str(error.value) and "nothing-here" in str(error.value)


@pytest.mark.slow
def test_processes_asking_at_once_share_one_download(index, tmp_path):
    index.delay = 1.0  # the first download is still running when the others ask
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from llama_cpp_sdist import extracted; "
              "print(extracted(__import__('pathlib').Path(sys.argv[2]), ('vendor/llama.cpp/gguf-py/',)))")
    dest = tmp_path / "cache" / TOP
    processes = [subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(dest)], stdout=subprocess.PIPE,
                                  text=True, env=os.environ.copy()) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert outputs == [str(dest)] * 3
    assert index.file_gets == 1
    assert _files(dest) == {"vendor/llama.cpp/gguf-py/gguf/__init__.py"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but its parent's wait (its parent is init here).
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_conversion_leaves_no_process_behind(tmp_path):
    """pytest-timeout raises in the test's thread from a signal handler: the same as here."""
    pid_file = tmp_path / "grandchild"
    child = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")

    class TimedOut(Exception):
        pass

    def time_out(*_):
        raise TimedOut

    previous = signal.signal(signal.SIGALRM, time_out)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(TimedOut):
            run_in_own_group([sys.executable, "-c", child])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
