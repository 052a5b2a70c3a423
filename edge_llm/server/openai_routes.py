"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, plus
/tokenize and /detokenize (llama-server's and vLLM's bodies), /health and /metrics.

Defaults where OpenAI's and llama.cpp's differ: sampling fields a request leaves out take
edge-llm's defaults (llama-server's: temperature 0.8, top_p 0.95, top_k 40, min_p 0.05), and a
request without max_tokens may generate until its context slot is full.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from edge_llm.engines.base import Engine, TokenLogprob, Usage
from edge_llm.engines.media import MEDIA_MARKER
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.server.chat_request import ChatOptions, chat_job, format_grammar, template_call
from edge_llm.server.errors import stream_error
from edge_llm.server.generation import SSEResponse, context_size
from edge_llm.server.jsonio import SLICE, RawJSON, dumps, json_response
from edge_llm.server.media import ImageCollector, join_parts, load_images
from edge_llm.server.pipeline import (
    Choice,
    Finish,
    Job,
    Run,
    TextPart,
    handle,
    named,
    total_usage,
    with_engine,
    with_engine_until_disconnect,
)
from edge_llm.server.schemas import (
    DOCUMENTED_ERRORS,
    MAX_BATCH,
    MAX_EMBEDDING_INPUTS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    HealthResponse,
    ImageURL,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    sampling_fields,
)
from edge_llm.server.state import server_state
from edge_llm.server.tool_calls import CallArguments, CallStart
from edge_llm.version import package_version

# Logprobs are finite in practice; a -inf would make the JSON invalid, so it is clamped.
MIN_LOGPROB = -9999.0

router = APIRouter()


# -- simple routes --------------------------------------------------------------------------------


@router.get("/health", response_model=HealthResponse, tags=["server"])
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics", tags=["server"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# Every OpenAI route also answers without its /v1 prefix, as llama-server's do: a client whose base URL
# lacks /v1 (http://host:8080) works unchanged.
@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses=DOCUMENTED_ERRORS)
@router.get("/models", response_model=ModelList, include_in_schema=False)
async def list_models(request: Request) -> ModelList:
    manager = server_state(request).manager
    loaded = manager.loaded()
    cards = [ModelCard(id=m.name, created=m.created, loaded=m.name in loaded, kind=m.kind,
                       capabilities=(["completion", "vision"] if m.vision else ["completion"]) if m.kind == "chat"
                       else [m.kind])
             for m in manager.models.values()]
    cards += [ModelCard(id=name, created=0, owned_by="peer", peer=url) for name, url in manager.peers.items()]
    return ModelList(data=cards)


# -- shared by chat and completions -------------------------------------------------------------------


def sampling_values(body: SamplingFields, **overrides: Any) -> dict[str, Any]:
    return {**sampling_fields(body), "logit_bias": logit_bias(body.logit_bias), **overrides}


def logit_bias(value: dict[str, float] | list[list] | None) -> dict | list | None:
    """OpenAI's {"token id": bias} map, or llama-server's [[token id, bias], ...] list, as the map
    SamplingParams checks (ids, range, count)."""
    if not value:
        return None
    if isinstance(value, dict):
        return value
    pairs = {}
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool)):
            raise InvalidParameterError("logit_bias as a list takes [token id, bias] pairs", param=f"logit_bias.{i}")
        pairs[pair[0]] = pair[1]
    return pairs


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    if response_format is None:
        return None
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    if response_format.type == "json_schema" and schema is None:
        raise InvalidParameterError("response_format json_schema needs json_schema.schema",
                                    param="response_format.json_schema")
    return format_grammar(response_format.type, schema, param="response_format.json_schema.schema")


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _finite(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def chat_logprobs(items: list[TokenLogprob] | None) -> dict | None:
    if items is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]}
                        for t in items]}


def completion_logprobs(items: list[TokenLogprob] | None, offset: int, top: int) -> dict | None:
    if items is None:
        return None
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [_finite(t.logprob) for t in items],
            "top_logprobs": [{s: _finite(lp) for s, lp in t.top} for t in items] if top else None,
            "text_offset": offsets}


# -- chat -----------------------------------------------------------------------------------------


def _content_text(message: ChatMessage, i: int, images: ImageCollector) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            texts.append(images.marker("url", url, f"messages.{i}.content.{k}.image_url"))
        elif part.type != "text" or part.text is None:
            raise InvalidParameterError(f"messages[{i}]: only text and image_url content parts are supported "
                                        f"(got {part.type!r})", param=f"messages.{i}.content")
        else:
            texts.append(part.text)
    return join_parts(texts) if MEDIA_MARKER in texts else "".join(texts)


def template_messages(messages: list[ChatMessage], images: ImageCollector | None = None) -> list[dict]:
    """Messages as chat templates expect them (transformers' conventions); an image part becomes
    MEDIA_MARKER in the text, its reference kept in `images`."""
    images = images if images is not None else ImageCollector()
    out = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": _content_text(m, i, images)}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            message["tool_calls"] = [template_call(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
        out.append(message)
    return out


def chat_options(body: ChatCompletionRequest, reasoning_format: str) -> ChatOptions:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameterError("top_logprobs needs logprobs: true", param="top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    return ChatOptions(tools=tools, tool_choice=choice, reasoning_format=body.reasoning_format or reasoning_format,
                       parallel_tool_calls=body.parallel_tool_calls is not False)


@router.post("/v1/chat/completions", tags=["openai"], responses=DOCUMENTED_ERRORS)
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    options = chat_options(body, server_state(request).reasoning_format)
    collector = ImageCollector()
    messages = template_messages(body.messages, collector)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = sampling_values(body, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    images = await load_images(request, collector.refs)

    def prepare(engine: Engine) -> Job:
        options.grammar = response_format_grammar(body.response_format)
        return chat_job(engine, messages, options, sampling=sampling, max_tokens=requested, images=images)

    def reply(run: Run, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": c.content or (None if c.tool_calls else "")}
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": c.index, "message": message, "logprobs": chat_logprobs(c.logprobs),
                        "finish_reason": c.reason})
        return {**chat_meta(run), "object": "chat.completion", "choices": out,
                "usage": usage_body(total_usage([c.finish for c in choices], run.n))}

    def stream_reply(run: Run) -> Response:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(chat_events(run, include_usage))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply)


def stream_chunk(meta: dict, kind: str, choice: dict, include_usage: bool) -> str:
    """One streamed chunk of one choice; with include_usage every chunk has "usage": null, as OpenAI's."""
    body = {**meta, "object": kind, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return dumps(body)


def chat_meta(run: Run) -> dict:
    return {"id": f"chatcmpl-{run.id}", "created": run.created, "model": run.name,
            "system_fingerprint": system_fingerprint(run.engine)}


def system_fingerprint(engine: Engine) -> str:
    """OpenAI's system_fingerprint: names the backend that answered (edge-llm's and llama.cpp's
    versions, the engine, the model), so a client sees when answers may change for that reason."""
    return _fingerprint(engine.name, engine.model_name or "")


@lru_cache(maxsize=64)
def _fingerprint(engine_name: str, model_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        backend = version("llama-cpp-python") if engine_name == "llama.cpp" else ""
    except PackageNotFoundError:
        backend = ""
    key = "|".join([package_version(), engine_name, backend, model_name])
    return "fp_" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:12]


async def chat_events(run: Run, include_usage: bool):
    meta = chat_meta(run)

    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return stream_chunk(meta, "chat.completion.chunk", choice, include_usage)

    finishes: list[Finish | None] = [None] * run.n
    for i in range(run.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, part in run.parts():
            if isinstance(part, TextPart):
                field = "content" if part.kind == "content" else "reasoning_content"
                if part.text or part.logprobs:
                    yield chunk(i, {field: part.text}, logprobs=chat_logprobs(part.logprobs))
            elif isinstance(part, CallStart):
                yield chunk(i, {"tool_calls": [{"index": part.index, "id": part.id, "type": "function",
                                                "function": {"name": part.name, "arguments": ""}}]})
            elif isinstance(part, CallArguments):
                yield chunk(i, {"tool_calls": [{"index": part.index, "function": {"arguments": part.text}}]})
            elif isinstance(part, Finish):
                finishes[i] = part
                reason = "tool_calls" if part.tool_calls else ("length" if part.reason == "length" else "stop")
                yield chunk(i, {}, reason)
    except EdgeLLMError as exc:
        yield stream_error(exc)
        return
    if include_usage:
        yield dumps({**meta, "object": "chat.completion.chunk", "choices": [],
                     "usage": usage_body(total_usage(finishes, run.n))})
    yield "[DONE]"


# -- completions ----------------------------------------------------------------------------------


def listed(value: str | list[str] | list[int] | list[list[int]], *, param: str, limit: int) -> list[str | list[int]]:
    """OpenAI's `prompt` / `input` forms (a text, token ids, or a list of either) as a list of them."""
    items: list = [value] if isinstance(value, str) or (value and all(isinstance(v, int) for v in value)) \
        else list(value)
    if not items:
        raise InvalidParameterError(f"{param} must not be empty", param=param)
    if len(items) > limit:
        raise InvalidParameterError(f"at most {limit} {param}s per request", param=param)
    return items


@router.post("/v1/completions", tags=["openai"], responses=DOCUMENTED_ERRORS)
@router.post("/completions", include_in_schema=False)
async def completions(body: CompletionRequest, request: Request) -> Any:
    if body.suffix:
        raise InvalidParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidParameterError("best_of must equal n (no server-side ranking)", param="best_of")
    prompts = listed(body.prompt, param="prompt", limit=MAX_BATCH)
    sampling = sampling_values(body, logprobs=body.logprobs)
    top = body.logprobs or 0

    def prepare(engine: Engine) -> Job:
        echoes = [(p if isinstance(p, str) else engine.detokenize(p)) if body.echo else "" for p in prompts]
        grammar = response_format_grammar(body.response_format)
        return Job(prompts, {**sampling, "grammar": grammar}, body.max_tokens, plan=echoes)

    def reply(run: Run, choices: list[Choice]) -> dict:
        echoes = run.job.plan
        out = [{"index": c.index, "text": echoes[c.index // run.n] + c.content,
                "logprobs": completion_logprobs(c.logprobs, len(echoes[c.index // run.n]), top),
                "finish_reason": c.reason} for c in choices]
        return {**completion_meta(run), "object": "text_completion", "choices": out,
                "usage": usage_body(total_usage([c.finish for c in choices], run.n))}

    def stream_reply(run: Run) -> Response:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(completion_events(run, top, include_usage))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply)


def completion_meta(run: Run) -> dict:
    return {"id": f"cmpl-{run.id}", "created": run.created, "model": run.name,
            "system_fingerprint": system_fingerprint(run.engine)}


async def completion_events(run: Run, top: int, include_usage: bool):
    meta, echoes, n = completion_meta(run), run.job.plan, run.n

    def chunk(index: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return stream_chunk(meta, "text_completion", choice, include_usage)

    finishes: list[Finish | None] = [None] * (len(echoes) * n)
    offsets = [len(echoes[i // n]) for i in range(len(finishes))]
    for i in range(len(finishes)):
        if echoes[i // n]:
            yield chunk(i, echoes[i // n])
    try:
        async for i, part in run.parts():
            if isinstance(part, TextPart):
                logprobs = completion_logprobs(part.logprobs, offsets[i], top)
                offsets[i] += len(part.text)
                if part.text or part.logprobs:
                    yield chunk(i, part.text, None, logprobs)
            elif isinstance(part, Finish):
                finishes[i] = part
                yield chunk(i, "", "length" if part.reason == "length" else "stop")
    except EdgeLLMError as exc:
        yield stream_error(exc)
        return
    if include_usage:
        yield dumps({**meta, "object": "text_completion", "choices": [], "usage": usage_body(total_usage(finishes, n))})
    yield "[DONE]"


# -- embeddings, tokenizer ------------------------------------------------------------------------


def embedding_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    inputs = listed(value, param="input", limit=MAX_EMBEDDING_INPUTS)
    if any(len(i) == 0 for i in inputs):
        raise InvalidParameterError("an input is empty", param="input")
    return inputs


@router.post("/v1/embeddings", tags=["openai"], response_model=EmbeddingResponse, responses=DOCUMENTED_ERRORS)
@router.post("/embeddings", include_in_schema=False)
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    if body.dimensions is not None:
        raise InvalidParameterError("dimensions is not supported: the model's own size is returned",
                                    param="dimensions")
    inputs = embedding_inputs(body.input)
    done = await with_engine_until_disconnect(
        request, body.model, lambda name, engine: named(name, engine.embeddings(inputs, normalize=body.embd_normalize)))
    if isinstance(done, Response):
        return done
    name, result = done

    def build() -> dict:
        data = []
        for i, vector in enumerate(result.vectors):
            if body.encoding_format == "base64":
                import numpy as np

                data.append({"object": "embedding", "index": i,
                             "embedding": base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()})
            else:
                data.append({"object": "embedding", "index": i, "embedding": vector})
        n_tokens = result.prompt_tokens
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens}}

    return await json_response(build)


@router.post("/tokenize", tags=["tokenizer"], response_model=TokenizeResponse, responses=DOCUMENTED_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    text = body.content if body.content is not None else body.prompt
    if text is None:
        raise InvalidParameterError("send the text as `content` (or `prompt`)", param="content")
    add_special = body.add_special_tokens if body.add_special_tokens is not None else body.add_special

    def work(name: str, engine: Engine) -> dict:
        tokens = engine.tokenize(text, special=True, add_bos=add_special)
        items = token_pieces_json(engine, tokens) if body.with_pieces else tokens
        return {"tokens": items, "count": len(tokens), "max_model_len": context_size(engine)}

    return await _json_or_forwarded(await with_engine(request, body.model, work))


async def _json_or_forwarded(done: dict | Response) -> Response:
    """A body built under the lease, encoded off the event loop (jsonio.py); or the peer's answer."""
    return done if isinstance(done, Response) else await json_response(lambda: done)


def token_pieces_json(engine: Engine, tokens: list[int]) -> RawJSON:
    """[{"id", "piece"}, ...] written as JSON text directly: the millions of small dicts of a long
    text would cost seconds of garbage collection, each pass holding the GIL."""
    encoded: dict[int, str] = {}

    def entry(token: int) -> str:
        piece = encoded.get(token)
        if piece is None:
            piece = encoded[token] = dumps(token_piece(engine, token))
        return f'{{"id":{token},"piece":{piece}}}'

    pieces = RawJSON(["["])
    for start in range(0, len(tokens), SLICE):
        pieces.append(("," if start else "") + ",".join(map(entry, tokens[start:start + SLICE])))
    pieces.append("]")
    return pieces


def token_piece(engine: Engine, token: int) -> str | list[int]:
    """The token's text, or its bytes when they are not whole UTF-8 (llama-server's convention)."""
    data = engine.token_piece(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/detokenize", tags=["tokenizer"], response_model=DetokenizeResponse, responses=DOCUMENTED_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    def work(name: str, engine: Engine) -> dict:
        text = engine.detokenize(body.tokens)
        return {"content": text, "prompt": text}

    return await _json_or_forwarded(await with_engine(request, body.model, work))
