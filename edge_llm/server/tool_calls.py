"""Tool calls in model output, in the Hermes / Qwen2.5 format that chat templates with tool
support ask models to write:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first call is the message content; each well-formed call becomes an OpenAI
`tool_calls` entry. A call whose JSON does not parse is left in the content rather than dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edge_llm.server.grammars import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def template_supports_tools(engine: Any) -> bool:
    """A Jinja chat template that mentions `tools` renders them; others would drop them silently."""
    template = getattr(getattr(engine, "formatter", None), "template", None)
    return isinstance(template, str) and "tools" in template


def parse_tool_calls(text: str) -> ParsedOutput:
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedOutput(text)
    calls, leftovers = [], []
    for match in _CALL.finditer(text, start):
        call = _as_call(match.group(1))
        if call is None:
            leftovers.append(match.group(0))
        else:
            calls.append(call)
    if not calls:
        return ParsedOutput(text)
    content = (text[:start] + "".join(leftovers)).strip()
    return ParsedOutput(content or None, calls)


def _as_call(payload: str) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": arguments}}
