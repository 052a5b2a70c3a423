"""A reader that falls behind the engine gets the waiting tokens of a choice in one delta (one SSE
event): nothing is lost, reordered or mixed between choices, and the official clients parse it."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from live_server import live_server

from edge_llm.load_options import LoadOptions
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.model


async def _wait_for_backlog(request, items: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while request.unread < items and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _reference(engine, prompt: str, params: SamplingParams) -> dict[int, tuple[str, list[int]]]:
    out: dict[int, tuple[str, list[int]]] = {}
    for delta in engine.stream(prompt, params):
        text, ids = out.get(delta.index, ("", []))
        out[delta.index] = (text + delta.text, ids + delta.token_ids)
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_a_late_reader_gets_merged_deltas_with_the_same_output(engine, n):
    params = SamplingParams.create(temperature=0.7 if n > 1 else 0, seed=11, n=n, max_tokens=24, ignore_eos=True)
    prompt = "Write a poem about the sea."
    reference = _reference(engine, prompt, params)

    async def late_reader() -> list:
        request = engine.scheduler.submit(engine.tokenize(prompt), params)
        await _wait_for_backlog(request, 24 * n + 1)  # everything generated, nothing read yet
        deltas = []
        while (delta := await request.aget()) is not None:
            deltas.append(delta)
        assert await request.aget() is None  # stays exhausted
        return deltas

    deltas = asyncio.run(late_reader())
    assert len(deltas) < 24 * n  # merged, not one per token
    got: dict[int, tuple[str, list[int]]] = {}
    for delta in deltas:
        text, ids = got.get(delta.index, ("", []))
        got[delta.index] = (text + delta.text, ids + delta.token_ids)
    assert got == reference
    finals = [d for d in deltas if d.finish_reason is not None]
    assert sorted(d.index for d in finals) == list(range(n))
    assert all(d.usage.completion_tokens == 24 for d in finals)
    for index in range(n):  # each choice's final delta is its last
        assert [d for d in deltas if d.index == index][-1].finish_reason == "length"


def test_merged_deltas_keep_every_logprob(engine):
    params = SamplingParams.create(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    prompt = "The capital of France is"

    async def late_reader() -> list:
        request = engine.scheduler.submit(engine.tokenize(prompt), params)
        await _wait_for_backlog(request, 12)
        deltas = []
        while (delta := await request.aget()) is not None:
            deltas.append(delta)
        return deltas

    deltas = asyncio.run(late_reader())
    assert len(deltas) < 12
    ids = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs or []]
    assert [lp.token_id for lp in logprobs] == ids and len(ids) == 12


class SlowFirstSend:
    """ASGI middleware: the first body chunk of each streamed response waits `delay` seconds, as a
    slow network or a busy event loop would, so the engine runs ahead of the stream."""

    def __init__(self, app, delay: float = 1.5) -> None:
        self.app = app
        self.delay = delay

    async def __call__(self, scope, receive, send):
        first = True

        async def slow_send(message):
            nonlocal first
            if message["type"] == "http.response.body" and message.get("more_body") and first:
                first = False
                await asyncio.sleep(self.delay)
            await send(message)

        await self.app(scope, receive, slow_send if scope["type"] == "http" else send)


@pytest.fixture(scope="module")
def slow_client(tmp_path_factory, demo_path):
    from edge_llm.server import ModelManager, create_app

    config = tmp_path_factory.mktemp("coalesce") / "models.toml"
    config.write_text(f'[models.demo]\nsource = "local"\npath = "{demo_path}"\nn_ctx = 2048\n')
    manager = ModelManager.from_refs(["demo"], config=str(config), options=LoadOptions(n_parallel=2), keep_alive=-1)
    app = SlowFirstSend(create_app(manager, api_keys=None, max_body_bytes=1 << 20))
    with live_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_coalesced_completion_stream_parses_with_the_openai_client(slow_client):
    kw = dict(model="demo", prompt="Once upon a time", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    whole = slow_client.completions.create(**kw)
    chunks = list(slow_client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    assert len(texts) < 40  # some chunks carry several tokens
    assert chunks[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


@pytest.mark.slow
def test_coalesced_chat_stream_parses_with_the_openai_client(slow_client):
    kw = dict(model="demo", messages=[{"role": "user", "content": "Tell me about the moon."}], max_tokens=40,
              temperature=0, extra_body={"ignore_eos": True})
    whole = slow_client.chat.completions.create(**kw)
    chunks = list(slow_client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) < 40
    assert chunks[-1].usage.completion_tokens == 40
