"""Tool calls for models whose chat template has no tool markup (SmolLM2, many small or older
models): the tools go into the prompt in one generic form, and a grammar holds the answer to either
plain text or one JSON tool-call object, which is parsed into the same calls (ids, streamed
arguments) as a native template's.

Modelled on llama.cpp's generic tool-call format (minja's tool polyfill: the tool list in the
system prompt, earlier calls and results written into the conversation as JSON), but the answer
is plain text unless it is a call, so a model that does not call a tool answers as it would
without tools. The form, as the model sees and writes it:

  - the system message gets (after its own text, or as a new first message):

        You can call these tools to satisfy the user's request:
        {"name": "get_weather", "description": "...", "parameters": {...}}
        To call tools, answer with only this JSON object and nothing else:
        {"tool_calls": [{"name": "<tool name>", "arguments": {<its parameters>}}]}
        Otherwise, answer in plain text.

    (with `tool_choice` required or a named tool, the last two lines ask for a call instead);
  - the answer is one of:
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
        any text that does not begin with `{"tool_calls"`
    enforced by GBNF: the call's name is one of the tools and its arguments fit that tool's
    parameters schema; several calls are allowed unless parallel calls are turned off; a forced
    call leaves out the text branch; with structured output (a JSON schema) the text branch is
    that schema's JSON;
  - an earlier assistant turn's calls are written back as that JSON (after its text), and tool
    results become user turns `{"tool_response": {"name": "get_weather", "content": "Sunny"}}`
    (consecutive results in one turn), so the conversation uses only the roles every template has.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_llm.json_schema_grammar import SchemaGrammar, gbnf_literal
from edge_llm.server.tool_calls import CallArguments, CallEnd, CallStart, Event, Text, new_call_id

CALLS_KEY = '{"tool_calls"'
CALLS_OPEN = '{"tool_calls": ['
CALLS_CLOSE = "]}"
CALL_SEPARATOR = ", "
# One call as the grammar writes it, up to its arguments object.
_CALL_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_CALL_HEAD_TEXT = '{"name": "'
# Templates that refuse a system message (Gemma's) raise this; the tool text then opens the first user turn.
_NO_SYSTEM_ROLE = "System role not supported"


# -- the prompt ---------------------------------------------------------------------------------------


def tool_instructions(tools: list[dict], forced: list[dict] | None) -> str:
    """The text put into the system message: the tools, then how to call them."""
    listed = "\n".join(json.dumps(_tool_entry(t), ensure_ascii=False) for t in tools)
    lines = ["You can call these tools to satisfy the user's request:", listed]
    example = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its parameters>}}]}'
    if forced is None:
        lines += ["To call tools, answer with only this JSON object and nothing else:", example,
                  "Otherwise, answer in plain text."]
    elif len(forced) == 1:
        lines += [f"Call the tool {forced[0]['function']['name']} now, answering with only this JSON object:",
                  example]
    else:
        lines += ["Call one of these tools now, answering with only this JSON object:", example]
    return "\n".join(lines)


def _tool_entry(tool: dict) -> dict:
    function = tool["function"]
    entry = {"name": function["name"]}
    if function.get("description"):
        entry["description"] = function["description"]
    entry["parameters"] = function.get("parameters") or {"type": "object"}
    return entry


def calls_text(calls: list[dict]) -> str:
    """Earlier calls (template dicts: function.name, function.arguments as an object) as the model writes them."""
    items = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # not JSON (template_call kept the text): as written
            arguments_json = arguments
        else:
            arguments_json = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        items.append(f'{{"name": {json.dumps(function.get("name", ""), ensure_ascii=False)}, '
                     f'"arguments": {arguments_json}}}')
    return CALLS_OPEN + CALL_SEPARATOR.join(items) + CALLS_CLOSE


def uses_tools(messages: list[dict]) -> bool:
    """Whether a conversation has earlier calls or results, which a template without tools would drop."""
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def prompt_messages(messages: list[dict], tools: list[dict] | None, forced: list[dict] | None,
                    template: str | None) -> list[dict]:
    """The conversation with the tool list in its system message and earlier calls and results
    written in the generic form (roles system, user and assistant only)."""
    out: list[dict] = []
    names: dict[str, str] = {}  # call id -> tool name, to name the tool a result is for
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = message.pop("tool_calls")
            for call in calls:
                if call.get("id"):
                    names[call["id"]] = (call.get("function") or {}).get("name", "")
            text = message.get("content") or ""
            message["content"] = (text + "\n" if text else "") + calls_text(calls)
        if message.get("role") == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id") or "", "")
            response: dict[str, Any] = {"name": name} if name else {}
            response["content"] = message.get("content") or ""
            message = {"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False),
                       "_result": True}
            if out and out[-1]["role"] == "user" and out[-1].get("_result"):
                out[-1]["content"] += "\n" + message["content"]
                continue
        elif message.get("role") == "user" and out and out[-1].get("_result"):
            # A user turn right after tool results: one turn, for templates that insist on alternation.
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + (message.get("content") or "")}
            continue
        out.append(message)
    out = [{k: v for k, v in m.items() if k != "_result"} for m in out]
    if tools:
        out = _with_instructions(out, tool_instructions(tools, forced), template)
    return out


def _with_instructions(messages: list[dict], text: str, template: str | None) -> list[dict]:
    first = messages[0] if messages else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": (first["content"] + "\n\n" if first["content"] else "") + text}, *messages[1:]]
    if template is not None and _NO_SYSTEM_ROLE in template:
        for i, message in enumerate(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return [*messages[:i], {**message, "content": text + "\n\n" + message["content"]}, *messages[i + 1:]]
    return [{"role": "system", "content": text}, *messages]


# -- the grammar --------------------------------------------------------------------------------------


def grammar(tools: list[dict], *, forced: bool, parallel: bool = True, format_grammar: str | None = None,
            param: str = "tools") -> str:
    """GBNF for the answer: a call of one of `tools`; unless `forced`, or else plain text (or, with
    `format_grammar`, the structured output it describes). Each tool's `$ref`s resolve within its
    own parameters, as in server/grammars.py's tool_call_grammar."""
    grammar = SchemaGrammar(param=param, label="the tool parameters")
    alternatives = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        arguments = grammar.add_schema(function.get("parameters") or {"type": "object"}, f"tool{i}-arguments",
                                       where=f"tools[{i}].function.parameters")
        head = f'{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": '
        alternatives.append(f'{gbnf_literal(head)} {arguments} "}}"')
    call = grammar.add_rule("tool-call", " | ".join(alternatives))
    more = f" ({gbnf_literal(CALL_SEPARATOR)} {call})*" if parallel else ""
    grammar.add_rule("tool-calls", f"{gbnf_literal(CALLS_OPEN)} {call}{more} {gbnf_literal(CALLS_CLOSE)}")
    rules = [grammar.text()]
    if forced:
        rules.append("root ::= tool-calls")
    elif format_grammar is not None:
        rules += [renamed_rules(format_grammar, "format-"), "root ::= tool-calls | format-root"]
    else:
        rules += [text_rules("text", CALLS_KEY), "root ::= tool-calls | text"]
    return "\n".join(rules)


def _char_class_not(ch: str) -> str:
    return f"[^\\x{ord(ch):02X}]" if ord(ch) < 0x100 else f"[^\\u{ord(ch):04X}]"


def text_rules(name: str, excluded: str) -> str:
    """GBNF rule `name`: any text (the empty text too) that does not begin with `excluded`."""
    # name-k: what may follow once excluded[:k] is written: the end, another character (then
    # anything), or the next character of `excluded` (not after its last one).
    lines = [f"{name}-any ::= .*"]
    for k, ch in enumerate(excluded):
        rule = f'{name}-{k} ::= "" | {_char_class_not(ch)} {name}-any'
        if k + 1 < len(excluded):
            rule += f" | {gbnf_literal(ch)} {name}-{k + 1}"
        lines.append(rule)
    lines.append(f"{name} ::= {name}-0")
    return "\n".join(lines)


# A GBNF token: a string literal, a character class, a comment, a {m,n} repetition or a rule name.
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|\{[0-9,\s]*\}|[A-Za-z0-9_-]+')


def renamed_rules(grammar_text: str, prefix: str) -> str:
    """Every rule name of a GBNF grammar (definitions and references) with `prefix` before it, so
    that it can sit beside other rules ("root" becomes prefix + "root")."""

    def rename(match: re.Match) -> str:
        token = match.group(0)
        if token[0] in '"[#{':
            return token
        return prefix + token

    return _GBNF_TOKEN.sub(rename, grammar_text)


# -- the answer ---------------------------------------------------------------------------------------


class GenericToolCallParser:
    """feed(text) -> events; finish() -> the last events. The same events as ToolCallParser (Text,
    CallStart, CallArguments, CallEnd), from the generic form: an answer that begins with
    `{"tool_calls": [` is calls, each announced when its name is known and its arguments object
    passed on as it is written; any other answer is text, passed on as it comes."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "start"  # start | text | item | arguments | after (its object) | between (calls) | done
        self._calls = 0
        self._raw = ""  # the current call as written so far
        self._pending = ""  # the envelope's text read since the last call (its opening, a separator)
        self._arguments = ""
        self._depth = 0  # the arguments object's nesting, and whether the scan is inside a string
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == "arguments":  # cut off inside the arguments: the call as far as it got
            out += self._end_call(self._raw)
        self._state = "done"
        return out

    def _end_call(self, raw: str) -> list[Event]:
        event = CallEnd(self._calls, self._arguments, raw)
        self._calls += 1
        self._raw, self._arguments = "", ""
        return [event]

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self._state == "start":
                if self._buffer.startswith(CALLS_OPEN):
                    self._pending, self._buffer = CALLS_OPEN, self._buffer[len(CALLS_OPEN):]
                    self._state = "item"
                elif CALLS_OPEN.startswith(self._buffer) and not final:
                    return out
                else:
                    self._state = "text"
            elif self._state == "text":
                if self._pending + self._buffer:
                    out.append(Text(self._pending + self._buffer))
                    self._pending = self._buffer = ""
                return out
            elif self._state == "item":
                head = _CALL_HEAD.match(self._buffer)
                if head is None:
                    if not final and _could_be_head(self._buffer):
                        return out
                    # Not the form (only without a grammar): the rest is text.
                    self._state = "text"
                    continue
                out.append(CallStart(self._calls, new_call_id(), json.loads(f'"{head.group(1)}"')))
                self._raw, self._arguments, self._pending = self._pending + head.group(0), "", ""
                self._depth, self._in_string, self._escaped = 0, False, False
                self._buffer = self._buffer[head.end():]
                self._state = "arguments"
            elif self._state == "arguments":
                end = self._scan_arguments()
                piece = self._buffer[:end]
                if piece:
                    self._arguments += piece
                    self._raw += piece
                    out.append(CallArguments(self._calls, piece))
                self._buffer = self._buffer[end:]
                if self._depth > 0 or not self._arguments.strip():
                    if self._buffer:  # not an object (only without a grammar): as written, then text
                        out += self._end_call(self._raw + self._buffer)
                        self._buffer, self._state = "", "done"
                        continue
                    return out
                self._state = "after"
            elif self._state == "after":  # the arguments' schema lets a space follow them
                rest = self._buffer.lstrip()
                if not rest and not final:
                    return out
                closed = rest.startswith("}")
                if closed:
                    self._raw += self._buffer[:len(self._buffer) - len(rest) + 1]
                    self._buffer = rest[1:]
                out += self._end_call(self._raw)
                self._state = "between" if closed else "done"  # not the form: what follows is text
            elif self._state == "between":
                if self._buffer.startswith(CALL_SEPARATOR):
                    self._pending, self._buffer = CALL_SEPARATOR, self._buffer[len(CALL_SEPARATOR):]
                    self._state = "item"
                elif self._buffer.startswith(CALLS_CLOSE):
                    self._buffer = self._buffer[len(CALLS_CLOSE):]
                    self._state = "done"
                elif not final and (CALL_SEPARATOR.startswith(self._buffer) or CALLS_CLOSE.startswith(self._buffer)):
                    return out
                else:
                    self._state = "text"
            else:  # done: nothing follows a grammar's calls; without one, what does is text
                if self._buffer.strip():
                    out.append(Text(self._buffer))
                self._buffer = ""
                return out

    def _scan_arguments(self) -> int:
        """How much of the buffer belongs to the arguments object (all of it while it is open)."""
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
            elif self._depth == 0:
                return i  # not an object (only without a grammar)
        return len(self._buffer)


_PARTIAL_HEAD = re.compile(r'\{"name": "(?:[^"\\]|\\.)*\\?(?:"(?P<tail>.*))?\Z', re.S)


def _could_be_head(text: str) -> bool:
    """Whether `text` may still grow into a call's head `{"name": "...", "arguments": `."""
    if len(text) < len(_CALL_HEAD_TEXT):
        return _CALL_HEAD_TEXT.startswith(text)
    partial = _PARTIAL_HEAD.match(text)
    if partial is None:
        return False
    tail = partial.group("tail")
    return tail is None or ', "arguments": '.startswith(tail)
