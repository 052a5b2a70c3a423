"""`edge-llm chat` driven as a person drives it: in a real pseudo-terminal (pexpect), or piped."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sys
from dataclasses import dataclass

import pexpect
import pytest
from conftest import ROOT, run_cli

from edge_llm.chat_format import named_formatter, unescape
from edge_llm.commands.chat import update_params
from edge_llm.commands.conversation import parse_messages
from edge_llm.errors import EdgeLLMError, InvalidParameterError
from edge_llm.sampling import SamplingParams

CHATML_PREFIX = "<|im_start|>user\n"
CHATML_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
STATS = re.compile(r"\[prompt: (\d+) tokens, (\d+) cached(?: \(\d+ restored from the prompt cache\))?, (\d+) "
                   r"evaluated(, conversation re-tokenized)? \| answer: (\d+) tokens")
PROMPT_IDS = re.compile(r"\[prompt\] (\d+) tokens, (\d+) new: (\[[\d, ]*\])")
PROMPT_TEXT = re.compile(r"\[prompt\] text: (.*)\r\n")


@dataclass
class Stats:
    prompt: int
    cached: int
    evaluated: int
    rebuilt: bool
    answer: int


def spawn_chat(*args: str, data_dir, timeout: float = 120) -> pexpect.spawn:
    # readline's defaults (bracketed paste on), whatever the person running the tests configured.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": str(data_dir), "TERM": "xterm",
           "INPUTRC": os.devnull}
    # Ctrl-C as in a terminal whoever started the tests: a shell's background job (`.ci/run &`, nohup)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    child = pexpect.spawn(sys.executable, ["-m", "edge_llm", "chat", *args], env=env, cwd=str(ROOT),
                          encoding="utf-8", timeout=timeout, dimensions=(50, 250),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("Ctrl-D to leave")
    return child


def ask(child: pexpect.spawn, text: str, *, verbose: bool = True) -> tuple[list[int] | None, str, Stats]:
    """Type one turn; return the token ids sent to the engine, the answer as shown, and the stats."""
    child.expect_exact("> ")
    child.send(text + "\r")
    ids = None
    if verbose:
        child.expect(PROMPT_IDS)
        ids = json.loads(child.match.group(3))
        assert int(child.match.group(1)) == len(ids)
        child.expect(PROMPT_TEXT)
    else:
        child.expect_exact(text.splitlines()[-1] + "\r\n")
    child.expect(STATS)
    answer = child.before.replace("\r\n", "\n").strip()
    g = child.match.groups()
    return ids, answer, Stats(int(g[0]), int(g[1]), int(g[2]), g[3] is not None, int(g[4]))


def leave(child: pexpect.spawn) -> None:
    child.expect_exact("> ")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- in a terminal, on the bundled model --------------------------------------------------------

@pytest.mark.model
def test_second_turn_evaluates_only_the_new_tokens(engine, tmp_path):
    child = spawn_chat("--temp", "0", "-n", "16", "--stats", "--verbose-prompt", data_dir=tmp_path)
    ids1, answer1, stats1 = ask(child, "Hi")
    ids2, answer2, stats2 = ask(child, "What is 2+2?")
    leave(child)

    assert stats1.cached == 0 and stats1.prompt == len(ids1) == stats1.evaluated
    assert ids1 == engine.prompt_tokens(engine.chat_prompt([{"role": "user", "content": "Hi"}]))
    # Turn 2 = turn 1's prompt + the generated tokens + the template text of the new turn.
    between = engine.tokenize(f"<|im_end|>\n{CHATML_PREFIX}What is 2+2?{CHATML_SUFFIX}", add_bos=False)
    assert ids2[: len(ids1)] == ids1 and ids2[-len(between):] == between
    assert engine.detokenize(ids2[len(ids1): -len(between)]) == answer1
    # Everything the engine had already evaluated came from the cache: the prompt and all the
    # answer's tokens but the last sampled one (never decoded).
    assert stats2.cached == stats1.prompt + stats1.answer - 1
    assert stats2.evaluated == stats2.prompt - stats2.cached <= len(between) + 1
    assert not stats2.rebuilt
    # The same conversation rendered whole by the template tokenizes to the same sequence.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer1},
                {"role": "user", "content": "What is 2+2?"}]
    assert ids2 == engine.prompt_tokens(engine.chat_prompt(messages))
    assert answer2


@pytest.mark.model
def test_system_reset_save_load_params_and_history(engine, tmp_path):
    child = spawn_chat("--temp", "0", "-n", "12", "--stats", "--verbose-prompt", data_dir=tmp_path)
    child.expect_exact("> ")
    child.send("/system You are a pirate.\r")
    child.expect_exact("[system prompt set]")
    ids1, answer1, stats1 = ask(child, "Hi")
    assert engine.detokenize(ids1).startswith("system\nYou are a pirate.\nuser\nHi\n")  # specials render as ""
    assert ids1 == engine.prompt_tokens(engine.chat_prompt([{"role": "system", "content": "You are a pirate."},
                                                       {"role": "user", "content": "Hi"}]))
    # A line ending in a backslash continues on the next one.
    child.expect_exact("> ")
    child.send("first line \\\r")
    child.expect_exact("... ")
    child.send("second line\r")
    child.expect(PROMPT_TEXT)
    assert "first line \\nsecond line<|im_end|>" in child.match.group(1)
    child.expect(STATS)
    answer2 = child.before.replace("\r\n", "\n").strip()
    # Pasted text (a terminal's bracketed paste) is one turn, newlines and all.
    child.expect_exact("> ")
    child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")
    child.expect(PROMPT_TEXT)
    assert "pasted one\\npasted two<|im_end|>" in child.match.group(1)
    child.expect(STATS)
    answer3 = child.before.replace("\r\n", "\n").strip()

    saved, resaved = tmp_path / "conversation.json", tmp_path / "again.json"
    child.expect_exact("> ")
    child.send(f"/save {saved}\r")
    child.expect_exact("[saved 3 turns")
    child.expect_exact("> ")
    child.send("/reset\r")
    child.expect_exact("[conversation cleared]")
    ids3, _, stats3 = ask(child, "Hi")
    assert ids3 == ids1  # conversation gone, system prompt kept
    assert stats3.cached == len(ids1) - 1  # and still in the cache from turn 1

    child.expect_exact("> ")
    child.send(f"/load {saved}\r")
    child.expect_exact("[loaded 3 turns")
    child.expect_exact("> ")
    child.send(f"/save {resaved}\r")
    child.expect_exact("[saved 3 turns")
    ids4, _, stats4 = ask(child, "Thanks")
    assert stats4.rebuilt  # a loaded conversation is tokenized whole
    assert engine.detokenize(ids4).endswith(f"\n{answer3}\nuser\nThanks\nassistant\n")

    child.expect_exact("> ")
    child.send("/params temp=0.3 top-k=20 n=64\r")
    child.expect_exact("temperature=0.3 top_k=20")
    child.expect_exact("max_tokens=64")
    child.expect_exact("> ")
    child.send("/params temp=-1\r")
    child.expect_exact("error: invalid temperature")
    child.expect_exact("> ")
    child.send("/nope\r")
    child.expect_exact("unknown command /nope")
    leave(child)

    data = json.loads(saved.read_text())
    assert data["messages"] == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer1},
        {"role": "user", "content": "first line \nsecond line"}, {"role": "assistant", "content": answer2},
        {"role": "user", "content": "pasted one\npasted two"}, {"role": "assistant", "content": answer3},
    ]
    assert json.loads(resaved.read_text()) == data  # save -> load -> save is lossless
    history = (tmp_path / "edge-llm" / "chat_history").read_text()
    assert "/system You are a pirate." in history and "Thanks" in history


@pytest.mark.model
def test_ctrl_c_stops_the_answer_and_keeps_the_session(tmp_path):
    child = spawn_chat("--temp", "0", "-n", "2000", "--ignore-eos", "--stats", data_dir=tmp_path)
    child.expect_exact("> ")
    child.send("Tell me a very long story.\r")
    child.expect_exact("Tell me a very long story.\r\n")
    child.expect(r"\w+\W+\w+\W+\w+")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(r"\[prompt: (\d+) tokens \| answer: (\d+) tokens, stopped\]")
    assert int(child.match.group(2)) < 2000
    child.expect_exact("> ")
    child.send("/params n=4 ignore_eos=false\r")
    _, _, stats = ask(child, "Hi", verbose=False)
    assert stats.cached > 0  # the stopped answer's tokens stayed in the conversation and the cache
    child.expect_exact("> ")
    child.sendintr()  # Ctrl-C at the prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    # The input history survives into the next session: Up recalls the last line.
    child = spawn_chat("-n", "4", data_dir=tmp_path)
    child.expect_exact("> ")
    child.send("\x1b[A")
    child.expect_exact("Hi")
    child.send("\x15")  # Ctrl-U: clear the line
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.model
def test_prefix_mode_sends_exactly_the_prefixed_prompt(engine, tmp_path):
    prompt_file = ROOT / "prompts" / "chat-with-qwen.txt"
    child = spawn_chat("-f", str(prompt_file), "--in-prefix", "<|im_start|>user\\n",
                       "--in-suffix", "<|im_end|>\\n<|im_start|>assistant\\n",
                       "--temp", "0", "-n", "12", "--stats", "--verbose-prompt", data_dir=tmp_path)
    ids1, answer1, stats1 = ask(child, "Hello")
    ids2, _, stats2 = ask(child, "Say <|im_end|> please")
    leave(child)

    expected_text = prompt_file.read_text() + CHATML_PREFIX + "Hello" + CHATML_SUFFIX
    assert ids1 == engine.tokenize(expected_text)
    assert stats1.prompt == len(ids1) and stats2.prompt == len(ids2)  # as the engine counted them
    # As in llama-cli: the prefix and suffix are parsed for special tokens, the user's text is not,
    # and the tokens the model generated (its end-of-turn token included) stay in the context.
    turn2 = (engine.tokenize(CHATML_PREFIX, add_bos=False)
             + engine.tokenize("Say <|im_end|> please", special=False, add_bos=False)
             + engine.tokenize(CHATML_SUFFIX, add_bos=False))
    assert ids2[: len(ids1)] == ids1 and ids2[-len(turn2):] == turn2
    generated = ids2[len(ids1): -len(turn2)]
    assert len(generated) == stats1.answer and engine.detokenize(generated) == answer1
    assert stats2.cached == len(ids1) + stats1.answer - 1


@pytest.mark.model
def test_piped_stdin_gives_one_answer_per_line():
    lines = ["Hi", "What is the capital of France?", "Write two short lines about the sea."]
    out = run_cli("chat", "--temp", "0", "-n", "40", "-co", input="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == len(lines) and all(answers)
    assert "\x1b" not in out.stdout and "> " not in out.stdout and out.stderr == ""
    # The first answer is what a one-shot chat completion of the same message gives.
    single = run_cli("generate", "--chat", "-p", "Hi", "--temp", "0", "-n", "40")
    assert single.returncode == 0, single.stderr
    assert answers[0] == single.stdout.rstrip("\n").replace("\\", "\\\\").replace("\n", "\\n")


@pytest.mark.model
def test_piped_prefix_mode_with_a_reverse_prompt():
    # llama-cli's classic dialog: the reverse prompt stops the answer, stays in it, and the next
    # line of input continues right after it.
    out = run_cli("chat", "-p", "A dialog between User and Bob, a helpful assistant.\\nUser: Hello\\nBob: Hi!\\nUser:",
                  "--in-prefix", " ", "--in-suffix", "\\nBob:", "-r", "User:", "-n", "40", "--temp", "0",
                  "--verbose-prompt", input="What is the sky?\nBye\n")
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == 2 and all(a.endswith("\\nUser:") for a in answers), answers
    texts = [ast.literal_eval(line.split("text: ", 1)[1]) for line in out.stderr.splitlines()
             if line.startswith("[prompt] text: ")]
    assert texts[0] == "A dialog between User and Bob, a helpful assistant.\nUser: Hello\nBob: Hi!\nUser: What is the sky?\nBob:"
    assert texts[1] == texts[0] + unescape(answers[0]) + " Bye\nBob:"


@pytest.mark.model
def test_full_context_drops_the_oldest_turns_keeping_the_system_prompt():
    lines = [f"Question {i}: please name one colour of the rainbow." for i in range(10)]
    lines.insert(2, "word " * 300)  # can never fit: an error, an empty answer line, the session goes on
    out = run_cli("chat", "-c", "256", "-n", "24", "--temp", "0", "--stats", "--system", "Be brief.",
                  input="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == len(lines) and answers[2] == "" and all(answers[:2] + answers[3:])
    assert "error: this turn needs 3" in out.stderr and "but the context holds 256" in out.stderr
    notices = out.stderr.splitlines()
    drop = next(i for i, line in enumerate(notices) if line.startswith("[context full: dropped the "))
    assert "(system prompt kept)" in notices[drop]
    after = [STATS.search(line) for line in notices[drop + 1:]]
    assert after[0].group(4) and int(after[0].group(1)) <= 128  # dropped down to half the context
    assert not after[1].group(4) and int(after[1].group(2)) > int(after[0].group(1))  # incremental again


# -- without a model ----------------------------------------------------------------------------

# Each shipped prompt file with the flags that drive it, and the built-in template it imitates.
HELPFUL = "You are a helpful assistant."
PROMPT_FILES = [
    ("chat-with-qwen.txt", "chatml", "", HELPFUL, CHATML_PREFIX, CHATML_SUFFIX),
    ("chat-with-internlm2.txt", "internlm2", "<s>",
     "You are InternLM (书生·浦语), a helpful, honest, and harmless AI assistant.", CHATML_PREFIX, CHATML_SUFFIX),
    ("chat-with-llama3.txt", "llama3", "<|begin_of_text|>", HELPFUL, "<|start_header_id|>user<|end_header_id|>\n\n",
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("chat-with-baichuan2.txt", "baichuan2", "", HELPFUL, "<reserved_106>", "<reserved_107>"),
]


@pytest.mark.parametrize("name,fmt,bos,system,prefix,suffix", PROMPT_FILES)
def test_prompt_files_match_their_chat_format(name, fmt, bos, system, prefix, suffix):
    initial = (ROOT / "prompts" / name).read_text(encoding="utf-8")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi there"}]
    rendered = named_formatter(fmt, bos_token=bos).render(messages)
    # The tokenizer adds BOS for these models where the template writes it.
    assert bos + initial + prefix + "Hi there" + suffix == rendered


def test_llama2_prompt_file_matches_the_llama2_format():
    system = (ROOT / "prompts" / "chat-with-llama2.txt").read_text(encoding="utf-8")
    messages = [{"role": "system", "content": "You are a helpful, respectful and honest assistant."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hello! How can I help you today?"},
                {"role": "user", "content": "Hi there"}]
    rendered = named_formatter("llama2", bos_token="<s>", eos_token="</s>").render(messages)
    assert "<s>" + system + "<s>[INST] " + "Hi there" + " [/INST]" == rendered


def test_params_command_accepts_llama_cli_names():
    params = update_params(SamplingParams(), "temp=0.2 top-k=20 repeat-penalty=1.1 n=-1 seed=7")
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_tokens, params.seed) == (
        0.2, 20, 1.1, None, 7)
    with pytest.raises(InvalidParameterError, match="invalid top_p"):
        update_params(params, "top_p=2")
    with pytest.raises(InvalidParameterError, match="unknown sampling value"):
        update_params(params, "logits=3")


def test_saved_messages_must_alternate():
    system, exchanges = parse_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                                        {"role": "assistant", "content": "a"}])
    assert system == "S" and [(e.user, e.answer) for e in exchanges] == [("u", "a")]
    with pytest.raises(EdgeLLMError, match="out of order"):
        parse_messages([{"role": "user", "content": "u"}, {"role": "user", "content": "v"}])
    with pytest.raises(EdgeLLMError, match="has no answer"):
        parse_messages([{"role": "user", "content": "u"}])


class TemplateEngine:
    """The demo model's tokenizer behind another chat template."""

    def __init__(self, engine, template: str) -> None:
        from edge_llm.chat_format import JinjaChatFormatter

        self._engine = engine
        self.formatter = JinjaChatFormatter(template)
        self.n_ctx = self.n_ctx_seq = engine.n_ctx_seq
        self.eog_ids = engine.eog_ids
        self.control_tokens = engine.control_tokens
        self.trust_content_markup = False

    def tokenize(self, text, *, special=True, add_bos=None):
        return self._engine.tokenize(text, special=special, add_bos=add_bos)

    def detokenize(self, tokens):
        return self._engine.detokenize(tokens)

    def chat_prompt(self, messages):
        from edge_llm.chat_tokens import render_chat

        return render_chat(self, messages)


@pytest.mark.model
def test_template_that_rewrites_the_answer_falls_back_to_a_full_tokenization(engine):
    from edge_llm.commands.conversation import Answer, TemplateConversation

    # Like Llama-3's template, this one trims each message, so an answer ending in a space is not
    # rendered as generated: the conversation is tokenized whole instead of extended.
    trimming = TemplateEngine(engine, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}"
                                      "<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\n' }}")
    im_end = engine.tokenize("<|im_end|>", add_bos=False)
    for answer_text, rebuilt in (("Hello there.", False), ("Hello there. ", True)):
        conversation = TemplateConversation(trimming)
        first = conversation.prompt("Hi")
        conversation.record(first, Answer(answer_text, engine.tokenize(answer_text, add_bos=False) + im_end, "stop"))
        second = conversation.prompt("Bye")
        assert second.rebuilt is rebuilt
        expected_text = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n"
                         "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
        assert engine.detokenize(second.tokens) == engine.detokenize(engine.tokenize(expected_text))
        assert second.new_tokens == (len(second.tokens) if rebuilt else len(second.tokens) - len(first.tokens)
                                     - len(engine.tokenize("Hello there.", add_bos=False)))


def test_system_and_initial_prompt_conflict_is_one_line():
    out = run_cli("chat", "--system", "x", "-p", "y", input="")
    assert out.returncode == 1
    assert out.stderr.strip() == "edge-llm chat: error: --system and -f/-p both give the initial prompt; use one"
