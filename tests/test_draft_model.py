"""The draft-model drafter on real llama.cpp: the bundled model drafting for itself, whose greedy
drafts must be the target's own greedy continuation."""

from __future__ import annotations

import pytest

from edge_llm.engines.base import collect
from edge_llm.engines.draft_model import (
    DEFAULT_P_MIN,
    FIRST_COMPARED_TOKEN,
    MAX_VOCAB_SIZE_DIFFERENCE,
    DraftModel,
    check_compatible,
)
from edge_llm.errors import ModelLoadError
from edge_llm.sampling import SamplingParams

N_PARALLEL = 4
N_CTX_SEQ = 256
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


@pytest.fixture(scope="module")
def target(demo_path):
    from edge_llm.api import load

    # Two threads in both contexts: llama.cpp's CPU kernels round differently with another thread
    # count, and a greedy near-tie could then flip between the target and its draft.
    eng = load(str(demo_path), n_ctx=N_PARALLEL * N_CTX_SEQ, n_parallel=N_PARALLEL, n_threads=2,
               adapt_threads=False)
    yield eng
    eng.close()


def new_drafter(demo_path, target, p_min: float = 0.0) -> DraftModel:
    """The bundled model as its own draft; p_min 0: drafts as long as asked, for exact comparisons."""
    return DraftModel(demo_path, target, n_parallel=N_PARALLEL, n_ctx_seq=N_CTX_SEQ, n_threads=2, p_min=p_min)


@pytest.fixture(scope="module")
def drafter(demo_path, target):
    d = new_drafter(demo_path, target)
    yield d
    d.close()


def greedy(target, tokens: list[int], n: int) -> list[int]:
    """The target's own greedy continuation (its end-of-generation token included when it stops)."""
    return collect(target.stream(tokens, SamplingParams.create(temperature=0, max_tokens=n)))[0].token_ids


@pytest.mark.model
@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_target_as_its_own_draft_proposes_its_greedy_continuation(target, drafter, prompt):
    tokens = target.tokenize(prompt)
    continuation = greedy(target, tokens, 16)
    # The slot holds the prompt and its first sampled token; the draft is what follows.
    assert drafter.propose({0: (tokens + continuation[:1], 15)}) == {0: continuation[1:16]}


@pytest.mark.model
def test_a_draft_stops_after_an_end_of_generation_token(target, drafter):
    tokens = target.tokenize("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    continuation = greedy(target, tokens, 40)
    assert continuation[-1] in target.eog_ids  # the target answers and stops
    assert drafter.propose({1: (tokens + continuation[:1], 60)}) == {1: continuation[1:]}


@pytest.mark.model
def test_slots_in_one_call_get_their_own_drafts(target, drafter):
    histories = {slot: target.tokenize(prompt) for slot, prompt in enumerate(PROMPTS)}
    expected = {slot: greedy(target, tokens, 9) for slot, tokens in histories.items()}
    wanted = {slot: (tokens + expected[slot][:1], 8) for slot, tokens in histories.items()}
    assert drafter.propose(wanted) == {slot: continuation[1:9] for slot, continuation in expected.items()}


@pytest.mark.model
@pytest.mark.parametrize("accepted", [0, 3])
def test_after_a_rejected_draft_the_proposal_is_a_fresh_drafters(demo_path, target, drafter, accepted):
    history = target.tokenize("The three primary colours are")
    draft = drafter.propose({2: (history, 8)})[2]
    # The target accepted `accepted` drafted tokens, then sampled something else than the next one.
    other = (draft[accepted] + 1) % target.n_vocab
    diverged = history + draft[:accepted] + [other]
    fresh = new_drafter(demo_path, target)
    try:
        expected = fresh.propose({2: (diverged, 8)})
    finally:
        fresh.close()
    assert len(expected[2]) == 8
    assert drafter.propose({2: (diverged, 8)}) == expected


@pytest.mark.model
def test_a_new_history_that_shares_a_prefix_keeps_only_the_prefix(demo_path, target, drafter):
    first = target.tokenize("The three primary colours are red, yellow and")
    drafter.propose({2: (first, 8)})
    second = first[:3] + target.tokenize(" largest planets of the solar system are")
    fresh = new_drafter(demo_path, target)
    try:
        expected = fresh.propose({2: (second, 8)})
    finally:
        fresh.close()
    assert drafter.propose({2: (second, 8)}) == expected


@pytest.mark.model
def test_a_draft_near_the_end_of_its_sequence_proposes_fewer(target, drafter):
    tokens = (target.tokenize(" one two three four five six seven eight nine ten") * 40)[:N_CTX_SEQ - 3]
    assert len(drafter.propose({3: (tokens, 16)})[3]) == 3  # positions N_CTX_SEQ-3 .. N_CTX_SEQ-1
    assert len(drafter.propose({3: (tokens + [tokens[0], tokens[1]], 16)})[3]) == 1
    assert drafter.propose({3: (tokens[:1] * N_CTX_SEQ, 16)}) == {}  # a full sequence: nothing to draft
    # The sequence still drafts afterwards, from its start.
    short = target.tokenize(PROMPTS[0])
    assert drafter.propose({3: (short, 4)}) == {3: greedy(target, short, 4)}


@pytest.mark.model
def test_p_min_cuts_a_draft_where_the_draft_model_doubts(demo_path, target, drafter):
    tokens = target.tokenize("Once upon a time, there was a")
    full = drafter.propose({0: (tokens, 24)})[0]
    cautious = new_drafter(demo_path, target, p_min=DEFAULT_P_MIN)
    try:
        cut = cautious.propose({0: (tokens, 24)})[0]
    finally:
        cautious.close()
    assert cut == full[:len(cut)]
    assert len(cut) < len(full)  # the story's next words are not that certain


@pytest.mark.model
@pytest.mark.slow
def test_a_draft_model_with_another_vocabulary_is_one_clear_error(target, tmp_path):
    from tiny_models import build_llama, train_sentencepiece

    from edge_llm.convert import convert

    tiny = build_llama(tmp_path / "llama", train_sentencepiece(tmp_path / "spm"))
    draft_path = convert(tiny.path, tmp_path / "tiny-spm.gguf", outtype="f16")
    with pytest.raises(ModelLoadError) as caught:
        DraftModel(draft_path, target, n_parallel=N_PARALLEL, n_ctx_seq=N_CTX_SEQ, n_threads=2)
    message = str(caught.value)
    assert "\n" not in message
    assert str(draft_path) in message and "vocabulary type SPM (the target's: BPE)" in message


@pytest.mark.model
def test_close_twice_is_harmless(demo_path, target):
    d = new_drafter(demo_path, target)
    d.close()
    d.close()


# -- the vocabulary check on plain data ----------------------------------------------------------


def facts(n: int = 300, **changes) -> dict:
    return {"type": "BPE", "add_bos": False, "bos": 1, "add_eos": False, "eos": 2,
            "texts": [f"t{i}".encode() for i in range(n)], **changes}


def renamed(token: int, n: int = 300) -> dict:
    texts = facts(n)["texts"]
    texts[token] = b"other"
    return facts(n, texts=texts)


@pytest.mark.parametrize("draft", [
    facts(),
    facts(bos=7),  # BOS is never added: its id does not matter (as in llama.cpp)
    facts(300 + MAX_VOCAB_SIZE_DIFFERENCE),
    facts(300 - MAX_VOCAB_SIZE_DIFFERENCE),
    renamed(FIRST_COMPARED_TOKEN - 1),  # the first ids are control tokens fine-tunes rename
])
def test_compatible_vocabularies(draft):
    assert check_compatible(facts(), draft) is None


@pytest.mark.parametrize("draft,target,reason", [
    (facts(type="SPM"), facts(), "vocabulary type SPM (the target's: BPE)"),
    (facts(add_bos=True), facts(), "adds-BOS flag True (the target's: False)"),
    (facts(add_bos=True, bos=7), facts(add_bos=True), "BOS token 7 (the target's: 1)"),
    (facts(add_eos=True, eos=0), facts(add_eos=True), "EOS token 0 (the target's: 2)"),
    (facts(300 + MAX_VOCAB_SIZE_DIFFERENCE + 1), facts(), "429 tokens (the target's: 300; at most 128 apart)"),
    (renamed(FIRST_COMPARED_TOKEN), facts(), "token 5 is b'other' (the target's: b't5')"),
    (renamed(299), facts(), "token 299 is b'other'"),
])
def test_incompatible_vocabularies_say_what_differs(draft, target, reason):
    assert reason in check_compatible(target, draft)
