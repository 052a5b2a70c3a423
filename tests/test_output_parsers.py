"""The streaming parsers of model output, without a model: `<think>` thinking split from the
answer, and Hermes-style tool calls. Every output is fed whole and split at every possible
point (two pieces, and one character at a time): the streamed result must be the same."""

from __future__ import annotations

import json

import pytest

from edge_llm.reasoning import ReasoningSplitter, prompt_opens_thinking
from edge_llm.server.pipeline import Choice, Finish, Job, OutputParser, TextPart
from edge_llm.server.tool_calls import (
    CallArguments,
    CallEnd,
    CallStart,
    Text,
    ToolCallParser,
    parse_tool_calls,
)


def splits(text: str):
    """Every way to cut `text` into two pieces, and one character at a time."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


def merged_reasoning(pieces, *, open=False):
    splitter = ReasoningSplitter(open=open)
    out = []
    for piece in pieces:
        out += splitter.feed(piece)
    out += splitter.finish()
    joined = {"reasoning": "", "content": ""}
    order = []
    for kind, text in out:
        assert text, "no empty pieces"
        joined[kind] += text
        if not order or order[-1] != kind:
            order.append(kind)
    return joined, order


@pytest.mark.parametrize("text, open, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nHello!", False, "Let me see.", "Hello!"),
    ("  <think>a < b, so\n\nb.</think>The answer is b.", False, "a < b, so\n\nb.", "The answer is b."),
    ("Plain answer, <think> in the middle is text.", False, "", "Plain answer, <think> in the middle is text."),
    ("<thin", False, "", "<thin"),  # a cut-off start that never became a tag is the answer
    ("Thinking already open.\n</think>\n\nDone.", True, "Thinking already open.", "Done."),
    ("<think>never closed", False, "never closed", ""),  # cut off by max_tokens: all thinking
    ("<think></think>Only the answer.", False, "", "Only the answer."),
    ("<think>x</think", False, "x</think", ""),  # the closing tag itself was cut off
])
def test_reasoning_split_at_every_point(text, open, reasoning, content):
    for pieces in splits(text):
        joined, order = merged_reasoning(pieces, open=open)
        assert joined == {"reasoning": reasoning, "content": content}, pieces
        assert order == [k for k in ("reasoning", "content") if joined[k]], pieces  # thinking first, once


def test_prompt_opening_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


def tool_events(pieces):
    parser = ToolCallParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def summary(events):
    """Content, and each call's (index, name, arguments), as a client that joins deltas sees them."""
    content, calls, ids, ends = "", {}, {}, []
    for event in events:
        if isinstance(event, Text):
            content += event.text
        elif isinstance(event, CallStart):
            assert event.index not in calls, "each call starts once"
            assert event.index == len(calls), "indices count up from 0"
            calls[event.index] = [event.name, ""]
            ids[event.index] = event.id
        elif isinstance(event, CallArguments):
            assert event.index in calls and event.index not in ends, "arguments only inside their call"
            calls[event.index][1] += event.text
        elif isinstance(event, CallEnd):
            ends.append(event.index)
            assert event.arguments == calls[event.index][1]
    assert ends == sorted(calls), "every call ends, in order"
    assert len(set(ids.values())) == len(ids), "ids are distinct"
    return content, [(i, name, args) for i, (name, args) in sorted(calls.items())]


TWO_CALLS = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
             '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Rome"}}'
             "\n</tool_call>")


@pytest.mark.parametrize("text, content, calls", [
    (TWO_CALLS, "I will check both.",
     [(0, "get_weather", {"city": "Paris", "days": [1, 2]}), (1, "get_time", {"tz": "Europe/Rome"})]),
    ('<tool_call>{"name": "f", "arguments": {"s": "a } </tool_call in a string"}}</tool_call>', "",
     [(0, "f", {"s": "a } </tool_call in a string"})]),
    ('<tool_call>{"arguments": {"x": 1}, "name": "late_name"}</tool_call>', "", [(0, "late_name", {"x": 1})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', "", [(0, "f", {"x": 2})]),
    ('<tool_call>{"name": "f", "arguments": {}}', "", [(0, "f", {})]),  # no closing tag: the end closes it
    ("just text, no <tool call here", "just text, no <tool call here", []),
    ("<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
])
def test_tool_calls_split_at_every_point(text, content, calls):
    for pieces in splits(text):
        got_content, got_calls = summary(tool_events(pieces))
        assert got_content == content, pieces
        assert [(i, name, json.loads(args)) for i, name, args in got_calls] == calls, pieces


def test_arguments_stream_before_the_call_ends():
    parser = ToolCallParser()
    events = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert isinstance(events[0], CallStart) and events[0].name == "get_weather"
    assert "".join(e.text for e in events if isinstance(e, CallArguments)) == '{"city": "Par'
    # the closing brace could end the call: held back until the next piece decides
    assert [e.text for e in parser.feed('is"}') if isinstance(e, CallArguments)] == ['is"']
    assert [e.text for e in parser.feed("}\n</tool_call>") if isinstance(e, CallArguments)] == ["}"]


def test_whole_output_parse():
    parsed = parse_tool_calls(TWO_CALLS)
    assert parsed.content == "I will check both."
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    # arguments cut off mid-object are not a call: they stay in the content
    cut = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"city": "Pa')
    assert cut.tool_calls == [] and cut.content == '<tool_call>{"name": "f", "arguments": {"city": "Pa'


def test_thinking_then_two_calls_through_one_choice():
    text = "<think>Two cities.</think>\n" + TWO_CALLS
    for pieces in splits(text):
        parser, choice = OutputParser(Job([""], reasoning=True, tools=True)), Choice(0)
        for k, piece in enumerate(pieces):
            for part in parser.feed(piece, final=k == len(pieces) - 1):
                choice.add(part)
        choice.add(Finish("stop", None, tool_calls=parser.calls))
        assert choice.reasoning == "Two cities." and choice.content == "I will check both."
        assert [c["function"]["name"] for c in choice.tool_calls] == ["get_weather", "get_time"]
        assert choice.reason == "tool_calls" and parser.calls == 2


def test_parser_passes_text_through_when_nothing_is_parsed():
    parser = OutputParser(Job([""]))
    text = "<think>kept</think> <tool_call>{}</tool_call>"
    assert parser.feed(text, final=True) == [TextPart("content", text)]


def test_repl_shows_thinking_dimmed():
    import io

    from fake_engine import THINK_TOOLS_TEMPLATE, FakeEngine

    from edge_llm.commands.chat import answer_printer
    from edge_llm.commands.console import Screen

    engine = FakeEngine(template=THINK_TOOLS_TEMPLATE)
    for interactive, color, expected in [
        (True, True, Screen.DIM + "Hm" + Screen.RESET + Screen.DIM + "m." + Screen.RESET + "\nHello!"),
        (True, False, "Hmm.\nHello!"),
        (False, False, "Hello!"),  # piped: stdout holds the answers alone
    ]:
        out = io.StringIO()
        show = answer_printer(engine, Screen(interactive, color, out=out), "<|im_start|>assistant\n<think>\n")
        for piece, final in [("Hm", False), ("m.\n</thi", False), ("nk>\n\nHello!", True)]:
            show(piece, final)
        assert out.getvalue() == expected, (interactive, color)
    plain = io.StringIO()  # a template without thinking: the text as it comes
    show = answer_printer(FakeEngine(template="{{ messages }}"), Screen(True, True, out=plain), "")
    show("<think>x</think>y", True)
    assert plain.getvalue() == "<think>x</think>y"
