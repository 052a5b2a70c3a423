"""Server parts that need no model: tool-call parsing, grammar bounds, flags, API-key checks."""

from __future__ import annotations

import json
import re

import pytest

from edge_llm import json_schema_grammar
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.load_options import parse_size
from edge_llm.server import grammars
from edge_llm.server.auth import APIKeyMiddleware, read_api_keys
from edge_llm.server.serve import parse_peers
from edge_llm.server.tool_calls import parse_tool_calls


def test_tool_calls_are_parsed_from_hermes_tags():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parsed = parse_tool_calls(text)
    assert parsed.content == "Let me check."
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parsed.tool_calls[0]["id"] != parsed.tool_calls[1]["id"]


def test_text_without_a_well_formed_call_stays_content():
    assert parse_tool_calls("just text").tool_calls == []
    broken = "<tool_call>{not json</tool_call>"
    parsed = parse_tool_calls(broken)
    assert parsed.tool_calls == [] and parsed.content == broken
    # an unterminated call cut off by max_tokens still counts if its JSON is whole
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{}"}').tool_calls[0]["function"]["arguments"] == "{}"


def test_grammars_for_schemas_and_tools():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert "root ::=" in grammars.json_schema_grammar(schema)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    gbnf = grammars.tool_call_grammar([tool])
    assert 'root ::= "<tool_call>"' in gbnf and '"\\"f\\""' in gbnf


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 10**9},
    {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
    {"type": "string", "pattern": "^a{1000000}$"},
    "not an object",
])
def test_schemas_whose_grammar_would_explode_are_refused(schema):
    with pytest.raises(InvalidParameterError):
        grammars.json_schema_grammar(schema)


def test_sizes_and_peers():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")
    assert parse_peers(["qwen=http://10.0.0.2:8080/"]) == {"qwen": "http://10.0.0.2:8080"}
    with pytest.raises(EdgeLLMError):
        parse_peers(["qwen:10.0.0.2"])


def test_api_key_check(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\none\n\ntwo\n")
    middleware = APIKeyMiddleware(app=None, keys=read_api_keys(str(keys)))
    assert middleware.allowed(b"Bearer one") and middleware.allowed(b"bearer two")
    assert not middleware.allowed(b"Bearer three") and not middleware.allowed(b"one") and not middleware.allowed(b"")
    assert not middleware.allowed(b"Basic one")


# -- grammar bounds on the converter's parsed structure (the text of a pattern can hide its counts) ----


@pytest.mark.parametrize("pattern", ["^a{ 300 }$", "^(ab){257,}$", "^a{0,30000000}$", "^a{2," + "9" * 1000 + "}$"])
def test_regex_repeat_counts_are_bounded(pattern):
    with pytest.raises(InvalidParameterError, match="limit of 256"):
        grammars.json_schema_grammar({"type": "string", "pattern": pattern})


# Spellings int() would read as a count (a sign, an underscore, other scripts' digits) are not an
# ECMA quantifier: refused as malformed rather than read as a count.
@pytest.mark.parametrize("pattern", ["^a{0,+30000000}$", "^a{1_00000}$", "^a{\u0663\u0660\u0660}$", "^a{,5}$"])
def test_regex_quantifiers_that_are_not_ascii_digits_are_refused(pattern):
    with pytest.raises(InvalidParameterError, match="malformed"):
        grammars.json_schema_grammar({"type": "string", "pattern": pattern})


def test_bounded_repeats_still_work():
    assert "root ::=" in grammars.json_schema_grammar({"type": "string", "pattern": "^[a-z]{2,256}$"})
    assert "root ::=" in grammars.json_schema_grammar({"type": "array", "items": {"type": "integer"},
                                                       "maxItems": 256})


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "integer"}, "maxItems": True},
    {"type": "string", "maxLength": 1e3},
    {"type": "string", "minLength": "300"},
])
def test_non_integer_counts_are_refused(schema):
    with pytest.raises(InvalidParameterError):
        grammars.json_schema_grammar(schema)


def test_grammar_size_is_bounded_while_it_is_built():
    # 1,500 alternatives of 256 any-characters: a 36 KB schema whose grammar would be ~2 MB. It must
    # be refused once the rules built so far pass the limit, not after the whole grammar exists.
    import tracemalloc

    schema = {"anyOf": [{"pattern": "^.{256}$"}] * 1500}
    tracemalloc.start()
    try:
        with pytest.raises(InvalidParameterError, match="too large"):
            grammars.json_schema_grammar(schema)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * json_schema_grammar.MAX_GRAMMAR_SIZE, peak


def test_tool_parameters_with_defs_work_as_in_response_format():
    parameters = {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
                  "$defs": {"City": {"type": "string", "enum": ["Paris", "Rome"]}}}
    assert '"\\"Paris\\""' in grammars.json_schema_grammar(parameters)
    tool = {"type": "function", "function": {"name": "weather", "parameters": parameters}}
    gbnf = grammars.tool_call_grammar([tool])
    assert '"\\"Paris\\""' in gbnf


def test_two_tools_with_the_same_def_name_keep_their_own_definitions():
    def tool(name, values):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "required": ["x"],
            "$defs": {"Item": {"type": "string", "enum": values}}}}}

    gbnf = grammars.tool_call_grammar([tool("a", ["apple"]), tool("b", ["banana"])])
    assert '"\\"apple\\""' in gbnf and '"\\"banana\\""' in gbnf


def test_a_body_that_trickles_in_too_slowly_gets_a_408(monkeypatch):
    import asyncio

    from edge_llm.server import limits

    monkeypatch.setattr(limits, "BODY_SECONDS", 0.2)
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        await asyncio.sleep(3600)  # headers came, the body never does

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"10")]}
    asyncio.run(asyncio.wait_for(limits.BodySizeLimitMiddleware(app)(scope, receive, send), 30))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]


# -- tools in the generic form (generic_tools.py) ---------------------------------------------------------


def _generic_events(text: str, step: int) -> list:
    from edge_llm.server.generic_tools import GenericToolCallParser

    parser = GenericToolCallParser()
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    return events + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_generic_calls_are_parsed_however_the_text_is_split(step):
    from edge_llm.server.tool_calls import CallArguments, CallStart, collect_events

    text = ('{"tool_calls": [{"name": "f", "arguments": {"s": "}]\\"{", "n": [1, {"a": 2}]} }, '
            '{"name": "g", "arguments": {}}]}')
    events = _generic_events(text, step)
    parsed = collect_events(events)
    assert parsed.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("f", {"s": '}]"{', "n": [1, {"a": 2}]}), ("g", {})]
    assert [e.name for e in events if isinstance(e, CallStart)] == ["f", "g"]
    streamed = "".join(e.text for e in events if isinstance(e, CallArguments) and e.index == 0)
    assert json.loads(streamed) == {"s": '}]"{', "n": [1, {"a": 2}]}


@pytest.mark.parametrize("text", ["Hello {world}", '{"tool": 1}', '{"tool_calls"', "", "  {\"tool_calls\": []}"])
def test_generic_text_that_is_not_a_call_is_content(text):
    from edge_llm.server.tool_calls import collect_events

    for step in (1, 4, 1000):
        parsed = collect_events(_generic_events(text, step))
        assert parsed.content == (text or None) and parsed.tool_calls == []


def test_a_generic_call_cut_off_is_content_as_written():
    from edge_llm.server.tool_calls import collect_events

    whole = '{"tool_calls": [{"name": "f", "arguments": {"a": 1}}, '
    text = whole + '{"name": "g", "arguments": {"b": "unfini'
    parsed = collect_events(_generic_events(text, 3))
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["f"]
    assert parsed.content == ', {"name": "g", "arguments": {"b": "unfini'


def test_generic_grammar_and_prompt():
    from edge_llm.server import generic_tools

    tools = [{"type": "function", "function": {"name": 'we"ird', "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    auto = generic_tools.grammar(tools, forced=False)
    assert 'root ::= tool-calls | text' in auto and r'"{\"name\": \"we\\\"ird\", \"arguments\": "' in auto
    assert "tool-call)*" not in generic_tools.grammar(tools, forced=True, parallel=False)
    combined = generic_tools.grammar(tools, forced=False, format_grammar=grammars.json_object_grammar())
    assert "root ::= tool-calls | format-root" in combined and re.search(r"^format-root\s+::=", combined, re.M)
    # every rule a renamed grammar defines has the prefix (llama.cpp parses it in test_server_apis.py)
    renamed = generic_tools.renamed_rules(grammars.json_schema_grammar({"type": "array", "maxItems": 3}), "f-")
    defined = set(re.findall(r"^(\S+)\s*::=", renamed, re.M))
    assert all(name.startswith("f-") for name in defined) and "f-root" in defined
    with pytest.raises(InvalidParameterError, match="tool parameters"):
        generic_tools.grammar([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string", "maxLength": 10**6}}}}}], forced=True)
    messages = generic_tools.prompt_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "?"},
         {"role": "assistant", "content": "Checking.", "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
             {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "one"}, {"role": "tool", "tool_call_id": "c2", "content": "two"},
         {"role": "user", "content": "And?"}], tools, None, None)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert messages[2]["content"] == ('Checking.\n{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, '
                                      '{"name": "g", "arguments": {}}]}')
    assert messages[3]["content"] == ('{"tool_response": {"name": "f", "content": "one"}}\n'
                                      '{"tool_response": {"name": "g", "content": "two"}}\n\nAnd?')
    # a template that refuses a system message gets the tools in the first user turn
    refusing = generic_tools.prompt_messages([{"role": "user", "content": "?"}], tools, tools,
                                             "{{ raise_exception('System role not supported') }}")
    assert [m["role"] for m in refusing] == ["user"] and refusing[0]["content"].endswith("\n\n?")
    assert "Call the tool we\"ird now" in refusing[0]["content"]
