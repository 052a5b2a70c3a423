"""The transformers engine against independent references: transformers' own generate() on
the same checkpoint, llama.cpp on an f32 GGUF of the same weights, the tokenizer's own chat
template; and the parameters it must refuse rather than ignore."""

import json

import pytest

from edge_llm.engines.base import collect
from edge_llm.errors import EdgeLLMError, InvalidParameterError, ModelLoadError
from edge_llm.sampling import SamplingParams

pytestmark = [pytest.mark.model, pytest.mark.slow]
torch = pytest.importorskip("torch", reason="the transformers engine needs the `hf` extra (torch)")
transformers = pytest.importorskip("transformers", reason="the transformers engine needs the `hf` extra")

GREEDY = dict(temperature=0.0)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "床前明月光，"]


def complete(engine, prompt, **kw):
    params = SamplingParams.create(**kw)
    return collect(engine.stream(prompt, params), params.n)


def reference_greedy(model, tokens, n):
    """transformers' own greedy generate() on the same weights."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(tokens):].tolist()


@pytest.fixture(scope="module")
def tiny_engine(tiny_hf_dir):
    from edge_llm.api import load

    eng = load(str(tiny_hf_dir), engine="transformers", n_ctx=256)
    yield eng
    eng.close()


def test_greedy_equals_transformers_generate_on_smollm2(hf_engine):
    for prompt in PROMPTS:
        tokens = hf_engine.tokenize(prompt)
        ours = complete(hf_engine, prompt, max_tokens=16, ignore_eos=True, **GREEDY)[0].token_ids
        assert ours == reference_greedy(hf_engine.model, tokens, 16), prompt


def test_greedy_equals_transformers_generate_on_tiny_random_model(tiny_engine):
    # Random weights give flat, arbitrary distributions: a strict test of the decode loop and cache.
    tokens = tiny_engine.tokenize("Hello there, how are you")
    ours = complete(tiny_engine, tokens, max_tokens=40, ignore_eos=True, **GREEDY)[0].token_ids
    assert ours == reference_greedy(tiny_engine.model, tokens, 40)


def test_greedy_equals_llamacpp_on_the_f32_gguf_of_the_same_weights(hf_engine, smollm2_hf_dir, tmp_path):
    convert = pytest.importorskip("edge_llm.convert", reason="needs the HF -> GGUF converter (branch `convert`)")
    from edge_llm.api import load

    f32 = tmp_path / "smollm2-f32.gguf"
    convert.convert(smollm2_hf_dir, f32, outtype="f32")
    llama = load(str(f32), n_ctx=1024, n_parallel=1)
    try:
        for prompt in PROMPTS:
            ours = complete(hf_engine, prompt, max_tokens=16, ignore_eos=True, **GREEDY)[0]
            theirs = complete(llama, prompt, max_tokens=16, ignore_eos=True, **GREEDY)[0]
            assert hf_engine.tokenize(prompt) == llama.tokenize(prompt)
            # Same weights, different kernels: the first tokens must agree exactly.
            assert ours.token_ids[:8] == theirs.token_ids[:8], prompt
    finally:
        llama.close()


def test_logprobs_equal_transformers_scores(tiny_engine):
    tokens = tiny_engine.tokenize("Hello there")
    out = complete(tiny_engine, tokens, max_tokens=3, logprobs=2, ignore_eos=True, **GREEDY)[0]
    with torch.inference_mode():
        logits = tiny_engine.model(torch.tensor([tokens])).logits[0, -1].double()
    expected = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert first.token_id == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [round(v, 5) for _, v in first.top] == [round(float(v), 5) for v in expected.topk(2).values]


def test_top_k_one_is_greedy_and_seeds_reproduce(tiny_engine):
    prompt = "Once upon a time"
    greedy = complete(tiny_engine, prompt, max_tokens=20, ignore_eos=True, **GREEDY)[0].token_ids
    top1 = complete(tiny_engine, prompt, max_tokens=20, ignore_eos=True, temperature=1.5, top_k=1, seed=1)[0]
    assert top1.token_ids == greedy
    kw = dict(max_tokens=20, ignore_eos=True, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0)
    a = complete(tiny_engine, prompt, seed=11, **kw)[0].token_ids
    assert a == complete(tiny_engine, prompt, seed=11, **kw)[0].token_ids
    assert a != complete(tiny_engine, prompt, seed=12, **kw)[0].token_ids
    # n choices from one seed are choice i = seed + i, as on llama.cpp.
    both = complete(tiny_engine, prompt, n=2, seed=11, **kw)
    assert both[0].token_ids == a
    assert both[1].token_ids == complete(tiny_engine, prompt, seed=12, **kw)[0].token_ids


def test_repetition_penalty_changes_greedy_output(tiny_engine):
    prompt = "la la la la la la"
    plain = complete(tiny_engine, prompt, max_tokens=30, ignore_eos=True, **GREEDY)[0].token_ids
    penalized = complete(tiny_engine, prompt, max_tokens=30, ignore_eos=True, repetition_penalty=5.0,
                         penalty_last_n=-1, **GREEDY)[0].token_ids
    assert penalized != plain
    # A huge presence penalty forbids repeating any generated token.
    fresh = complete(tiny_engine, prompt, max_tokens=30, ignore_eos=True, presence_penalty=2.0,
                     frequency_penalty=2.0, **GREEDY)[0].token_ids
    assert fresh != plain


def test_context_limit_finishes_with_length(tiny_engine):
    tokens = tiny_engine.tokenize("word " * 240)
    out = complete(tiny_engine, tokens, max_tokens=100, ignore_eos=True, **GREEDY)[0]
    assert out.finish_reason == "length"
    assert len(tokens) + out.usage.completion_tokens == tiny_engine.n_ctx


def test_chat_prompt_equals_tokenizer_apply_chat_template(hf_engine):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = hf_engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf_engine.chat_prompt(messages).text == expected


def test_embeddings_agree_with_llamacpp(hf_engine, engine):
    texts = ["The cat sat on the mat.", "Stock prices fell sharply on Monday."]
    for ours, theirs in zip(hf_engine.embed(texts), engine.embed(texts), strict=True):
        cosine = sum(a * b for a, b in zip(ours, theirs, strict=True))
        # Same pooling over the same (Q4_1-dequantized) weights.
        assert cosine > 0.95


def test_refuses_what_it_cannot_honour(tiny_engine, tiny_hf_dir, tmp_path):
    from edge_llm.api import load

    with pytest.raises(InvalidParameterError, match="grammar"):
        complete(tiny_engine, "hi", max_tokens=4, grammar='root ::= "yes"')
    with pytest.raises(InvalidParameterError, match="ctk"):
        load(str(tiny_hf_dir), engine="transformers", cache_type_k="q8_0")
    with pytest.raises(InvalidParameterError, match="ngl 1"):
        load(str(tiny_hf_dir), engine="transformers", n_gpu_layers=1)
    with pytest.raises(InvalidParameterError, match="tp"):
        load(str(tiny_hf_dir), engine="transformers", tensor_parallel_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="no CUDA"):
            load(str(tiny_hf_dir), engine="transformers", n_gpu_layers=-1)


def test_refuses_remote_code_and_gguf(demo_path, tmp_path):
    from edge_llm.api import load

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm",
                                                    "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMModel"}}))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load(str(folder), engine="transformers")
    with pytest.raises(EdgeLLMError, match="GGUF"):
        load(str(demo_path), engine="transformers")
