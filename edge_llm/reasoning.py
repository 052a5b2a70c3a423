"""Thinking split from the answer, as it streams: `<think>...</think>` (Qwen3, DeepSeek-R1 distills).

The thinking opens only at the start of the output (as llama.cpp's parser has it), or is already
open when the chat template ends the prompt with `<think>` (DeepSeek-R1's newer templates, Qwen3
with thinking on): then the output starts inside it and only `</think>` is written. Whitespace
around the thinking is dropped, so `<think>\\nhm\\n</think>\\n\\nHi` is thinking "hm", answer "Hi".

Text that could be the start of a tag is held back until the next piece decides it, so a tag
split across tokens is never shown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from edge_llm.engines.base import Engine

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# `--reasoning-format` (llama-server's flag and values): auto = split when the model's chat
# template knows the tags; deepseek = always split; none = leave the thinking inline in the answer.
REASONING_FORMATS = ("auto", "deepseek", "none")

Kind = Literal["reasoning", "content"]


def template_has_reasoning(engine: Engine) -> bool:
    template = engine.formatter.template
    return template is not None and THINK_CLOSE in template


def splits_reasoning(engine: Engine, reasoning_format: str) -> bool:
    """Whether this engine's output is split into thinking and answer under `reasoning_format`."""
    if reasoning_format == "none":
        return False
    return reasoning_format == "deepseek" or template_has_reasoning(engine)


def prompt_opens_thinking(prompt: str) -> bool:
    return prompt.rstrip().endswith(THINK_OPEN)


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class TrimmedText:
    """One part of a streamed answer (the thinking, the content around tool calls) sent without the
    whitespace at its ends: leading whitespace is dropped, trailing whitespace is held back and sent
    only if more text of the part follows."""

    def __init__(self) -> None:
        self._started = False
        self.held = ""  # whitespace after the text sent so far

    def feed(self, text: str) -> str:
        """What of `text` can be sent now ("" when nothing)."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        out = self.held + body if body else ""
        if body:
            self.held = ""
        self.held += text[len(body):]
        return out


class ReasoningSplitter:
    """feed(text) -> [(kind, text), ...]; finish() flushes what was held back."""

    def __init__(self, *, open: bool = False) -> None:
        self._state = "thinking" if open else "start"
        self._buffer = ""
        self._thinking = TrimmedText()
        self._content_lead = False  # the content follows </think>: its leading whitespace is dropped

    @property
    def thinking(self) -> bool:
        """Still in (or maybe entering) the thinking: the tokens so far count as reasoning."""
        return self._state != "content"

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[tuple[Kind, str]]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[tuple[Kind, str]]:
        out: list[tuple[Kind, str]] = []
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buffer = stripped[len(THINK_OPEN):]
                    self._state = "thinking"
                    continue
                if not final and THINK_OPEN.startswith(stripped):
                    return out  # empty, or the tag so far: wait for more
                self._state = "content"
                continue
            if self._state == "thinking":
                end = self._buffer.find(THINK_CLOSE)
                if end >= 0:
                    self._think(self._buffer[:end], out)
                    self._buffer = self._buffer[end + len(THINK_CLOSE):]
                    self._state, self._content_lead = "content", True
                    continue
                keep = 0 if final else partial_tag(self._buffer, THINK_CLOSE)
                self._think(self._buffer[:len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return out
            # content: everything passes, but the whitespace right after </think>
            if self._content_lead:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return out
                self._content_lead = False
            if self._buffer:
                out.append(("content", self._buffer))
                self._buffer = ""
            return out

    def _think(self, text: str, out: list[tuple[Kind, str]]) -> None:
        piece = self._thinking.feed(text)
        if piece:
            out.append(("reasoning", piece))
