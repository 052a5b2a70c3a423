"""What the benchmark scripts share: the servers they compare, each in a process of its own with
a clean environment, and the load scenarios.

- `llama_server_binary()`: llama.cpp's `llama-server`, built once from the llama.cpp that the
  pinned llama-cpp-python sdist vendors (so both sides run the same llama.cpp), into
  ~/.cache/edge-llm/llama-server-<version>/; or a binary the caller names (`--llama-server`).
- `edge_llm_spec`, `llama_server_spec`, `llama_cpp_python_spec`: how to start each server.
- `running(spec)`: start one, wait until it answers its health route, stop it afterwards.
- `turn_order(specs, round)`: the servers in the order they take turns in a round (it rotates).
- `stream_completion(client, route, body)`: one streamed OpenAI-style request, timed.
- `TOPICS`: the subjects of the open-ended prompts.
- `scrape_metrics(url)`: a server's Prometheus /metrics samples, {} where it has none.
- `busy_core()`: the contended scenario, a busy loop pinned to one core for the whole run.

Every server starts from `clean_env()`: PATH, HOME and LANG only. Nothing the caller's shell
holds (OMP_*, GOMP_*, LLAMA_ARG_*, PYTHONPATH, ...) and nothing edge-llm sets in its own
process can reach a baseline, so a baseline runs as a user would start it.

    from bench_servers import edge_llm_spec, llama_server_binary, llama_server_spec, running
    with running(llama_server_spec(llama_server_binary(), model, parallel=8, ctx=8192, threads=2)) as url:
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's edge_llm, whatever is installed
sys.path.insert(1, str(ROOT / "tests"))  # the sdist fetcher is shared with the converter tests
from llama_cpp_sdist import SdistError, cache_dir, extracted, given_sdist, pinned_version  # noqa: E402

START_TIMEOUT_S = 180.0
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A minimal environment built from scratch, plus `extra` (a setting under test)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    return {**env, **(extra or {})}


def resolve_model(ref: str | None) -> Path:
    """A .gguf path for a model reference (default: the bundled demo model); the names of the
    benchmark model set (bench_models.py: gemma3-270m, qwen2.5-0.5b, llama3.2-1b) build or find
    that model."""
    from bench_models import MODELS, model_path

    from edge_llm.registry import load_registry, resolve

    if ref in MODELS:
        return model_path(ref)
    return resolve(ref, load_registry()).path


# -- llama-server, built from the pinned sdist -----------------------------------------------------


def llama_server_binary(path: str | Path | None = None, *, jobs: int | None = None) -> Path:
    """`path` if given; else llama-server from the cache, built there first if missing (from the
    sdist that tests/llama_cpp_sdist.py fetches once per machine, or $EDGE_LLM_LLAMA_CPP_SDIST;
    then cmake: about 10 minutes on 2 cores, once)."""
    if path is not None:
        binary = Path(path)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise SystemExit(f"--llama-server {binary}: not an executable file")
        return binary
    version = pinned_version()
    home = cache_dir() / f"llama-server-{version}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    given = given_sdist()
    if given is not None and (given / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        source, temporary = given, False
    else:
        try:
            source, temporary = extracted(home / "src", release=version), True
        except SdistError as exc:
            raise SystemExit(str(exc)) from None
    llama_cpp_dir = source / "vendor" / "llama.cpp"
    build = home / "build"
    print(f"building llama-server {version} in {build} (once)...", file=sys.stderr, flush=True)
    _run(["cmake", "-S", str(llama_cpp_dir), "-B", str(build), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)])
    if not binary.is_file():
        raise SystemExit(f"the build finished but {binary} is missing")
    if temporary:
        shutil.rmtree(source)  # ~200 MB; the binary needs only the build folder's libraries
    return binary


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}")


# -- servers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server; `{port}` in argv is replaced by the port it gets."""

    name: str
    argv: tuple[str, ...]
    health: str
    env: dict[str, str] = field(default_factory=dict)  # on top of clean_env(): only a setting under test
    cwd: Path | None = None


def parse_checkout(text: str) -> tuple[str, Path, tuple[str, ...]]:
    """'NAME=PATH' or 'NAME=PATH:ARGS' -> edge-llm run from that checkout with those flags."""
    name, _, rest = text.partition("=")
    path, _, args = rest.partition(":")
    if not name or not path:
        raise SystemExit(f"--checkout {text!r}: NAME=PATH[:ARGS]")
    return name, Path(path).resolve(), tuple(shlex.split(args))


def edge_llm_spec(model: Path, *, parallel: int, ctx: int, threads: int | None, name: str = "edge-llm",
                  extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  checkout: Path = ROOT) -> ServerSpec:
    """`edge-llm serve` with this interpreter, run from `checkout` (default: this repository), whose
    edge_llm package is then what runs. threads=None leaves -t to edge-llm's own default."""
    argv = [sys.executable, "-m", "edge_llm", "serve", str(model), "--host", "127.0.0.1", "--port", "{port}",
            "-np", str(parallel), "-c", str(ctx), *(["-t", str(threads)] if threads else []), *extra_args]
    return ServerSpec(name, tuple(argv), "/health", env or {}, checkout)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (Intel Sapphire Rapids and later)."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def no_amx_preload() -> Path | None:
    """scripts/no_amx_preload.c compiled once into the cache (a C compiler is there: llama-server
    was built with one); None where it cannot be built."""
    out = cache_dir() / "no_amx_preload.so"
    if not out.exists():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial),
                               str(ROOT / "scripts" / "no_amx_preload.c"), "-ldl"], capture_output=True)
        if done.returncode != 0:
            return None
        partial.replace(out)
    return out


def llama_server_spec(binary: Path, model: Path, *, parallel: int, ctx: int, threads: int,
                      name: str = "llama-server", extra_args: tuple[str, ...] = ()) -> ServerSpec:
    """llama-server with its defaults and these -np / -c / -t. On a CPU with AMX a llama-server
    built there (-march=native) puts weights in AMX buffers and dies on its first decode (SIGILL
    or SIGSEGV, llama.cpp issue #20824): it runs with AMX refused (no_amx_preload: its other
    repacked layouts kept, as edge-llm's llama_runtime.leave_out_amx does), or with --no-repack
    where that cannot be built."""
    env: dict[str, str] = {}
    guard: tuple[str, ...] = ()
    if cpu_has_amx() and "--no-repack" not in extra_args:
        preload = no_amx_preload()
        if preload is not None:
            env["LD_PRELOAD"] = str(preload)
        else:
            guard = ("--no-repack",)
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "{port}", "-np", str(parallel),
            "-c", str(ctx), "-t", str(threads), "--no-webui", *guard, *extra_args]
    return ServerSpec(name, tuple(argv), "/health", env=env)


def llama_cpp_python_spec(model: Path, *, ctx: int, threads: int,
                          name: str = "llama-cpp-python server") -> ServerSpec:
    """llama-cpp-python's own server: one request at a time. `ctx` is one request's context;
    --interrupt_requests False, or each new request would cut the running stream short."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", "{port}", "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch",
            str(threads), "--interrupt_requests", "False", "--verbose", "False"]
    return ServerSpec(name, tuple(argv), "/v1/models")


@dataclass
class RunningServer:
    spec: ServerSpec
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far, all its threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(spec: ServerSpec, *, port: int | None = None,
            timeout: float = START_TIMEOUT_S) -> Iterator[RunningServer]:
    """Start the server in its own process (and session), wait for health; stop it on exit."""
    port = port or free_port()
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    with tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=clean_env(spec.env), cwd=spec.cwd, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    server = RunningServer(spec, f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        died = process.poll()  # before it was asked to stop: a crash, whose log is worth reading
        _stop(process)
        if died is not None:
            print(f"{spec.name} exited with {died} during the run:\n{server.log_tail()}", file=sys.stderr)
        log_path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the script that started it dies, however it dies
    (Linux), so no server outlives a killed benchmark."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _wait_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.spec.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + server.spec.health, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{server.spec.name} did not become healthy in {timeout:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it started it), then SIGKILL if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def turn_order(specs: list[ServerSpec], round_index: int) -> list[ServerSpec]:
    """The servers rotated by one place per round, so none always runs first (cold caches, a CPU
    that has not clocked up yet) or last."""
    shift = round_index % len(specs)
    return specs[shift:] + specs[:shift]


# -- requests ---------------------------------------------------------------------------------------

# Open-ended prompts: "Write a long, detailed story about <topic>".
TOPICS = ["the sea", "a lighthouse", "the moon", "a forest", "a city at night", "a mountain", "a river",
          "an old library", "a train journey", "a garden in spring", "the desert", "a snowy village"]


@dataclass
class Streamed:
    ttft: float
    seconds: float  # the whole request
    tokens: int
    text: str
    # llama-server's own figures for the request (draft_n, draft_n_accepted, ...), {} elsewhere.
    timings: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """The stream's rate after its first token: generation alone, without the prompt's reading."""
        return (self.tokens - 1) / max(self.seconds - self.ttft, 1e-9)


async def stream_completion(client: httpx.AsyncClient, route: str, body: dict) -> Streamed:
    """One streamed request to /v1/completions or /v1/chat/completions, with usage asked for.
    Tokens from the final usage (llama-cpp-python's server sends none: there, each text chunk is
    one token)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    parts: list[str] = []
    timings: dict = {}
    async with client.stream("POST", route, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            timings = event.get("timings") or timings
            for choice in event.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    return Streamed((first or end) - start, end - start, usage if usage is not None else chunks, "".join(parts),
                    timings)


def scrape_metrics(url: str) -> dict[str, float]:
    """The samples of a server's Prometheus /metrics (`name{labels}` -> value); {} for a server
    without the route."""
    try:
        response = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return parse_metrics(response.text) if response.status_code == 200 else {}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {`name{labels}`: value}; comments and unreadable lines skipped."""
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


# -- the contended scenario -------------------------------------------------------------------------

# Ends at the deadline or as soon as the script that started it is gone (its parent changes).
_BUSY_LOOP = """
import os, time
parent, end, i = os.getppid(), time.monotonic() + {seconds}, 0
while True:
    i += 1
    if i % 200000 == 0 and (time.monotonic() > end or os.getppid() != parent):
        break
"""


@contextlib.contextmanager
def busy_core(cpu: int | None = None, *, max_seconds: float = 1200.0) -> Iterator[int]:
    """Another program competing for the cores: a busy loop pinned to one core (by default the
    first this process may use) while the block runs. It is stopped on exit, and ends by itself
    when this process dies or after `max_seconds`. Yields the core it occupies."""
    if cpu is None:
        cpu = min(os.sched_getaffinity(0))
    process = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP.format(seconds=float(max_seconds))],
                               stdin=subprocess.DEVNULL, env=clean_env(), start_new_session=True,
                               preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        time.sleep(0.2)  # let it reach the loop before anything is measured
        if process.poll() is not None:
            raise SystemExit(f"the busy loop on core {cpu} exited with {process.returncode}")
        yield cpu
    finally:
        _stop(process)


def stop_on_sigterm() -> None:
    """SIGTERM ends the script through SystemExit, so every server and busy loop it started is
    stopped by its context manager on the way out."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def scenario(name: str) -> contextlib.AbstractContextManager:
    """'quiet': nothing added; 'contended': busy_core() for the duration."""
    if name == "quiet":
        return contextlib.nullcontext()
    if name == "contended":
        return busy_core()
    raise ValueError(f"unknown scenario {name!r}: quiet or contended")
