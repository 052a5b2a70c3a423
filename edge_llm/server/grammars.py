"""Structured output: JSON (any object, or one JSON schema) and forced tool calls as llama.cpp
GBNF grammars, put into SamplingParams.grammar so the sampler can only pick tokens that fit.

The JSON-schema converter is llama-cpp-python's port of llama.cpp's own. Schemas come from
clients, so they are bounded first: a `maxLength: 1000000000` would expand into a grammar of a
billion rules and take the server down with it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_llm.errors import InvalidParameterError

# Repetition counts above this are refused; a laptop model writing a 10,000-item array under a
# grammar is not a use case, and each count unrolls into grammar rules.
MAX_REPEAT = 256
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_CHARS = 64_000
MAX_GRAMMAR_CHARS = 256_000
_COUNT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
               "minContains", "maxContains")
# The grammar that ends a tool call, and the tags around it (Hermes / Qwen2.5 format).
_REGEX_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: Any, *, param: str = "response_format.json_schema.schema") -> str:
    """GBNF for output that is one JSON value valid under `schema`."""
    converter = _converter(schema, param)
    try:
        converter.visit(converter.resolve_refs(schema, "request"), "")
        return _checked(converter.format_grammar(), param)
    except InvalidParameterError:
        raise
    except Exception as exc:  # the converter raises many types on schemas it cannot handle
        raise InvalidParameterError(f"cannot turn this JSON schema into a grammar: {exc}", param=param) from None


def tool_call_grammar(tools: list[dict[str, Any]], *, param: str = "tools") -> str:
    """GBNF for output that is exactly one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    calling one of `tools` (OpenAI tool dicts) with arguments valid under its parameters schema."""
    choices = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object"}
        choices.append({"type": "object",
                        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"]})
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    converter = _converter(schema, param)
    try:
        body = converter.visit(converter.resolve_refs(schema, "request"), "tool-call-json")
        converter._add_rule("root", f'"{TOOL_CALL_OPEN}" "\\n"? {body} "\\n"? "{TOOL_CALL_CLOSE}"')
        return _checked(converter.format_grammar(), param)
    except InvalidParameterError:
        raise
    except Exception as exc:
        raise InvalidParameterError(f"cannot turn these tool parameters into a grammar: {exc}", param=param) from None


def _converter(schema: Any, param: str) -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    if not isinstance(schema, dict):
        raise InvalidParameterError("the JSON schema must be an object", param=param)
    check_schema_bounds(schema, param)
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def check_schema_bounds(schema: Any, param: str) -> None:
    """Refuse schemas whose grammar would be too large to build (see MAX_REPEAT)."""
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise InvalidParameterError(f"the JSON schema is larger than {MAX_SCHEMA_CHARS} characters", param=param)

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidParameterError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH}", param=param)
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _COUNT_KEYS and not isinstance(value, bool) and isinstance(value, (int, float)) \
                        and value > MAX_REPEAT:
                    raise InvalidParameterError(f"{key} = {value} is above the limit of {MAX_REPEAT} "
                                                "for grammar-constrained output", param=param)
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value, param)
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)

    walk(schema, 0)


def _check_pattern(pattern: str, param: str) -> None:
    for low, high in _REGEX_COUNT.findall(pattern):
        if int(low) > MAX_REPEAT or (high and int(high) > MAX_REPEAT):
            raise InvalidParameterError(f"the pattern {pattern!r} repeats more than {MAX_REPEAT} times", param=param)


def _checked(grammar: str, param: str) -> str:
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidParameterError("the JSON schema makes a grammar too large to run", param=param)
    return grammar
