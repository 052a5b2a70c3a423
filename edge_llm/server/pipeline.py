"""The one request pipeline every generating API goes through (OpenAI, Responses, Anthropic,
Ollama, the simple APIs).

An API route only translates: its request body into a `Job` (prompts, sampling values, what to
parse out of the answer), made by a `prepare` function that runs off the event loop with the
engine in hand (chat templates, grammars); and the pipeline's output into its own response body
or stream events. The pipeline does the rest, the same way for all of them:

  model name -> a lease on the local engine, or the peer's answer (--peer) passed back as it is
  -> prepare -> prompts tokenized (off the loop) and checked against the context, max_tokens
  capped -> SamplingParams (the one validation) -> engine requests, started before any byte is
  sent (so queue and prompt errors get a status code) -> per choice, the text split into thinking,
  answer and tool calls as it streams (reasoning.py, tool_calls.py) -> the API's reply, or its
  stream; a client that goes away cancels the work, and the lease is released however it ends.

Errors are raised as EdgeLLMError and shaped per API by server/errors.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from edge_llm.chat_tokens import ChatPrompt
from edge_llm.engines.base import Engine, TokenLogprob, Usage
from edge_llm.engines.media import MediaPrompt
from edge_llm.reasoning import ReasoningSplitter
from edge_llm.sampling import SamplingParams
from edge_llm.server import templates
from edge_llm.server.access_log import request_tokens
from edge_llm.server.forward import forward
from edge_llm.server.generation import (
    Generation,
    capped_max_tokens,
    merged,
    until_disconnect,
)
from edge_llm.server.generic_tools import GenericToolCallParser
from edge_llm.server.jsonio import json_response
from edge_llm.server.state import server_state
from edge_llm.server.tool_calls import (
    CallArguments,
    CallEnd,
    CallStart,
    Text,
    ToolCallParser,
    arguments_are_json,
)

if TYPE_CHECKING:
    from edge_llm.server.models import Lease

T = TypeVar("T")


async def local_or_forward(request: Request, model: str | None) -> tuple[str, Lease | Response]:
    """The served name, and either a lease on its engine or the peer's forwarded answer."""
    state = server_state(request)
    name = state.manager.resolve_name(model)
    url = state.manager.peer_url(name)
    if url is not None:
        return name, await forward(request, url, state.peer_client, name)
    return name, await state.manager.acquire(name)


async def with_engine(request: Request, model: str | None, work: Callable[[str, Engine], T], *,
                      renders_template: bool = False) -> T | Response:
    """`work(name, engine)` in a worker thread under a lease (embeddings, tokenizer, model info),
    or the peer's answer. Work that renders the chat template takes the engine's one render slot
    (server/templates.py), so a slow template never holds more than one worker thread."""
    name, held = await local_or_forward(request, model)
    if isinstance(held, Response):
        return held
    try:
        if renders_template:
            async with templates.rendering(held.engine):
                return await asyncio.to_thread(work, name, held.engine)
        return await asyncio.to_thread(work, name, held.engine)
    finally:
        held.release()


async def with_engine_until_disconnect(request: Request, model: str | None,
                                       work: Callable[[str, Engine], Awaitable[T]]) -> T | Response:
    """`await work(name, engine)` under a lease (embeddings, rerank), cancelled as soon as the client
    disconnects (the engine stops the work); or the peer's answer."""
    name, held = await local_or_forward(request, model)
    if isinstance(held, Response):
        return held
    try:
        return await until_disconnect(request, work(name, held.engine))
    finally:
        held.release()


async def named(name: str, work: Awaitable[T]) -> tuple[str, T]:
    """The served name with the work's result (a route's `with_engine_until_disconnect` work)."""
    return name, await work


# -- what an API asks for ----------------------------------------------------------------------------


@dataclass
class Job:
    """One request as the engine sees it, made by the API's `prepare`."""

    # A chat (chat_tokens.ChatPrompt), raw text or token ids; several for a batched /v1/completions;
    # a chat with images (engines/media.py).
    prompts: list[str | list[int] | ChatPrompt | MediaPrompt]
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields but max_tokens
    max_tokens: int | None = None  # requested; capped by what the context leaves
    prompt_param: str = "prompt"  # the request field a too-long prompt is blamed on
    reasoning: bool = False  # split <think> thinking from the answer
    thinking_open: bool = False  # ... the prompt already opened it
    tools: bool = False  # parse tool calls out of the answer
    tool_format: Literal["native", "generic"] = "native"  # ... as tool_calls.py or generic_tools.py reads them
    plan: Any = None  # the API's own notes for its reply


# -- what comes out, per choice ----------------------------------------------------------------------


@dataclass
class TextPart:
    kind: Literal["reasoning", "content"]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finish:
    reason: Literal["stop", "length", "cancelled"]
    usage: Usage | None
    stop_sequence: str | None = None  # the client's stop string that ended the answer
    tool_calls: int = 0  # calls the answer made
    reasoning_tokens: int = 0  # tokens of thinking (up to the token that closed it)


Part = TextPart | CallStart | CallArguments | CallEnd | Finish


@dataclass
class Choice:
    """A whole choice, for replies that are not streamed."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape
    logprobs: list[TokenLogprob] | None = None
    finish: Finish | None = None
    _names: dict[int, tuple[str, str]] = field(default_factory=dict)

    def add(self, part: Part) -> None:
        if isinstance(part, TextPart):
            if part.kind == "reasoning":
                self.reasoning += part.text
            else:
                self.content += part.text
            if part.logprobs:
                self.logprobs = (self.logprobs or []) + part.logprobs
        elif isinstance(part, CallStart):
            self._names[part.index] = (part.id, part.name)
        elif isinstance(part, CallEnd):
            call_id, name = self._names[part.index]
            if arguments_are_json(part.arguments):
                self.tool_calls.append({"id": call_id, "type": "function",
                                        "function": {"name": name, "arguments": part.arguments}})
            else:  # cut off, or not JSON: as the model wrote it
                self.content += part.raw
        elif isinstance(part, Finish):
            self.finish = part

    @property
    def reason(self) -> str:
        """OpenAI's finish_reason: stop | length | tool_calls."""
        if self.tool_calls:
            return "tool_calls"
        return "length" if self.finish is not None and self.finish.reason == "length" else "stop"


class OutputParser:
    """One choice's text -> parts: thinking, answer, tool calls (each only where the Job asks)."""

    def __init__(self, job: Job) -> None:
        self._splitter = ReasoningSplitter(open=job.thinking_open) if job.reasoning else None
        self._tools = (GenericToolCallParser() if job.tool_format == "generic" else ToolCallParser()) \
            if job.tools else None
        self.calls = 0
        self.reasoning_tokens = 0

    def count(self, n_tokens: int) -> None:
        if self._splitter is not None and self._splitter.thinking:
            self.reasoning_tokens += n_tokens

    def feed(self, text: str, *, final: bool = False) -> list[Part]:
        if self._splitter is None:
            pieces = [("content", text)]
        else:
            pieces = self._splitter.feed(text) + (self._splitter.finish() if final else [])
        out: list[Part] = []
        for kind, piece in pieces:
            if kind == "content" and self._tools is not None:
                out += self._tool_parts(self._tools.feed(piece))
            elif piece:
                out.append(TextPart(kind, piece))  # type: ignore[arg-type]
        if final and self._tools is not None:
            out += self._tool_parts(self._tools.finish())
        return out

    def _tool_parts(self, events: list) -> list[Part]:
        out: list[Part] = []
        for event in events:
            if isinstance(event, Text):
                out.append(TextPart("content", event.text))
            else:
                if isinstance(event, CallStart):
                    self.calls += 1
                out.append(event)
        return out


# -- one request's engine work -----------------------------------------------------------------------


class Run:
    """The engine requests of one API request, as parts per choice."""

    def __init__(self, name: str, engine: Engine, job: Job, generations: list[Generation]) -> None:
        self.name = name
        self.engine = engine
        self.job = job
        self.generations = generations
        self.n = generations[0].params.n
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.started = time.monotonic()  # the first token is out: the prompt is evaluated
        self._stops = _stripped_stops(job)

    @property
    def params(self) -> SamplingParams:
        return self.generations[0].params

    async def parts(self) -> AsyncIterator[tuple[int, Part]]:
        """(choice index, part) as the engine produces them; choice p * n + i is choice i of prompt p."""
        parsers = [OutputParser(self.job) for _ in range(len(self.generations) * self.n)]
        if len(self.generations) == 1:
            source = ((0, d) async for d in self.generations[0].deltas())
        else:
            source = merged([g.deltas() for g in self.generations])
        async for p, delta in source:
            i = p * self.n + delta.index
            final = delta.finish_reason is not None
            text, stop = delta.text, None
            if final and self._stops:
                text, stop = _cut_stop(text, self._stops)
            parts = parsers[i].feed(text, final=final)
            parsers[i].count(len(delta.token_ids))
            if delta.logprobs:
                first = next((part for part in parts if isinstance(part, TextPart)), None)
                if first is None:
                    parts.insert(0, first := TextPart("content", ""))
                first.logprobs = delta.logprobs
            for part in parts:
                yield i, part
            if final:
                yield i, Finish(delta.finish_reason, delta.usage, stop, parsers[i].calls, parsers[i].reasoning_tokens)

    async def collect(self) -> list[Choice]:
        choices = [Choice(i) for i in range(len(self.generations) * self.n)]
        async for i, part in self.parts():
            choices[i].add(part)
        return choices

    async def close(self) -> None:
        for g in self.generations:
            await g.aclose()


def total_usage(finishes: list[Finish | None], n: int = 1) -> Usage:
    """Usage of a request; the n choices of one prompt share (and count once) its prompt tokens."""
    total = Usage()
    for i, finish in enumerate(finishes):
        if finish is None or finish.usage is None:
            continue
        total.completion_tokens += finish.usage.completion_tokens
        if i % n == 0:
            total.prompt_tokens += finish.usage.prompt_tokens
            total.cached_tokens += finish.usage.cached_tokens
    return total


def _stripped_stops(job: Job) -> tuple[str, ...]:
    """Stop strings the pipeline cuts itself, to know which one ended the answer (Anthropic's
    stop_sequence): the engine is asked to keep them in the text, and they are cut here."""
    stop = job.sampling.get("stop")
    if not stop or job.sampling.get("include_stop_str_in_output"):
        return ()
    if isinstance(stop, str):
        return (stop,)
    # anything but a list of strings is SamplingParams' to refuse (a 400 naming `stop`)
    return tuple(stop) if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop) else ()


def _cut_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    # The engine holds back text that could start a stop string, so a stop string that ended the
    # answer is wholly in the last delta.
    for stop in sorted(stops, key=len, reverse=True):
        if text.endswith(stop):
            return text[: len(text) - len(stop)], stop
    return text, None


async def start_run(request: Request, name: str, engine: Engine, job: Job) -> Run:
    # What the request leaves unset: serve's sampling flags, then (in the engine) the model's entry.
    defaults = dict(server_state(request).sampling_defaults)
    default_max = defaults.pop("max_tokens", None)
    requested_max = job.max_tokens if job.max_tokens is not None else default_max
    sampling = {**defaults, **{k: v for k, v in job.sampling.items() if v is not None}}
    if _stripped_stops(job):
        sampling["include_stop_str_in_output"] = True
    observer = server_state(request).metrics.observer
    log_tokens = request_tokens(request)  # for the request's log line (access_log.py)
    generations: list[Generation] = []
    try:
        for prompt in job.prompts:
            tokens = await asyncio.to_thread(engine.prompt_tokens, prompt)
            max_tokens = capped_max_tokens(engine, len(tokens), requested_max, param=job.prompt_param)
            params = SamplingParams.create(**sampling, max_tokens=max_tokens)
            generations.append(Generation(engine, tokens, params, observer(name, log_tokens),
                                          closing=server_state(request).closing))
        for g in generations:
            await until_disconnect(request, g.start())
    except BaseException:
        for g in generations:
            await g.aclose()
        raise
    return Run(name, engine, job, generations)


Reply = Callable[[Run, list[Choice]], Any]
StreamReply = Callable[[Run], Response]


async def handle(request: Request, model: str | None, prepare: Callable[[Engine], Job], *, stream: bool,
                 reply: Reply, stream_reply: StreamReply,
                 on_done: Callable[[str], Awaitable[None]] | None = None) -> Any:
    """One generating request, start to end: see the module docstring. `reply` builds the body
    of a whole answer; `stream_reply` returns the streaming response over `run.parts()`."""
    name, held = await local_or_forward(request, model)
    if isinstance(held, Response):
        return held
    lease, run, handed_over = held, None, False

    async def end() -> None:
        if run is not None:
            await run.close()
        lease.release()
        if on_done is not None:
            await on_done(name)

    try:
        lease.engine.check_kind("chat", use="generating text")  # an embedding model or reranker: a 400
        async with templates.rendering(lease.engine):  # prepare renders the chat template
            job = await asyncio.to_thread(prepare, lease.engine)
        run = await start_run(request, name, lease.engine, job)
        if stream:
            response = stream_reply(run)
            response.cleanup = end  # type: ignore[attr-defined]
            handed_over = True
            return response
        choices = await until_disconnect(request, run.collect())
        body = await asyncio.to_thread(reply, run, choices)
        # A body can be large (logprobs of every token): encoded off the event loop (jsonio.py).
        return await json_response(lambda: body) if isinstance(body, dict) else body
    finally:
        if not handed_over:
            await end()
