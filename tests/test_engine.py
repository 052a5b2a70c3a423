"""The llama.cpp engine on the real bundled model (SmolLM2-135M-Instruct Q4_1)."""

import pytest

from edge_llm.engines.base import collect
from edge_llm.errors import ContextLengthError, InvalidParameterError
from edge_llm.sampling import SamplingParams

pytestmark = pytest.mark.model
GREEDY = dict(temperature=0.0)


def complete(engine, prompt, **kw):
    params = SamplingParams.create(**kw)
    return collect(engine.stream(prompt, params), params.n)


def test_greedy_is_deterministic(engine):
    a = complete(engine, "The capital of France is", max_tokens=24, **GREEDY)[0]
    b = complete(engine, "The capital of France is", max_tokens=24, **GREEDY)[0]
    assert a.text == b.text and a.token_ids == b.token_ids
    assert len(a.text.strip()) > 0
    assert a.usage.prompt_tokens == len(engine.tokenize("The capital of France is"))


def test_max_tokens_is_respected(engine):
    out = complete(engine, "Count: 1, 2, 3,", max_tokens=5, ignore_eos=True, **GREEDY)[0]
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 5 and len(out.token_ids) == 5


def test_stop_string_cuts_output_and_is_included_only_when_asked(engine):
    free = complete(engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, **GREEDY)[0].text
    assert " 5," in free, free  # the model counts; the stop below is a real mid-stream cut
    cut = complete(engine, "Count: 1, 2, 3,", max_tokens=20, stop=[" 5,"], **GREEDY)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(" 5,")]
    kept = complete(engine, "Count: 1, 2, 3,", max_tokens=20, stop=[" 5,"], include_stop_str_in_output=True,
                    **GREEDY)[0]
    assert kept.text == free[: free.index(" 5,") + 3]


def test_stop_token_ids(engine):
    free = complete(engine, "Count: 1, 2, 3,", max_tokens=10, ignore_eos=True, **GREEDY)[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    out = complete(engine, "Count: 1, 2, 3,", max_tokens=10, stop_token_ids=[stop_id], **GREEDY)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]


def test_chinese_streams_without_broken_characters(engine):
    # SmolLM2-135M knows little Chinese, but continues a Chinese text in Chinese.
    prompt = "床前明月光，疑是地上霜。举头望明月，"
    pieces = []
    # 30 tokens end in the middle of a character: the cut-off bytes must not show up as U+FFFD.
    tokens = []
    for delta in engine.stream(prompt, SamplingParams.create(max_tokens=30, **GREEDY)):
        tokens += delta.token_ids
        pieces.append(delta.text)
        assert "\ufffd" not in delta.text
    text = "".join(pieces)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    # Each piece is whole characters: encoding the pieces one by one equals the whole.
    assert b"".join(p.encode() for p in pieces) == text.encode()
    raw = engine.detokenize_bytes(tokens)
    assert raw.startswith(text.encode()) and len(raw) > len(text.encode())  # the cut character


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    kw = dict(max_tokens=24, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0)
    a = complete(engine, "Once upon a time", seed=7, **kw)[0].text
    b = complete(engine, "Once upon a time", seed=7, **kw)[0].text
    others = {complete(engine, "Once upon a time", seed=s, **kw)[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_n_choices(engine):
    outs = complete(engine, "My favourite colour is", n=2, max_tokens=12, temperature=1.0, seed=3, top_k=-1,
                    min_p=0.0)
    assert [o.finish_reason is not None for o in outs] == [True, True]
    assert outs[0].text != outs[1].text
    greedy = complete(engine, "My favourite colour is", n=2, max_tokens=12, **GREEDY)
    assert greedy[0].text == greedy[1].text == complete(engine, "My favourite colour is", max_tokens=12,
                                                           **GREEDY)[0].text


def test_logprobs(engine):
    out = complete(engine, "The capital of France is", max_tokens=4, logprobs=3, **GREEDY)[0]
    assert len(out.logprobs) == 4
    for lp, token in zip(out.logprobs, out.token_ids, strict=False):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-4)  # greedy picks the top token


def test_tokenize_round_trip(engine):
    text = "Hello, world! 你好，世界 🙂 def f(x): return x**2"
    tokens = engine.tokenize(text, special=False)
    assert engine.detokenize(tokens) == text


def test_gguf_chat_template_renders_conversation(engine):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert engine.chat_prompt(messages) == expected
    with_system = engine.chat_prompt([{"role": "system", "content": "Be terse."}, messages[0]])
    assert with_system == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n")
    # Special tokens in the rendered prompt become single special token ids.
    ids = engine.tokenize(expected)
    assert ids.count(engine.tokenize("<|im_start|>", special=True)[0]) == 5


def test_chat_answer_ends_at_end_of_turn(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "Say hello."}])
    out = complete(engine, prompt, max_tokens=200, **GREEDY)[0]
    assert out.finish_reason == "stop"
    assert "<|im_end|>" not in out.text


def test_invalid_inputs(engine):
    with pytest.raises(ContextLengthError):
        complete(engine, "word " * 2000, max_tokens=4)
    with pytest.raises(InvalidParameterError, match="out of range"):
        complete(engine, [1, 2, 10**7], max_tokens=4)
    with pytest.raises(InvalidParameterError, match="empty"):
        complete(engine, [], max_tokens=4)
    with pytest.raises(InvalidParameterError, match="exceeds the 4 parallel slots"):
        complete(engine, "hi", n=5)


def test_embeddings_are_normalized_and_meaningful(engine):
    a, b, c = engine.embed(["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell."])
    assert len(a) == 576
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3
    dot = lambda u, v: sum(x * y for x, y in zip(u, v, strict=False))  # noqa: E731
    assert dot(a, b) > dot(a, c)


def test_grammar_constrains_the_output(engine):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    for seed in (1, 2):
        out = complete(engine, "Is the sky blue?", max_tokens=16, temperature=1.0, seed=seed, grammar=grammar)[0]
        assert out.text in ("The answer is yes.", "The answer is no."), out.text
        assert out.finish_reason == "stop"


def test_repetition_penalty_changes_greedy_output(engine):
    plain = complete(engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, **GREEDY)[0].text
    penalized = complete(engine, "Count: 1, 2, 3,", max_tokens=20, ignore_eos=True, repetition_penalty=1.5,
                         **GREEDY)[0].text
    assert plain != penalized


def test_embedding_an_empty_input_is_refused(engine):
    with pytest.raises(InvalidParameterError, match="empty"):
        engine.embed([""])
