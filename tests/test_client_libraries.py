"""The client libraries people build on, unchanged, over real HTTP against `edge-llm serve` with the
bundled SmolLM2-135M: openai, anthropic, ollama, langchain-openai, litellm (its openai/, ollama/,
ollama_chat/ and anthropic/ providers, the async Ollama provider among them), instructor,
openai-agents, pydantic-ai and llama-index (its Ollama integration: llama-index's OpenAI one pins
openai < 3, openai-agents needs >= 3). Each does what a typical user does: a plain answer, a stream,
an async call, a tool round trip with `auto` and with a forced tool, structured output through
tools and through a JSON schema, embeddings, where the library has them. docs/server.md's "works
with" table lists what each test exercises.

SmolLM2's chat template has no tool markup: every tool call here goes through the generic form
(server/generic_tools.py). The server runs greedy (`--temp 0`) with `-n 48`, so answers are short
and repeatable; the tool is described and asked for in words SmolLM2 answers with a call.

No library may reach the network: a socket guard refuses (and records) every connection and name
lookup that is not this machine's, from import on; each test fails if its library tried, and
telemetry and tracing are turned off as their documentation says.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
from typing import Annotated

import pytest
from pydantic import BaseModel, Field
from server_process import ServerProcess, write_models_toml

pytestmark = [pytest.mark.model, pytest.mark.slow]

QUESTION = "Call get_weather with city Paris."
TOOL_DESCRIPTION = "Get the current weather in a city"
WEATHER = "Sunny, 24 C"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": TOOL_DESCRIPTION,
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
# Each library's documented switch for telemetry, tracing and downloads at import.
QUIET = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENAI_AGENTS_DISABLE_TRACING": "1", "LANGSMITH_TRACING": "false",
         "LANGCHAIN_TRACING_V2": "false", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "ANONYMIZED_TELEMETRY": "False",
         "OTEL_SDK_DISABLED": "true", "LOGFIRE_IGNORE_NO_CONFIG": "1"}


class City(BaseModel):
    name: Annotated[str, Field(max_length=20)]
    country: Annotated[str, Field(max_length=20)]


def get_weather(city: str) -> str:
    """Get the current weather in a city

    Args:
        city: the city
    """
    return WEATHER


# -- the network guard -----------------------------------------------------------------------------------

_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")
reached: list[str] = []


def _local(host: object) -> bool:
    return isinstance(host, str) and (host.startswith(_LOCAL) or host == "") or host is None


@pytest.fixture(scope="module", autouse=True)
def no_network():
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(host: object) -> None:
        reached.append(str(host))
        raise OSError(f"test_client_libraries: no network (tried {host})")

    def connect(self, address):  # noqa: ANN001, ANN202
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            refuse(address[0])
        return real_connect(self, address)

    def connect_ex(self, address):  # noqa: ANN001, ANN202
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            refuse(address[0])
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not _local(host if not isinstance(host, bytes) else host.decode()):
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = \
            real_connect, real_connect_ex, real_getaddrinfo
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def stayed_local():
    before = len(reached)
    yield
    assert reached[before:] == [], f"the library tried to reach the network: {reached[before:]}"


@pytest.fixture(scope="module")
def url(tmp_path_factory, demo_path, no_network):
    folder = tmp_path_factory.mktemp("libraries")
    config = write_models_toml(folder / "models.toml", {"demo": demo_path}, n_ctx=4096)
    server = ServerProcess(["--config", str(config), "-np", "2", "--temp", "0", "-n", "48", "--preload"],
                           folder / "server.log")
    with server:
        server.wait_healthy()
        yield server.url


def load(name: str):  # noqa: ANN201
    """Import a library here, under the guard: what it does at import is checked too."""
    return importlib.import_module(name)


def called_weather(arguments: str | dict) -> str:
    data = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(data["city"], str) and data["city"]
    return data["city"]


# -- the official clients -----------------------------------------------------------------------------------


def test_openai(url):
    openai = load("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Say hello."}]
    assert client.chat.completions.create(model="demo", messages=ask, max_tokens=8).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo", messages=ask, max_tokens=8, stream=True) if c.choices)

    async def async_call() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        return (await aclient.chat.completions.create(model="demo", messages=ask, max_tokens=8)).choices[0].message.content

    assert asyncio.run(async_call())
    # tools: auto (SmolLM2 calls for this question) and forced, each sent back with its result
    for choice in ("auto", "required"):
        messages = [{"role": "user", "content": QUESTION}]
        answer = client.chat.completions.create(model="demo", messages=messages, tools=[TOOL], tool_choice=choice,
                                                max_tokens=40).choices[0].message
        (call,) = answer.tool_calls
        called_weather(call.function.arguments)
        messages += [answer.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": WEATHER}]
        final = client.chat.completions.create(model="demo", messages=messages, tools=[TOOL], max_tokens=20)
        assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # structured output through a JSON schema and through a forced tool
    parsed = client.chat.completions.parse(model="demo", response_format=City, max_tokens=40,
                                           messages=[{"role": "user", "content": "The capital of France?"}])
    assert isinstance(parsed.choices[0].message.parsed, City)
    forced = client.chat.completions.parse(model="demo", tools=[openai.pydantic_function_tool(City)], max_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "City"}},
                                           messages=[{"role": "user", "content": "The capital of France?"}])
    assert isinstance(forced.choices[0].message.tool_calls[0].function.parsed_arguments, City)
    assert len(client.embeddings.create(model="demo", input=["a cat"]).data[0].embedding) > 100
    # a base URL without /v1, and a model name the server does not know: its one model answers
    bare = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    reply = bare.chat.completions.create(model="gpt-4o-mini", messages=ask, max_tokens=4)
    assert reply.model == "demo" and reply.system_fingerprint


def test_anthropic(url):
    anthropic = load("anthropic")
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Say hello."}]
    message = client.messages.create(model="demo", max_tokens=8, messages=ask)
    assert message.content[0].text
    with client.messages.stream(model="demo", max_tokens=8, messages=ask) as stream:
        assert "".join(stream.text_stream)
        streamed = stream.get_final_message()
    assert streamed.usage == client.messages.create(model="demo", max_tokens=8, messages=ask).usage

    async def async_call() -> str:
        aclient = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=120)
        return (await aclient.messages.create(model="demo", max_tokens=8, messages=ask)).content[0].text

    assert asyncio.run(async_call())
    tool = {"name": "get_weather", "description": TOOL_DESCRIPTION, "input_schema": TOOL["function"]["parameters"]}
    for choice in ({"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "get_weather"}):
        messages = [{"role": "user", "content": QUESTION}]
        answer = client.messages.create(model="demo", max_tokens=40, tools=[tool], tool_choice=choice, messages=messages)
        (use,) = [b for b in answer.content if b.type == "tool_use"]
        called_weather(use.input)
        assert answer.stop_reason == "tool_use"
        messages += [{"role": "assistant", "content": answer.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": WEATHER}]}]
        assert client.messages.create(model="demo", max_tokens=20, tools=[tool], messages=messages).content
    schema = City.model_json_schema()
    structured = client.messages.create(model="demo", max_tokens=40, output_config={"format": {
        "type": "json_schema", "schema": schema}}, messages=[{"role": "user", "content": "The capital of France?"}])
    City.model_validate_json(structured.content[0].text)


def test_ollama(url):
    ollama = load("ollama")
    client = ollama.Client(host=url, timeout=120)
    options = {"num_predict": 8}
    ask = [{"role": "user", "content": "Say hello."}]
    assert client.chat(model="demo", messages=ask, options=options).message.content
    assert "".join(c.message.content for c in client.chat(model="demo", messages=ask, options=options, stream=True))
    assert asyncio.run(ollama.AsyncClient(host=url, timeout=120).chat(model="demo", messages=ask, options=options)
                       ).message.content
    # Ollama has no forced call: auto, with a Python function as the tool (the client makes its schema)
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat(model="demo", messages=messages, tools=[TOOL], options={"num_predict": 40}).message
    (call,) = answer.tool_calls
    called_weather(call.function.arguments)
    messages += [answer, {"role": "tool", "tool_name": "get_weather", "content": WEATHER}]
    assert client.chat(model="demo", messages=messages, tools=[get_weather], options=options).done
    structured = client.chat(model="demo", format=City.model_json_schema(), options={"num_predict": 40},
                             messages=[{"role": "user", "content": "The capital of France?"}])
    City.model_validate_json(structured.message.content)
    assert len(client.embed(model="demo", input="a cat").embeddings[0]) > 100


# -- frameworks -----------------------------------------------------------------------------------------------


def test_langchain_openai(url):
    lc = load("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = lc.ChatOpenAI(model="demo", base_url=f"{url}/v1", api_key="x", max_tokens=40, max_retries=0, timeout=120)
    assert llm.invoke("Say hello.").content
    assert "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert asyncio.run(llm.ainvoke("Say hello.")).content
    for choice in ("auto", "get_weather"):
        bound = llm.bind_tools([get_weather], tool_choice=choice)
        messages = [HumanMessage(QUESTION)]
        answer = bound.invoke(messages)
        (call,) = answer.tool_calls
        called_weather(call["args"])
        messages += [answer, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
        assert bound.invoke(messages) is not None
    for method in ("function_calling", "json_schema"):
        city = llm.with_structured_output(City, method=method).invoke("The capital of France?")
        assert isinstance(city, City)
    embeddings = lc.OpenAIEmbeddings(model="demo", base_url=f"{url}/v1", api_key="x", check_embedding_ctx_length=False)
    assert len(embeddings.embed_query("a cat")) > 100


def test_litellm(url):
    litellm = load("litellm")
    litellm.telemetry = False
    ask = [{"role": "user", "content": "Say hello."}]
    openai_kw = dict(model="openai/demo", api_base=f"{url}/v1", api_key="x", max_tokens=8)
    assert litellm.completion(messages=ask, **openai_kw).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=ask, stream=True, **openai_kw))
    assert asyncio.run(litellm.acompletion(messages=ask, **openai_kw)).choices[0].message.content
    for choice in ("auto", "required"):
        messages = [{"role": "user", "content": QUESTION}]
        answer = litellm.completion(messages=messages, tools=[TOOL], tool_choice=choice, **openai_kw | {"max_tokens": 40})
        (call,) = answer.choices[0].message.tool_calls
        called_weather(call.function.arguments)
        messages += [answer.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": WEATHER}]
        assert litellm.completion(messages=messages, tools=[TOOL], **openai_kw).choices
    structured = litellm.completion(messages=[{"role": "user", "content": "The capital of France?"}],
                                    response_format=City, **openai_kw | {"max_tokens": 40})
    City.model_validate_json(structured.choices[0].message.content)
    assert len(litellm.embedding(model="openai/demo", api_base=f"{url}/v1", api_key="x", input=["a cat"])
               .data[0]["embedding"]) > 100
    # the Ollama providers: /api/generate (ollama/) and /api/chat (ollama_chat/), sync and async; the
    # async ones send their JSON as application/octet-stream or text/plain
    for model in ("ollama/demo", "ollama_chat/demo"):
        kw = dict(model=model, api_base=url, max_tokens=8)
        assert litellm.completion(messages=ask, **kw).choices[0].message.content
        assert asyncio.run(litellm.acompletion(messages=ask, **kw)).choices[0].message.content
    answer = asyncio.run(litellm.acompletion(model="ollama_chat/demo", api_base=url, max_tokens=40, tools=[TOOL],
                                             messages=[{"role": "user", "content": QUESTION}]))
    called_weather(answer.choices[0].message.tool_calls[0].function.arguments)
    assert len(litellm.embedding(model="ollama/demo", api_base=url, input=["a cat"]).data[0]["embedding"]) > 100
    # the Anthropic provider: its usage adds up to the prompt (input_tokens is the uncached part)
    kw = dict(model="anthropic/demo", api_base=url, api_key="x", max_tokens=8)
    first, second = (litellm.completion(messages=ask, **kw) for _ in range(2))
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    forced = litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[TOOL], tool_choice="required",
                                **kw | {"max_tokens": 40})
    called_weather(forced.choices[0].message.tool_calls[0].function.arguments)


def test_instructor(url):
    instructor = load("instructor")
    openai = load("openai")
    ask = [{"role": "user", "content": "The capital of France?"}]
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), mode=mode)
        assert isinstance(client.chat.completions.create(model="demo", response_model=City, messages=ask,
                                                         max_tokens=40, max_retries=0), City)

    async def async_call() -> City:
        client = instructor.from_openai(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0))
        return await client.chat.completions.create(model="demo", response_model=City, messages=ask, max_tokens=40,
                                                    max_retries=0)

    assert isinstance(asyncio.run(async_call()), City)
    anthropic = load("anthropic")
    claude = instructor.from_anthropic(anthropic.Anthropic(base_url=url, api_key="x", max_retries=0),
                                       mode=instructor.Mode.ANTHROPIC_TOOLS)
    assert isinstance(claude.messages.create(model="demo", response_model=City, messages=ask, max_tokens=40,
                                             max_retries=0), City)


def test_openai_agents(url):
    agents = load("agents")
    openai = load("openai")
    agents.set_tracing_disabled(True)

    def chat_model():  # noqa: ANN202 - a client per event loop: each run_sync starts its own
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        return agents.OpenAIChatCompletionsModel(model="demo", openai_client=client)

    settings = agents.ModelSettings(max_tokens=40)
    assert agents.Runner.run_sync(agents.Agent(name="plain", model=chat_model(), model_settings=settings),
                                  "Say hello.").final_output

    async def streamed_and_responses() -> tuple[str, str]:
        run = agents.Runner.run_streamed(agents.Agent(name="plain", model=chat_model(), model_settings=settings),
                                         "Say hello.")
        async for _ in run.stream_events():
            pass
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        responses = agents.Agent(name="responses", model_settings=settings,  # the Responses API
                                 model=agents.OpenAIResponsesModel(model="demo", openai_client=client))
        # (a short answer: an agent on the Responses API fails on one cut at max_output_tokens, as on OpenAI's)
        return run.final_output, (await agents.Runner.run(responses, "What is 2+2?")).final_output

    assert all(asyncio.run(streamed_and_responses()))
    # a registered tool, called with tool_choice auto and required (reset to auto after the call)
    calls = []

    @agents.function_tool(name_override="get_weather")
    def weather(city: str) -> str:
        """Get the current weather in a city"""
        calls.append(city)
        return WEATHER

    for choice in ("auto", "required"):
        agent = agents.Agent(name="tools", model=chat_model(), tools=[weather],
                             model_settings=agents.ModelSettings(max_tokens=40, tool_choice=choice))
        before = len(calls)
        result = agents.Runner.run_sync(agent, QUESTION, max_turns=4)
        assert len(calls) > before and result.final_output is not None
    # structured output: a JSON schema response format
    structured = agents.Agent(name="city", model=chat_model(), model_settings=settings, output_type=City)
    assert isinstance(agents.Runner.run_sync(structured, "The capital of France?").final_output, City)


def test_pydantic_ai(url):
    pai = load("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"{url}/v1", api_key="x")
    model = OpenAIChatModel("demo", provider=provider)
    settings = {"max_tokens": 40}
    agent = pai.Agent(model, model_settings=settings)
    assert agent.run_sync("Say hello.").output

    async def streamed() -> str:
        async with agent.run_stream("Say hello.") as run:
            return "".join([piece async for piece in run.stream_text(delta=True)])

    assert asyncio.run(streamed())
    tools = pai.Agent(model, model_settings=settings)
    calls = []

    @tools.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city"""
        calls.append(city)
        return WEATHER

    assert tools.run_sync(QUESTION).output is not None and calls
    # structured output through a tool (pydantic-ai's default, a forced call) and through a JSON schema
    assert isinstance(pai.Agent(model, output_type=City, model_settings=settings).run_sync(
        "The capital of France?").output, City)
    assert isinstance(pai.Agent(model, output_type=pai.NativeOutput(City), model_settings=settings).run_sync(
        "The capital of France?").output, City)
    from pydantic_ai.embeddings import Embedder
    from pydantic_ai.embeddings.openai import OpenAIEmbeddingModel

    assert len(Embedder(OpenAIEmbeddingModel("demo", provider=provider)).embed_query_sync("a cat").embeddings[0]) > 100


def test_llama_index(url):
    ollama_llm = load("llama_index.llms.ollama")
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from llama_index.embeddings.ollama import OllamaEmbedding

    llm = ollama_llm.Ollama(model="demo", base_url=url, request_timeout=120, additional_kwargs={"num_predict": 40})
    assert llm.complete("Say hello.").text
    assert "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="Say hello.")]))
    assert asyncio.run(llm.achat([ChatMessage(role="user", content="Say hello.")])).message.content
    tool = FunctionTool.from_defaults(fn=get_weather)
    answer = llm.chat_with_tools([tool], user_msg=QUESTION)
    (call,) = llm.get_tool_calls_from_response(answer, error_on_no_tool_call=True)
    called_weather(call.tool_kwargs)
    assert str(llm.predict_and_call([tool], user_msg=QUESTION)) == WEATHER
    city = llm.structured_predict(City, PromptTemplate("The capital of {country}?"), country="France")
    assert isinstance(city, City)
    assert len(OllamaEmbedding(model_name="demo", base_url=url).get_text_embedding("a cat")) > 100
