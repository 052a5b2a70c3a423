"""A chat request of any API (OpenAI chat, Responses, Anthropic, Ollama) as a pipeline Job.

Each API first turns its messages into the dicts chat templates expect (transformers'
conventions: role, content, tool_calls with arguments as objects, tool_call_id, and
reasoning_content for earlier thinking), its tools into OpenAI's `{"type": "function",
"function": {...}}`, and its tool choice into "auto" | "none" | "required" | a tool name. The rest
is the same for all: the tools rendered by a template that has tool markup (a forced call as a
grammar), or in the generic form for one that has none (generic_tools.py: the tool list in the
system message, the answer held by a grammar to text or a JSON call); a structured-output grammar;
and whether the answer's thinking is split off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edge_llm.engines.base import Engine
from edge_llm.engines.media import MediaPrompt
from edge_llm.errors import InvalidParameterError
from edge_llm.images import Image
from edge_llm.reasoning import prompt_opens_thinking, splits_reasoning
from edge_llm.server import generic_tools, grammars
from edge_llm.server.pipeline import Job
from edge_llm.server.tool_calls import template_supports_tools


@dataclass
class ChatOptions:
    tools: list[dict] | None = None  # OpenAI function tools
    tool_choice: str | None = None  # auto | none | required | the name of one tool
    grammar: str | None = None  # structured output (JSON, a schema)
    reasoning_format: str = "auto"  # auto | deepseek | none (reasoning.py)
    tools_param: str = "tools"
    format_param: str = "response_format"
    parallel_tool_calls: bool = True  # several calls in one answer (where the format can hold them to one)


def arguments_object(arguments: Any) -> Any:
    """Templates render tool-call arguments with tojson: give them the object, not a JSON string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def template_call(call_id: str | None, name: str, arguments: Any) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_object(arguments)}}


def chat_job(engine: Engine, messages: list[dict], options: ChatOptions, *, sampling: dict[str, Any],
             max_tokens: int | None, plan: Any = None, images: list[Image] | None = None) -> Job:
    """Runs off the event loop: renders the template and builds grammars. `images`: decoded, in
    the order of the MEDIA_MARKERs in the messages' content (server/media.py)."""
    if images and not engine.takes_images:
        raise InvalidParameterError(f"the model {engine.model_name} does not take images (it was served without a "
                                    "vision projector: --mmproj FILE)", param="messages")
    tools, choice = options.tools or None, options.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidParameterError("tool_choice needs tools", param="tool_choice")
    if choice == "none":
        tools = None
    forced = None
    if choice == "required":
        forced = tools
    elif choice not in (None, "auto", "none"):
        forced = [t for t in tools or [] if t["function"]["name"] == choice]
        if not forced:
            raise InvalidParameterError(f"tool_choice names {choice!r}, which is not in tools", param="tool_choice")
    if forced and options.grammar is not None:
        raise InvalidParameterError("structured output cannot be combined with a forced tool call",
                                    param=options.format_param)
    if template_supports_tools(engine):
        tool_format = "native"
        grammar = grammars.tool_call_grammar(forced, param=options.tools_param) if forced else options.grammar
        prompt = engine.chat_prompt(messages, tools=tools)
    else:
        tool_format = "generic"
        grammar = options.grammar
        if tools or generic_tools.uses_tools(messages):
            messages = generic_tools.prompt_messages(messages, tools, forced, engine.formatter.template)
        # Without grammar support (the transformers engine) an `auto` answer is parsed as it comes;
        # a forced call asks for the grammar and gets the engine's refusal.
        if tools and (forced or engine.grammars):
            grammar = generic_tools.grammar(forced or tools, forced=forced is not None,
                                            parallel=options.parallel_tool_calls, format_grammar=options.grammar,
                                            param=options.tools_param)
        prompt = engine.chat_prompt(messages)
    # A grammar decides the whole answer from its first token: there is no thinking to split off.
    reasoning = grammar is None and splits_reasoning(engine, options.reasoning_format)
    return Job([MediaPrompt(prompt, list(images)) if images else prompt], {**sampling, "grammar": grammar},
               max_tokens, prompt_param="messages",
               reasoning=reasoning, thinking_open=reasoning and prompt_opens_thinking(prompt.text),
               tools=tools is not None, tool_format=tool_format, plan=plan)


def format_grammar(kind: str | None, schema: Any, *, param: str) -> str | None:
    """Structured output: kind "json_object" (any JSON object) or "json_schema" (one schema)."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return grammars.json_object_grammar()
    if schema is None:
        raise InvalidParameterError("a json_schema format needs its schema", param=param)
    return grammars.json_schema_grammar(schema, param=param)
