"""OpenAI's Responses API, stateless: POST /v1/responses.

`input` is text or a list of items (messages with text parts, function_call and
function_call_output items, earlier reasoning items); `instructions` is the system message;
function tools and `tool_choice`; `text.format` json_object / json_schema; `max_output_tokens`.
The answer's output items are, in order: reasoning (the model's <think> text), the message, the
function calls. Streamed with the Responses event types, each with its sequence_number; the last is
response.completed, or response.incomplete for an answer cut at max_output_tokens.

Nothing is stored: `store` is accepted and ignored, `previous_response_id` is refused (send the
conversation as input items instead), as llama-server and vLLM do without a store.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from edge_llm.engines.base import Engine
from edge_llm.engines.media import MEDIA_MARKER
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.server.chat_request import ChatOptions, chat_job, format_grammar, template_call
from edge_llm.server.generation import SSEResponse
from edge_llm.server.jsonio import dumps
from edge_llm.server.media import ImageCollector, join_parts, load_images
from edge_llm.server.pipeline import Choice, Finish, Job, Run, TextPart, handle
from edge_llm.server.schemas import (
    DOCUMENTED_ERRORS,
    MaxTokens,
    MinP,
    RequestBody,
    Seed,
    Temperature,
    TopK,
    TopP,
)
from edge_llm.server.state import server_state
from edge_llm.server.tool_calls import CallArguments, CallEnd, CallStart

router = APIRouter(tags=["openai"])


class FunctionTool(RequestBody):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(RequestBody):
    type: Literal["function"]
    name: str


class TextFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(RequestBody):
    format: TextFormat | None = None


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="edge-llm extension")
    min_p: MinP | None = Field(None, description="edge-llm extension")
    seed: Seed | None = Field(None, description="edge-llm extension")
    stream: bool = False
    store: bool | None = Field(None, description="accepted and ignored: nothing is stored")
    previous_response_id: str | None = Field(None, description="not supported: the server keeps no state")
    reasoning: dict[str, Any] | None = Field(None, description="accepted and ignored")
    metadata: dict[str, str] | None = None
    user: str | None = None


# -- input items -> template messages ------------------------------------------------------------------

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _item_text(content: Any, param: str, images: ImageCollector | None = None) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameterError("content must be text or a list of text parts", param=param)
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image" and images is not None:
            if part.get("file_id") is not None:
                raise InvalidParameterError("file_id images are not supported: send image_url (a data: URL)",
                                            param=f"{param}.{k}.file_id")
            texts.append(images.marker("url", part.get("image_url"), f"{param}.{k}.image_url"))
            continue
        if kind not in _TEXT_PARTS:
            raise InvalidParameterError(f"only text content parts are supported (got {kind!r})", param=f"{param}.{k}")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise InvalidParameterError("a text part needs its text", param=f"{param}.{k}.text")
        texts.append(text)
    return join_parts(texts) if MEDIA_MARKER in texts else "".join(texts)


def input_messages(instructions: str | None, items: str | list[dict[str, Any]],
                   images: ImageCollector | None = None) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    reasoning = ""  # a reasoning item belongs to the assistant turn that follows it
    for i, item in enumerate(items):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item["role"]) if isinstance(item.get("role"), str) else None
            if role is None:
                raise InvalidParameterError(f"unknown role {item.get('role')!r}", param=f"{param}.role")
            message = {"role": role, "content": _item_text(item.get("content", ""), f"{param}.content",
                                                           images if role == "user" else None)}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            messages.append(message)
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise InvalidParameterError("a function_call item needs name and call_id", param=param)
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                if reasoning:
                    last["reasoning_content"], reasoning = reasoning, ""
                messages.append(last)
            last.setdefault("tool_calls", []).append(template_call(call_id, name, item.get("arguments", "{}")))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidParameterError("a function_call_output item needs call_id", param=param)
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _item_text(item.get("output", ""), f"{param}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if isinstance(parts, list):
                reasoning += "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        else:
            raise InvalidParameterError(f"input items of type {kind!r} are not supported", param=f"{param}.type")
    if not messages:
        raise InvalidParameterError("input must not be empty", param="input")
    return messages


def chat_tools(body: ResponsesRequest) -> list[dict] | None:
    if not body.tools:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.type != "function" or not tool.name:
            raise InvalidParameterError(f"only function tools are supported (got {tool.type!r})",
                                        param=f"tools.{i}.type")
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools


# -- the route -------------------------------------------------------------------------------------------


@router.post("/v1/responses", responses=DOCUMENTED_ERRORS)
@router.post("/responses", include_in_schema=False)
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    if body.previous_response_id:
        raise InvalidParameterError("previous_response_id is not supported: this server stores no responses; "
                                    "send the conversation as input items", param="previous_response_id")
    collector = ImageCollector()
    messages = input_messages(body.instructions, body.input, collector)
    images = await load_images(request, collector.refs)
    choice = body.tool_choice.name if isinstance(body.tool_choice, NamedFunction) else body.tool_choice
    options = ChatOptions(tools=chat_tools(body), tool_choice=choice, format_param="text.format",
                          reasoning_format=server_state(request).reasoning_format,
                          parallel_tool_calls=body.parallel_tool_calls is not False)
    text_format = body.text.format if body.text else None
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                    seed=body.seed)

    def prepare(engine: Engine) -> Job:
        if text_format is not None:
            options.grammar = format_grammar(text_format.type, text_format.schema_, param="text.format.schema")
        return chat_job(engine, messages, options, sampling=sampling, max_tokens=body.max_output_tokens,
                        images=images)

    def reply(run: Run, choices: list[Choice]) -> dict:
        c = choices[0]
        output = []
        if c.reasoning:
            output.append(reasoning_item(f"rs_{run.id}", c.reasoning))
        if c.content or not c.tool_calls:
            output.append(message_item(f"msg_{run.id}", c.content))
        for k, call in enumerate(c.tool_calls):
            output.append(function_item(f"fc_{run.id}_{k}", call["id"], call["function"]["name"],
                                        call["function"]["arguments"]))
        return response_object(run, body, "completed", output, c.finish)

    def stream_reply(run: Run) -> Response:
        return SSEResponse(response_events(run, body))

    return await handle(request, body.model, prepare, stream=body.stream, reply=reply, stream_reply=stream_reply)


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)] if status == "completed" else []}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_object(run: Run, body: ResponsesRequest, status: str, output: list[dict],
                    finish: Finish | None) -> dict:
    incomplete = finish is not None and finish.reason == "length"
    if status == "completed" and incomplete:
        status = "incomplete"
    out: dict[str, Any] = {
        "id": f"resp_{run.id}", "object": "response", "created_at": run.created, "status": status,
        "model": run.name, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": run.params.temperature, "top_p": run.params.top_p,
        "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction)
        else (body.tool_choice or "auto"),
        "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or []],
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                 if body.text and body.text.format else {"type": "text"}},
        "store": False, "metadata": body.metadata or {}, "usage": None,
    }
    if finish is not None and finish.usage is not None:
        usage = finish.usage
        out["usage"] = {"input_tokens": usage.prompt_tokens,
                        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                        "output_tokens": usage.completion_tokens,
                        "output_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
                        "total_tokens": usage.total_tokens}
    return out


async def response_events(run: Run, body: ResponsesRequest):
    """The Responses stream: one output item per block of the answer (reasoning, message, each
    function call), each opened, filled by deltas and closed, between created and completed."""
    sequence = 0
    output: list[dict] = []
    current: dict | None = None  # the open item
    text = ""  # the open item's text so far

    def event(kind: str, **fields: Any) -> dict:
        nonlocal sequence
        sequence += 1
        return {"event": kind, "data": dumps({"type": kind, "sequence_number": sequence - 1, **fields})}

    def open_item(item: dict, part: dict | None) -> list[dict]:
        nonlocal current, text
        current, text = item, ""
        index = len(output)
        output.append(item)
        events = [event("response.output_item.added", output_index=index, item=item)]
        if part is not None:
            events.append(event("response.content_part.added", item_id=item["id"], output_index=index,
                                content_index=0, part=part))
        return events

    def close_item() -> list[dict]:
        nonlocal current
        if current is None:
            return []
        item, index, events = current, len(output) - 1, []
        current = None
        if item["type"] == "message":
            part = output_text(text)
            item.update(status="completed", content=[part])
            events += [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=text, logprobs=[]),
                       event("response.content_part.done", item_id=item["id"], output_index=index,
                             content_index=0, part=part)]
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            item.update(status="completed", content=[part])
            events += [event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                             content_index=0, text=text),
                       event("response.content_part.done", item_id=item["id"], output_index=index,
                             content_index=0, part=part)]
        else:
            item.update(status="completed", arguments=text)
            events.append(event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=text))
        return [*events, event("response.output_item.done", output_index=index, item=item)]

    yield event("response.created", response=response_object(run, body, "in_progress", [], None))
    yield event("response.in_progress", response=response_object(run, body, "in_progress", [], None))
    finish = None
    try:
        async for _, part in run.parts():
            events: list[dict] = []
            if isinstance(part, TextPart):
                if not part.text:
                    continue
                kind = "message" if part.kind == "content" else "reasoning"
                if current is None or current["type"] != kind:
                    events += close_item()
                    n = len(output)
                    if kind == "message":
                        events += open_item(message_item(f"msg_{run.id}_{n}", "", "in_progress"), output_text(""))
                    else:
                        events += open_item(reasoning_item(f"rs_{run.id}_{n}", "", "in_progress"),
                                            {"type": "reasoning_text", "text": ""})
                text += part.text
                delta = ("response.output_text.delta" if kind == "message" else "response.reasoning_text.delta")
                extra = {"logprobs": []} if kind == "message" else {}
                events.append(event(delta, item_id=current["id"], output_index=len(output) - 1, content_index=0,
                                    delta=part.text, **extra))
            elif isinstance(part, CallStart):
                events += close_item()
                events += open_item(function_item(f"fc_{run.id}_{len(output)}", part.id, part.name, "",
                                                  "in_progress"), None)
            elif isinstance(part, CallArguments):
                text += part.text
                events.append(event("response.function_call_arguments.delta", item_id=current["id"],
                                    output_index=len(output) - 1, delta=part.text))
            elif isinstance(part, CallEnd):
                events += close_item()
            elif isinstance(part, Finish):
                events += close_item()
                finish = part
            for e in events:
                yield e
    except EdgeLLMError as exc:
        yield event("error", code=exc.code, message=exc.message, param=exc.param)
        yield event("response.failed", response={**response_object(run, body, "failed", output, None),
                                                 "error": {"code": exc.code or "server_error", "message": exc.message}})
        return
    final = response_object(run, body, "completed", output, finish)
    # An answer cut at max_output_tokens ends the stream as OpenAI's does: `response.incomplete`.
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)

