"""What a hostile client sends, over real HTTP on the FakeEngine: bounded stop strings (one clear
400 in each API's own shape), Ollama options of the wrong type (a 400, never a 500), and a
client that stops reading an NDJSON stream (dropped, its slot and lease given back)."""

from __future__ import annotations

import socket
import time

import pytest
from fake_engine import FakeEngine
from live_server import live_server

from edge_llm.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS


def serve(engine, **app_kwargs):
    from edge_llm.server import ModelManager, create_app

    manager = ModelManager({"demo": "demo"}, loader=lambda ref: engine, keep_alive=-1)
    return live_server(create_app(manager, max_body_bytes=4 << 20, **app_kwargs))


@pytest.fixture(scope="module")
def engine():
    return FakeEngine("Hello there, general Kenobi.", n_ctx=4096, n_parallel=2, model_name="demo")


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine) as url:
        yield url


MESSAGES = [{"role": "user", "content": "Hi"}]
TOO_MANY = [f"stop {i}" for i in range(MAX_STOP_STRINGS + 1)]
TOO_LONG = ["x" * (MAX_STOP_CHARS // 2), "y" * (MAX_STOP_CHARS // 2 + 1)]


@pytest.mark.parametrize("stops", [TOO_MANY, TOO_LONG], ids=["count", "length"])
def test_stop_strings_are_bounded_on_every_api(http, stops):
    requests = [
        ("/v1/chat/completions", {"model": "demo", "messages": MESSAGES, "stop": stops}),
        ("/v1/completions", {"model": "demo", "prompt": "Hi", "stop": stops}),
        ("/v1/messages", {"model": "demo", "messages": MESSAGES, "max_tokens": 8, "stop_sequences": stops}),
        ("/api/chat", {"model": "demo", "messages": MESSAGES, "options": {"stop": stops}, "stream": False}),
        ("/api/generate", {"model": "demo", "prompt": "Hi", "options": {"stop": stops}, "stream": False}),
        ("/generate", {"model": "demo", "prompt": "Hi", "stop": stops}),
    ]
    for path, body in requests:
        response = http.post(path, json=body)
        assert response.status_code == 400, (path, response.text[:300])
        error = response.json()["error"]
        message = error if isinstance(error, str) else error["message"]
        assert "stop" in message and ("at most" in message), (path, message)
    # within the bounds, all of them are honoured
    out = http.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES,
                                                   "stop": TOO_MANY[:-2] + ["general"]}).json()
    assert out["choices"][0]["message"]["content"] == "Hello there, "


OLLAMA_OPTIONS = ["temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty", "repeat_last_n",
                  "presence_penalty", "frequency_penalty", "num_predict"]


@pytest.mark.parametrize("value", [5, True, "x", [1, 2], {"a": 1}, [None], 1e300], ids=repr)
def test_ollama_options_of_the_wrong_type_are_a_400(http, value):
    for name in OLLAMA_OPTIONS:
        for path, body in (("/api/generate", {"model": "demo", "prompt": "Hi"}),
                           ("/api/chat", {"model": "demo", "messages": MESSAGES})):
            response = http.post(path, json={**body, "stream": False, "options": {name: value, "num_predict": 4}
                                             if name != "num_predict" else {name: value}})
            assert response.status_code in (200, 400), (path, name, value, response.text[:300])
            if response.status_code == 400:
                assert set(response.json()) == {"error"} and name.split("_")[0] in response.json()["error"]


def test_ollama_stream_of_a_client_that_stops_reading_is_dropped(monkeypatch):
    """NDJSON has a send timeout as SSE has: a client that keeps its connection open but reads
    nothing gives its slot and its lease back."""
    from edge_llm.server import generation

    monkeypatch.setattr(generation, "SEND_TIMEOUT_SECONDS", 1.0)
    # ~110 bytes of NDJSON a token, 100,000 tokens: far more than the socket buffers hold
    slow = FakeEngine("word " * 20000, n_ctx=1 << 20, n_parallel=1, model_name="demo")
    with serve(slow) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's window fills at once
        sock.connect((host, int(port)))
        body = '{"model": "demo", "prompt": "Hi", "options": {"num_predict": 100000}}'
        sock.sendall((f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        try:
            deadline = time.monotonic() + 60
            while slow.running == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slow.running == 1
            # never read: the server's writes block, then time out and end the request
            while slow.running and time.monotonic() < deadline:
                time.sleep(0.1)
            assert slow.running == 0, "the request kept running for a client that reads nothing"
        finally:
            sock.close()


def test_model_listings_read_only_the_header_and_name_no_path(monkeypatch, demo_path):
    """/api/show, /api/tags and /api/ps read a GGUF's header once (never gguf-py's GGUFReader, which
    builds every token string: seconds of CPU on a large vocabulary), and show the served name,
    never where the weights are."""
    import gguf
    import httpx

    from edge_llm.server import ModelManager, create_app

    def refused(*args, **kwargs):
        raise AssertionError("the whole GGUF was parsed")

    monkeypatch.setattr(gguf, "GGUFReader", refused)
    engine = FakeEngine(model_name="demo")
    manager = ModelManager({"demo": "demo"}, loader=lambda ref: engine, keep_alive=-1, paths={"demo": demo_path})
    with live_server(create_app(manager)) as url, httpx.Client(base_url=url, timeout=30) as http:
        shown = http.post("/api/show", json={"model": "demo"})
        listed = http.get("/api/tags")
        http.post("/api/generate", json={"model": "demo", "prompt": "Hi", "stream": False})
        loaded = http.get("/api/ps")
    for response in (shown, listed, loaded):
        assert response.status_code == 200 and str(demo_path.parent) not in response.text
    body = shown.json()
    assert body["modelfile"] == "FROM demo\n"
    assert body["details"]["parameter_size"] == "135M" and body["details"]["family"] == "llama"
    assert body["model_info"]["llama.context_length"] == 8192
    assert listed.json()["models"][0]["details"] == body["details"] == loaded.json()["models"][0]["details"]


def test_the_header_reader_agrees_with_gguf_py(demo_path, tmp_path):
    import gguf

    from edge_llm.errors import EdgeLLMError
    from edge_llm.info import read_gguf_info

    info = read_gguf_info(demo_path)
    reader = gguf.GGUFReader(demo_path)
    assert info.n_params == sum(int(t.n_elements) for t in reader.tensors)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert info.chat_template == reader.fields["tokenizer.chat_template"].contents()
    head = demo_path.open("rb").read(1 << 20)
    for cut in (3, 100, 5000, 500_000):  # the header cut short: one clear error, never a crash
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(head[:cut])
        with pytest.raises(EdgeLLMError, match="not a readable GGUF file"):
            read_gguf_info(part)
