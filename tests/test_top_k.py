"""top_k.py: the k best logits found without a record per vocabulary entry, and the sampler that
uses them draws exactly the tokens llama.cpp's own chain draws (same seed, same logits)."""

import ctypes

import numpy as np
import pytest

from edge_llm.engines import llama_runtime as rt
from edge_llm.engines.llama_runtime import llama_cpp
from edge_llm.engines.top_k import TOKEN_DATA, Bias, TopKFirst, block_size, top_candidates, usable
from edge_llm.sampling import SamplingParams


def brute_force(logits, k, bias=None):
    values = logits.astype(np.float32).copy()
    for token, b in (bias or {}).items():
        values[token] += np.float32(b)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    return np.array(order), values[order]


@pytest.mark.parametrize("n_vocab", [49152, 151936, 262144, 32000 + 7])
@pytest.mark.parametrize("k", [1, 40, 128])
def test_the_k_best_are_found_as_a_full_sort_finds_them(n_vocab, k):
    rng = np.random.default_rng(n_vocab + k)
    for shape in ("normal", "clustered", "flat"):
        logits = rng.normal(size=n_vocab).astype(np.float32) * 3
        if shape == "clustered":  # the best tokens next to each other, in a few blocks
            logits[1000:1400] += 12
        if shape == "flat":  # many exact ties, as a quantized head can give
            logits = np.round(logits).astype(np.float32)
        ids, values = top_candidates(logits, k, block_size(k, n_vocab))
        want_ids, want_values = brute_force(logits, k)
        assert ids.tolist() == want_ids.tolist()
        assert values.tolist() == want_values.tolist()


def test_logit_bias_and_banned_tokens():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=262144).astype(np.float32)
    best = int(logits.argmax())
    bias = {best: float("-inf"), 7: 50.0, 99: -0.5, int(np.argsort(logits)[-3]): 1.0}
    ids, values = top_candidates(logits, 40, block_size(40, len(logits)), Bias(bias, len(logits)))
    assert best not in ids.tolist() and ids[0] == 7
    want = {t: b for t, b in bias.items() if b != float("-inf")}
    masked = logits.copy()
    masked[best] = -np.inf
    want_ids, want_values = brute_force(masked, 40, want)
    assert ids.tolist() == want_ids.tolist()
    assert np.allclose(values, want_values)


@pytest.mark.parametrize("case", ["banned words", "the best all banned"])
def test_a_long_bias_list(case):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=151936).astype(np.float32)
    ranked = np.argsort(-logits)
    if case == "banned words":  # MAX_LOGIT_BIAS_TOKENS entries of -100, a few pushed up
        bias = {int(t): -100.0 for t in rng.choice(len(logits), 1024, replace=False)}
        bias.update({int(ranked[500]): 30.0, int(ranked[9000]): 2.5})
    else:  # every plain candidate banned: the candidates must come from the rest
        bias = {int(t): float("-inf") for t in ranked[:300]}
    ids, values = top_candidates(logits, 40, block_size(40, len(logits)), Bias(bias, len(logits)))
    masked = logits.copy()
    masked[[t for t, b in bias.items() if b == float("-inf")]] = -np.inf
    want_ids, want_values = brute_force(masked, 40, {t: b for t, b in bias.items() if b != float("-inf")})
    assert ids.tolist() == want_ids.tolist()
    assert np.allclose(values, want_values)


def test_nan_logits_fall_back_to_every_token():
    logits = np.full(65536, np.nan, dtype=np.float32)
    logits[[5, 9, 700]] = [1.0, 3.0, 2.0]
    ids, _ = top_candidates(logits, 2, block_size(2, len(logits)))
    assert ids.tolist() == [9, 700]  # a NaN is never preferred to a number


def test_only_small_k_on_large_vocabularies():
    assert usable(40, 151936) and usable(128, 262144)
    assert not usable(0, 262144) and not usable(129, 262144) and not usable(40, 49152)


def reference_chain(params, seed):
    """llama.cpp's whole chain, as rt.sampler_chain builds it for a small vocabulary."""
    sampler = rt.LlamaSampler()
    sampler.add_top_k(params.top_k)
    sampler.add_top_p(params.top_p, 1)
    sampler.add_min_p(params.min_p, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(seed)
    return sampler


def draw_with_llama_cpp(sampler, logits):
    data = np.zeros(len(logits), dtype=TOKEN_DATA)
    data["id"] = np.arange(len(logits))
    data["logit"] = logits
    array = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=len(logits), selected=-1,
        sorted=False)
    llama_cpp.llama_sampler_apply(sampler.sampler, ctypes.byref(array))
    token = int(data["id"][array.selected])
    llama_cpp.llama_sampler_accept(sampler.sampler, token)
    return token


@pytest.mark.parametrize("n_vocab", [128256, 262144])
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_the_same_seed_draws_the_same_tokens_as_llama_cpp(n_vocab, temperature):
    params = SamplingParams.create(temperature=temperature, top_k=40, top_p=0.95, min_p=0.05, seed=11)
    ours = rt.sampler_chain(params, vocab=None, n_vocab=n_vocab, eog_ids=frozenset(), penalty_last_n=0, seed=11)
    assert isinstance(ours, TopKFirst)
    theirs = reference_chain(params, 11)
    rng = np.random.default_rng(n_vocab)
    drawn, expected = [], []
    for _ in range(300):
        logits = (rng.normal(size=n_vocab) * 4).astype(np.float32)
        drawn.append(ours.sample_logits(logits))
        expected.append(draw_with_llama_cpp(theirs, logits))
    assert drawn == expected
    assert len(set(drawn)) > 50  # really sampled, not the argmax every time
    ours.close()
    theirs.close()


@pytest.mark.model
def test_the_engine_writes_the_same_text_with_either_top_k(engine, monkeypatch):
    # The bundled model's 49k vocabulary is below MIN_VOCAB; lowered, its chains take TopKFirst.
    from edge_llm.engines import top_k
    from edge_llm.engines.base import collect

    def texts():
        params = SamplingParams.create(max_tokens=48, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=5,
                                       n=2, ignore_eos=True)
        return [o.text for o in collect(engine.stream("Once upon a time", params), 2)]

    monkeypatch.setattr(top_k, "MIN_VOCAB", 10**9)
    with_llama_cpp = texts()
    used = []
    sample_logits = TopKFirst.sample_logits
    monkeypatch.setattr(top_k, "MIN_VOCAB", 0)
    monkeypatch.setattr(TopKFirst, "sample_logits", lambda self, logits: used.append(1) or sample_logits(self, logits))
    assert texts() == with_llama_cpp
    assert len(used) >= 2 * 48 and with_llama_cpp[0] != with_llama_cpp[1]
