"""Untrusted chat templates, rendered in a child process with a bound on time and memory.

A chat template from a model file is code. jinja2's ImmutableSandboxedEnvironment keeps it away
from Python's internals (as in transformers), but nothing in it stops a template from looping
10^10 times, recursing without end or building a 10 GB string, and a Python thread stuck in such
a render can be neither interrupted nor killed. So each untrusted template renders in a small
process of its own (this file, run by path: only the standard library and jinja2, ~20 MB):

- time: a SIGALRM deadline (`seconds`, default RENDER_SECONDS) interrupts the render between two
  bytecodes; a render stuck inside one C call for KILL_GRACE_SECONDS more is killed, and the next
  render starts a fresh process;
- memory: RLIMIT_AS caps the process at MEMORY_BYTES, so `'a' * 10**10` is a MemoryError there
  instead of 10 GB taken from the machine; the rendered text is refused beyond MAX_OUTPUT_CHARS;
- recursion: Python's own limit, reported like the rest.

Every failure comes back to the caller as a TemplateRenderError with a `kind`: "syntax" (does not
parse), "security" (the sandbox refused an access), "failed" (raise_exception, a type error...),
"too_expensive" (time, memory, recursion, size) or "crashed" (the process died).

The two processes talk over the child's stdin/stdout in length-prefixed JSON frames: the
template once, then one request and one reply per render.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

RENDER_SECONDS = 2.0
KILL_GRACE_SECONDS = 2.0
MEMORY_BYTES = 1 << 30
# Far above any context window (1M tokens is ~4M characters), far below what hurts the server.
MAX_OUTPUT_CHARS = 32 << 20
_HEADER = struct.Struct(">I")
# Run this file by path, without the current directory on sys.path (`python -c` puts it first),
# so nothing in the caller's folder can shadow jinja2 or the standard library in the child.
_BOOTSTRAP = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"


class TemplateRenderError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # transformers' tojson keeps non-ASCII text as is; templates of Chinese models rely on that.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def sandbox_environment() -> ImmutableSandboxedEnvironment:
    """The environment every chat template renders in: transformers' settings and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_context(request: dict[str, Any], bos_token: str, eos_token: str) -> dict[str, Any]:
    return {"messages": request["messages"], "add_generation_prompt": request["add_generation_prompt"],
            "tools": request.get("tools"), "bos_token": bos_token, "eos_token": eos_token}


# -- the parent's side ------------------------------------------------------------------------------


class TemplateSandbox:
    """One untrusted template and the process that renders it; thread-safe (renders queue)."""

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "",
                 seconds: float = RENDER_SECONDS) -> None:
        self.seconds = seconds
        self._init = _encode({"template": template, "bos_token": bos_token, "eos_token": eos_token,
                              "seconds": seconds})
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        request = _encode({"messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools})
        with self._lock:
            proc = self._process()
            try:
                _write_frame(proc.stdin, request)
                reply = _read_frame_before(proc.stdout, time.monotonic() + self.seconds + KILL_GRACE_SECONDS)
            except TimeoutError:
                self._stop()
                raise TemplateRenderError("too_expensive", f"it ran longer than {self.seconds:g} s") from None
            except (OSError, EOFError, ValueError):
                self._stop()
                raise TemplateRenderError("crashed", "its sandbox process died") from None
        if "error" in reply:
            raise TemplateRenderError(*reply["error"])
        return reply["text"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _process(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self._proc = proc
            # The process ends with this object (or at exit), however it is dropped.
            self._finalizer = weakref.finalize(self, _stop_process, proc)
            try:
                _write_frame(proc.stdin, self._init)
            except OSError:
                self._stop()
                raise TemplateRenderError("crashed", "its sandbox process did not start") from None
        return self._proc

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_process once
        self._proc = self._finalizer = None


def _stop_process(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass


def _encode(value: Any) -> bytes:
    # Lone surrogates (valid in JSON strings, e.g. "\ud800") must survive the round trip.
    return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> Any:
    return json.loads(data.decode("utf-8", "surrogatepass"))


def _write_frame(pipe: Any, data: bytes) -> None:
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


def _read_frame_before(pipe: Any, deadline: float) -> Any:
    fd = pipe.fileno()

    def read_exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(read_exactly(_HEADER.size))
    if size > 4 * MAX_OUTPUT_CHARS + 4096:
        raise ValueError("reply too large")
    return _decode(read_exactly(size))


# -- the child's side -------------------------------------------------------------------------------


class _Deadline(BaseException):
    """Raised by SIGALRM inside a render; a BaseException, so no template machinery catches it."""


def _on_deadline(signum: int, frame: object) -> None:
    raise _Deadline


def _limit_memory(limit: int) -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # not on this platform: the time bound still holds
        pass


class _Renderer:
    """The child's template, compiled on the first render (within that render's deadline)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.template: jinja2.Template | None = None
        self.broken: _Refused | None = None

    def __call__(self, context: dict[str, Any]) -> str:
        if self.broken is not None:
            raise self.broken
        if self.template is None:
            try:
                self.template = sandbox_environment().from_string(self.source)
            except jinja2.TemplateSyntaxError as exc:
                self.broken = _Refused("syntax", f"{exc.message} (line {exc.lineno})")
                raise self.broken from None
            except (_Deadline, MemoryError, RecursionError):
                raise
            except Exception as exc:  # a template that breaks the compiler itself
                self.broken = _Refused("syntax", f"{type(exc).__name__}: {exc}")
                raise self.broken from None
        return self.template.render(**context)


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _render(render: _Renderer, context: dict[str, Any], seconds: float) -> dict[str, Any]:
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            text = render(context)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Refused as exc:
        return {"error": [exc.kind, str(exc)]}
    except _Deadline:
        return {"error": ["too_expensive", f"it ran longer than {seconds:g} s"]}
    except MemoryError:
        return {"error": ["too_expensive", f"it needed more than {MEMORY_BYTES >> 20} MiB of memory"]}
    except RecursionError:
        return {"error": ["too_expensive", "it recursed too deep"]}
    except OverflowError as exc:  # e.g. the sandbox's cap on range(), or a number too large for a size
        return {"error": ["too_expensive", str(exc)]}
    except SecurityError as exc:
        return {"error": ["security", str(exc)]}
    except jinja2.TemplateError as exc:
        return {"error": ["failed", str(exc)]}
    except Exception as exc:  # the template's own bug on these messages (a TypeError, 1/0...)
        return {"error": ["failed", f"{type(exc).__name__}: {exc}"]}
    if len(text) > MAX_OUTPUT_CHARS:
        return {"error": ["too_expensive", f"its output is longer than {MAX_OUTPUT_CHARS} characters"]}
    return {"text": text}


def _read_child_frame(pipe: Any) -> Any:
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return _decode(pipe.read(size))


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_deadline)
    _limit_memory(MEMORY_BYTES)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # only frames on the channel to the parent
    init = _read_child_frame(inp)
    if init is None:
        return
    render = _Renderer(init["template"])
    while (request := _read_child_frame(inp)) is not None:
        context = render_context(request, init["bos_token"], init["eos_token"])
        reply = _render(render, context, init["seconds"])
        try:
            _write_frame(out, _encode(reply))
        except MemoryError:
            _write_frame(out, _encode({"error": ["too_expensive", "its output does not fit in memory"]}))


if __name__ == "__main__":
    main()
