"""Tool calls in model output, in the Hermes / Qwen2.5 format that chat templates with tool
support ask models to write, parsed as the text streams:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Each call gets its own index (0, 1, ... in the order written) and id. A call is announced as soon
as its name is known, and its arguments object is passed on as it is written, holding back only
what could be the end of the call (the closing `}` and tag); this is what OpenAI's, Anthropic's
and the Responses streams carry. A call written another way (keys in another order, arguments as a
string) is sent whole when it ends. Text outside calls is the content: whitespace around the calls
is dropped; a call whose JSON does not parse stays in the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_llm.engines.base import Engine

from edge_llm.reasoning import TrimmedText, partial_tag
from edge_llm.server.grammars import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# The start of a call written name-first, up to the arguments object or string.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_OUTER_END = re.compile(r"\}\s*$")


@dataclass
class Text:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    index: int
    text: str


@dataclass
class CallEnd:
    index: int
    arguments: str  # the whole arguments text
    raw: str  # the call as written, tags included (put back into the content if it is not JSON)


Event = Text | CallStart | CallArguments | CallEnd


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_supports_tools(engine: Engine) -> bool:
    """A Jinja chat template that mentions `tools` renders them; others would drop them silently."""
    template = engine.formatter.template
    return template is not None and "tools" in template


class ToolCallParser:
    """feed(text) -> events; finish() -> the last events (a call cut off by the end is closed)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "text"  # text | head (after <tool_call>) | arguments (streaming an object)
        self._text = TrimmedText()  # the content before, between and after calls
        self._calls = 0
        self._raw = ""  # the current call as written so far
        self._arguments = ""
        self._opened = False  # the current call's CallStart was sent

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Event]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            if self._state == "text":
                start = self._buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = 0 if final else partial_tag(self._buffer, TOOL_CALL_OPEN)
                    self._content(self._buffer[:len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                self._content(self._buffer[:start], out)
                self._text.held = ""  # whitespace before a call is not content
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN):]
                self._state, self._raw, self._arguments, self._opened = "head", TOOL_CALL_OPEN, "", False
            elif self._state == "head":
                end = self._buffer.find(TOOL_CALL_CLOSE)
                head = _HEAD.match(self._buffer)
                if head and (end < 0 or head.end() < end) and len(self._buffer) > head.end():
                    if self._buffer[head.end()] == "{":
                        self._open(json.loads(f'"{head.group(1)}"'), out)
                        self._raw += self._buffer[:head.end()]
                        self._buffer = self._buffer[head.end():]
                        self._state = "arguments"
                        continue
                if end < 0 and not final:
                    return out
                payload = self._buffer if end < 0 else self._buffer[:end]
                self._buffer = "" if end < 0 else self._buffer[end + len(TOOL_CALL_CLOSE):]
                self._raw += payload + ("" if end < 0 else TOOL_CALL_CLOSE)
                self._whole_call(payload, out)
            else:  # arguments
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0 and not final:
                    keep = self._held_tail(self._buffer)
                    self._send_arguments(self._buffer[:len(self._buffer) - keep], out)
                    self._raw += self._buffer[:len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                body = self._buffer if end < 0 else self._buffer[:end]
                self._raw += body + ("" if end < 0 else TOOL_CALL_CLOSE)
                self._buffer = "" if end < 0 else self._buffer[end + len(TOOL_CALL_CLOSE):]
                self._send_arguments(_OUTER_END.sub("", body.rstrip()).rstrip(), out)
                self._close(out)

    def _content(self, text: str, out: list[Event]) -> None:
        piece = self._text.feed(text)
        if piece:
            out.append(Text(piece))

    def _held_tail(self, text: str) -> int:
        """What could still be the call's end: `}`, whitespace, a partial `</tool_call>`."""
        keep = partial_tag(text, TOOL_CALL_CLOSE)
        rest = text[:len(text) - keep]
        stripped = rest.rstrip()
        if stripped.endswith("}"):
            stripped = stripped[:-1]
        return len(text) - len(stripped)

    def _open(self, name: str, out: list[Event]) -> None:
        out.append(CallStart(self._calls, new_call_id(), name))
        self._opened = True

    def _send_arguments(self, text: str, out: list[Event]) -> None:
        if text:
            self._arguments += text
            out.append(CallArguments(self._calls, text))

    def _close(self, out: list[Event]) -> None:
        out.append(CallEnd(self._calls, self._arguments, self._raw))
        self._calls += 1
        self._state, self._text = "text", TrimmedText()

    def _whole_call(self, payload: str, out: list[Event]) -> None:
        call = _as_call(payload)
        if call is None:  # not a call after all: it is content, as written
            self._state = "text"
            self._content(self._raw, out)
            return
        name, arguments = call
        self._open(name, out)
        self._send_arguments(arguments, out)
        self._close(out)


def _as_call(payload: str) -> tuple[str, str] | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return data["name"], arguments


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_tool_calls(text: str) -> ParsedOutput:
    """The whole output at once: content and OpenAI `tool_calls` entries. A call whose arguments
    are not valid JSON (cut off by max_tokens, say) stays in the content."""
    parser = ToolCallParser()
    return collect_events([*parser.feed(text), *parser.finish()])


def collect_events(events: list[Event]) -> ParsedOutput:
    content, calls, starts = [], [], {}
    for event in events:
        if isinstance(event, Text):
            content.append(event.text)
        elif isinstance(event, CallStart):
            starts[event.index] = event
        elif isinstance(event, CallEnd):
            start = starts[event.index]
            if arguments_are_json(event.arguments):
                calls.append({"id": start.id, "type": "function",
                              "function": {"name": start.name, "arguments": event.arguments}})
            else:
                content.append(event.raw)
    return ParsedOutput("".join(content) or None, calls)


def arguments_are_json(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False
