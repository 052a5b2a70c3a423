"""The Ollama API on the same port: /api/chat, /api/generate, /api/embed (and the older
/api/embeddings), /api/tags, /api/show, /api/ps, /api/version.

Requests name only the served models (by served name; never a path, never a pull). Streaming is
Ollama's default and its format: one JSON object per line (NDJSON), the last with `done: true`,
`done_reason` and the counts. `options` map to SamplingParams (num_predict, temperature, top_k,
top_p, min_p, seed, stop, repeat_penalty, repeat_last_n, presence/frequency_penalty); options that
size the model at load time (num_ctx, num_gpu, num_thread ...) are the server's, and ignored here.
`format` is "json" or a JSON schema; `keep_alive` ("5m", 300, 0, -1) sets how long the model stays
loaded after the request (0: unloaded at once); a /api/generate without a prompt loads (or, with
keep_alive 0, unloads) the model, as in Ollama. `think: false` leaves <think> text inline in the
content; otherwise a thinking model's thinking comes as `thinking`. Tool calls come whole, one per
chunk, as Ollama's format has them (arguments are an object, not text). Errors: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import AfterValidator, Field
from starlette.responses import Response

from edge_llm.engines.base import Engine
from edge_llm.engines.media import MediaPrompt
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.sampling import SamplingParams
from edge_llm.server.chat_request import ChatOptions, chat_job, format_grammar
from edge_llm.server.generation import StreamResponse, context_size
from edge_llm.server.jsonio import dumps
from edge_llm.server.media import ImageCollector, join_parts, load_images
from edge_llm.server.pipeline import (
    Choice,
    Finish,
    Job,
    Run,
    TextPart,
    handle,
    named,
    with_engine_until_disconnect,
)
from edge_llm.server.schemas import MAX_EMBEDDING_INPUTS, RequestBody
from edge_llm.server.state import server_state
from edge_llm.server.tool_calls import CallEnd, CallStart
from edge_llm.version import package_version

router = APIRouter(tags=["ollama"])
# Ollama option -> SamplingParams field. num_predict is the output budget (max_tokens).
OPTION_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
                "repeat_last_n": "penalty_last_n", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty"}
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}
FOREVER = 2.0**33  # seconds since the epoch: the year 2242


# Ollama clients often name a model with its default tag: "demo:latest" is the served "demo".
ModelName = Annotated[str, Field(min_length=1), AfterValidator(lambda name: name.removesuffix(":latest"))]


class OllamaMessage(RequestBody):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class _Generating(RequestBody):
    model: ModelName
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None


class ChatRequest(_Generating):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Generating):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class EmbedRequest(RequestBody):
    model: ModelName
    input: str | list[str] = ""
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    dimensions: int | None = None


class EmbeddingsRequest(RequestBody):
    model: ModelName
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None


class ShowRequest(RequestBody):
    model: ModelName | None = None
    name: ModelName | None = Field(None, description="the older name of `model`")


# -- translation -----------------------------------------------------------------------------------------


def parse_keep_alive(value: str | float | None) -> float | None:
    """Seconds; negative keeps the model loaded for good (Ollama's durations: "5m", "1h", 300, -1)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise InvalidParameterError(f"keep_alive {value!r} is not a duration (examples: 5m, 30s, 0, -1)",
                                    param="keep_alive")
    return float(match.group(1)) * _UNITS[match.group(2)]


def sampling_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], int | None]:
    """SamplingParams values and the output budget from Ollama `options`."""
    options = options or {}
    values = {field: options[name] for name, field in OPTION_NAMES.items() if name in options}
    for name, field in OPTION_NAMES.items():  # each checked alone, so the error names Ollama's option
        if options.get(name) is not None:
            try:
                SamplingParams.create(**{field: options[name]})
            except InvalidParameterError as exc:
                raise InvalidParameterError(f"options.{name}: {exc.message.split(': ', 1)[-1]}",
                                            param="options") from None
    predict = options.get("num_predict")
    if predict is not None and (isinstance(predict, bool) or not isinstance(predict, int)):
        raise InvalidParameterError(f"options.num_predict must be an integer (got {predict!r})", param="options")
    # -1 (no limit) and -2 (fill the context) both mean: up to what the context leaves.
    return values, predict if predict is not None and predict > 0 else None


def grammar_of(format: str | dict[str, Any] | None) -> str | None:
    if format is None or format == "":
        return None
    if format == "json":
        return format_grammar("json_object", None, param="format")
    if isinstance(format, dict):
        return format_grammar("json_schema", format, param="format")
    raise InvalidParameterError(f'format must be "json" or a JSON schema (got {format!r})', param="format")


def image_markers(images: list[Any] | None, collector: ImageCollector, param: str) -> list[str]:
    """Ollama's images (base64), each as MEDIA_MARKER; they go before the message's text."""
    return [collector.marker("base64", image, f"{param}.{k}") for k, image in enumerate(images or [])]


def template_messages(messages: list[OllamaMessage], images: ImageCollector | None = None) -> list[dict]:
    images = images if images is not None else ImageCollector()
    out = []
    for i, m in enumerate(messages):
        markers = image_markers(m.images, images, f"messages.{i}.images")
        message: dict[str, Any] = {"role": m.role, "content": join_parts([*markers, m.content or ""]) if markers
                                   else m.content or ""}
        if m.thinking:
            message["reasoning_content"] = m.thinking
        if m.tool_name:
            message["name"] = m.tool_name
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidParameterError(f"messages[{i}]: a tool call needs function.name", param="messages")
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": function["name"], "arguments": function.get("arguments") or {}}})
            message["tool_calls"] = calls
        out.append(message)
    return out


def reasoning_format(request: Request, think: bool | str | None) -> str:
    return "none" if think is False else server_state(request).reasoning_format


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def counts(run: Run, finish: Finish | None, began: float) -> dict:
    """Ollama's closing counts; durations in nanoseconds, from the request's arrival."""
    end = time.monotonic()
    usage = finish.usage if finish else None
    return {"done_reason": "length" if finish and finish.reason == "length" else "stop",
            "total_duration": int((end - began) * 1e9), "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens if usage else 0,
            "prompt_eval_duration": int((run.started - began) * 1e9),
            "eval_count": usage.completion_tokens if usage else 0,
            "eval_duration": int((end - run.started) * 1e9)}


def ollama_call(call: dict, index: int) -> dict:
    import json

    return {"id": call["id"], "function": {"index": index, "name": call["function"]["name"],
                                           "arguments": json.loads(call["function"]["arguments"])}}


def ndjson(lines) -> StreamResponse:  # noqa: ANN001
    async def body():
        async for line in lines:
            yield (dumps(line) + "\n").encode("utf-8")

    return StreamResponse(body(), media_type="application/x-ndjson")


async def ollama_stream(run: Run, began: float, chunk) -> Any:  # noqa: ANN001
    """The NDJSON lines of a generation; `chunk(content, thinking, calls)` shapes one line's body."""
    finish, calls, names = None, [], {}
    try:
        async for _, part in run.parts():
            if isinstance(part, TextPart) and part.text:
                yield {"model": run.name, "created_at": now_iso(),
                       **chunk(part.text if part.kind == "content" else "",
                               part.text if part.kind == "reasoning" else None, None), "done": False}
            elif isinstance(part, CallStart):
                names[part.index] = part
            elif isinstance(part, CallEnd):
                start = names[part.index]
                call = {"id": start.id, "function": {"name": start.name, "arguments": part.arguments}}
                try:
                    whole = ollama_call(call, len(calls))
                except ValueError:
                    continue  # arguments cut off: not a call
                calls.append(whole)
                yield {"model": run.name, "created_at": now_iso(), **chunk("", None, [whole]), "done": False}
            elif isinstance(part, Finish):
                finish = part
    except EdgeLLMError as exc:
        yield {"error": exc.message}
        return
    yield {"model": run.name, "created_at": now_iso(), **chunk("", None, None), "done": True,
           **counts(run, finish, began)}


async def _keep_alive_hook(request: Request, keep_alive: str | float | None):  # noqa: ANN202
    """Apply keep_alive to the model the request uses; unload it afterwards when it is 0."""
    seconds = parse_keep_alive(keep_alive)
    manager = server_state(request).manager

    async def done(name: str) -> None:
        if seconds is not None and name in manager.models:
            manager.set_keep_alive(name, seconds)
            if seconds == 0:
                await manager.unload_if_idle(name)

    return done


# -- generating routes -----------------------------------------------------------------------------------


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request) -> Any:
    began = time.monotonic()
    collector = ImageCollector()
    messages = template_messages(body.messages, collector)
    images = await load_images(request, collector.refs)
    values, max_tokens = sampling_options(body.options)
    options = ChatOptions(tools=body.tools or None, tool_choice=None, format_param="format",
                          reasoning_format=reasoning_format(request, body.think))
    on_done = await _keep_alive_hook(request, body.keep_alive)
    if not messages:  # Ollama's way to load a model: an empty conversation
        return await _load_only(request, body.model, body.keep_alive, on_done,
                                {"message": {"role": "assistant", "content": ""}})

    def prepare(engine: Engine) -> Job:
        options.grammar = grammar_of(body.format)
        return chat_job(engine, messages, options, sampling=values, max_tokens=max_tokens, images=images)

    def message(content: str, thinking: str | None, calls: list | None) -> dict:
        out: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            out["thinking"] = thinking
        if calls:
            out["tool_calls"] = calls
        return {"message": out}

    def reply(run: Run, choices: list[Choice]) -> dict:
        c = choices[0]
        return {"model": run.name, "created_at": now_iso(),
                **message(c.content, c.reasoning or None, [ollama_call(t, k) for k, t in enumerate(c.tool_calls)] or None),
                "done": True, **counts(run, c.finish, began)}

    def stream_reply(run: Run) -> Response:
        return ndjson(ollama_stream(run, began, message))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply,
                        on_done=on_done)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request) -> Any:
    began = time.monotonic()
    collector = ImageCollector()
    markers = image_markers(body.images, collector, "images")
    if markers and body.context:
        raise InvalidParameterError("images cannot be combined with context: send the conversation to /api/chat",
                                    param="context")
    images = await load_images(request, collector.refs)
    if body.suffix:
        raise InvalidParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.template:
        raise InvalidParameterError("a per-request template is not supported: the model's own is used",
                                    param="template")
    values, max_tokens = sampling_options(body.options)
    on_done = await _keep_alive_hook(request, body.keep_alive)
    if not body.prompt:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        return await _load_only(request, body.model, body.keep_alive, on_done, {"response": ""})
    context = list(body.context or [])
    options = ChatOptions(format_param="format", reasoning_format=reasoning_format(request, body.think))

    def prepare(engine: Engine) -> Job:
        options.grammar = grammar_of(body.format)
        if body.raw and images:  # the prompt as given, the images before it
            if not engine.takes_images:
                raise InvalidParameterError(f"the model {engine.model_name} does not take images", param="images")
            prompt = MediaPrompt(join_parts([*markers, body.prompt]), images)
            return Job([prompt], {**values, "grammar": options.grammar}, max_tokens)
        if body.raw:  # the prompt as given, no template (and no thinking to split)
            return Job([context + engine.tokenize(body.prompt)], {**values, "grammar": options.grammar}, max_tokens)
        messages = [{"role": "system", "content": body.system}] if body.system else []
        content = join_parts([*markers, body.prompt]) if markers else body.prompt
        job = chat_job(engine, [*messages, {"role": "user", "content": content}], options, sampling=values,
                       max_tokens=max_tokens, images=images)
        if context:  # an earlier answer's context continues
            job.prompts = [context + engine.prompt_tokens(job.prompts[0])]
        return job

    def response(content: str, thinking: str | None, calls: list | None) -> dict:
        return {"response": content, **({"thinking": thinking} if thinking else {})}

    def reply(run: Run, choices: list[Choice]) -> dict:
        c = choices[0]
        return {"model": run.name, "created_at": now_iso(), **response(c.content, c.reasoning or None, None),
                "done": True, **counts(run, c.finish, began)}

    def stream_reply(run: Run) -> Response:
        return ndjson(ollama_stream(run, began, response))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply,
                        on_done=on_done)


async def _load_only(request: Request, model: str, keep_alive: str | float | None, on_done, body: dict) -> Any:  # noqa: ANN001
    unload = parse_keep_alive(keep_alive) == 0
    manager = server_state(request).manager
    name = manager.resolve_name(model)
    if manager.peer_url(name) is None:
        if unload:
            await manager.unload_if_idle(name)
        else:
            (await manager.acquire(name)).release()
            await on_done(name)
    return {"model": name, "created_at": now_iso(), **body, "done": True, "done_reason": "unload" if unload else "load"}


# -- embeddings ------------------------------------------------------------------------------------------


@router.post("/api/embed")
async def embed(body: EmbedRequest, request: Request) -> Any:
    began = time.monotonic()
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs or len(inputs) > MAX_EMBEDDING_INPUTS or any(not i for i in inputs):
        raise InvalidParameterError(f"input must be 1 to {MAX_EMBEDDING_INPUTS} non-empty texts", param="input")
    if body.dimensions is not None:
        raise InvalidParameterError("dimensions is not supported: the model's own size is returned",
                                    param="dimensions")
    done = await with_engine_until_disconnect(request, body.model,
                                              lambda name, engine: named(name, engine.embeddings(inputs)))
    if isinstance(done, Response):
        return done
    name, result = done
    return {"model": name, "embeddings": result.vectors, "total_duration": int((time.monotonic() - began) * 1e9),
            "load_duration": 0, "prompt_eval_count": result.prompt_tokens}


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> Any:
    if not body.prompt:
        raise InvalidParameterError("prompt must not be empty", param="prompt")
    done = await with_engine_until_disconnect(request, body.model, lambda name, engine: engine.embeddings([body.prompt]))
    return done if isinstance(done, Response) else {"embedding": done.vectors[0]}


# -- models ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _gguf_details(path: str, mtime: float) -> tuple[dict, dict, str | None]:
    """(details, model_info, chat template) of a GGUF file, from its header (info.py: no token
    arrays are read); cached while the file is unchanged."""
    from edge_llm.info import read_gguf_info

    info = read_gguf_info(path)
    params = info.n_params
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    details = {"parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
               "parameter_size": size, "quantization_level": info.file_type or ""}
    model_info = {"general.architecture": info.architecture, "general.parameter_count": params,
                  f"{info.architecture}.context_length": info.context_length,
                  f"{info.architecture}.embedding_length": info.embedding_length,
                  f"{info.architecture}.block_count": info.n_layers}
    return details, model_info, info.chat_template


def model_details(path: Path | None) -> tuple[dict, dict, str | None]:
    if path is None or not path.is_file() or path.suffix != ".gguf":
        kind = "" if path is None else "gguf" if path.suffix == ".gguf" else "safetensors"
        return {"parent_model": "", "format": kind,
                "family": "", "families": [], "parameter_size": "", "quantization_level": ""}, {}, None
    try:
        return _gguf_details(str(path), path.stat().st_mtime)
    except (EdgeLLMError, OSError):
        return {"parent_model": "", "format": "gguf", "family": "", "families": [], "parameter_size": "",
                "quantization_level": ""}, {}, None


def _modified_at(path: Path | None) -> str:
    stamp = path.stat().st_mtime if path is not None and path.exists() else 0
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat().replace("+00:00", "Z")


def _entry(name: str, model: Any) -> dict:
    # No digest: Ollama's is the sha256 of its blob, and hashing gigabytes per listing is not worth it.
    return {"name": name, "model": name, "modified_at": _modified_at(model.path), "size": model.size_bytes,
            "digest": "", "details": model_details(model.path)[0], "kind": model.kind}


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    manager = server_state(request).manager
    models = await asyncio.to_thread(lambda: [_entry(n, m) for n, m in manager.models.items()])
    # A peer's models are answered here too (forwarded); what they are is the peer's to say.
    models += [{"name": n, "model": n, "modified_at": _modified_at(None), "size": 0, "digest": "",
                "details": model_details(None)[0]} for n in manager.peers]
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict:
    manager = server_state(request).manager
    loaded = []
    for name, model in manager.models.items():
        if model.engine is None:
            continue
        keep = manager.keep_alive_of(model)
        left = keep - (time.monotonic() - model.last_used)
        # "forever" (a negative keep-alive), as Ollama writes it: far in the future
        expires = min(datetime.now(timezone.utc).timestamp() + max(0.0, left), FOREVER) if keep >= 0 else FOREVER
        entry = await asyncio.to_thread(_entry, name, model)
        loaded.append({**entry, "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat()
                      .replace("+00:00", "Z"), "size_vram": 0, "context_length": context_size(model.engine)})
    return {"models": loaded}


@router.post("/api/show")
async def show(body: ShowRequest, request: Request) -> dict:
    manager = server_state(request).manager
    name = manager.resolve_name(body.model or body.name or "")
    if name not in manager.models:
        raise InvalidParameterError(f"{name!r} is served by a peer: ask it", param="model")
    model = manager.models[name]
    details, model_info, template = await asyncio.to_thread(model_details, model.path)
    if not template and model.engine is not None:  # not in the file: the template the engine renders with
        template = model.engine.formatter.template
    # Ollama's names: an embedding model's capability is "embedding"; a reranker's is edge-llm's "rerank".
    # Every chat model takes tools: in its template's own markup, or in the generic form (generic_tools.py).
    capabilities = {"chat": ["completion", "tools"], "embedding": ["embedding"], "rerank": ["rerank"]}[model.kind]
    if model.kind == "chat" and model.vision:
        capabilities.append("vision")
    if model.kind == "chat" and template and "</think>" in template:
        capabilities.append("thinking")
    # The served name, not the file: a client has no business knowing where the weights are.
    return {"modelfile": f"FROM {name}\n", "parameters": _parameters(model.engine),
            "template": template or "",
            "details": details, "model_info": model_info, "capabilities": capabilities,
            "modified_at": _modified_at(model.path)}


def _parameters(engine: Engine | None) -> str:
    """A loaded model's sampling defaults (its registry entry's) as Ollama lists them: `name value` lines."""
    defaults = engine.sampling_defaults if engine is not None else {}
    return "".join(f"{option:<30} {defaults[field]}\n" for option, field in OPTION_NAMES.items() if field in defaults)


@router.get("/api/version")
async def version() -> dict:
    return {"version": package_version()}
