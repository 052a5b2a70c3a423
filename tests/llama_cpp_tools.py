"""llama.cpp's own programs as references, from the llama.cpp that the pinned llama-cpp-python
vendors: llama-imatrix, llama-quantize and llama-perplexity for edge-llm's imatrix, quantize and KL
divergence; llama-server for embeddings, rerank scores and image answers. One build makes them all.

Where they come from, first found wins:
- `$EDGE_LLM_LLAMA_CPP_BIN`: a folder holding them (a llama.cpp `build/bin`);
- `~/.cache/edge-llm/llama-cpp-tools-VERSION/bin` (or under `$EDGE_LLM_TEST_CACHE`), built there on
  first use with cmake from the sdist's vendored llama.cpp (`$EDGE_LLM_LLAMA_CPP_SDIST`, else the sdist
  tests/llama_cpp_sdist.py downloads once per machine): a few minutes once per machine.

They are built as llama-cpp-python builds its library (Release, the host's CPU features), so on one
machine both compute the same activations and logits.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from llama_cpp_reference import PINNED, run_in_own_group
from llama_cpp_sdist import cache_dir, extracted, given_sdist

# The first test that needs a tool builds them all (about 10 minutes on 2 cores, once per machine):
# those tests run under this timeout instead of the suite's 600 s.
BUILD_TIMEOUT_S = 3600
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-server")


def _source() -> Path:
    """The full vendored llama.cpp tree (CMakeLists.txt, ggml, src, common, tools)."""
    given = given_sdist()
    if given and (given / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return given / "vendor" / "llama.cpp"
    top = extracted(cache_dir() / f"llama-cpp-sources-{PINNED}", ("vendor/llama.cpp/",), PINNED)
    return top / "vendor" / "llama.cpp"


def _build(cmd: list[str]) -> None:
    """A cmake step in a process group of its own: a test that times out mid-build leaves no
    compiler running."""
    done = run_in_own_group(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed (exit {done.returncode}):\n"
                           + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))


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
            _build(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                    # The server's web page is fetched from a hub by default: none (no network in tests).
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"])
            _build(["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
                    "--target", *TOOLS])
    return path


def run(name: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a llama.cpp program on the CPU; a failure shows its log."""
    result = subprocess.run([str(tool(name)), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
