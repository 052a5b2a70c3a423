"""Exposure of a local server: what web pages (cross-site requests, DNS rebinding) and idle or
slow connections can do to a real `edge-llm serve` process on 127.0.0.1."""

from __future__ import annotations

import os
import resource
import socket
import time

import httpx
import pytest
from server_process import ServerProcess, write_models_toml

from edge_llm.server.connections import HEADER_SECONDS, MAX_CONNECTIONS

pytestmark = [pytest.mark.model, pytest.mark.slow]
NO_HANG_SECONDS = 60
APP = "https://app.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path):
    tmp = tmp_path_factory.mktemp("exposure")
    config = write_models_toml(tmp / "models.toml", {"demo": demo_path}, n_ctx=512)
    # The soft limit of open files many systems start with: the server must never reach it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        proc = ServerProcess(["--config", str(config), "-np", "1", "-t", "1", "--keep-alive", "-1", "--preload",
                              "--allowed-hosts", "llm.example", "--cors", APP], tmp / "serve.log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with proc:
        yield proc.wait_healthy()
    assert "Traceback" not in proc.log()


def get(server, path: str = "/v1/models", **headers: str) -> httpx.Response:
    return httpx.get(server.url + path, headers=headers, timeout=NO_HANG_SECONDS)


def post(server, body: str, path: str = "/v1/completions", **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers, timeout=NO_HANG_SECONDS)


BODY = '{"model": "demo", "prompt": "Hi", "max_tokens": 1}'


def test_only_loopback_names_ip_addresses_and_allowed_hosts_are_answered(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"chat.localhost:{port}",
                 f"10.1.2.3:{port}", f"[fe80::1]:{port}", "llm.example", f"LLM.example:{port}"):
        assert get(server, host=host).status_code == 200, host
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: refused, before any route runs.
    for host in (f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker.example", "llm.example.com"):
        response = get(server, host=host)
        assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed", host
        assert post(server, BODY, host=host, **{"content-type": "application/json"}).status_code == 403


def test_web_pages_of_other_origins_cannot_post(server):
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x",
                         "application/json"):
        response = post(server, BODY, origin="https://attacker.example", **{"content-type": content_type})
        assert response.status_code == 403, (content_type, response.text)
        assert response.json()["error"]["code"] == "origin_not_allowed"
    assert post(server, BODY, origin="null", **{"content-type": "text/plain"}).status_code == 403
    # A page's form post that came without Origin still names its context in Sec-Fetch-Site.
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        response = post(server, BODY, **{"content-type": content_type, "sec-fetch-site": "cross-site"})
        assert response.json()["error"]["code"] == "content_type_not_allowed", response.text
    # An allowed page must still send JSON.
    response = post(server, BODY, origin="http://localhost:3000", **{"content-type": "text/plain"})
    assert response.json()["error"]["code"] == "content_type_not_allowed"


def test_curl_form_posts_are_still_read_as_json(server):
    # vLLM's documented `curl -d '{...}'` sends a form content type, with no browser headers.
    response = post(server, BODY, **{"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text


def test_cors_for_allowed_origins(server):
    for origin in (APP, "http://localhost:5173", "http://127.0.0.1:3000", server.url):
        preflight = httpx.options(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200, (origin, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == origin
        response = post(server, BODY, origin=origin, **{"content-type": "application/json"})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
    refused = httpx.options(server.url + "/v1/chat/completions", timeout=NO_HANG_SECONDS, headers={
        "origin": "https://attacker.example", "access-control-request-method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert get(server, origin="https://attacker.example").status_code == 403


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_that_send_nothing_or_trickle_headers_are_closed(server):
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    trickling = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    try:
        deadline = time.monotonic() + NO_HANG_SECONDS
        # One byte a second: each byte is news, but the headers never complete in time.
        sent = 0
        while sent < min(len(request), int(HEADER_SECONDS) + 5):
            for sock in trickling:
                try:
                    sock.send(request[sent:sent + 1])
                except OSError:
                    pass
            sent += 1
            time.sleep(1)
        assert all(closed_by_server(sock, deadline) for sock in silent + trickling)
    finally:
        for sock in silent + trickling:
            sock.close()
    assert get(server, "/health").status_code == 200


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_cannot_crowd_out_a_request(server):
    """Twice the connection cap in idle sockets (past the 1024 open files the server was started
    with): the server closes the idle ones that have waited longest, stays under its cap and
    still answers a real request."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = []
    try:
        for _ in range(2 * MAX_CONNECTIONS + 100):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        response = get(server, "/health")
        assert response.status_code == 200
        deadline = time.monotonic() + NO_HANG_SECONDS
        assert closed_by_server(idle[0], deadline), "the longest-idle connection should have made room"
        assert open_files(server.pid) < MAX_CONNECTIONS + 100
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
