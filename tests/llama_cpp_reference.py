"""llama.cpp's own converter as the reference for edge-llm's: `convert_hf_to_gguf.py` from the
llama.cpp that the pinned llama-cpp-python vendors, run in a subprocess with its own gguf-py.

The sources come from `llama_cpp_sdist.py` ($EDGE_LLM_LLAMA_CPP_SDIST, else the sdist downloaded
once per machine into the test cache); only the converter, its `conversion/` package and `gguf-py/`
are extracted, into `CACHE/llama_cpp_python-VERSION/`.

The upstream converter needs torch and transformers (the `dev` extra has them). Its output is cached
under the same cache folder, keyed by the checkpoint's bytes, the sdist version, the output type and
the pre-tokenizer fallback, so a fixture that did not change is converted by llama.cpp only once.

Tiny fixtures carry tokenizers trained here, whose token-id hash cannot be the real model's, so
upstream's `get_vocab_base_pre` would refuse them ("BPE pre-tokenizer was not recognized"). For those,
the test names the family's pre-tokenizer (`pre=`) and upstream uses it when, and only when, its hash
table does not know the tokenizer; edge-llm must then find the same name by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from llama_cpp_sdist import cache_dir, extracted, given_sdist, pinned_version

PINNED = pinned_version()
PR_SET_PDEATHSIG = 1
_MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")

# Runs upstream's converter as its own __main__, with `get_vocab_base_pre` falling back to the
# pre-tokenizer the test names when upstream's hash table does not know the tokenizer, after the
# test's `patch` (Python source) if any.
_RUNNER = """
import runpy, sys
script, pre, patch = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [script] + sys.argv[4:]
exec(patch)
if pre:
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def llama_cpp_dir() -> Path:
    """The vendored llama.cpp folder (convert_hf_to_gguf.py, conversion/, gguf-py/)."""
    given = given_sdist()
    folder = given if given is not None and given.is_dir() else \
        extracted(cache_dir() / f"llama_cpp_python-{PINNED}", _MEMBERS, PINNED)
    vendored = folder / "vendor" / "llama.cpp"
    if not (vendored / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{folder}: not an extracted llama-cpp-python sdist (no vendor/llama.cpp/"
                                "convert_hf_to_gguf.py); set EDGE_LLM_LLAMA_CPP_SDIST")
    return vendored


def run_in_own_group(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, with the command and anything it starts in a process group of their own
    that is killed when the caller stops waiting for any reason (a test's timeout raises in
    here; Ctrl-C), and sent SIGKILL if the caller's process dies (Linux), so none outlives it."""
    process = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _checkpoint_hash(hf_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in hf_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(hf_dir)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def reference_gguf(hf_dir: Path, outtype: str = "f16", pre: str | None = None, patch: str = "") -> Path:
    """llama.cpp's conversion of `hf_dir` (cached). `patch`: Python run first in the converter's
    process, for an upstream bug that stops it (the test says which and why)."""
    key = hashlib.sha256(f"{PINNED}|{outtype}|{pre}|{patch}|{_checkpoint_hash(hf_dir)}".encode()).hexdigest()[:32]
    out = cache_dir() / "reference-gguf" / f"{key}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    vendored = llama_cpp_dir()
    tmp = out.with_suffix(f".{os.getpid()}.partial")  # concurrent test processes may convert the same fixture
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendored / "gguf-py"), str(vendored)]),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    result = run_in_own_group([sys.executable, "-c", _RUNNER, str(vendored / "convert_hf_to_gguf.py"), pre or "",
                               patch, str(hf_dir), "--outfile", str(tmp), "--outtype", outtype],
                              env=env, cwd=vendored)
    if result.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's converter failed on {hf_dir.name} (exit {result.returncode}):\n"
                           + "\n".join(result.stderr.strip().splitlines()[-15:]))
    tmp.rename(out)
    return out


# Keys llama.cpp does not read for inference (or that say who wrote the file): not compared.
_IGNORED_PREFIXES = ("GGUF.", "edge_llm.", "general.")
_COMPARED_GENERAL = ("general.architecture", "general.file_type", "general.quantization_version",
                     "general.alignment")


def _fields(reader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values()
            if f.name in _COMPARED_GENERAL or not f.name.startswith(_IGNORED_PREFIXES)}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(value) if hasattr(value, '__len__') else '?'} items)"


def gguf_differences(reference: Path, ours: Path) -> dict[str, str]:
    """Every way `ours` differs from `reference`: tensor (name, type, shape, bytes) and metadata
    key by key. An empty dict: the same model for llama.cpp."""
    from gguf import GGUFReader

    ref, mine = GGUFReader(reference), GGUFReader(ours)
    diffs: dict[str, str] = {}
    theirs = {t.name: t for t in ref.tensors}
    own = {t.name: t for t in mine.tensors}
    for name in sorted(theirs.keys() | own.keys()):
        a, b = theirs.get(name), own.get(name)
        if a is None or b is None:
            diffs[f"tensor {name}"] = "only in llama.cpp's file" if b is None else "only in edge-llm's file"
        elif a.tensor_type != b.tensor_type:
            diffs[f"tensor {name}"] = f"type {a.tensor_type.name} vs {b.tensor_type.name}"
        elif list(a.shape) != list(b.shape):
            diffs[f"tensor {name}"] = f"shape {list(a.shape)} vs {list(b.shape)}"
        elif not np.array_equal(np.asarray(a.data), np.asarray(b.data)):
            diffs[f"tensor {name}"] = "different bytes"
    fa, fb = _fields(ref), _fields(mine)
    for key in sorted(fa.keys() | fb.keys()):
        if fa.get(key) != fb.get(key):
            diffs[key] = f"llama.cpp {_short(fa.get(key))}, edge-llm {_short(fb.get(key))}"
    return diffs
