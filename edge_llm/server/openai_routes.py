"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, plus
/tokenize and /detokenize (llama-server's and vLLM's bodies), /health and /metrics.

Defaults where OpenAI's and llama.cpp's differ: sampling fields a request leaves out take
edge-llm's defaults (llama-server's: temperature 0.8, top_p 0.95, top_k 40, min_p 0.05), and a
request without max_tokens may generate until its context slot is full.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from edge_llm.engines.base import Delta, Engine, TokenLogprob
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.sampling import SamplingParams
from edge_llm.server import grammars, templates
from edge_llm.server.errors import error_body
from edge_llm.server.forward import forward
from edge_llm.server.generation import (
    Generation,
    SSEResponse,
    capped_max_tokens,
    context_size,
    merged,
    tokenize_prompt,
    until_disconnect,
)
from edge_llm.server.jsonio import SLICE, RawJSON, dumps, json_response
from edge_llm.server.schemas import (
    MAX_BATCH,
    MAX_EMBEDDING_INPUTS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from edge_llm.server.tool_calls import parse_tool_calls, template_supports_tools

if TYPE_CHECKING:
    from edge_llm.server.app import ServerState
    from edge_llm.server.models import Lease

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                       (413, "body too large"), (503, "overloaded; retry after Retry-After seconds")]
}
# Logprobs are finite in practice; a -inf would make the JSON invalid, so it is clamped.
MIN_LOGPROB = -9999.0

router = APIRouter()


def server_state(request: Request) -> ServerState:
    return request.app.state.edge


# -- simple routes --------------------------------------------------------------------------------


@router.get("/health", response_model=HealthResponse, tags=["server"])
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics", tags=["server"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, tags=["openai"], responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    manager = server_state(request).manager
    loaded = manager.loaded()
    cards = [ModelCard(id=m.name, created=m.created, loaded=m.name in loaded) for m in manager.models.values()]
    cards += [ModelCard(id=name, created=0, owned_by="peer", peer=url) for name, url in manager.peers.items()]
    return ModelList(data=cards)


# -- shared request handling ------------------------------------------------------------------------


async def local_or_forward(request: Request, model: str | None) -> tuple[str, Lease | Response]:
    """The served name, and either a lease on its engine or the peer's forwarded answer."""
    state = server_state(request)
    name = state.manager.resolve_name(model)
    url = state.manager.peer_url(name)
    if url is not None:
        return name, await forward(request, url, state.peer_client, name)
    return name, await state.manager.acquire(name)


def build_params(body: SamplingFields, *, max_tokens: int, logprobs: int | None = None,
                 grammar: str | None = None, **overrides: Any) -> SamplingParams:
    if body.logit_bias:
        raise InvalidParameterError("logit_bias is not supported", param="logit_bias")
    values = dict(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, stop=body.stop, stop_token_ids=body.stop_token_ids,
        include_stop_str_in_output=body.include_stop_str_in_output, ignore_eos=body.ignore_eos,
        seed=body.seed, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar,
    )
    values.update(overrides)
    return SamplingParams.create(**values)


def format_grammar(response_format: ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return grammars.json_object_grammar()
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    if schema is None:
        raise InvalidParameterError("response_format json_schema needs json_schema.schema",
                                    param="response_format.json_schema")
    return grammars.json_schema_grammar(schema)


def usage_of(choices: list[Delta], n_prompts: int = 1, n: int = 1) -> dict:
    """OpenAI usage; the n choices of one prompt share (and count once) its prompt tokens."""
    prompt = cached = completion = 0
    for i, choice in enumerate(choices):
        usage = choice.usage
        if usage is None:
            continue
        completion += usage.completion_tokens
        if i % n == 0:
            prompt += usage.prompt_tokens
            cached += usage.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(delta: Delta) -> str | None:
    reason = delta.finish_reason
    return None if reason is None else ("length" if reason == "length" else "stop")


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


def sse_error(exc: EdgeLLMError) -> str:
    """An error after the stream began: one error event (as vLLM sends), then the stream ends."""
    return dumps(error_body(exc.message, type=exc.type, param=exc.param, code=exc.code))


# -- chat -----------------------------------------------------------------------------------------


def _content_text(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise InvalidParameterError(f"messages[{i}]: only text content parts are supported (got {part.type!r})",
                                        param=f"messages.{i}.content")
        texts.append(part.text)
    return "".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them (transformers' conventions)."""
    out = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": _content_text(m, i)}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                arguments = call.function.arguments
                if isinstance(arguments, str):  # templates render arguments with tojson: give them the object
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        pass
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        out.append(message)
    return out


class ChatPlan:
    """What a chat request turns into besides its prompt: the grammar, whether tool calls are parsed."""

    def __init__(self, engine: Engine, body: ChatCompletionRequest) -> None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise InvalidParameterError("tool_choice needs tools", param="tool_choice")
        self.tools = tools if choice != "none" else None
        if self.tools and not template_supports_tools(engine):
            raise InvalidParameterError("this model's chat template has no tool support; serve a model whose "
                                        "template renders `tools` (e.g. Qwen2.5, Hermes)", param="tools")
        forced = None
        if isinstance(choice, NamedToolChoice):
            forced = [t for t in self.tools or [] if t["function"]["name"] == choice.function.name]
            if not forced:
                raise InvalidParameterError(f"tool_choice names {choice.function.name!r}, which is not in tools",
                                            param="tool_choice")
        elif choice == "required":
            forced = self.tools
        if forced and body.response_format is not None and body.response_format.type != "text":
            raise InvalidParameterError("response_format cannot be combined with a forced tool call",
                                        param="response_format")
        self.grammar = grammars.tool_call_grammar(forced) if forced else format_grammar(body.response_format)
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidParameterError("top_logprobs needs logprobs: true", param="top_logprobs")
        self.logprobs = (body.top_logprobs or 0) if body.logprobs else None


def chat_message(text: str, parse_tools: bool) -> tuple[dict, bool]:
    """The assistant message for a finished choice, and whether it calls tools."""
    if parse_tools:
        parsed = parse_tool_calls(text)
        if parsed.tool_calls:
            return {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}, True
    return {"role": "assistant", "content": text}, False


@router.post("/v1/chat/completions", tags=["openai"], responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    lease, handed_over = held, False
    try:
        engine = lease.engine
        plan = await asyncio.to_thread(ChatPlan, engine, body)
        prompt = await templates.chat_prompt(engine, template_messages(body.messages), tools=plan.tools)
        tokens = await asyncio.to_thread(tokenize_prompt, engine, prompt)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = build_params(body, max_tokens=capped_max_tokens(engine, len(tokens), requested, param="messages"),
                              logprobs=plan.logprobs, grammar=plan.grammar)
        generation = Generation(engine, tokens, params, server_state(request).metrics.observer(name),
                                closing=server_state(request).closing)
        await until_disconnect(request, generation.start())
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = SSEResponse(chat_events(generation, meta, params.n, plan.tools is not None, include_usage))

            async def cleanup() -> None:
                await generation.aclose()
                lease.release()

            response.cleanup = cleanup
            handed_over = True
            return response
        choices = await until_disconnect(request, generation.collect())

        def build() -> dict:
            out = []
            for choice in choices:
                message, calls = chat_message(choice.text, plan.tools is not None)
                out.append({"index": choice.index, "message": message, "logprobs": chat_logprobs(choice.logprobs),
                            "finish_reason": "tool_calls" if calls else finish_reason(choice)})
            return {**meta, "object": "chat.completion", "choices": out, "usage": usage_of(choices, 1, params.n)}

        return await json_response(build)
    finally:
        if not handed_over:
            lease.release()


async def chat_events(generation: Generation, meta: dict, n: int, parse_tools: bool, include_usage: bool):
    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        return dumps(body)

    finished = [Delta(index=i) for i in range(n)]
    texts = [""] * n
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for delta in generation.deltas():
            i = delta.index
            if parse_tools:
                # Tool calls are known only once the output is complete: with tools, each choice
                # is sent as one delta when it finishes.
                texts[i] += delta.text
            elif delta.text or delta.logprobs:
                yield chunk(i, {"content": delta.text}, logprobs=chat_logprobs(delta.logprobs))
            if delta.finish_reason is not None:
                finished[i] = delta
                reason = finish_reason(delta)
                if parse_tools:
                    message, calls = chat_message(texts[i], True)
                    message.pop("role")
                    if calls:
                        message["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                        reason = "tool_calls"
                    yield chunk(i, message)
                yield chunk(i, {}, reason)
    except EdgeLLMError as exc:
        yield sse_error(exc)
        return
    if include_usage:
        yield dumps({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(finished, 1, n)})
    yield "[DONE]"


# -- completions ----------------------------------------------------------------------------------


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise InvalidParameterError("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_BATCH:
        raise InvalidParameterError(f"at most {MAX_BATCH} prompts per request", param="prompt")
    return prompts


@router.post("/v1/completions", tags=["openai"], responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    if body.suffix:
        raise InvalidParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidParameterError("best_of must equal n (no server-side ranking)", param="best_of")
    prompts = completion_prompts(body.prompt)
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    lease, handed_over = held, False
    generations: list[Generation] = []

    async def close_all() -> None:
        for g in generations:
            await g.aclose()

    try:
        engine = lease.engine
        grammar = await asyncio.to_thread(format_grammar, body.response_format)
        state = server_state(request)
        echoes = []
        for prompt in prompts:
            tokens = await asyncio.to_thread(tokenize_prompt, engine, prompt)
            params = build_params(body, max_tokens=capped_max_tokens(engine, len(tokens), body.max_tokens,
                                                                     param="prompt"),
                                  logprobs=body.logprobs, grammar=grammar)
            generations.append(Generation(engine, tokens, params, state.metrics.observer(name),
                                          closing=state.closing))
            echoes.append((prompt if isinstance(prompt, str) else await asyncio.to_thread(engine.detokenize, prompt))
                          if body.echo else "")
        for g in generations:
            await until_disconnect(request, g.start())
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        top = body.logprobs or 0
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = SSEResponse(completion_events(generations, meta, body.n, echoes, top, include_usage))

            async def cleanup() -> None:
                await close_all()
                lease.release()

            response.cleanup = cleanup
            handed_over = True
            return response
        results = await until_disconnect(request, asyncio.gather(*(g.collect() for g in generations)))

        def build() -> dict:
            choices, out = [], []
            for p, per_prompt in enumerate(results):
                for choice in per_prompt:
                    choices.append(choice)
                    out.append({"index": p * body.n + choice.index, "text": echoes[p] + choice.text,
                                "logprobs": completion_logprobs(choice.logprobs, len(echoes[p]), top),
                                "finish_reason": finish_reason(choice)})
            return {**meta, "object": "text_completion", "choices": out,
                    "usage": usage_of(choices, len(prompts), body.n)}

        return await json_response(build)
    finally:
        if not handed_over:
            await close_all()
            lease.release()


async def completion_events(generations: list[Generation], meta: dict, n: int, echoes: list[str], top: int,
                            include_usage: bool):
    def chunk(index: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> str:
        body = {**meta, "object": "text_completion",
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None
        return dumps(body)

    finished = [Delta(index=i) for i in range(len(generations) * n)]
    offsets = [len(echoes[i // n]) for i in range(len(finished))]
    for i in range(len(finished)):
        if echoes[i // n]:
            yield chunk(i, echoes[i // n])
    try:
        async for p, delta in merged([g.deltas() for g in generations]):
            i = p * n + delta.index
            logprobs = completion_logprobs(delta.logprobs, offsets[i], top)
            offsets[i] += len(delta.text)
            reason = finish_reason(delta)
            if delta.text or delta.logprobs or reason:
                yield chunk(i, delta.text, reason, logprobs)
            if reason is not None:
                finished[i] = delta
    except EdgeLLMError as exc:
        yield sse_error(exc)
        return
    if include_usage:
        yield dumps({**meta, "object": "text_completion", "choices": [],
                     "usage": usage_of(finished, len(generations), n)})
    yield "[DONE]"


# -- embeddings, tokenizer ------------------------------------------------------------------------


def embedding_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(value, str):
        inputs: list = [value]
    elif value and all(isinstance(v, int) for v in value):
        inputs = [value]
    else:
        inputs = list(value)
    if not inputs:
        raise InvalidParameterError("input must not be empty", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidParameterError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    if any(len(i) == 0 for i in inputs):
        raise InvalidParameterError("an input is empty", param="input")
    return inputs


def embed_all(engine: Engine, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
    texts = [i if isinstance(i, str) else engine.detokenize(i) for i in inputs]
    n_tokens = 0
    for i, text in enumerate(texts):
        count = len(engine.tokenize(text))
        if count == 0:
            # llama.cpp's embedding decode of zero tokens corrupts memory and aborts the process.
            raise InvalidParameterError(f"input {i} has no tokens to embed", param="input")
        n_tokens += count
    embed = getattr(engine, "embed", None)
    try:
        return embed(texts), n_tokens
    except (NotImplementedError, TypeError):
        raise InvalidParameterError(f"the {engine.name} engine does not make embeddings", param="model") from None


@router.post("/v1/embeddings", tags=["openai"], response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    if body.dimensions is not None:
        raise InvalidParameterError("dimensions is not supported: the model's own size is returned",
                                    param="dimensions")
    inputs = embedding_inputs(body.input)
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    try:
        vectors, n_tokens = await asyncio.to_thread(embed_all, held.engine, inputs)
    finally:
        held.release()

    def build() -> dict:
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                import numpy as np

                data.append({"object": "embedding", "index": i,
                             "embedding": base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()})
            else:
                data.append({"object": "embedding", "index": i, "embedding": vector})
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens}}

    return await json_response(build)


@router.post("/tokenize", tags=["tokenizer"], response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    text = body.content if body.content is not None else body.prompt
    if text is None:
        raise InvalidParameterError("send the text as `content` (or `prompt`)", param="content")
    add_special = body.add_special_tokens if body.add_special_tokens is not None else body.add_special
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    engine = held.engine

    def build() -> dict:
        try:
            tokens = engine.tokenize(text, special=True, add_bos=add_special)
        except TypeError:  # an engine without the add_bos option
            tokens = engine.tokenize(text, special=True)
        items = token_pieces_json(engine, tokens) if body.with_pieces else tokens
        return {"tokens": items, "count": len(tokens), "max_model_len": context_size(engine)}

    try:
        return await json_response(build)
    finally:
        held.release()


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
    piece = getattr(engine, "token_piece", None)
    if piece is None:
        return engine.detokenize([token])
    data = piece(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/detokenize", tags=["tokenizer"], response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    name, held = await local_or_forward(request, body.model)
    if isinstance(held, Response):
        return held
    engine = held.engine

    def build() -> dict:
        text = engine.detokenize(body.tokens)
        return {"content": text, "prompt": text}

    try:
        return await json_response(build)
    finally:
        held.release()
