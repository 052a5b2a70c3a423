"""llama.cpp's own programs (llama-imatrix, llama-quantize, llama-perplexity) as the reference for
edge-llm's imatrix, quantize and KL divergence, from the llama.cpp that the pinned llama-cpp-python
vendors.

Where they come from, first found wins:
- `$EDGE_LLM_LLAMA_CPP_BIN`: a folder holding them (a llama.cpp `build/bin`);
- `~/.cache/edge-llm/llama-cpp-tools-VERSION/bin` (or under `$EDGE_LLM_TEST_CACHE`), built there on
  first use with cmake from the sdist's vendored llama.cpp (`$EDGE_LLM_LLAMA_CPP_SDIST`, else `pip
  download`, as tests/llama_cpp_reference.py finds it): a few minutes once per machine.

They are built as llama-cpp-python builds its library (Release, the host's CPU features), so on one
machine both compute the same activations and logits.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from llama_cpp_reference import PINNED, cache_dir

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")


def _source() -> Path:
    """The full vendored llama.cpp tree (CMakeLists.txt, ggml, src, common, tools)."""
    given = Path(os.environ["EDGE_LLM_LLAMA_CPP_SDIST"]).expanduser() \
        if os.environ.get("EDGE_LLM_LLAMA_CPP_SDIST") else None
    if given and (given / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return given / "vendor" / "llama.cpp"
    folder = cache_dir() / f"llama-cpp-src-{PINNED}"
    if not (folder / "CMakeLists.txt").is_file():
        tarball = given if given and given.is_file() else None
        if tarball is None:
            downloads = cache_dir() / "downloads"
            downloads.mkdir(parents=True, exist_ok=True)
            tarball = downloads / f"llama_cpp_python-{PINNED}.tar.gz"
            if not tarball.is_file():
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                ":all:", f"llama-cpp-python=={PINNED}", "-d", str(downloads)], check=True)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tarball) as tar:
            top = tar.getnames()[0].split("/")[0]
            prefix = f"{top}/vendor/llama.cpp/"
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
        (tmp / top / "vendor" / "llama.cpp").rename(folder)
        shutil.rmtree(tmp)
    return folder


def tool(name: str) -> Path:
    """The path of a llama.cpp program, built if needed."""
    given = os.environ.get("EDGE_LLM_LLAMA_CPP_BIN")
    if given:
        path = Path(given).expanduser() / name
        if not path.is_file():
            raise FileNotFoundError(f"$EDGE_LLM_LLAMA_CPP_BIN has no {name}")
        return path
    build = cache_dir() / f"llama-cpp-tools-{PINNED}"
    path = build / "bin" / name
    if path.is_file():
        return path
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".lock", "w") as lock:  # one build at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            source = _source()
            subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                            "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"],
                           check=True, capture_output=True)
            subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
                            "--target", *TOOLS], check=True, capture_output=True)
    return path


def run(name: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a llama.cpp program on the CPU; a failure shows its log."""
    result = subprocess.run([str(tool(name)), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
