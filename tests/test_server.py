"""`edge-llm serve` over real HTTP: uvicorn on a free 127.0.0.1 port, the official `openai` client
and plain httpx, two copies of the bundled model served at once as `demo-a` and `demo-b`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time

import httpx
import openai
import pytest
from live_server import live_server

from edge_llm.load_options import LoadOptions

pytestmark = [pytest.mark.model, pytest.mark.slow]
N_CTX, N_PARALLEL = 2048, 4  # 512 tokens per request
SLOT = N_CTX // N_PARALLEL


def write_config(tmp_path, demo_path, names=("demo-a", "demo-b")):
    config = tmp_path / "models.toml"
    config.write_text("".join(f'[models.{n}]\nsource = "local"\npath = "{demo_path}"\nn_ctx = {N_CTX}\n\n'
                              for n in names))
    return str(config)


def make_app(config, names=("demo-a", "demo-b"), *, api_keys=None, **manager_kwargs):
    from edge_llm.server import ModelManager, create_app

    manager_kwargs.setdefault("options", LoadOptions(n_parallel=N_PARALLEL))
    manager_kwargs.setdefault("keep_alive", -1)
    manager = ModelManager.from_refs(list(names), config=config, **manager_kwargs)
    return create_app(manager, api_keys=api_keys, max_body_bytes=1 << 20)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path):
    app = make_app(write_config(tmp_path_factory.mktemp("serve"), demo_path))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client_timeout():
    return 120  # the real model answers


def engine_of(app, name):
    return app.state.edge.manager.models[name].engine


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{re.escape(name)}{{[^}}]*model_name="{model}"[^}}]*}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# -- OpenAI API through the official client ----------------------------------------------------------


def test_models_and_chat(oa):
    ids = {m.id for m in oa.models.list().data}
    assert ids == {"demo-a", "demo-b"}
    out = oa.chat.completions.create(model="demo-a", messages=[{"role": "user", "content": "Say hello."}],
                                     max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 5
    assert out.model == "demo-a"


def test_completion_stream_equals_non_stream_and_reports_usage(oa):
    kw = dict(model="demo-b", prompt="The capital of France is", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = oa.completions.create(**kw)
    chunks = list(oa.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and text.strip()
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert whole.usage.completion_tokens == 10


def test_chat_stream_with_usage(oa):
    stream = oa.chat.completions.create(model="demo-a", messages=[{"role": "user", "content": "Count to five."}],
                                        max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 0


def test_n_2_gives_two_choices(oa):
    out = oa.completions.create(model="demo-a", prompt="Once upon a time", n=2, max_tokens=6, temperature=1.0,
                                seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12
    chat = oa.chat.completions.create(model="demo-a", messages=[{"role": "user", "content": "Hi"}], n=2,
                                      max_tokens=4, seed=3)
    assert len(chat.choices) == 2


def test_stop_string_cuts_the_output(oa):
    kw = dict(model="demo-a", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0)
    free = oa.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    assert " 5," in free
    cut = oa.completions.create(**kw, stop=[" 5,"]).choices[0]
    assert cut.text == free[: free.index(" 5,")] and cut.finish_reason == "stop"


def test_json_schema_output_parses_and_validates(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}, "mood": {"enum": ["happy", "sad"]}},
              "required": ["name", "age", "mood"], "additionalProperties": False}
    out = oa.chat.completions.create(
        model="demo-a", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"name", "age", "mood"}
    assert isinstance(data["name"], str) and len(data["name"]) <= 20
    assert isinstance(data["age"], int) and data["mood"] in ("happy", "sad")
    obj = oa.chat.completions.create(
        model="demo-b", messages=[{"role": "user", "content": 'Answer in JSON, like {"answer": "yes"}: is the sky blue?'}],
        max_tokens=150, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_logprobs(oa):
    out = oa.chat.completions.create(model="demo-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)


def test_embeddings(oa):
    out = oa.embeddings.create(model="demo-a", input=["a cat", "a cat", "quantum field theory"])
    a, b, c = (d.embedding for d in out.data)
    assert len(a) == len(c) > 100 and a == b
    assert sum(x * x for x in a) == pytest.approx(1.0, rel=1e-3)
    assert sum(x * y for x, y in zip(a, c, strict=True)) < 0.999
    assert out.usage.prompt_tokens > 0


def test_two_models_serve_at_once(oa, server):
    results = {}

    def ask(name):
        results[name] = oa.completions.create(model=name, prompt="Hello", max_tokens=24, temperature=0,
                                              extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("demo-a", "demo-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.model for r in results.values()} == {"demo-a", "demo-b"}
    # the same weights, greedy: two models, same answer
    assert results["demo-a"].choices[0].text == results["demo-b"].choices[0].text
    assert {m.id for m in oa.models.list().data if m.model_extra.get("loaded")} == {"demo-a", "demo-b"}


def test_tokenize_round_trip(http):
    text = "Hello world, héllo 世界!"
    tokens = http.post("/tokenize", json={"model": "demo-a", "content": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 3 and tokens["max_model_len"] == SLOT
    back = http.post("/detokenize", json={"model": "demo-a", "tokens": tokens["tokens"]}).json()
    assert back["content"] == text
    pieces = http.post("/tokenize", json={"prompt": text, "with_pieces": True}).json()["tokens"]
    # a piece that is not whole UTF-8 (part of 世) comes as a list of bytes, as llama-server sends it
    assert any(isinstance(p["piece"], list) for p in pieces)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text


def test_cpu_heavy_work_never_runs_on_the_event_loop(server, http, monkeypatch):
    """Tokenizing, token pieces, detokenizing, templates, grammars, embeddings and encoding large
    bodies run in worker threads: on the event loop they would stall every other request (a 7 MB
    /tokenize with pieces once froze /health for 7.5 s)."""
    from edge_llm.server import grammars, jsonio

    on_loop: list[str] = []

    def in_event_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def watched(name, function):
        def call(*args, **kwargs):
            if in_event_loop():
                on_loop.append(name)
            return function(*args, **kwargs)
        return call

    ids = http.post("/tokenize", json={"model": "demo-a", "content": "Once upon a time"}).json()["tokens"]
    engine = engine_of(server[1], "demo-a")
    for name in ("tokenize", "detokenize", "token_piece", "chat_prompt", "embed"):
        monkeypatch.setattr(engine, name, watched(name, getattr(engine, name)))
    for name in ("json_schema_grammar", "json_object_grammar", "tool_call_grammar"):
        monkeypatch.setattr(grammars, name, watched(name, getattr(grammars, name)))
    render = jsonio.JSONResponse.render

    def watched_render(self, content):
        body = render(self, content)
        if len(body) > 16_384 and in_event_loop():
            on_loop.append(f"a {len(body)}-byte body")
        return body

    monkeypatch.setattr(jsonio.JSONResponse, "render", watched_render)
    text = "Hello world, héllo 世界! " * 4000
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for path, body in [
        ("/tokenize", {"model": "demo-a", "content": text, "with_pieces": True}),
        ("/detokenize", {"model": "demo-a", "tokens": ids * 2000}),
        ("/v1/completions", {"model": "demo-a", "prompt": ids, "echo": True, "max_tokens": 4, "logprobs": 5,
                             "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}),
        ("/v1/completions", {"model": "demo-a", "prompt": "Hi", "max_tokens": 2,
                             "response_format": {"type": "json_object"}}),
        ("/v1/chat/completions", {"model": "demo-a", "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 200, "logprobs": True, "top_logprobs": 20,
                                  "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}),
        ("/v1/embeddings", {"model": "demo-a", "input": ["a cat"] * 64}),
        ("/", {"model": "demo-a", "prompt": "Hi", "history": [], "max_length": 200}),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 200, (path, response.text[:300])
    assert on_loop == []


# -- tools ---------------------------------------------------------------------------------------------

# Qwen2.5's way of offering tools, cut down: enough for a template that "supports tools".
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call functions. Signatures:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\nReturn each call as <tool_call>{\"name\": ..., "
    "\"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}


def test_forced_tool_call_with_a_tools_template(oa, server):
    from edge_llm.chat_format import JinjaChatFormatter

    oa.models.list()
    engine = engine_of(server[1], "demo-b") or pytest.fail("demo-b should be loaded by earlier tests")
    original = engine.formatter
    engine.formatter = JinjaChatFormatter(TOOLS_TEMPLATE)
    try:
        out = oa.chat.completions.create(
            model="demo-b", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
            tool_choice="required", max_tokens=60, temperature=0)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        stream = list(oa.chat.completions.create(
            model="demo-b", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60, temperature=0,
            stream=True))
        calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls and calls[0].function.name == "get_weather"
        assert [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
        # Parameters with $defs work in a forced call as they do in response_format (they were refused).
        defs = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
            "$defs": {"City": {"type": "string", "enum": ["Paris", "Rome"]}}}}}
        out = oa.chat.completions.create(
            model="demo-b", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[defs],
            tool_choice="required", max_tokens=60, temperature=0)
        assert json.loads(out.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    finally:
        engine.formatter.close()
        engine.formatter = original


# -- the simple APIs -----------------------------------------------------------------------------------


def test_vllm_generate_shape(http):
    prompt = "The capital of France is"
    body = http.post("/generate", json={"prompt": prompt, "n": 2, "temperature": 0.0, "max_tokens": 8,
                                        "use_beam_search": False, "stream": False}).json()
    assert set(body) == {"text"} and len(body["text"]) == 2
    assert all(t.startswith(prompt) and len(t) > len(prompt) for t in body["text"])
    with http.stream("POST", "/generate", json={"prompt": prompt, "temperature": 0.0, "max_tokens": 8,
                                               "stream": True}) as response:
        raw = response.read()
    parts = [json.loads(p) for p in raw.split(b"\0") if p]
    assert len(parts) > 1 and parts[-1] == {"text": [body["text"][0]]}
    # vLLM's documented `curl -d '{...}'` sends a form content type; the body is JSON all the same
    form = http.post("/generate", content=json.dumps({"prompt": prompt, "max_tokens": 2}),
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.json()["text"][0].startswith(prompt)
    refused = http.post("/generate", json={"prompt": prompt, "use_beam_search": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "use_beam_search"


def test_mosec_inference_shape(http):
    body = http.post("/inference", json={"prompt": "Once upon a time", "max_tokens": 8}).json()
    assert set(body) == {"generated"} and isinstance(body["generated"], str) and body["generated"]


def test_fastapi_demo_shape(http):
    body = http.post("/", json={"prompt": "Hello, who are you?", "history": []}).json()
    assert set(body) >= {"response", "status", "time"} and body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["response"] and body["history"] == [["Hello, who are you?", body["response"]]]


# -- metrics, errors, cancellation ---------------------------------------------------------------------


def test_metrics_count_tokens_and_latency(http, oa):
    before = http.get("/metrics").text
    out = oa.completions.create(model="demo-b", prompt="Metrics test prompt", max_tokens=5, temperature=0,
                                extra_body={"ignore_eos": True})
    after = http.get("/metrics").text
    delta = {n: metric(after, n, "demo-b") - metric(before, n, "demo-b") for n in (
        "edge_llm:prompt_tokens_total", "edge_llm:generation_tokens_total",
        "edge_llm:time_to_first_token_seconds_count", "edge_llm:time_per_output_token_seconds_count")}
    assert delta["edge_llm:prompt_tokens_total"] == out.usage.prompt_tokens
    assert delta["edge_llm:generation_tokens_total"] == 5
    assert delta["edge_llm:time_to_first_token_seconds_count"] == 1
    assert delta["edge_llm:time_per_output_token_seconds_count"] == 4
    # The thread governor's state: between one thread and one per core, and a counter that exists.
    assert 1 <= metric(after, "edge_llm:cpu_threads", "demo-b") <= (os.cpu_count() or 1)
    assert re.search(r'^edge_llm:decodes_with_fewer_threads_total\{model_name="demo-b"\} \S+$', after, re.M)
    assert 'edge_llm:num_requests_running{model_name="demo-b"} 0.0' in after
    assert "edge_llm:prefix_cache_hits_total" in after and "edge_llm:num_requests_waiting" in after


def test_metrics_count_drafted_and_accepted_tokens(http, oa):
    """Speculation is on by default: a prompt the answer copies from gets drafts, most of them kept."""
    names = ("edge_llm:spec_decode_num_draft_tokens_total", "edge_llm:spec_decode_num_accepted_tokens_total")
    passage = "the keeper climbed the steps to the lamp room and wound the clockwork that turned the lens"
    counts, texts = [], []
    for per_request in ({"draft_max": 0}, {}):  # draft_max 0: this request does not speculate
        before = http.get("/metrics").text
        out = oa.completions.create(model="demo-b", prompt=f"{passage}\n{passage}\n{passage}\n", max_tokens=48,
                                    temperature=0, extra_body={"ignore_eos": True, **per_request})
        after = http.get("/metrics").text
        counts.append([metric(after, n, "demo-b") - metric(before, n, "demo-b") for n in names])
        texts.append(out.choices[0].text)
    assert counts[0] == [0, 0]
    drafted, accepted = counts[1]
    assert drafted >= accepted > 0
    assert texts[0] == texts[1]


def test_max_tokens_is_capped_by_the_context(oa):
    out = oa.completions.create(model="demo-a", prompt="Hi", max_tokens=100_000, temperature=0,
                                extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == SLOT


def test_disconnect_mid_stream_frees_the_slot(url, server):
    engine = engine_of(server[1], "demo-a")
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json={
            "model": "demo-a", "prompt": "Tell a long story.", "max_tokens": 400, "stream": True,
            "ignore_eos": True}) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert engine.scheduler.running == 1
    assert wait_until(lambda: engine.scheduler.running == 0)
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=1.0)) as c:
        c.post("/v1/completions", json={"model": "demo-a", "prompt": "Again", "max_tokens": 450, "ignore_eos": True})
    assert wait_until(lambda: engine.scheduler.running == 0)


def test_router_gauges_under_both_names(url, http):
    """What an endpoint picker reads (deploy/kubernetes/inference-pool.yaml): requests running and
    waiting, and the share of the KV cache they hold, under edge-llm's names and vLLM's."""
    names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json={
            "model": "demo-a", "prompt": "Tell a long story about the sea.", "max_tokens": 400, "stream": True,
            "ignore_eos": True}) as response:
        lines = response.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(3))
        during = http.get("/metrics").text
    ours = {n: metric(during, "edge_llm:" + n, "demo-a") for n in names}
    assert ours == {n: metric(during, "vllm:" + n, "demo-a") for n in names}
    assert ours["num_requests_running"] == 1 and ours["num_requests_waiting"] == 0
    assert 0 < ours["kv_cache_usage_perc"] < 1
    assert wait_until(lambda: metric(http.get("/metrics").text, "vllm:kv_cache_usage_perc", "demo-a") == 0)


# -- servers with other settings ------------------------------------------------------------------------


def test_overload_answers_503_with_retry_after(tmp_path, demo_path):
    app = make_app(write_config(tmp_path, demo_path, ["solo"]), ["solo"],
                   options=LoadOptions(n_parallel=1, max_queue=1))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        engine = None
        body = {"prompt": "Story:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect)
            next(lines)
            engine = engine_of(app, "solo")
            answers = []
            waiter = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{url}/v1/completions", timeout=60, json={"prompt": "Wait", "max_tokens": 2})))
            waiter.start()
            assert wait_until(lambda: engine.scheduler.waiting == 1), (engine.scheduler.running, answers)
            busy = c.post("/v1/completions", json={"prompt": "Third", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
            assert busy.json()["error"]["code"] == "overloaded"
        waiter.join(timeout=60)
        assert wait_until(lambda: engine.scheduler.running == 0 and engine.scheduler.waiting == 0)


def test_keep_alive_and_memory_budget(tmp_path, demo_path):
    size = demo_path.stat().st_size
    app = make_app(write_config(tmp_path, demo_path), keep_alive=1.0, memory_budget=int(size * 1.5))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        def loaded():
            return {m["id"] for m in c.get("/v1/models").json()["data"] if m["loaded"]}

        assert loaded() == set()
        assert c.post("/inference", json={"model": "demo-a", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert loaded() == {"demo-a"}
        assert c.post("/inference", json={"model": "demo-b", "prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert loaded() == {"demo-b"}  # the budget holds one model: demo-a made room
        assert wait_until(lambda: loaded() == set())  # idle past keep-alive: unloaded


def test_peer_forwarding(server):
    from edge_llm.server import ModelManager, create_app

    url, _ = server
    front = create_app(ModelManager({}, peers={"demo-a": url}))
    with live_server(front) as front_url:
        client = openai.OpenAI(base_url=f"{front_url}/v1", api_key="x", max_retries=0)
        models = {m.id: m.model_extra for m in client.models.list().data}
        assert models["demo-a"]["peer"] == url
        kw = dict(model="demo-a", prompt="The capital of France is", max_tokens=6, temperature=0)
        direct = openai.OpenAI(base_url=f"{url}/v1", api_key="x").completions.create(**kw)
        assert client.completions.create(**kw).choices[0].text == direct.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
        assert streamed == direct.choices[0].text
        loop = httpx.post(f"{front_url}/v1/completions", json=kw, headers={"x-edge-llm-forwarded": "1"})
        assert loop.status_code == 404


def test_cli_serve_with_api_key(demo_path, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# comment\nsekrit\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge_llm", "serve", str(demo_path), "--port", str(port),
                             "--api-key-file", str(keyfile), "-c", "1024", "-np", "2"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _health(base), timeout=120), proc.stdout.read() if proc.poll() is not None else ""
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # /health needs no key
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
        name = demo_path.stem
        assert [m.id for m in good.models.list().data] == [name]
        out = good.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert out.choices[0].message.content is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # One log line per request (server/access_log.py), the refusals too; /health and /metrics polls left out.
    log = proc.stdout.read()
    assert re.search(r"^\S+ \S+ 127\.0\.0\.1 GET /v1/models 401 \d+\.\d\d s$", log, re.M), log
    usage = out.usage
    assert re.search(rf"^\S+ \S+ 127\.0\.0\.1 POST /v1/chat/completions 200 \d+\.\d\d s, {usage.prompt_tokens} "
                     rf"prompt \+ {usage.completion_tokens} generated tokens$", log, re.M), log
    assert "/health" not in log and "/metrics" not in log and "Traceback" not in log


def _health(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
