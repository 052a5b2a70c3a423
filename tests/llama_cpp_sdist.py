"""The pinned llama-cpp-python sdist, fetched once per machine, for what needs llama.cpp's own
sources: the converter reference tests (`llama_cpp_reference.py`) and the llama-server that the
benchmarks build (`scripts/bench_servers.py`).

Only the sdist file itself is downloaded, from the package index pip is configured with (`pip
config list`: PIP_INDEX_URL or index-url, then each extra-index-url), and it must match the sha256
the index lists; nothing is built. (Asking pip for sources of every package built each build tool of the
sdist from source, one inside the next; even `--no-binary llama-cpp-python` installs
scikit-build-core into a build environment and runs it to read the metadata.)

`$EDGE_LLM_LLAMA_CPP_SDIST` (an extracted sdist folder or its .tar.gz) is used instead when set.
Otherwise the files live under `$EDGE_LLM_TEST_CACHE`, else `$XDG_CACHE_HOME/edge-llm`, else
`~/.cache/edge-llm`: `downloads/llama_cpp_python-VERSION.tar.gz`, and the folders extracted from it.

Concurrent pytest processes share one file lock per version: the first downloads and extracts,
the others wait and find the result. A download becomes the final file only once complete and
its hash checked; an extraction goes to a partial folder renamed when complete; an interrupted
one (a test's timeout, Ctrl-C) leaves nothing that a later run would take for whole.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

PROJECT = "llama-cpp-python"
DEFAULT_INDEX = "https://pypi.org/simple"
READ_TIMEOUT_S = 60  # per read: a stalled connection fails rather than hanging a test
CHUNK = 1 << 20


class SdistError(RuntimeError):
    """The sdist could not be found, downloaded or checked: one line saying which and why."""


def pinned_version() -> str:
    """The llama-cpp-python version installed here: the one edge-llm pins."""
    return version(PROJECT)


def cache_dir() -> Path:
    root = os.environ.get("EDGE_LLM_TEST_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-llm"


def given_sdist() -> Path | None:
    """$EDGE_LLM_LLAMA_CPP_SDIST: an extracted sdist folder or its .tar.gz, if set."""
    value = os.environ.get("EDGE_LLM_LLAMA_CPP_SDIST")
    return Path(value).expanduser() if value else None


def _lock(release: str) -> FileLock:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".llama_cpp_python-{release}.lock"))


def sdist_tarball(release: str | None = None) -> Path:
    """The sdist's .tar.gz: $EDGE_LLM_LLAMA_CPP_SDIST when it names one, else the cached download
    (downloaded first, once, when missing)."""
    given = given_sdist()
    if given is not None and given.is_file():
        return given
    release = release or pinned_version()
    tarball = cache_dir() / "downloads" / f"llama_cpp_python-{release}.tar.gz"
    if tarball.is_file():
        return tarball
    with _lock(release):
        if not tarball.is_file():  # another process may have finished it while this one waited
            url, sha256 = find_sdist(release)
            download(url, sha256, tarball)
    return tarball


def extracted(dest: Path, members: tuple[str, ...] = (), release: str | None = None) -> Path:
    """`dest`: the sdist's top folder, extracted once (only the paths under `members`, relative to
    that folder, when given)."""
    if dest.is_dir():
        return dest
    release = release or pinned_version()
    tarball = sdist_tarball(release)
    with _lock(release):
        if dest.is_dir():
            return dest
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an extraction that was killed
        try:
            with tarfile.open(tarball) as tar:
                names = tar.getmembers()
                top = names[0].name.split("/")[0]
                chosen = [m for m in names
                          if not members or any(m.name.removeprefix(top + "/").startswith(p) for p in members)]
                tar.extractall(partial, members=chosen, filter="data")
            dest.parent.mkdir(parents=True, exist_ok=True)
            (partial / top).rename(dest)
        except (OSError, tarfile.TarError) as exc:
            raise SdistError(f"could not extract {tarball} into {dest}: {exc}") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return dest


# -- the package index -------------------------------------------------------------------------


def index_urls() -> list[str]:
    """The indexes `pip download` would look in, in pip's order: PIP_INDEX_URL or the configured
    index-url (a `[download]` section's over `[global]`'s), then every extra-index-url."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60)
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")

    def setting(name: str) -> str | None:
        for section in (":env:", "download", "global"):
            if f"{section}.{name}" in values:
                return values[f"{section}.{name}"]
        return None

    extra = setting("extra-index-url")
    return [setting("index-url") or DEFAULT_INDEX, *(extra.split() if extra else [])]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def _read_page(url: str) -> str:
    """A PEP 503 project page; for a file:// index, a folder's index.html (as pip reads it)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        return (path / "index.html" if path.is_dir() else path).read_text(encoding="utf-8")
    with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response:
        return response.read().decode("utf-8", errors="replace")


def find_sdist(release: str, indexes: list[str] | None = None) -> tuple[str, str]:
    """(URL, sha256) of the sdist of `release` on the first index that lists it with a sha256."""
    indexes = indexes if indexes is not None else index_urls()
    wanted = {f"llama_cpp_python-{release}.tar.gz", f"llama-cpp-python-{release}.tar.gz"}
    tried = []
    for index in indexes:
        page = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', PROJECT).lower()}/"
        try:
            links = _Links()
            links.feed(_read_page(page))
        except (OSError, http.client.HTTPException) as exc:  # not listed there (404), unreachable...
            tried.append(f"{index} ({getattr(exc, 'reason', None) or exc})")
            continue
        for href in links.hrefs:
            url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
            name = urllib.parse.unquote(url.rsplit("/", 1)[-1])
            if name in wanted and fragment.startswith("sha256="):
                return url, fragment.removeprefix("sha256=")
        tried.append(f"{index} (no {min(wanted)} with a sha256)")
    raise SdistError(f"{PROJECT} {release} sdist not found: {'; '.join(tried)}; "
                     "set EDGE_LLM_LLAMA_CPP_SDIST to a downloaded .tar.gz or an extracted folder")


def download(url: str, sha256: str, dest: Path) -> Path:
    """`url` into `dest` through a partial file that becomes `dest` only when its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    digest = hashlib.sha256()
    print(f"downloading {url} (once per machine)", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as response, open(partial, "wb") as out:
            expected = int(response.headers.get("Content-Length") or -1)
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if 0 <= expected != partial.stat().st_size:  # a closed connection ends read() without an error
            raise SdistError(f"download of {url} failed: the connection closed after "
                             f"{partial.stat().st_size} of {expected} bytes")
        if digest.hexdigest() != sha256.lower():
            raise SdistError(f"{url}: sha256 {digest.hexdigest()} does not match the index's {sha256}")
        os.replace(partial, dest)
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError; a cut body an HTTPException
        raise SdistError(f"download of {url} failed: {getattr(exc, 'reason', None) or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return dest
