"""Faults: corrupt model files, a model file deleted while loaded, a full disk under quantize,
SIGTERM during generation. Each must end in a clear error or a clean exit, never a crash or a hang."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_process import ROOT, ServerProcess, write_models_toml

pytestmark = [pytest.mark.model, pytest.mark.slow]
TIMEOUT = 120


def run_cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_llm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory, demo_path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("corrupt")
    data = demo_path.read_bytes()
    files = {
        "garbage": b"\x00\x01not a gguf at all" * 1000,
        "truncated": data[: len(data) // 2],  # header and metadata intact, tensor data cut
        "header-only": data[:4096],
        "huge-counts": data[:8] + (2**62).to_bytes(8, "little") + (2**62).to_bytes(8, "little") + data[24:65536],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp / f"{name}.gguf"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("kind", ["garbage", "truncated", "header-only", "huge-counts"])
def test_corrupt_gguf_is_one_clear_error(corrupt_files, kind):
    done = run_cli("generate", "-m", str(corrupt_files[kind]), "-n", "2", "-p", "Hello")
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("edge-llm generate: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_corrupt_gguf_next_to_a_good_one_in_a_server(tmp_path, demo_path, corrupt_files):
    config = write_models_toml(tmp_path / "models.toml", {"good": demo_path, "bad": corrupt_files["truncated"]},
                               n_ctx=512)
    with ServerProcess(["--config", str(config), "good", "bad", "-np", "1", "-t", "1", "--keep-alive", "-1"],
                       tmp_path / "serve.log") as server:
        server.wait_healthy()
        bad = httpx.post(server.url + "/v1/completions", json={"model": "bad", "prompt": "Hi", "max_tokens": 2},
                         timeout=TIMEOUT)
        assert bad.status_code in (400, 500) and bad.json()["error"]["message"], bad.text
        good = httpx.post(server.url + "/v1/completions", json={"model": "good", "prompt": "Hi", "max_tokens": 2},
                          timeout=TIMEOUT)
        assert good.status_code == 200
        assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_model_file_deleted_while_loaded(tmp_path, demo_path):
    copy = tmp_path / "doomed.gguf"
    shutil.copyfile(demo_path, copy)
    config = write_models_toml(tmp_path / "models.toml", {"doomed": copy}, n_ctx=512)
    body = {"model": "doomed", "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with ServerProcess(["--config", str(config), "-np", "1", "-t", "1", "--keep-alive", "3", "--preload"],
                       tmp_path / "serve.log") as server:
        server.wait_healthy()
        before = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert before.status_code == 200
        copy.unlink()
        # The weights are memory-mapped: the open mapping keeps the deleted file's data alive.
        after = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        # Once idle past --keep-alive it unloads; reloading then fails with a clear error, not a crash.
        deadline = time.monotonic() + 60
        while b'model_loaded{model_name="doomed"} 1.0' in httpx.get(server.url + "/metrics", timeout=10).content:
            assert time.monotonic() < deadline, "the idle model was never unloaded"
            time.sleep(0.25)
        gone = httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert 400 <= gone.status_code < 600 and "doomed" in gone.json()["error"]["message"], gone.text
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert "Traceback" not in server.log()


DISK_FULL_QUANTIZE = """
import resource, signal, sys
from pathlib import Path
from edge_llm.errors import EdgeLLMError
from edge_llm.quantize import quantize_file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    quantize_file(sys.argv[1], sys.argv[2], "q8_0", allow_requantize=True, threads=1)
except EdgeLLMError as exc:
    print("error:", exc.message)
    sys.exit(1)
"""


def test_disk_full_during_quantize_leaves_no_file(tmp_path, demo_path):
    out = tmp_path / "out" / "demo-q8_0.gguf"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", DISK_FULL_QUANTIZE, str(demo_path), str(out), str(8 * 2**20)],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.startswith("error:") and "Traceback" not in done.stderr
    assert list(out.parent.iterdir()) == []  # neither the output nor a partial file


# SIGINT (Ctrl-C in the terminal that runs the server) drains as SIGTERM does, and exits 0 too.
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


@SIGNALS
def test_sigterm_ends_long_requests_with_whole_answers(tmp_path, demo_path, sig):
    """Requests still running when the drain period (10 s) is over: a stream ends with a last chunk
    (finish_reason "length"), its usage and [DONE] in a complete chunked body; a non-streamed one
    gets its answer so far; one still waiting for a slot gets a 503. The process exits 0."""
    config = write_models_toml(tmp_path / "models.toml", {"demo": demo_path}, n_ctx=8192)
    server = ServerProcess(["--config", str(config), "-np", "2", "-t", "1", "--keep-alive", "-1", "--preload"],
                           tmp_path / "serve.log")
    long = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
    try:
        server.wait_healthy()
        outcome: dict = {"events": []}

        def long_stream():
            try:
                with httpx.stream("POST", server.url + "/v1/completions", timeout=TIMEOUT, json={
                        **long, "stream": True, "stream_options": {"include_usage": True}}) as response:
                    outcome["status"] = response.status_code
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            outcome["events"].append(line[6:])
                outcome["ended"] = "cleanly"
            except httpx.HTTPError as exc:  # an incomplete chunked body is a RemoteProtocolError
                outcome["ended"] = type(exc).__name__

        def post(key: str) -> None:
            try:
                outcome[key] = httpx.post(server.url + "/v1/completions", json=long, timeout=TIMEOUT)
            except httpx.HTTPError as exc:
                outcome[key] = type(exc).__name__

        threads = [threading.Thread(target=long_stream), threading.Thread(target=post, args=("whole",))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + TIMEOUT
        while len(outcome["events"]) < 3 or b'num_requests_running{model_name="demo"} 2.0' not in \
                httpx.get(server.url + "/metrics", timeout=10).content:
            assert time.monotonic() < deadline and threads[0].is_alive(), outcome
            time.sleep(0.1)
        threads.append(threading.Thread(target=post, args=("queued",)))  # both slots are busy: it waits
        threads[-1].start()
        while b'num_requests_waiting{model_name="demo"} 1.0' not in httpx.get(server.url + "/metrics",
                                                                               timeout=10).content:
            assert time.monotonic() < deadline, outcome
            time.sleep(0.1)
        server.proc.send_signal(sig)
        status = server.proc.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client still hangs after the server exited"
        assert status == 0, status
        assert outcome["status"] == 200 and outcome["ended"] == "cleanly", outcome.get("ended")
        events = outcome["events"]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and 0 < usage["completion_tokens"] < long["max_tokens"], usage
        whole = outcome["whole"]
        assert not isinstance(whole, str) and whole.status_code == 200, whole
        choice = whole.json()["choices"][0]
        assert choice["finish_reason"] == "length" and whole.json()["usage"]["completion_tokens"] < long["max_tokens"]
        queued = outcome["queued"]
        assert not isinstance(queued, str) and queued.status_code == 503, queued
        assert queued.json()["error"]["code"] == "overloaded"
        log = server.log()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    finally:
        server.stop(signal.SIGKILL)


@SIGNALS
def test_sigterm_lets_a_short_in_flight_stream_finish_and_exits_0(tmp_path, demo_path, sig):
    config = write_models_toml(tmp_path / "models.toml", {"demo": demo_path}, n_ctx=2048)
    server = ServerProcess(["--config", str(config), "-np", "2", "-t", "1", "--keep-alive", "-1", "--preload"],
                           tmp_path / "serve.log")
    try:
        server.wait_healthy()
        events: list[str] = []

        def short_stream():
            with httpx.stream("POST", server.url + "/v1/completions", timeout=TIMEOUT, json={
                    "model": "demo", "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True,
                    "stream": True}) as response:
                events.extend(line for line in response.iter_lines() if line.startswith("data: "))

        thread = threading.Thread(target=short_stream)
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not events and thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(sig)
        status = server.proc.wait(timeout=60)
        thread.join(timeout=30)
        # 24 tokens fit well inside the 10 s grace period: the stream must complete.
        assert events and events[-1] == "data: [DONE]", events[-2:]
        assert status == 0
        assert "ERROR" not in server.log()
    finally:
        server.stop(signal.SIGKILL)
