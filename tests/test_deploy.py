"""deploy/: the shipped nginx config in front of two real `edge-llm serve` processes serving
different models (peer forwarding between them), failover when one dies, and start.sh."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_process import ROOT, ServerProcess, free_port, write_models_toml

pytestmark = [pytest.mark.model, pytest.mark.slow]
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def render_nginx(front: int, upstreams: list[int], tmp: Path) -> Path:
    """deploy/nginx.conf (an http-level snippet) with test ports, inside a main config that keeps
    every file nginx writes in `tmp`, so it runs unprivileged-style, in the foreground."""
    snippet = (DEPLOY / "nginx.conf").read_text()
    snippet = snippet.replace("127.0.0.1:8080", f"127.0.0.1:{front}")
    for shipped, port in zip(("127.0.0.1:8081", "127.0.0.1:8082"), upstreams, strict=True):
        snippet = snippet.replace(shipped, f"127.0.0.1:{port}")
    assert not re.search(r"127\.0\.0\.1:808[0-2]\b", snippet)
    (tmp / "edge-llm.conf").write_text(snippet)
    temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp dirs
    main = (f"{user}daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "    log_format upstream '$request_uri $status $upstream_addr';\n"
            f"    access_log {tmp}/access.log upstream;\n{temp_paths}"
            f"    include {tmp}/edge-llm.conf;\n}}\n")
    config = tmp / "nginx-main.conf"
    config.write_text(main)
    return config


def chat(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True, "logprobs": True, **extra})


def first_logprob(answer: dict) -> float:
    return answer["choices"][0]["logprobs"]["content"][0]["logprob"]


@pytest.fixture(scope="module")
def model_b(tmp_path_factory, demo_path) -> Path:
    """A second, different model: the demo requantized to q8_0 by llama.cpp's quantizer."""
    from edge_llm.quantize import quantize_file

    return quantize_file(demo_path, tmp_path_factory.mktemp("q8") / "demo-q8_0.gguf", "q8_0",
                         allow_requantize=True)


def test_nginx_round_robin_with_peers_and_failover(tmp_path, demo_path, model_b):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    config = write_models_toml(tmp_path / "models.toml", {"model-a": demo_path, "model-b": model_b}, n_ctx=512)
    port_a, port_b, front = free_port(), free_port(), free_port()
    common = ["--config", str(config), "-np", "2", "--keep-alive", "-1", "--preload"]
    a = ServerProcess([*common, "model-a", "--peer", f"model-b=http://127.0.0.1:{port_b}"], tmp_path / "a.log",
                      port=port_a)
    b = ServerProcess([*common, "model-b", "--peer", f"model-a=http://127.0.0.1:{port_a}"], tmp_path / "b.log",
                      port=port_b)
    nginx_tmp = Path(tmp_path / "nginx")
    nginx_tmp.mkdir()
    nginx_tmp.chmod(0o755)
    conf = render_nginx(front, [port_a, port_b], nginx_tmp)
    checked = subprocess.run([NGINX, "-t", "-p", str(nginx_tmp), "-c", str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    nginx = None
    try:
        a.wait_healthy()
        b.wait_healthy()
        nginx = subprocess.Popen([NGINX, "-p", str(nginx_tmp), "-c", str(conf)], stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{front}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert nginx.poll() is None, nginx.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)

        direct = {"model-a": chat(a.url, "model-a").json(), "model-b": chat(b.url, "model-b").json()}
        # Really two different models: q4_1 and q8_0 weights give different probabilities.
        assert first_logprob(direct["model-a"]) != first_logprob(direct["model-b"])
        for _ in range(3):  # round-robin: each model is asked of both upstreams
            for model in ("model-a", "model-b"):
                answer = chat(url, model)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == model
                assert answer.json()["choices"][0]["message"] == direct[model]["choices"][0]["message"]
                assert first_logprob(answer.json()) == first_logprob(direct[model])
        # Streaming passes through nginx event by event.
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "model": "model-b", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 8,
                "stream": True, "temperature": 0, "ignore_eos": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 8
        upstreams = {line.split()[-1] for line in (nginx_tmp / "access.log").read_text().splitlines()
                     if "/v1/chat/completions" in line}
        assert upstreams == {f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"}

        b.proc.kill()  # a crash, not a clean stop
        b.proc.wait(timeout=30)
        for _ in range(6):
            answer = chat(url, "model-a")
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"] == direct["model-a"]["choices"][0]["message"]
        lost = chat(url, "model-b")  # its only server is gone: a clear 502, no hang
        assert lost.status_code == 502
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(timeout=15)
            except subprocess.TimeoutExpired:
                nginx.kill()
        a.stop()
        b.stop()
    assert "[emerg]" not in (nginx_tmp / "error.log").read_text()


def test_start_script_serves_on_the_platform_port_and_stops_on_sigterm(tmp_path, demo_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "START_TIMEOUT": "120",
           "PYTHON": sys.executable, "EDGE_LLM": f"{sys.executable} -m edge_llm", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["bash", str(DEPLOY / "start.sh"), str(demo_path), "-np", "1", "-c", "512"],
                            env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        while "healthy" not in line:
            line = proc.stderr.readline()
            assert line, f"start.sh ended early (status {proc.wait()})"
        assert "exited" not in line
        answer = httpx.post(f"http://127.0.0.1:{port}/inference", json={"prompt": "Hello", "max_tokens": 4},
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["generated"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_start_script_fails_when_the_server_cannot_start(tmp_path):
    env = {**os.environ, "PORT": str(free_port()), "START_TIMEOUT": "60", "PYTHON": sys.executable,
           "EDGE_LLM": f"{sys.executable} -m edge_llm", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(DEPLOY / "start.sh"), str(tmp_path / "missing.gguf")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "before it was healthy" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_parses():
    done = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "edge-llm.service")], capture_output=True,
                          text=True)
    # The binary path exists only on an installed machine; anything else is a unit-file error.
    problems = [line for line in done.stderr.splitlines() if line.strip() and "is not executable" not in line]
    assert not problems, done.stderr
