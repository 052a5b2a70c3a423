"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

`system` (text or text blocks), messages of content blocks (text, tool_use, tool_result,
thinking), `max_tokens` (required, as Anthropic has it), `stop_sequences`, tools with
`input_schema` and `tool_choice` (auto / any / tool / none), structured output as
`output_config.format` (a JSON schema). The answer is content blocks:
`thinking` (the model's <think> text), `text`, then one `tool_use` per call; `stop_reason` is
end_turn, max_tokens, stop_sequence (with the sequence) or tool_use. Streamed as Anthropic
streams: message_start, content_block_start / _delta / _stop per block, message_delta,
message_stop, as named server-sent events.

Keys come as `x-api-key` (Anthropic's header) or `Authorization: Bearer` (auth.py); errors have
Anthropic's shape (errors.py, by path). `thinking: {"type": "disabled"}` leaves any <think> text
inline in the text block (the template cannot be told not to think).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from edge_llm.engines.base import Engine, Usage
from edge_llm.engines.media import MEDIA_MARKER, MediaTokens
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.server.chat_request import ChatOptions, chat_job, format_grammar
from edge_llm.server.errors import edge_error_body
from edge_llm.server.generation import SSEResponse
from edge_llm.server.jsonio import dumps
from edge_llm.server.media import ImageCollector, join_parts, load_images
from edge_llm.server.pipeline import Choice, Finish, Job, Run, TextPart, handle, with_engine
from edge_llm.server.schemas import MaxTokens, RequestBody, Seed, TopK, TopP
from edge_llm.server.state import server_state
from edge_llm.server.tool_calls import CallArguments, CallEnd, CallStart

router = APIRouter(tags=["anthropic"])


class Block(RequestBody):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    source: dict[str, Any] | None = None  # an image block's: {type: base64, media_type, data} or {type: url, url}


class Message(RequestBody):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(RequestBody):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # server tools (web_search ...) have a type; custom tools none or "custom"


class ToolChoice(RequestBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(RequestBody):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class OutputFormat(RequestBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(RequestBody):
    format: OutputFormat | None = None
    effort: str | None = Field(None, description="accepted and ignored")


class MessagesRequest(RequestBody):
    model: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[Block] | None = None
    max_tokens: MaxTokens
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = Field(None, description="edge-llm extension")
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = Field(None, description="structured output: format.schema")
    metadata: dict[str, Any] | None = None


class CountTokensRequest(RequestBody):
    model: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None


# -- request -> template messages ------------------------------------------------------------------------


def _text(blocks: str | list, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for k, block in enumerate(blocks):
        block = block if isinstance(block, dict) else block.model_dump()
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidParameterError(f"only text blocks are supported here (got {block.get('type')!r})",
                                        param=f"{param}.{k}")
        texts.append(block["text"])
    return "".join(texts)


def _image_marker(block: Block, images: ImageCollector, param: str) -> str:
    source = block.source or {}
    if source.get("type") == "base64":
        return images.marker("base64", source.get("data"), f"{param}.source.data")
    if source.get("type") == "url":
        return images.marker("url", source.get("url"), f"{param}.source.url")
    raise InvalidParameterError("an image block's source must be base64 (or url)", param=f"{param}.source")


def template_messages(system: str | list[Block] | None, messages: list[Message],
                      images: ImageCollector | None = None) -> list[dict]:
    """Messages as chat templates expect them; an image block becomes MEDIA_MARKER in the text,
    its data kept in `images`."""
    images = images if images is not None else ImageCollector()
    out: list[dict] = []
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        blocks = message.content
        if isinstance(blocks, str):
            out.append({"role": message.role, "content": blocks})
            continue
        turn: dict[str, Any] = {"role": message.role, "content": ""}
        parts: list[str] = []
        for k, block in enumerate(blocks):
            param = f"messages.{i}.content.{k}"
            if block.type == "text" and block.text is not None:
                parts.append(block.text)
            elif block.type == "image" and message.role == "user":
                parts.append(_image_marker(block, images, param))
            elif block.type == "thinking" and message.role == "assistant":
                turn["reasoning_content"] = turn.get("reasoning_content", "") + (block.thinking or "")
            elif block.type == "redacted_thinking":
                continue
            elif block.type == "tool_use" and message.role == "assistant" and block.id and block.name:
                turn.setdefault("tool_calls", []).append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input or {}}})
            elif block.type == "tool_result" and message.role == "user" and block.tool_use_id:
                content = _text(block.content or "", f"{param}.content")
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {content}" if block.is_error else content})
            else:
                raise InvalidParameterError(f"content blocks of type {block.type!r} are not supported in "
                                            f"{message.role} messages (or lack their fields)", param=param)
        turn["content"] = join_parts(parts) if MEDIA_MARKER in parts else "".join(parts)
        if turn["content"] or len(turn) > 2 or message.role == "assistant":
            out.append(turn)
    return out


def chat_tools(tools: list[Tool] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise InvalidParameterError(f"server tools ({tool.type}) are not supported", param=f"tools.{i}.type")
        function = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def tool_choice(choice: ToolChoice | None) -> str | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidParameterError("tool_choice of type tool needs a name", param="tool_choice.name")
        return choice.name
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# -- the routes ------------------------------------------------------------------------------------------


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Any:
    collector = ImageCollector()
    messages = template_messages(body.system, body.messages, collector)
    images = await load_images(request, collector.refs)
    reasoning_format = server_state(request).reasoning_format
    if body.thinking is not None and body.thinking.type == "disabled":
        reasoning_format = "none"
    options = ChatOptions(tools=chat_tools(body.tools), tool_choice=tool_choice(body.tool_choice),
                          reasoning_format=reasoning_format, format_param="output_config.format",
                          parallel_tool_calls=not (body.tool_choice and body.tool_choice.disable_parallel_tool_use))
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                    stop=body.stop_sequences)

    output_format = body.output_config.format if body.output_config else None

    def prepare(engine: Engine) -> Job:
        if output_format is not None:
            options.grammar = format_grammar("json_schema", output_format.schema_, param="output_config.format.schema")
        return chat_job(engine, messages, options, sampling=sampling, max_tokens=body.max_tokens, images=images)

    def reply(run: Run, choices: list[Choice]) -> dict:
        c = choices[0]
        content: list[dict] = []
        if c.reasoning:
            content.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
        if c.content or not c.tool_calls:
            content.append({"type": "text", "text": c.content})
        for call in c.tool_calls:
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": json.loads(call["function"]["arguments"])})
        reason, sequence = stop_reason(c.finish, bool(c.tool_calls))
        return {**message_start(run), "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": usage_body(c.finish.usage if c.finish else None)}

    def stream_reply(run: Run) -> Response:
        return SSEResponse(message_events(run, request.url.path))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> Any:
    collector = ImageCollector()
    messages = template_messages(body.system, body.messages, collector)
    images = await load_images(request, collector.refs)
    options = ChatOptions(tools=chat_tools(body.tools))

    def count(name: str, engine: Engine) -> dict:
        job = chat_job(engine, messages, options, sampling={}, max_tokens=None, images=images)
        tokens = engine.prompt_tokens(job.prompts[0])
        if isinstance(tokens, MediaTokens):
            tokens.release()
        return {"input_tokens": len(tokens)}

    # count renders the template: it waits for the engine's one render slot as generation does.
    return await with_engine(request, body.model, count, renders_template=True)


def stop_reason(finish: Finish | None, calls: bool) -> tuple[str, str | None]:
    if calls:
        return "tool_use", None
    if finish is not None and finish.reason == "length":
        return "max_tokens", None
    if finish is not None and finish.stop_sequence is not None:
        return "stop_sequence", finish.stop_sequence
    return "end_turn", None


def usage_body(usage: Usage | None) -> dict:
    """Anthropic's usage: `input_tokens` are the prompt tokens evaluated for this request, those taken
    from the prompt cache are `cache_read_input_tokens` (together: the whole prompt)."""
    usage = usage or Usage()
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def message_start(run: Run) -> dict:
    # How much of the prompt the cache held is known only at the end: the stream's message_start
    # counts the whole prompt as input, and its message_delta carries the final split.
    return {"id": f"msg_{run.id}", "type": "message", "role": "assistant", "model": run.name, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": usage_body(Usage(prompt_tokens=run.generations[0].n_prompt))}


async def message_events(run: Run, path: str):
    """Anthropic's stream: one content block per part of the answer, opened, filled, stopped."""
    index = -1
    open_kind: str | None = None  # thinking | text | tool_use

    def event(kind: str, **fields: Any) -> dict:
        return {"event": kind, "data": dumps({"type": kind, **fields})}

    def start(kind: str, block: dict) -> list[dict]:
        nonlocal index, open_kind
        events = stop()
        index, open_kind = index + 1, kind
        return [*events, event("content_block_start", index=index, content_block=block)]

    def stop() -> list[dict]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [event("content_block_stop", index=index)]

    yield event("message_start", message=message_start(run))
    yield event("ping")
    try:
        async for _, part in run.parts():
            events: list[dict] = []
            if isinstance(part, TextPart) and part.text:
                kind = "text" if part.kind == "content" else "thinking"
                if open_kind != kind:
                    events += start(kind, {"type": "text", "text": ""} if kind == "text"
                                    else {"type": "thinking", "thinking": "", "signature": ""})
                delta = ({"type": "text_delta", "text": part.text} if kind == "text"
                         else {"type": "thinking_delta", "thinking": part.text})
                events.append(event("content_block_delta", index=index, delta=delta))
            elif isinstance(part, CallStart):
                events += start("tool_use", {"type": "tool_use", "id": part.id, "name": part.name, "input": {}})
            elif isinstance(part, CallArguments):
                events.append(event("content_block_delta", index=index,
                                    delta={"type": "input_json_delta", "partial_json": part.text}))
            elif isinstance(part, CallEnd):
                events += stop()
            elif isinstance(part, Finish):
                events += stop()
                reason, sequence = stop_reason(part, part.tool_calls > 0)
                # The whole usage, as Anthropic's message_delta has it: its SDK takes each field given.
                events += [event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                                 usage=usage_body(part.usage)),
                           event("message_stop")]
            for e in events:
                yield e
    except EdgeLLMError as exc:
        yield {"event": "error", "data": dumps(edge_error_body(path, exc))}
