"""The engine-level suite, run on every engine that can load SmolLM2-135M-Instruct here:
llama.cpp on the bundled Q4_1 GGUF, and transformers on the same weights rebuilt as a float32
HF checkpoint. Checks that only make sense for one engine live at the end of this file
(llama.cpp) and in test_engine_transformers.py."""

import os
import subprocess
import sys

import pytest

from edge_llm.engines.base import collect
from edge_llm.errors import ContextLengthError, InvalidParameterError
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.model
GREEDY = dict(temperature=0.0)


@pytest.fixture(params=["llama.cpp", "transformers"], scope="module")
def any_engine(request):
    fixture = {"llama.cpp": "engine", "transformers": "hf_engine"}[request.param]
    return request.getfixturevalue(fixture)


def complete(engine, prompt, **kw):
    params = SamplingParams.create(**kw)
    return collect(engine.stream(prompt, params), params.n)


def test_greedy_is_deterministic(any_engine):
    a = complete(any_engine, "The capital of France is", max_tokens=24, **GREEDY)[0]
    b = complete(any_engine, "The capital of France is", max_tokens=24, **GREEDY)[0]
    assert a.text == b.text and a.token_ids == b.token_ids
    assert len(a.text.strip()) > 0
    assert a.usage.prompt_tokens == len(any_engine.tokenize("The capital of France is"))


def test_max_tokens_is_respected(any_engine):
    out = complete(any_engine, "Count: 1, 2, 3,", max_tokens=5, ignore_eos=True, **GREEDY)[0]
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 5 and len(out.token_ids) == 5


def test_stop_string_cuts_output_and_is_included_only_when_asked(any_engine):
    free = complete(any_engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, **GREEDY)[0].text
    assert " 5," in free, free  # the model counts; the stop below is a real mid-stream cut
    cut = complete(any_engine, "Count: 1, 2, 3,", max_tokens=20, stop=[" 5,"], **GREEDY)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(" 5,")]
    kept = complete(any_engine, "Count: 1, 2, 3,", max_tokens=20, stop=[" 5,"], include_stop_str_in_output=True,
                    **GREEDY)[0]
    assert kept.text == free[: free.index(" 5,") + 3]


def test_stop_token_ids(any_engine):
    free = complete(any_engine, "Count: 1, 2, 3,", max_tokens=10, ignore_eos=True, **GREEDY)[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    out = complete(any_engine, "Count: 1, 2, 3,", max_tokens=10, stop_token_ids=[stop_id], **GREEDY)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]


def test_chinese_streams_without_broken_characters(any_engine):
    # SmolLM2-135M knows little Chinese, but continues a Chinese text in Chinese.
    prompt = "床前明月光，疑是地上霜。举头望明月，"
    # A token limit that ends in the middle of a character: 30 tokens on the Q4_1 GGUF; the
    # float weights write other text, so there the first such limit is looked up.
    free = complete(any_engine, prompt, max_tokens=40, ignore_eos=True, **GREEDY)[0].token_ids
    limit = next(k for k in [30, *range(1, 41)] if not _is_utf8(any_engine.detokenize_bytes(free[:k])))
    pieces = []
    # The cut-off bytes must not show up as U+FFFD.
    tokens = []
    for delta in any_engine.stream(prompt, SamplingParams.create(max_tokens=limit, ignore_eos=True, **GREEDY)):
        tokens += delta.token_ids
        pieces.append(delta.text)
        assert "\ufffd" not in delta.text
    text = "".join(pieces)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    # Each piece is whole characters: encoding the pieces one by one equals the whole.
    assert b"".join(p.encode() for p in pieces) == text.encode()
    raw = any_engine.detokenize_bytes(tokens)
    assert raw.startswith(text.encode()) and len(raw) > len(text.encode())  # the cut character


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_seeded_sampling_is_reproducible_and_seeds_differ(any_engine):
    kw = dict(max_tokens=24, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0)
    a = complete(any_engine, "Once upon a time", seed=7, **kw)[0].text
    b = complete(any_engine, "Once upon a time", seed=7, **kw)[0].text
    others = {complete(any_engine, "Once upon a time", seed=s, **kw)[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_n_choices(any_engine):
    outs = complete(any_engine, "My favourite colour is", n=2, max_tokens=12, temperature=1.0, seed=3, top_k=-1,
                    min_p=0.0)
    assert [o.finish_reason is not None for o in outs] == [True, True]
    assert outs[0].text != outs[1].text
    greedy = complete(any_engine, "My favourite colour is", n=2, max_tokens=12, **GREEDY)
    assert greedy[0].text == greedy[1].text == complete(any_engine, "My favourite colour is", max_tokens=12,
                                                           **GREEDY)[0].text


def test_logprobs(any_engine):
    out = complete(any_engine, "The capital of France is", max_tokens=4, logprobs=3, **GREEDY)[0]
    assert len(out.logprobs) == 4
    for lp, token in zip(out.logprobs, out.token_ids, strict=False):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-4)  # greedy picks the top token


def test_tokenize_round_trip(any_engine):
    text = "Hello, world! 你好，世界 🙂 def f(x): return x**2"
    tokens = any_engine.tokenize(text, special=False)
    assert any_engine.detokenize(tokens) == text


def test_gguf_chat_template_renders_conversation(any_engine):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert any_engine.chat_prompt(messages).text == expected
    with_system = any_engine.chat_prompt([{"role": "system", "content": "Be terse."}, messages[0]]).text
    assert with_system == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n")
    # Special tokens in the rendered prompt become single special token ids.
    ids = any_engine.tokenize(expected)
    assert ids.count(any_engine.tokenize("<|im_start|>", special=True)[0]) == 5


def test_chat_answer_ends_at_end_of_turn(any_engine):
    prompt = any_engine.chat_prompt([{"role": "user", "content": "Say hello."}])
    out = complete(any_engine, prompt, max_tokens=200, **GREEDY)[0]
    assert out.finish_reason == "stop"
    assert "<|im_end|>" not in out.text


def test_invalid_inputs(any_engine):
    with pytest.raises(ContextLengthError):
        complete(any_engine, "word " * 2000, max_tokens=4)
    with pytest.raises(InvalidParameterError, match="out of range"):
        complete(any_engine, [1, 2, 10**7], max_tokens=4)
    with pytest.raises(InvalidParameterError, match="out of range") as stop_id_error:
        complete(any_engine, "Hi", max_tokens=4, stop_token_ids=[10**7])
    assert stop_id_error.value.param == "stop_token_ids"
    with pytest.raises(InvalidParameterError, match="empty"):
        complete(any_engine, [], max_tokens=4)


def test_usage_and_finish_reason_on_the_last_delta_of_each_choice(any_engine):
    deltas = list(any_engine.stream("Count: 1, 2, 3,", SamplingParams.create(n=2, max_tokens=6, ignore_eos=True,
                                                                          temperature=1.0, seed=5)))
    for index in (0, 1):
        own = [d for d in deltas if d.index == index]
        assert [d.finish_reason for d in own[:-1]] == [None] * (len(own) - 1)
        assert own[-1].finish_reason == "length"
        assert own[-1].usage.completion_tokens == 6 == sum(len(d.token_ids) for d in own)
        assert own[-1].usage.prompt_tokens == len(any_engine.tokenize("Count: 1, 2, 3,"))


def test_async_generate_matches_stream_and_closing_it_cancels(any_engine):
    import asyncio

    from edge_llm.engines.base import collect_async

    params = SamplingParams.create(max_tokens=12, **GREEDY)
    expected = complete(any_engine, "The capital of France is", max_tokens=12, **GREEDY)[0]

    async def run():
        whole = (await collect_async(any_engine.generate("The capital of France is", params)))[0]
        stream = any_engine.generate("Once upon a time", SamplingParams.create(max_tokens=5000, ignore_eos=True))
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # a client that goes away
        return whole, got

    whole, got = asyncio.run(run())
    assert whole.text == expected.text and whole.token_ids == expected.token_ids
    assert len(got) == 3
    # The cancelled request does not hold the engine: the next one runs to completion.
    again = complete(any_engine, "The capital of France is", max_tokens=12, **GREEDY)[0]
    assert again.token_ids == expected.token_ids


def test_embeddings_are_normalized_and_meaningful(any_engine):
    a, b, c = any_engine.embed(["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell."])
    assert len(a) == 576
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3
    dot = lambda u, v: sum(x * y for x, y in zip(u, v, strict=False))  # noqa: E731
    assert dot(a, b) > dot(a, c)


def test_repetition_penalty_changes_greedy_output(any_engine):
    plain = complete(any_engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, **GREEDY)[0].text
    penalized = complete(any_engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, repetition_penalty=1.5,
                         **GREEDY)[0].text
    assert plain != penalized


def test_embedding_an_empty_input_is_refused(any_engine):
    with pytest.raises(InvalidParameterError, match="empty"):
        any_engine.embed([""])


# -- llama.cpp only --------------------------------------------------------------------------------


def test_grammar_constrains_the_output(engine):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    for seed in (1, 2):
        out = complete(engine, "Is the sky blue?", max_tokens=16, temperature=1.0, seed=seed, grammar=grammar)[0]
        assert out.text in ("The answer is yes.", "The answer is no."), out.text
        assert out.finish_reason == "stop"


def test_n_beyond_parallel_slots_is_refused(engine):
    with pytest.raises(InvalidParameterError, match="exceeds the 4 parallel slots"):
        complete(engine, "hi", n=5)


QUIET_RUN = """
import sys
from edge_llm.api import generate, load
engine = load(None, n_ctx=512, n_parallel=2, verbose=sys.argv[1] == "verbose")
generate(engine, "Hello", max_tokens=2)
engine.embed(["a cat"])
engine.chat_prompt([{"role": "user", "content": "Hi"}])
engine.close()
"""


@pytest.mark.model
def test_llama_cpp_is_silent_unless_verbose():
    """llama-cpp-python read ggml's log levels by an older enum: the first embedding request printed
    llama.cpp's pooling-type warning in quiet mode."""
    from conftest import ROOT

    def stderr_of(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", QUIET_RUN, mode], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert stderr_of("quiet") == ""
    assert "pooling_type" in stderr_of("verbose")


PYTHON_API_RUN = """
import edge_llm
import edge_llm.cli, edge_llm.commands.generate, edge_llm.commands.chat  # the CLI loaded in the same process
engine = edge_llm.load(n_ctx=512, n_parallel=1)
text = edge_llm.generate(engine, "The capital of France is", max_tokens=4, temperature=0)
pieces = list(edge_llm.stream_generate(engine, "The capital of France is", max_tokens=4, temperature=0))
assert isinstance(text, str) and text and "".join(pieces) == text, (text, pieces)
engine.close()
print("ok")
"""


@pytest.mark.model
def test_readme_python_api_with_the_cli_imported():
    """The Python API example of docs/commands.md: `edge_llm.generate` stays the function even once the CLI's
    modules are imported (a submodule named `generate` used to replace it on the package)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PYTHON_API_RUN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
