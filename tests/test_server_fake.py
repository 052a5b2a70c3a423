"""The server's routes over real HTTP with the official clients (openai, anthropic, ollama), on a
FakeEngine (tests/fake_engine.py): every API's request and answer shapes, streaming, usage, stop
and length rules, errors in each API's own shape, and the output parsers on what the bundled
SmolLM2 never writes (`</think>`, two tool calls in one answer). No model: this runs in seconds.
What only a real model shows (grammars obeyed, greedy determinism, slots, cancellation inside
llama.cpp) stays in test_server.py and test_server_apis.py."""

from __future__ import annotations

import base64
import json
import re
import struct

import anthropic
import httpx
import ollama
import openai
import pytest
from fake_engine import BYTE0, SPECIALS, THINK_TOOLS_TEMPLATE, FakeEngine
from live_server import live_server
from test_server import WEATHER, wait_until

ANSWER = "Bonjour, 世界! 1, 2, 3, 4, 5."
N_CTX, N_PARALLEL = 2048, 4
SLOT = N_CTX // N_PARALLEL
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}


def serve(engines: dict[str, FakeEngine], **app_kwargs):
    from edge_llm.server import ModelManager, create_app

    manager = ModelManager({name: name for name in engines}, loader=lambda ref: engines[ref], keep_alive=-1)
    return live_server(create_app(manager, max_body_bytes=1 << 20, **app_kwargs))


@pytest.fixture(scope="module")
def engines():
    return {name: FakeEngine(ANSWER, n_ctx=N_CTX, n_parallel=N_PARALLEL, model_name=name) for name in ("demo", "demo-b")}


@pytest.fixture(scope="module")
def url(engines):
    with serve(engines) as url:
        yield url


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"


def n_tokens(text: str) -> int:
    return len(text.encode("utf-8"))  # the fake vocabulary is one token a byte


# -- OpenAI chat and completions --------------------------------------------------------------------------


def test_models_and_chat(oa, engines):
    assert {m.id for m in oa.models.list().data} == {"demo", "demo-b"}
    out = oa.chat.completions.create(model="demo-b", messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}])
    assert out.model == "demo-b" and out.choices[0].message.content == ANSWER
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.role == "assistant"
    # the prompt is the chat template's rendering, tokenized once
    prompt = chatml(("system", "Be brief."), ("user", "Hi"))
    assert engines["demo-b"].prompts[-1] == engines["demo-b"].tokenize(prompt)
    assert out.usage.prompt_tokens == len(engines["demo-b"].tokenize(prompt))
    assert out.usage.completion_tokens == n_tokens(ANSWER) + 1  # and the end-of-generation token


def test_chat_stream_equals_whole_and_reports_usage(oa):
    kw = dict(model="demo", messages=[{"role": "user", "content": "Hi"}])
    whole = oa.chat.completions.create(**kw)
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # the multi-byte characters were split over tokens: never half a character in a delta
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_completions_length_stop_n_and_echo(oa):
    kw = dict(model="demo", prompt="Count:", max_tokens=5)
    cut = oa.completions.create(**kw)
    assert cut.choices[0].text == ANSWER[:5] and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 5 and cut.usage.prompt_tokens == n_tokens("Count:")
    chunks = list(oa.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5
    stopped = oa.completions.create(model="demo", prompt="Count:", stop=[" 3,"])
    assert stopped.choices[0].text == ANSWER[:ANSWER.index(" 3,")] and stopped.choices[0].finish_reason == "stop"
    two = oa.completions.create(model="demo", prompt="Count:", n=2, max_tokens=4)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8
    echoed = oa.completions.create(model="demo", prompt="Count:", max_tokens=3, echo=True)
    assert echoed.choices[0].text == "Count:" + ANSWER[:3]
    # ignore_eos: the answer goes on to max_tokens
    long = oa.completions.create(model="demo", prompt="x", max_tokens=60, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 60 and long.choices[0].finish_reason == "length"


def test_max_tokens_is_capped_by_the_context(oa):
    out = oa.completions.create(model="demo", prompt="Hi", max_tokens=100_000, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == SLOT


def test_logprobs(oa):
    out = oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [item.token for item in content] == list(ANSWER[:3])
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)
    text = oa.completions.create(model="demo", prompt="Hi", max_tokens=2, logprobs=1).choices[0].logprobs
    assert text.tokens == list(ANSWER[:2]) and len(text.top_logprobs) == 2


def test_embeddings(oa):
    out = oa.embeddings.create(model="demo", input=["a cat", "a cat", "quantum field theory"])
    a, b, c = (d.embedding for d in out.data)
    assert a == b != c and sum(x * x for x in a) == pytest.approx(1.0)
    assert out.usage.prompt_tokens == n_tokens("a cat") * 2 + n_tokens("quantum field theory")
    packed = oa.embeddings.create(model="demo", input="a cat", encoding_format="base64")
    raw = base64.b64decode(packed.data[0].embedding)
    assert list(struct.unpack(f"<{len(a)}f", raw)) == pytest.approx(a, rel=1e-6)  # little-endian float32


def test_tokenize_round_trip(http):
    text = "Hello, héllo 世界!"
    tokens = http.post("/tokenize", json={"model": "demo", "content": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) == n_tokens(text) and tokens["max_model_len"] == SLOT
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["content"] == text
    pieces = http.post("/tokenize", json={"prompt": text, "with_pieces": True}).json()["tokens"]
    # a piece that is not whole UTF-8 comes as a list of bytes, as llama-server sends it
    assert any(isinstance(p["piece"], list) for p in pieces)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text


def test_metrics_count_tokens(http, oa):
    def value(text: str, name: str) -> float:
        match = re.search(rf'^{re.escape(name)}{{[^}}]*model_name="demo-b"[^}}]*}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    before = http.get("/metrics").text
    out = oa.completions.create(model="demo-b", prompt="Metrics", max_tokens=5)
    after = http.get("/metrics").text
    assert value(after, "edge_llm:prompt_tokens_total") - value(before, "edge_llm:prompt_tokens_total") == \
        out.usage.prompt_tokens
    assert value(after, "edge_llm:generation_tokens_total") - value(before, "edge_llm:generation_tokens_total") == 5
    assert value(after, "edge_llm:num_requests_running") == 0.0
    assert 'edge_llm:model_loaded{model_name="demo-b"} 1.0' in after


# -- Responses, Anthropic, Ollama -------------------------------------------------------------------------


def test_responses_plain_and_streamed(oa, engines):
    kw = dict(model="demo", input="Say hello.", instructions="You are brief.")
    whole = oa.responses.create(**kw)
    assert whole.status == "completed" and whole.output_text == ANSWER
    assert engines["demo"].prompts[-1] == engines["demo"].tokenize(chatml(("system", "You are brief."),
                                                                          ("user", "Say hello.")))
    events = list(oa.responses.create(**kw, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    short = oa.responses.create(**kw, max_output_tokens=4)
    assert short.status == "incomplete" and short.output_text == ANSWER[:4]
    events = list(oa.responses.create(**kw, max_output_tokens=4, stream=True))  # cut: OpenAI's terminal event
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_anthropic_create_and_stream(claude, engines):
    kw = dict(model="demo", max_tokens=100, system="You are brief.", messages=[{"role": "user", "content": "Hi"}])
    message = claude.messages.create(**kw)
    assert message.content[0].text == ANSWER and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == n_tokens(ANSWER) + 1
    with claude.messages.stream(**kw) as stream:
        assert "".join(stream.text_stream) == ANSWER
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == message.usage.output_tokens
    cut = claude.messages.create(**{**kw, "max_tokens": 3})
    assert cut.content[0].text == ANSWER[:3] and cut.stop_reason == "max_tokens"
    counted = claude.messages.count_tokens(model="demo", messages=kw["messages"]).input_tokens
    assert counted == len(engines["demo"].tokenize(chatml(("user", "Hi"))))


def test_ollama_chat_generate_and_models(llama, url, engines):
    messages = [{"role": "user", "content": "Hi"}]
    whole = llama.chat(model="demo", messages=messages)
    assert whole.done and whole.done_reason == "stop" and whole.message.content == ANSWER
    assert whole.prompt_eval_count == len(engines["demo"].tokenize(chatml(("user", "Hi"))))
    chunks = list(llama.chat(model="demo", messages=messages, stream=True))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == ANSWER
    assert llama.generate(model="demo:latest", prompt="Hi").response == ANSWER
    cut = llama.generate(model="demo", prompt="Hi", raw=True, options={"num_predict": 4})
    assert cut.response == ANSWER[:4] and cut.done_reason == "length" and cut.prompt_eval_count == 2
    assert {m.model for m in llama.list().models} == {"demo", "demo-b"}
    assert "demo" in {m.model for m in llama.ps().models}
    vectors = llama.embed(model="demo", input=["a cat", "a cat", "a dog"]).embeddings
    assert vectors[0] == vectors[1] != vectors[2]
    assert httpx.get(f"{url}/api/version").json()["version"]


# -- the simple APIs --------------------------------------------------------------------------------------


def test_vllm_generate_shape(http):
    body = http.post("/generate", json={"prompt": "P:", "n": 2, "max_tokens": 8, "stream": False}).json()
    assert body == {"text": ["P:" + ANSWER[:8]] * 2}
    with http.stream("POST", "/generate", json={"prompt": "P:", "max_tokens": 8, "stream": True}) as response:
        raw = response.read()
    parts = [json.loads(p) for p in raw.split(b"\0") if p]
    assert len(parts) > 1 and parts[-1] == {"text": ["P:" + ANSWER[:8]]}
    form = http.post("/generate", content=json.dumps({"prompt": "P:", "max_tokens": 2}),
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.json() == {"text": ["P:" + ANSWER[:2]]}
    refused = http.post("/generate", json={"prompt": "P:", "use_beam_search": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "use_beam_search"


def test_mosec_and_fastapi_demo_shapes(http):
    assert http.post("/inference", json={"prompt": "Once", "max_tokens": 8}).json() == {"generated": ANSWER[:8]}
    body = http.post("/", json={"prompt": "Hello, who are you?", "history": []}).json()
    assert set(body) >= {"response", "status", "time"} and body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["response"] == ANSWER and body["history"] == [["Hello, who are you?", ANSWER]]


# -- a client that leaves ---------------------------------------------------------------------------------


def test_a_client_leaving_a_stream_ends_its_request():
    engine = FakeEngine("word " * 100, delay=0.02)  # 10 s of answer
    with serve({"slow": engine}) as url:
        for path, body in [
                ("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
                ("/api/generate", {"model": "slow", "prompt": "x"}),
                ("/v1/messages", {"max_tokens": 400, "stream": True, "messages": [{"role": "user", "content": "x"}]}),
                ("/v1/responses", {"input": "x", "stream": True})]:
            with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", path, json=body) as response:
                lines = response.iter_lines()
                for _ in range(4):
                    next(lines)
                assert engine.running == 1, path
            assert wait_until(lambda: engine.running == 0), path


# -- errors in each API's own shape ----------------------------------------------------------------------


def long_prompt(words: int) -> str:
    return " ".join(["word"] * words)


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_request"),
    (b"", 400, None, "invalid_request"),
    ({"messages": "hello"}, 400, "messages", "invalid_request"),
    ({"messages": []}, 400, "messages", "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 500}, 400, "temperature", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 0}, 400, "top_k", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 8}, 400, "n", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 500}}, 400, "logit_bias.1",
     "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"one": 5}}, 400, "logit_bias", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999": 5}}, 400, "logit_bias",
     "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(i): 1 for i in range(1025)}}, 400,
     "logit_bias", "invalid_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": [[1, 5, 3]]}, 400, "logit_bias.0",
     "invalid_parameter"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ({"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": long_prompt(600)}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "maxLength": 10**9}}}}, 400, "response_format.json_schema.schema",
     "invalid_parameter"),
    # JSON booleans are not numbers (pydantic's lax mode took `true` as 1).
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 400, "max_tokens", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": True}, 400, "max_completion_tokens",
     "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "n": True}, 400, "n", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": False}, 400, "seed", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": True}, 400, "top_k", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, 400, "temperature", "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": True}, 400, "top_logprobs",
     "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [True]}, 400, "stop_token_ids.0",
     "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [10**9]}, 400, "stop_token_ids",
     "invalid_parameter"),
    # Once the JSON is complete only end-of-generation fits: masked, llama.cpp aborted the process.
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "ignore_eos": True},
     400, "ignore_eos", "invalid_parameter"),
])
def test_malformed_chat_requests_get_openai_errors(http, body, status, param, code):
    if isinstance(body, bytes):
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code


def test_other_malformed_requests(http):
    cases = [
        (http.post("/v1/completions", json={"prompt": long_prompt(600)}), 400, "context_length_exceeded"),
        (http.post("/v1/completions", json={"prompt": [[10**9]]}), 400, "invalid_parameter"),
        (http.post("/detokenize", json={"tokens": [-1]}), 400, "invalid_parameter"),
        (http.post("/detokenize", json={"tokens": [True]}), 400, "invalid_request"),
        (http.post("/v1/completions", json={"prompt": [True, False]}), 400, "invalid_request"),
        (http.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [10**9]}), 400, "invalid_parameter"),
        (http.post("/generate", json={"prompt": "x", "max_tokens": True}), 400, "invalid_request"),
        (http.post("/v1/embeddings", json={"input": [True]}), 400, "invalid_request"),
        (http.post("/v1/embeddings", json={"input": ""}), 400, "invalid_parameter"),
        (http.post("/generate", json={"prompt": 5}), 400, "invalid_request"),
        (http.post("/inference", json={}), 400, "invalid_request"),
        (http.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
         413, "request_too_large"),
        (http.get("/v1/nothing-here"), 404, None),
        (http.get("/v1/chat/completions"), 405, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["error"]["code"] == code


@pytest.mark.parametrize("path, body, status", [
    ("/v1/responses", {"input": []}, 400),
    ("/v1/responses", {"model": "nope", "input": "x"}, 404),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, 400),
    ("/v1/responses", {"input": [{"type": "input_image", "image_url": "x"}]}, 400),
    ("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}, 400),
    ("/v1/responses", b"{not json", 400),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, 400),  # no max_tokens
    ("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    ("/v1/messages", {"max_tokens": 5, "temperature": 3, "messages": [{"role": "user", "content": "x"}]}, 400),
    ("/v1/messages", b"{not json", 400),
    ("/api/chat", {"model": "demo", "messages": "x"}, 400),
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/api/chat", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "format": "yaml"}, 400),
    ("/api/generate", {"model": "demo", "prompt": "x", "keep_alive": "soon"}, 400),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"temperature": -1}}, 400),
    ("/api/generate", {"model": "/etc/passwd", "prompt": "x"}, 404),
    ("/api/embed", {"model": "demo", "input": []}, 400),
    ("/api/show", {"model": "nope"}, 404),
    ("/api/chat", b"{not json", 400),
])
def test_bad_input_gets_the_apis_own_error(url, path, body, status):
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url + path, json=body)
    assert response.status_code == status, response.text
    error = response.json()
    if path.startswith("/v1/messages"):
        assert error["type"] == "error" and set(error["error"]) == {"type", "message"} and error["error"]["message"]
        assert error["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    elif path.startswith("/api/"):
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]


def test_clients_raise_their_own_errors(oa, claude, llama):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oa.responses.create(model="demo", input="x", previous_response_id="resp_1")
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="not in tools"):
        claude.messages.create(model="demo", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                               tools=[{"name": "f", "input_schema": {"type": "object"}}],
                               tool_choice={"type": "tool", "name": "g"})
    with pytest.raises(ollama.ResponseError) as caught:
        llama.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404 and "does not exist" in caught.value.error


# -- a scripted answer: thinking and two tool calls in one answer, through every API ----------------------

TWO_CALLS = ("The user wants two cities.\n</think>\n\nChecking both.\n"
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
CITIES = [{"city": "Paris"}, {"city": "Rome"}]


@pytest.fixture(scope="module")
def scripted():
    engine = FakeEngine(TWO_CALLS, template=THINK_TOOLS_TEMPLATE, n_ctx=8192, n_parallel=1, model_name="scripted")
    with serve({"scripted": engine}, api_keys=["sekrit"]) as url:
        yield url, engine


def test_two_streamed_tool_calls_openai_chat(scripted):
    url, _ = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    chunks = list(client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}],
                                                 tools=tools, stream=True))
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if tc.id:  # the first delta of a call: its id and name
                assert tc.index not in calls
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == [0, 1] and calls[0]["id"] != calls[1]["id"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == CITIES
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > 4  # arguments came in pieces
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants two cities."
    assert "".join(d.content or "" for d in deltas) == "Checking both."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    whole = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}], tools=tools)
    message = whole.choices[0].message
    assert [json.loads(t.function.arguments) for t in message.tool_calls] == CITIES
    assert message.content == "Checking both." and message.model_extra["reasoning_content"] == "The user wants two cities."


def test_two_streamed_tool_calls_responses(scripted):
    url, _ = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
    events = list(client.responses.create(model="scripted", input="?", tools=[tool], stream=True))
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "The user wants two cities." and final.output_text == "Checking both."
    calls = final.output[2:]
    assert calls[0].call_id != calls[1].call_id and [json.loads(c.arguments) for c in calls] == CITIES
    for index, call in ((2, calls[0]), (3, calls[1])):
        pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.output_index == index]
        assert len(pieces) > 1 and "".join(pieces) == call.arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call", "function_call"]
    assert final.usage.output_tokens_details.reasoning_tokens > 0


def test_two_streamed_tool_calls_anthropic(scripted):
    url, _ = scripted
    client = anthropic.Anthropic(base_url=url, api_key="sekrit", max_retries=0)  # sends x-api-key
    tool = {"name": "get_weather", "input_schema": WEATHER_SCHEMA}
    with client.messages.stream(model="scripted", max_tokens=500, tools=[tool],
                                messages=[{"role": "user", "content": "?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "The user wants two cities." and final.content[1].text == "Checking both."
    assert [b.input for b in final.content[2:]] == CITIES and final.content[2].id != final.content[3].id
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1, 2, 3]
    json_deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert {e.index for e in json_deltas} == {2, 3} and len(json_deltas) > 2
    assert final.stop_reason == "tool_use"


def test_two_tool_calls_ollama(scripted):
    url, _ = scripted
    client = ollama.Client(host=url, headers={"Authorization": "Bearer sekrit"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    chunks = list(client.chat(model="scripted", messages=[{"role": "user", "content": "?"}], tools=tools, stream=True))
    calls = [call for c in chunks for call in (c.message.tool_calls or [])]
    assert [dict(call.function.arguments) for call in calls] == CITIES
    assert "".join(c.message.thinking or "" for c in chunks) == "The user wants two cities."
    assert "".join(c.message.content or "" for c in chunks) == "Checking both."
    whole = client.chat(model="scripted", messages=[{"role": "user", "content": "?"}], tools=tools)
    assert [dict(t.function.arguments) for t in whole.message.tool_calls] == CITIES


def test_thinking_kept_inline_on_request(scripted):
    url, engine = scripted
    engine.answer = "Hmm.\n</think>\n\nHello."
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        chat = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}],
                                              extra_body={"reasoning_format": "none"})
        assert chat.choices[0].message.content == "Hmm.\n</think>\n\nHello."
        ollama_chat = ollama.Client(host=url, headers={"Authorization": "Bearer sekrit"}).chat(
            model="scripted", messages=[{"role": "user", "content": "?"}], think=False)
        assert ollama_chat.message.content == "Hmm.\n</think>\n\nHello." and not ollama_chat.message.thinking
        message = anthropic.Anthropic(base_url=url, api_key="sekrit", max_retries=0).messages.create(
            model="scripted", max_tokens=50, messages=[{"role": "user", "content": "?"}], thinking={"type": "disabled"})
        assert [b.type for b in message.content] == ["text"] and message.content[0].text.endswith("Hello.")
    finally:
        engine.answer = TWO_CALLS


def test_anthropic_stop_sequence_and_keys(scripted):
    url, engine = scripted
    engine.answer = "Done.\n</think>\nCount: 1, 2, 3, 4, 5, 6"
    try:
        client = anthropic.Anthropic(base_url=url, api_key="sekrit", max_retries=0)
        message = client.messages.create(model="scripted", max_tokens=100, stop_sequences=[" 4,", " 6"],
                                         messages=[{"role": "user", "content": "Count"}])
        assert message.content[-1].text == "Count: 1, 2, 3," and message.stop_reason == "stop_sequence"
        assert message.stop_sequence == " 4,"
        with client.messages.stream(model="scripted", max_tokens=100, stop_sequences=[" 4,"],
                                    messages=[{"role": "user", "content": "Count"}]) as stream:
            assert "".join(stream.text_stream) == "Count: 1, 2, 3,"
            final = stream.get_final_message()
        assert final.stop_reason == "stop_sequence" and final.stop_sequence == " 4,"
    finally:
        engine.answer = TWO_CALLS
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": "Incorrect API key provided"}}
    refused = httpx.get(f"{url}/api/tags")
    assert refused.status_code == 401 and set(refused.json()) == {"error"}


def test_ollama_show_lists_the_models_sampling_defaults(engines, llama, monkeypatch):
    monkeypatch.setattr(engines["demo-b"], "sampling_defaults", {"temperature": 0.2, "repetition_penalty": 1.1})
    llama.generate(model="demo-b", prompt="")  # loads it: the defaults are the loaded engine's
    lines = llama.show("demo-b").parameters.splitlines()
    assert [line.split() for line in lines] == [["temperature", "0.2"], ["repeat_penalty", "1.1"]]
    assert not llama.show("demo").parameters


def test_serve_sampling_flags_fill_what_a_request_leaves_unset_above_the_models_entry():
    """request > serve's --temp/-n ... > the model's registry defaults > SamplingParams' own."""
    from edge_llm.options import given_sampling
    from edge_llm.server.serve import build_parser

    defaults = given_sampling(build_parser().parse_args(["--temp", "0.3", "--top-k", "5", "-n", "7"]))
    assert defaults == {"temperature": 0.3, "top_k": 5, "max_tokens": 7}
    engine = FakeEngine("word " * 50, model_name="m")
    engine.sampling_defaults = {"temperature": 0.9, "top_p": 0.5}  # the registry entry's
    with serve({"m": engine}, sampling_defaults=defaults) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=30)
        reply = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens == 7  # serve's -n
        seen = engine.params[-1]
        assert (seen.temperature, seen.top_k, seen.top_p, seen.min_p) == (0.3, 5, 0.5, 0.05)
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=1.2,
                                   max_tokens=3, top_p=0.9)
        seen = engine.params[-1]
        assert (seen.temperature, seen.top_k, seen.top_p, seen.max_tokens) == (1.2, 5, 0.9, 3)


def test_each_request_is_one_log_line_with_its_tokens(caplog):
    """serve's access log (server/access_log.py): method, path, status, seconds and, where the
    request generated, its prompt and generated tokens; refusals too; /health and /metrics not;
    no line at all without `access_log` (serve --no-access-log)."""
    from edge_llm.server.serve import build_parser

    assert build_parser().parse_args([]).access_log is True
    assert build_parser().parse_args(["--no-access-log"]).access_log is False
    engine = FakeEngine(ANSWER, model_name="m")
    caplog.set_level("INFO", logger="edge_llm.server.access_log")
    with serve({"m": engine}, api_keys=["sekrit"], access_log=True) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", timeout=30, max_retries=0)
        whole = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        streamed = list(oa.completions.create(model="m", prompt="abc", max_tokens=3, n=2, stream=True,
                                              stream_options={"include_usage": True}))
        httpx.get(f"{url}/v1/models")  # no key: 401
        httpx.get(f"{url}/health")
        httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sekrit"})
        httpx.post(f"{url}/v1/chat/completions?key=secret", json={"model": "m"},
                   headers={"Authorization": "Bearer sekrit"})
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_llm.server.access_log"]
    stamp, seconds = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 127\.0\.0\.1", r"\d+\.\d\d s"
    usage = streamed[-1].usage
    expected = [
        rf"{stamp} POST /v1/chat/completions 200 {seconds}, {whole.usage.prompt_tokens} prompt \+ 4 generated tokens",
        rf"{stamp} POST /v1/completions 200 {seconds}, {usage.prompt_tokens} prompt \+ 6 generated tokens",
        rf"{stamp} GET /v1/models 401 {seconds}",
        rf"{stamp} POST /v1/chat/completions 400 {seconds}",  # the query string is never written
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), line
    assert usage.completion_tokens == 6
    caplog.clear()
    with serve({"m": engine}) as url:
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=30).models.list()
    assert not [r for r in caplog.records if r.name == "edge_llm.server.access_log"]


def test_ps_lists_what_a_running_server_has_loaded(engines, url, oa, capsys):
    """`edge-llm ps` (models --running): the server's /api/ps as a table; no server is one line."""
    from edge_llm import cli

    oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert cli.main(["ps", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "size", "context", "until"]
    assert any(re.match(rf"demo +\d+ MiB +{N_CTX // N_PARALLEL} +\d{{4}}-", line) for line in lines[1:]), lines
    closed = url.rsplit(":", 1)[0] + ":9"
    assert cli.main(["ps", closed]) == 1
    assert capsys.readouterr().err == (f"edge-llm models: error: no edge-llm server answers at {closed} (connection "
                                       "refused); start one with edge-llm serve, or name its URL: --running URL\n")


# -- tools on a template without tool markup (generic_tools.py): the same calls on every API ---------------

GENERIC_CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "get_weather", "arguments": {"city": "Rome"}}]}')


@pytest.fixture(scope="module")
def generic():
    engine = FakeEngine(GENERIC_CALLS, n_ctx=8192, n_parallel=1, model_name="plain")  # ChatML: no tools in it
    with serve({"plain": engine}) as url:
        yield url, engine


def prompt_text(engine: FakeEngine) -> str:
    """The last prompt as text, special tokens by name."""
    return b"".join(SPECIALS[t].encode() if t < BYTE0 else bytes([t - BYTE0]) for t in engine.prompts[-1]).decode()


def test_generic_tool_calls_openai_chat(generic):
    url, engine = generic
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    kw = dict(model="plain", messages=[{"role": "user", "content": "Weather in Paris and Rome?"}], tools=[WEATHER])
    whole = client.chat.completions.create(**kw)
    calls = whole.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments) for c in calls] == CITIES and whole.choices[0].message.content is None
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id and whole.choices[0].finish_reason == "tool_calls"
    # the tool list is in the system message, and a grammar holds the answer to text or a call
    prompt = prompt_text(engine)
    assert prompt.startswith("<|im_start|>system\nYou can call these tools") and '"name": "get_weather"' in prompt
    assert "Otherwise, answer in plain text." in prompt
    grammar = engine.params[-1].grammar
    assert "root ::= tool-calls | text" in grammar and '(", " tool-call)*' in grammar
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed: dict[int, dict] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.id:
                streamed[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            streamed[tc.index]["arguments"] += tc.function.arguments or ""
    assert [json.loads(streamed[i]["arguments"]) for i in (0, 1)] == CITIES
    assert sum(1 for c in chunks if c.choices[0].delta.tool_calls) > 4  # the arguments came in pieces
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    # forced: no text branch, the named tool only, one call when parallel calls are off
    client.chat.completions.create(**kw, tool_choice="required")
    assert "root ::= tool-calls\n" in engine.params[-1].grammar + "\n"
    assert "Call the tool get_weather now" in prompt_text(engine)
    client.chat.completions.create(**kw, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   parallel_tool_calls=False)
    assert "tool-call)*" not in engine.params[-1].grammar
    # with structured output, the text branch is that schema's JSON
    client.chat.completions.create(**kw, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert "root ::= tool-calls | format-root" in engine.params[-1].grammar


def test_generic_tool_calls_other_apis(generic):
    url, _ = generic
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
    out = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).responses.create(
        model="plain", input="?", tools=[tool], stream=True)
    final = list(out)[-1].response
    assert [json.loads(item.arguments) for item in final.output if item.type == "function_call"] == CITIES
    claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    with claude.messages.stream(model="plain", max_tokens=500, tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}],
                                tool_choice={"type": "any"}, messages=[{"role": "user", "content": "?"}]) as stream:
        message = stream.get_final_message()
    assert [b.input for b in message.content if b.type == "tool_use"] == CITIES and message.stop_reason == "tool_use"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    chunks = list(ollama.Client(host=url).chat(model="plain", messages=[{"role": "user", "content": "?"}],
                                               tools=tools, stream=True))
    assert [dict(call.function.arguments) for c in chunks for call in c.message.tool_calls or []] == CITIES


def test_generic_tool_history_and_plain_answers(generic):
    url, engine = generic
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    engine.answer = "It is sunny in Paris."
    try:
        out = client.chat.completions.create(model="plain", tools=[WEATHER], messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}])
        assert out.choices[0].message.content == "It is sunny in Paris." and not out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "stop"
        prompt = prompt_text(engine)
        # the earlier call as the model writes one, its result as a user turn: roles every template has
        assert ('<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
                '<|im_end|>') in prompt
        assert '<|im_start|>user\n{"tool_response": {"name": "get_weather", "content": "Sunny"}}<|im_end|>' in prompt
        assert "<|im_start|>tool" not in prompt
        # an answer that begins like JSON but is not a call is text
        engine.answer = '{"tool": "x"}'
        out = client.chat.completions.create(model="plain", tools=[WEATHER], messages=[{"role": "user", "content": "?"}])
        assert out.choices[0].message.content == '{"tool": "x"}' and not out.choices[0].message.tool_calls
    finally:
        engine.answer = GENERIC_CALLS


# -- what clients written for other servers send ------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded"])
def test_json_bodies_are_read_whatever_their_content_type(url, content_type):
    # litellm's async Ollama provider sends application/octet-stream or text/plain
    headers = {"content-type": content_type} if content_type else {}
    for path, body in [("/api/chat", {"model": "demo", "stream": False, "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        response = httpx.post(url + path, content=json.dumps(body).encode(), headers=headers)
        assert response.status_code == 200, response.text
    refused = httpx.post(url + "/v1/chat/completions", content=b"messages=x", headers={"content-type": "text/plain"})
    assert refused.status_code == 400 and "Content-Type text/plain" in refused.json()["error"]["message"]
    refused = httpx.post(url + "/api/chat", content=b"\x00\x01", headers={"content-type": "application/octet-stream"})
    assert refused.status_code == 400 and "Content-Type application/octet-stream" in refused.json()["error"]


def test_openai_routes_without_v1_and_system_fingerprint(url):
    bare = openai.OpenAI(base_url=url, api_key="x", max_retries=0)  # a base URL without /v1
    assert {m.id for m in bare.models.list().data} == {"demo", "demo-b"}
    chat = bare.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert chat.choices[0].message.content == ANSWER[:3] and chat.system_fingerprint.startswith("fp_")
    chunks = list(bare.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], stream=True))
    assert {c.system_fingerprint for c in chunks} == {chat.system_fingerprint}
    completion = bare.completions.create(model="demo", prompt="x", max_tokens=3)
    assert completion.choices[0].text == ANSWER[:3] and completion.system_fingerprint == chat.system_fingerprint
    assert len(bare.embeddings.create(model="demo", input="x").data[0].embedding) > 0
    assert bare.responses.create(model="demo", input="x", max_output_tokens=3).output_text == ANSWER[:3]
    # another model, another fingerprint
    other = bare.chat.completions.create(model="demo-b", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert other.system_fingerprint != chat.system_fingerprint


def test_one_served_model_answers_any_name():
    engine = FakeEngine(ANSWER, model_name="only")
    with serve({"only": engine}) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        chat = oa.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}])
        assert chat.model == "only" and chat.choices[0].message.content == ANSWER  # named as it is
        assert ollama.Client(host=url).chat(model="test", messages=[{"role": "user", "content": "x"}]).model == "only"
        message = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert message.model == "only"
    from edge_llm.server import ModelManager, create_app

    strict = ModelManager({"only": "only"}, loader=lambda ref: engine, keep_alive=-1, strict_names=True)
    with live_server(create_app(strict)) as url:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}])


def test_strict_model_names_flag():
    from edge_llm.server.serve import build_parser

    assert build_parser().parse_args(["--strict-model-names"]).strict_model_names
    assert not build_parser().parse_args([]).strict_model_names
