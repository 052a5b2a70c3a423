"""The other APIs the server speaks, over real HTTP with their official clients, unchanged:
OpenAI's Responses API (`openai`), Anthropic's Messages API (`anthropic`) and the Ollama API
(`ollama`), answered by the bundled SmolLM2. Errors and what SmolLM2 never writes (`</think>`, two
tool calls in one answer) are tested on a FakeEngine in test_server_fake.py."""

from __future__ import annotations

import contextlib
import json

import httpx
import ollama
import pytest
from live_server import live_server
from test_server import TOOLS_TEMPLATE, write_config

from edge_llm.load_options import LoadOptions

pytestmark = [pytest.mark.model, pytest.mark.slow]

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
# The same Qwen-style think template SmolLM2 is given: the prompt opens the thinking.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}{# </think> #}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_path):
    from edge_llm.server import ModelManager, create_app

    config = write_config(tmp_path_factory.mktemp("apis"), demo_path, ["demo"])
    manager = ModelManager.from_refs(["demo"], config=config, options=LoadOptions(n_parallel=4), keep_alive=-1)
    app = create_app(manager, max_body_bytes=1 << 20, preload=True)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client_timeout():
    return 120  # the real model answers


@contextlib.contextmanager
def template(server, text):
    """Serve the demo model with another chat template for a while (SmolLM2 has no tool or think one)."""
    from edge_llm.chat_format import JinjaChatFormatter

    engine = server[1].state.edge.manager.models["demo"].engine
    original, engine.formatter = engine.formatter, JinjaChatFormatter(text)
    try:
        yield
    finally:
        engine.formatter = original


# -- OpenAI Responses ------------------------------------------------------------------------------------


def test_responses_plain_and_streamed(oa):
    kw = dict(model="demo", input="Say hello.", instructions="You are brief.", max_output_tokens=12, temperature=0)
    whole = oa.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    assert whole.usage.output_tokens <= 12 and whole.usage.input_tokens > 5
    events = list(oa.responses.create(**kw, stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == {"completed": "response.completed", "incomplete": "response.incomplete"}[whole.status]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    # a conversation as input items: the model sees the earlier turns
    items = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."},
             {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}]
    assert oa.responses.create(model="demo", input=items, max_output_tokens=8, temperature=0).output_text


def test_responses_with_a_tool(oa, server):
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA}
    with template(server, TOOLS_TEMPLATE):
        out = oa.responses.create(model="demo", input="What is the weather in Paris?", tools=[tool],
                                  tool_choice="required", max_output_tokens=60, temperature=0)
        calls = [item for item in out.output if item.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
        assert isinstance(json.loads(calls[0].arguments)["city"], str)
        events = list(oa.responses.create(model="demo", input="Weather in Rome?", tools=[tool],
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=60, temperature=0, stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(done) == 1 and done[0].arguments == deltas and json.loads(deltas)["city"]
        # the call and its result go back as input items
        follow = oa.responses.create(model="demo", max_output_tokens=10, temperature=0, tools=[tool], input=[
            {"role": "user", "content": "Weather in Rome?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": deltas},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 C"}])
        assert follow.status in ("completed", "incomplete")


def test_responses_json_schema(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = oa.responses.create(model="demo", input="Describe a person as JSON.", max_output_tokens=60, temperature=0,
                              text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    data = json.loads(out.output_text)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)


# -- Anthropic Messages ----------------------------------------------------------------------------------


def test_anthropic_create_and_stream(claude):
    # This SDK has no sampling arguments (its models fix them); the API still takes them in the body.
    kw = dict(model="demo", max_tokens=12, extra_body={"temperature": 0}, system="You are brief.",
              messages=[{"role": "user", "content": "Say hello."}])
    message = claude.messages.create(**kw)
    assert message.role == "assistant" and message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and 0 < message.usage.output_tokens <= 12
    with claude.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text == final.content[0].text
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens
    assert claude.messages.count_tokens(model="demo", messages=kw["messages"]).input_tokens > 3
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    structured = claude.messages.create(model="demo", max_tokens=40, extra_body={"temperature": 0},
                                        messages=[{"role": "user", "content": "A person as JSON."}],
                                        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(structured.content[0].text)["age"], int)


def test_anthropic_with_a_tool(claude, server):
    tool = {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_SCHEMA}
    with template(server, TOOLS_TEMPLATE):
        kw = dict(model="demo", max_tokens=60, extra_body={"temperature": 0}, tools=[tool], tool_choice={"type": "any"},
                  messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        message = claude.messages.create(**kw)
        uses = [b for b in message.content if b.type == "tool_use"]
        assert message.stop_reason == "tool_use" and len(uses) == 1
        assert uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)
        with claude.messages.stream(**kw) as stream:
            final = stream.get_final_message()
        streamed = [b for b in final.content if b.type == "tool_use"]
        assert len(streamed) == 1 and streamed[0].input == uses[0].input and final.stop_reason == "tool_use"
        # the tool's result goes back as a tool_result block
        follow = claude.messages.create(model="demo", max_tokens=10, tools=[tool], messages=[
            *kw["messages"], {"role": "assistant", "content": message.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"}]}])
        assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")


# -- Ollama ------------------------------------------------------------------------------------------------


def test_ollama_chat_and_generate(llama):
    options = {"temperature": 0, "num_predict": 12}
    messages = [{"role": "user", "content": "Say hello."}]
    whole = llama.chat(model="demo", messages=messages, options=options)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.content.strip()
    assert 0 < whole.eval_count <= 12 and whole.prompt_eval_count > 3
    chunks = list(llama.chat(model="demo", messages=messages, options=options, stream=True))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == whole.eval_count
    generated = llama.generate(model="demo:latest", prompt="Say hello.", options=options)  # the default tag
    assert generated.response == whole.message.content  # generate applies the same chat template
    raw = "".join(c.response for c in llama.generate(model="demo", prompt="The capital of France is", raw=True,
                                                     options=options, stream=True))
    assert raw.strip()
    data = json.loads(llama.chat(model="demo", messages=[{"role": "user", "content": "A person as JSON."}],
                                 format={"type": "object", "properties": {"age": {"type": "integer"}},
                                         "required": ["age"]}, options={"temperature": 0, "num_predict": 40})
                      .message.content)
    assert isinstance(data["age"], int)


def test_ollama_models_and_embeddings(llama, url):
    listed = llama.list().models
    assert [m.model for m in listed] == ["demo"]
    assert listed[0].details.format == "gguf" and listed[0].details.family == "llama" and listed[0].size > 10**7
    assert [m.model for m in llama.ps().models] == ["demo"]
    shown = llama.show("demo")
    assert "completion" in shown.capabilities and shown.modelinfo["general.architecture"] == "llama"
    vectors = llama.embed(model="demo", input=["a cat", "a cat", "quantum field theory"]).embeddings
    assert len(vectors) == 3 and vectors[0] == vectors[1] != vectors[2] and len(vectors[0]) > 100
    assert httpx.get(f"{url}/api/version").json()["version"]


def test_ollama_keep_alive_unloads(tmp_path, demo_path):
    from edge_llm.server import ModelManager, create_app

    manager = ModelManager.from_refs(["demo"], config=write_config(tmp_path, demo_path, ["demo"]), keep_alive=-1)
    with live_server(create_app(manager)) as url:
        client = ollama.Client(host=url)
        assert client.ps().models == []
        client.generate(model="demo", prompt="")  # an empty prompt loads the model
        assert [m.model for m in client.ps().models] == ["demo"]
        client.generate(model="demo", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
        assert client.ps().models == []  # unloaded right after the request


def test_a_client_leaving_a_stream_frees_its_slot(url, server):
    from test_server import wait_until

    engine = server[1].state.edge.manager.models["demo"].engine
    streams = [("/api/generate", {"model": "demo", "prompt": "Tell a long story.", "options": {"num_predict": 400}}),
               ("/v1/messages", {"model": "demo", "max_tokens": 400, "stream": True,
                                 "messages": [{"role": "user", "content": "Tell a long story."}]}),
               ("/v1/responses", {"model": "demo", "input": "Tell a long story.", "stream": True})]
    for path, body in streams:
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", path, json=body) as response:
            lines = response.iter_lines()
            # A few lines only: a sampled story may end early, and with speculation several tokens
            # arrive as one event, so a long read could outlast the generation.
            for _ in range(3):
                next(lines)
            assert engine.scheduler.running == 1, path
        assert wait_until(lambda: engine.scheduler.running == 0), path


# -- reasoning --------------------------------------------------------------------------------------------


def test_thinking_is_split_from_the_answer(oa, server, url):
    """A think template opens the thinking in the prompt: SmolLM2's whole answer is then thinking,
    and the same greedy text comes as content when the request keeps it inline."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    with template(server, THINK_TEMPLATE):
        split = oa.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0)
        inline = oa.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                            extra_body={"reasoning_format": "none"})
        reasoning = split.choices[0].message.model_extra["reasoning_content"]
        assert reasoning and reasoning == inline.choices[0].message.content.strip()
        assert not split.choices[0].message.content
        chunks = list(oa.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
        assert not "".join(d.content or "" for d in deltas)
        ollama_chat = ollama.Client(host=url).chat(model="demo", messages=messages,
                                                   options={"temperature": 0, "num_predict": 10})
        assert ollama_chat.message.thinking == reasoning


# -- tools on SmolLM2, whose template has no tool markup (generic_tools.py) --------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": WEATHER_SCHEMA}}


def test_forced_and_auto_tools_without_tool_markup_openai_chat(oa):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="demo", tools=[WEATHER_TOOL], max_tokens=40, temperature=0)
    forced = oa.chat.completions.create(messages=question, tool_choice="required", **kw)
    call = forced.choices[0].message.tool_calls[0]
    assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str) and call.id.startswith("call_")
    chunks = list(oa.chat.completions.create(messages=question, stream=True, **kw,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    streamed = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [])
    assert streamed == call.function.arguments  # greedy: the same call, streamed in pieces
    # the round trip: the call and its result go back, and the model answers
    follow = oa.chat.completions.create(messages=[
        *question, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}], **kw)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # auto: plain text or a valid call, never a 400; with structured output, that JSON or a call
    auto = oa.chat.completions.create(messages=question, tool_choice="auto", **kw)
    message = auto.choices[0].message
    assert message.content or all(json.loads(t.function.arguments) for t in message.tool_calls)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"]}
    formatted = oa.chat.completions.create(messages=question, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}, **kw).choices[0].message
    assert formatted.tool_calls or isinstance(json.loads(formatted.content)["answer"], str)


def test_forced_tools_without_tool_markup_other_apis(oa, claude, llama):
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA}
    out = oa.responses.create(model="demo", input="Weather in Rome?", tools=[tool], tool_choice="required",
                              max_output_tokens=40, temperature=0)
    calls = [item for item in out.output if item.type == "function_call"]
    assert len(calls) >= 1 and isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = oa.responses.create(model="demo", max_output_tokens=10, temperature=0, tools=[tool], input=[
        {"role": "user", "content": "Weather in Rome?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"}])
    assert follow.status in ("completed", "incomplete")
    anthropic_tool = {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_SCHEMA}
    kw = dict(model="demo", max_tokens=40, extra_body={"temperature": 0}, tools=[anthropic_tool],
              messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    message = claude.messages.create(**kw, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(uses) == 1 and isinstance(uses[0].input["city"], str)
    with claude.messages.stream(**kw, tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"][0] == uses[0].input
    follow = claude.messages.create(**kw | {"messages": [
        *kw["messages"], {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"}]}]})
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # Ollama has no forced call: tools are offered, and the answer is text or a call
    answer = llama.chat(model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                        tools=[WEATHER_TOOL], options={"temperature": 0, "num_predict": 30})
    assert answer.message.content or answer.message.tool_calls


# -- usage: every API's counts add up to the prompt's tokens ---------------------------------------------


def test_usage_adds_up_to_the_prompt_on_every_api(oa, claude, llama, http):
    system, user = "You are brief.", "Name a color."
    n_prompt = claude.messages.count_tokens(model="demo", system=system,
                                            messages=[{"role": "user", "content": user}]).input_tokens
    # twice each: the second time most of the prompt comes from the cache
    for _ in range(2):
        chat = oa.chat.completions.create(model="demo", max_tokens=3, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": user}])
        assert chat.usage.prompt_tokens == n_prompt
    assert chat.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(oa.chat.completions.create(model="demo", max_tokens=3, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "system", "content": system},
                                                       {"role": "user", "content": user}]))
    assert chunks[-1].usage.prompt_tokens == n_prompt
    response = oa.responses.create(model="demo", instructions=system, input=user, max_output_tokens=3, temperature=0)
    assert response.usage.input_tokens == n_prompt and response.usage.input_tokens_details.cached_tokens > 0
    kw = dict(model="demo", max_tokens=3, system=system, extra_body={"temperature": 0},
              messages=[{"role": "user", "content": user}])
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    for usage in (whole.usage, streamed.usage):
        # Anthropic's input_tokens are the part not read from the cache
        assert usage.input_tokens + usage.cache_read_input_tokens == n_prompt and usage.cache_read_input_tokens > 0
    assert streamed.usage == whole.usage
    ollama_chat = llama.chat(model="demo", options={"temperature": 0, "num_predict": 3},
                             messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert ollama_chat.prompt_eval_count == n_prompt
    prompt = "The capital of France is"
    completion = oa.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0)
    assert completion.usage.prompt_tokens == http.post("/tokenize", json={"content": prompt,
                                                                          "add_special": True}).json()["count"]


# -- logit_bias ------------------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(oa, http):
    kw = dict(model="demo", prompt="The capital of France is", max_tokens=1, temperature=0)
    first = oa.completions.create(**kw).choices[0].text
    (token,) = http.post("/tokenize", json={"content": first}).json()["tokens"]
    banned = oa.completions.create(**kw, logit_bias={str(token): -100}).choices[0].text
    assert banned != first
    forced_id = http.post("/tokenize", json={"content": " banana", "with_pieces": True}).json()["tokens"][0]
    forced = oa.completions.create(**kw, logit_bias={str(forced_id["id"]): 100}).choices[0].text
    assert forced == forced_id["piece"]
    chat = oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                      temperature=0, logit_bias={str(forced_id["id"]): 100})
    assert chat.choices[0].message.content == forced_id["piece"]
    # llama-server's list form
    listed = http.post("/v1/completions", json={**kw, "logit_bias": [[forced_id["id"], 100]]}).json()
    assert listed["choices"][0]["text"] == forced_id["piece"]
