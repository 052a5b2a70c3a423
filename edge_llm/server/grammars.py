"""Structured output: JSON (any object, or one JSON schema) and forced tool calls as llama.cpp
GBNF grammars, put into SamplingParams.grammar so the sampler can only pick tokens that fit.

The JSON-schema converter is llama-cpp-python's port of llama.cpp's own. Schemas come from
clients, and a `maxLength: 1000000000` or a regex `a{0,+30000000}` would expand into a grammar of
a billion rules and take the server down with it. So the bounds are checked on what the converter
itself parsed, as it builds: every repetition count (minItems / maxItems / minLength / maxLength
and regex `{m,n}`, whatever their spelling) when it is expanded, and the grammar's total size as
each rule is added. Routes build grammars in a worker thread, never on the event loop.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from edge_llm.errors import InvalidParameterError

# Repetition counts above this are refused; a laptop model writing a 10,000-item array under a
# grammar is not a use case, and each count unrolls into grammar rules.
MAX_REPEAT = 256
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_CHARS = 64_000
MAX_GRAMMAR_CHARS = 256_000
# The tags around a tool call (Hermes / Qwen2.5 format).
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class Refused(Exception):
    """A bound was passed inside the converter; turned into the request's 400."""


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: Any, *, param: str = "response_format.json_schema.schema") -> str:
    """GBNF for output that is one JSON value valid under `schema`."""
    converter = schema_converter(schema, param)
    try:
        # resolve_refs rewrites the $refs it resolves: work on a copy, not the request's body.
        converter.visit(converter.resolve_refs(copy.deepcopy(schema), "request"), "")
        return converter.format_grammar()
    except Refused as exc:
        raise InvalidParameterError(f"the JSON schema {exc}", param=param) from None
    except Exception as exc:  # the converter raises many types on schemas it cannot handle
        raise InvalidParameterError(f"cannot turn this JSON schema into a grammar: {exc}", param=param) from None


def tool_call_grammar(tools: list[dict[str, Any]], *, param: str = "tools") -> str:
    """GBNF for output that is exactly one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    calling one of `tools` (OpenAI tool dicts) with arguments valid under its parameters schema.

    Each tool's `$ref`s resolve within its own parameters (where its `$defs` are), as they do for a
    response_format schema, and as llama.cpp does for tools."""
    converter = None
    choices = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        parameters = copy.deepcopy(function.get("parameters") or {"type": "object"})
        if converter is None:
            converter = schema_converter(parameters, param)
        else:
            check_schema_bounds(parameters, param)
        try:
            parameters = converter.resolve_refs(parameters, f"tool{i}")
        except Exception as exc:
            raise InvalidParameterError(f"cannot resolve the $refs of tool {function['name']!r}: {exc}",
                                        param=param) from None
        choices.append({"type": "object",
                        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"]})
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    try:
        body = converter.visit(schema, "tool-call-json")
        converter._add_rule("root", f'"{TOOL_CALL_OPEN}" "\\n"? {body} "\\n"? "{TOOL_CALL_CLOSE}"')
        return converter.format_grammar()
    except Refused as exc:
        raise InvalidParameterError(f"the tool parameters {exc}", param=param) from None
    except Exception as exc:
        raise InvalidParameterError(f"cannot turn these tool parameters into a grammar: {exc}", param=param) from None


def schema_converter(schema: Any, param: str) -> Any:
    if not isinstance(schema, dict):
        raise InvalidParameterError("the JSON schema must be an object", param=param)
    check_schema_bounds(schema, param)
    return _bounded_converter_class()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def check_schema_bounds(schema: Any, param: str) -> None:
    """The bounds a schema's JSON shows before conversion: its size and nesting."""
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise InvalidParameterError(f"the JSON schema is larger than {MAX_SCHEMA_CHARS} characters", param=param)

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidParameterError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH}", param=param)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for value in children:
            walk(value, depth + 1)

    walk(schema, 0)


def _check_repetition(item_rule: str, min_items: Any, max_items: Any, separator_rule: str | None) -> None:
    """Before a repetition is expanded: integer counts within MAX_REPEAT, and an expansion that
    fits the grammar size limit."""
    for count in (min_items, max_items):
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int):
            raise Refused(f"has a repetition count that is not an integer: {count!r}")
        if not 0 <= count <= MAX_REPEAT:
            raise Refused(f"repeats something {count} times, above the limit of {MAX_REPEAT} for "
                           "grammar-constrained output (minItems, maxItems, minLength, maxLength or a "
                           "regex {m,n})")
    times = max_items if max_items is not None else min_items
    if (len(item_rule) + len(separator_rule or "") + 8) * times > MAX_GRAMMAR_CHARS:
        raise Refused("makes a grammar too large to run")


_converter_class: type | None = None


def _bounded_converter_class() -> type:
    """llama-cpp-python's SchemaConverter, bounded while it builds (created on first use, so
    importing this module does not import llama_cpp)."""
    global _converter_class
    if _converter_class is not None:
        return _converter_class
    from llama_cpp import llama_grammar

    expand = llama_grammar._build_repetition
    if not getattr(expand, "bounded", False):
        # Every repetition the converter writes, from a schema keyword or from a regex quantifier it
        # parsed itself, goes through this module-level function: the one place to check counts.
        def bounded_repetition(item_rule, min_items, max_items, separator_rule=None, item_rule_is_literal=False):
            _check_repetition(item_rule, min_items, max_items, separator_rule)
            return expand(item_rule, min_items, max_items, separator_rule, item_rule_is_literal)

        bounded_repetition.bounded = True  # type: ignore[attr-defined]
        llama_grammar._build_repetition = bounded_repetition

    class BoundedSchemaConverter(llama_grammar.SchemaConverter):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._size = sum(len(name) + len(rule) for name, rule in self._rules.items())

        def _add_rule(self, name: str, rule: str) -> str:
            self._size += len(name) + len(rule) + 5
            if self._size > MAX_GRAMMAR_CHARS:
                raise Refused("makes a grammar too large to run")
            return super()._add_rule(name, rule)

        def _resolve_ref(self, ref: str) -> str:
            # As upstream, but the converter names a $ref's rule after its last path segment only:
            # refs resolved within different tools ("tool0#/$defs/Item", "tool1#/$defs/Item") get
            # their tool's prefix, so they do not share one rule.
            base, _, path = ref.partition("#")
            name = path.split("/")[-1] if base == "request" else f"{base}-{path.split('/')[-1]}"
            if name not in self._rules and ref not in self._refs_being_resolved:
                self._refs_being_resolved.add(ref)
                name = self.visit(self._refs[ref], name)
                self._refs_being_resolved.remove(ref)
            return name

    _converter_class = BoundedSchemaConverter
    return _converter_class
