"""The chat REPL's session logic (turns, the conversation kept as tokens, the context limit,
commands, the stats line) on a FakeEngine: no model, so it runs in a second. The REPL in a real
terminal on the bundled model is tests/test_repl.py."""

from __future__ import annotations

import io
import json

import pytest
from fake_engine import EOG, FakeEngine

from edge_llm.commands.chat import ChatSession, ReplSettings
from edge_llm.commands.console import Screen
from edge_llm.commands.conversation import PrefixConversation, TemplateConversation
from edge_llm.sampling import SamplingParams

ANSWER = "Hi there, 世界."


def session(engine: FakeEngine, conversation=None, **settings) -> tuple[ChatSession, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    settings = {"interactive": False, "color": False, "stats": True, "verbose_prompt": False,
                "continue_first": False, **settings}
    chat = ChatSession(engine, conversation or TemplateConversation(engine), SamplingParams(max_tokens=64),
                       ReplSettings(**settings), Screen(False, False, out=out, err=err))
    return chat, out, err


@pytest.fixture()
def engine():
    eng = FakeEngine(ANSWER, n_ctx=1024, n_parallel=4)
    yield eng
    eng.close()


def test_turns_extend_the_conversation_by_tokens(engine):
    chat, out, err = session(engine)
    first = chat.turn("Hello")
    assert first.text == ANSWER and first.finish_reason == "stop"
    second = chat.turn("Again")
    assert second.text == ANSWER
    # the second prompt starts with the first one and the answer's tokens, end-of-generation token included
    assert engine.prompts[1][:len(engine.prompts[0])] == engine.prompts[0]
    assert engine.prompts[1][len(engine.prompts[0]):][:len(first.token_ids)] == first.token_ids
    assert first.token_ids[-1] == EOG
    assert out.getvalue() == f"{ANSWER}\n{ANSWER}\n"  # piped: one answer a line
    stats = [line for line in err.getvalue().splitlines() if line.startswith("[prompt:")]
    assert len(stats) == 2 and f"answer: {len(first.token_ids)} tokens" in stats[0]
    assert f"[prompt: {len(engine.prompts[1])} tokens" in stats[1]


def test_a_full_context_drops_the_oldest_turns(engine):
    chat, _, err = session(engine)
    for i in range(12):  # each turn ~60 tokens; a request holds 256
        assert chat.turn(f"Turn {i}: " + "x" * 20).text == ANSWER
    assert "[context full: dropped the " in err.getvalue()
    assert max(len(p) for p in engine.prompts) < engine.n_ctx_seq
    assert 0 < len(chat.conversation.exchanges) < 12


def test_commands_save_load_params_and_errors(engine, tmp_path):
    chat, _, err = session(engine)
    chat.turn("Hello")
    target = tmp_path / "chat.json"
    assert chat.command(f"/save {target}")
    saved = json.loads(target.read_text())
    assert saved["model"] == "fake" and any(m.get("content") == ANSWER for m in saved["messages"])
    assert chat.command("/reset") and chat.conversation.exchanges == []
    assert chat.command(f"/load {target}") and len(chat.conversation.exchanges) == 1
    assert f"[saved 1 turn to {target}]" in err.getvalue() and f"[loaded 1 turn from {target}]" in err.getvalue()
    assert chat.command("/params max_tokens=3") and chat.params.max_tokens == 3
    assert chat.turn("Short").text == ANSWER[:3]
    assert chat.command("/nothing") and "unknown command /nothing" in err.getvalue()
    assert not chat.command("/exit")


def test_prefix_mode_and_reverse_prompt(engine):
    engine.answer = "Sure.\nUser: more"
    conversation = PrefixConversation(engine, system="A chat.\n", in_prefix="User: ", in_suffix="\nBot: ")
    chat, out, _ = session(engine, conversation, reverse_prompts=("User:",))
    answer = chat.turn("Hi")
    assert answer.text == "Sure.\nUser:" and answer.finish_reason == "stop"  # the reverse prompt is kept
    assert engine.detokenize(engine.prompts[0]) == "A chat.\nUser: Hi\nBot: "
