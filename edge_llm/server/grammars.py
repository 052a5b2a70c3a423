"""Structured output: JSON (any object, or one JSON schema) and forced tool calls as llama.cpp
GBNF grammars, put into SamplingParams.grammar so the sampler can only pick tokens that fit.

Schemas become grammar through edge_llm.json_schema_grammar, our own bounded converter: a
client's schema that would expand into a huge grammar gets a 400 naming the parameter and the
place in the schema. Routes build grammars in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
from typing import Any

from edge_llm.json_schema_grammar import SchemaGrammar, gbnf_literal, json_schema_gbnf

# The tags around a tool call (Hermes / Qwen2.5 format).
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def json_object_grammar() -> str:
    """GBNF for any JSON object: llama.cpp's own grammars/json.gbnf, as llama-cpp-python ships it."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: Any, *, param: str = "response_format.json_schema.schema") -> str:
    """GBNF for output that is one JSON value valid under `schema`."""
    return json_schema_gbnf(schema, param=param)


def tool_call_grammar(tools: list[dict[str, Any]], *, param: str = "tools") -> str:
    """GBNF for output that is exactly one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    calling one of `tools` (OpenAI tool dicts) with arguments valid under its parameters schema.

    Each tool's `$ref`s resolve within its own parameters (where its `$defs` are), as they do for a
    response_format schema, and as llama.cpp does for tools."""
    grammar = SchemaGrammar(param=param, label="the tool parameters")
    calls = [call_rule(grammar, i, tool) for i, tool in enumerate(tools)]
    body = grammar.add_rule("tool-call-json", " | ".join(calls))
    grammar.add_rule("root", f'"{TOOL_CALL_OPEN}" "\\n"? {body} "\\n"? "{TOOL_CALL_CLOSE}"')
    return grammar.text()


def call_rule(grammar: SchemaGrammar, index: int, tool: dict[str, Any]) -> str:
    """A rule for one call of `tool` as JSON: `{"name": "...", "arguments": {...}}`."""
    function = tool["function"]
    arguments = grammar.add_schema(function.get("parameters") or {"type": "object"}, f"tool{index}-arguments",
                                   where=f"tools[{index}].function.parameters")
    name = gbnf_literal(json.dumps(function["name"], ensure_ascii=False))
    return grammar.add_rule(f"tool{index}-call", f'"{{" space "\\"name\\"" space ":" space {name} space "," space '
                                                 f'"\\"arguments\\"" space ":" space {arguments} "}}" space')
