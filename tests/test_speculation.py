"""Speculative decoding: the drafters and the plan as plain Python, and the scheduler's verification
on the real bundled model (output identical to decoding without speculation)."""

import random
import threading

import pytest

from edge_llm.engines.base import collect
from edge_llm.engines.speculation import (
    LOOKUP_MIN_MATCH,
    PRIOR_ACCEPTANCE,
    START_FLOOR,
    Acceptance,
    Candidate,
    PromptLookup,
    StepCost,
    expected_tokens,
    graph_runs,
    plan_drafts,
)
from edge_llm.sampling import SamplingParams

# -- prompt lookup ---------------------------------------------------------------------------------


def lookup_by_search(tokens, n_draft, sizes=(4, 3, 2)):
    """What PromptLookup must propose, by brute force: for the longest n whose last n tokens occur
    earlier (followed by at least one token), what followed their latest such occurrence."""
    end = len(tokens)
    for n in sizes:
        if end <= n:
            continue
        suffix = tokens[end - n:]
        for j in range(end - n - 1, -1, -1):
            if tokens[j:j + n] == suffix:
                return tokens[j + n:j + n + n_draft]
    return []


def test_prompt_lookup_drafts_what_followed_the_longest_match():
    lookup = PromptLookup(n_min=2)
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2, 3, 4]
    assert lookup.propose({0: (text, 5)}) == {0: [5, 6, 7, 8, 9]}
    assert lookup.propose({0: (text + [5, 6], 3)}) == {0: [7, 8, 9]}  # grown by two tokens: still copying
    assert lookup.propose({1: ([1, 2, 3, 4, 5], 4)}) == {1: []}  # nothing repeats


def test_prompt_lookup_prefers_the_latest_occurrence_and_starts_over_for_another_conversation():
    lookup = PromptLookup(n_min=2)
    assert lookup.propose({0: ([7, 8, 1, 7, 8, 2, 7, 8], 1)}) == {0: [2]}
    # The slot took another conversation: its old n-grams must not be proposed.
    assert lookup.propose({0: ([5, 7, 8, 9, 9, 7, 8], 2)}) == {0: [9, 9]}
    assert lookup.propose({0: ([7, 8, 1, 7, 8, 2, 7, 8], 1)}) == {0: [2]}


def test_prompt_lookup_by_default_drafts_only_from_a_match_of_lookup_min_match_tokens():
    # Short matches are mostly coincidence on open-ended text (LOOKUP_MIN_MATCH says what was measured).
    lookup = PromptLookup()
    assert LOOKUP_MIN_MATCH == 4
    story = [7, 8, 1, 2, 9, 7, 8]  # "7 8" repeats, nothing longer does
    assert lookup.propose({0: (story, 3)}) == {0: []}
    copy = [1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3, 4]  # the last four tokens were seen before
    assert lookup.propose({1: (copy, 3)}) == {1: [5, 6, 7]}
    assert PromptLookup(n_min=2).propose({0: (story, 3)}) == {0: [1, 2, 9]}


@pytest.mark.parametrize("seed", range(5))
def test_prompt_lookup_grown_token_by_token_equals_a_search_of_the_whole_history(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(6) for _ in range(400)]
    lookup = PromptLookup(n_min=2)
    for end in range(1, len(tokens)):
        if rng.random() < 0.05:  # now and then the slot is cut back (a rejected draft, a reused prefix)
            end = rng.randrange(1, end + 1)
        history = tokens[:end]
        n_draft = rng.randrange(1, 9)
        assert lookup.propose({3: (history, n_draft)})[3] == lookup_by_search(history, n_draft)


# -- the plan --------------------------------------------------------------------------------------


def test_graph_runs_follow_llama_cpp_split_equal():
    # One stream per sequence: consecutive sequence ids run together, as many tokens from each as
    # the shortest has; whatever is left runs again.
    assert graph_runs([(0, 1), (1, 1), (2, 1), (3, 1)], unified=False) == [4]
    assert graph_runs([(0, 4), (1, 1), (2, 1), (3, 1)], unified=False) == [4, 3]
    assert graph_runs([(0, 4), (1, 4)], unified=False) == [8]
    assert graph_runs([(0, 1), (2, 1)], unified=False) == [1, 1]  # ids 0 and 2 are not consecutive
    assert graph_runs([(0, 3), (1, 1), (2, 3)], unified=False) == [3, 2, 2]
    assert graph_runs([(0, 4), (1, 1), (2, 1), (3, 1)], unified=True) == [7]


def test_step_cost_learns_medians_and_scales_unseen_sizes_from_the_nearest_seen():
    cost = StepCost()
    assert cost.run(4) / cost.run(1) == pytest.approx(2.64)  # the built-in shape, before any step
    for seconds in (0.010, 0.011, 0.500, 0.009, 0.010):  # one step slowed by another program
        cost.observe(1, seconds)
    assert cost.run(1) == pytest.approx(0.010)
    cost.observe(8, 0.020)  # a memory-bound model: 8 tokens cost twice one
    assert cost.run(8) == pytest.approx(0.020)
    assert cost.run(9) == pytest.approx(0.020 * (0.96 + 0.42 * 9) / (0.96 + 0.42 * 8))
    assert cost.run(2) == pytest.approx(0.010 * 1.8)


def test_expected_tokens_counts_the_sampled_token_and_the_accepted_run():
    assert expected_tokens(0, 0.9) == 1
    assert expected_tokens(3, 1.0) == 4
    assert expected_tokens(2, 0.5) == pytest.approx(1.75)


def test_a_lone_slot_drafts_when_its_drafts_are_kept_and_not_when_they_are_rejected():
    cost = StepCost()
    # 97% kept: the best length balances the longer run against the falling chance of reaching its end.
    assert 8 <= plan_drafts([Candidate(0, 16, 0.97)], [], cost, unified=False)[0] < 16
    assert plan_drafts([Candidate(0, 16, 1.0)], [], cost, unified=False) == {0: 16}
    assert plan_drafts([Candidate(0, 16, 0.3)], [], cost, unified=False) == {}
    assert plan_drafts([Candidate(0, 2, 0.97)], [], cost, unified=False, draft_min=3) == {}


def test_drafting_beside_busy_slots_needs_drafts_worth_a_second_graph_run():
    cost = StepCost()
    busy = [(1, 1), (2, 1), (3, 1)]
    # Slot 0 drafting alone splits the step into two runs: not worth it for likely drafts...
    assert plan_drafts([Candidate(0, 16, 0.9)], busy, cost, unified=False) == {}
    # ...only for near-certain ones; with one KV pool (-kvu) the step stays one run.
    assert plan_drafts([Candidate(0, 16, 1.0)], busy, cost, unified=False)
    assert plan_drafts([Candidate(0, 8, 0.9)], busy, cost, unified=True)


def test_slots_that_all_draft_verify_equal_lengths_in_one_run():
    cost = StepCost()
    candidates = [Candidate(i, n, 0.99) for i, n in enumerate((16, 6, 16, 16))]
    plan = plan_drafts(candidates, [], cost, unified=False)
    assert plan and len(set(plan.values())) == 1 and set(plan) == {0, 1, 2, 3}


def test_acceptance_falls_with_rejections_and_recovers_slowly():
    acceptance = Acceptance()
    acceptance.update(drafted=4, accepted=0)
    low = acceptance.value
    assert low < PRIOR_ACCEPTANCE
    acceptance.update(drafted=4, accepted=4)
    assert acceptance.value > low
    falling = Acceptance(0.2)
    for _ in range(50):
        falling.recover()
    assert 0.2 < falling.value < PRIOR_ACCEPTANCE
    # A new request starts from the engine's recent acceptance, but not so low it would never draft.
    assert falling.start().value == START_FLOOR
    assert Acceptance(0.95).start().value == 0.95


# -- on the real model -----------------------------------------------------------------------------

PASSAGE = ("The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper "
           "climbed the one hundred and twelve steps to the lamp room, wound the clockwork that turned the great "
           "lens, and trimmed the wick so that the beam would reach the ships far out at sea.")
PROMPTS = [
    "Repeat this text exactly:\n\n" + PASSAGE + "\n\n" + PASSAGE[:70],  # copy-heavy: drafts mostly kept
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colours are",
]


class FreeVerification(StepCost):
    """Every run costs the same: the plan drafts wherever a draft is found, so the tests see many
    kept and many rejected drafts whatever the machine's speed."""

    def run(self, n_tokens: int) -> float:
        return 1.0


class WrongDrafter:
    """Proposes tokens that are never what the model samples (token 0 is <|endoftext|>)."""

    costly = False

    def propose(self, wanted):
        return {seq_id: [0] * n for seq_id, (_, n) in wanted.items()}

    def close(self):
        pass


def load_engine(demo_path, *, spec, **options):
    from edge_llm.api import load

    # Fixed threads: llama.cpp's CPU flash attention rounds differently with another thread count.
    options = {"n_ctx": 4 * 1024, **options}
    engine = load(str(demo_path), n_parallel=4, n_threads=2, adapt_threads=False, spec=spec, **options)
    engine.scheduler.cost = FreeVerification()
    return engine


@pytest.fixture(scope="module")
def plain(demo_path):
    engine = load_engine(demo_path, spec="off")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speculative(demo_path):
    engine = load_engine(demo_path, spec="ngram")
    # Drafts from 2-token matches too: far more of them are rejected, which is what these tests exercise.
    engine.scheduler.drafter = PromptLookup(n_min=2)
    yield engine
    engine.close()


def run(engine, prompt, params):
    return collect(engine.stream(prompt, params))[0]


def together(engine, prompts, params):
    results = [None] * len(prompts)

    def worker(i):
        results[i] = run(engine, prompts[i], params)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


GREEDY = SamplingParams.create(temperature=0, max_tokens=96, ignore_eos=True)
SEEDED = SamplingParams.create(temperature=0.9, top_p=0.95, seed=11, max_tokens=96, ignore_eos=True)
PENALISED = SamplingParams.create(temperature=0, repetition_penalty=1.3, max_tokens=64, ignore_eos=True)


@pytest.mark.model
@pytest.mark.parametrize("params", [GREEDY, SEEDED, PENALISED], ids=["greedy", "seeded", "penalties"])
def test_output_is_identical_with_and_without_speculation_alone(plain, speculative, params):
    stats = speculative.scheduler.stats
    drafted, accepted = stats.draft_tokens, stats.accepted_tokens
    for prompt in PROMPTS:
        expected = run(plain, prompt, params)
        got = run(speculative, prompt, params)
        assert got.token_ids == expected.token_ids, prompt
        assert got.text == expected.text
        assert len(got.token_ids) == params.max_tokens  # drafts never run past max_tokens
    # Drafts were verified and some rejected; greedy copying also keeps many.
    assert stats.draft_tokens - drafted > stats.accepted_tokens - accepted
    if params is GREEDY:
        assert stats.accepted_tokens - accepted > 20


@pytest.mark.model
def test_logprobs_stop_strings_and_grammars_are_the_same_with_speculation(plain, speculative):
    prompt = PROMPTS[0]
    with_logprobs = SamplingParams.create(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    expected, got = run(plain, prompt, with_logprobs), run(speculative, prompt, with_logprobs)
    assert got.token_ids == expected.token_ids
    assert [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in got.logprobs] == \
        [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in expected.logprobs]
    # A stop string met inside a kept draft ends the answer there; the drafts after it leave nothing.
    stop = SamplingParams.create(temperature=0, max_tokens=96, stop=["twelve"])
    expected, got = run(plain, prompt, stop), run(speculative, prompt, stop)
    assert (got.text, got.finish_reason) == (expected.text, "stop")
    assert got.usage.accepted_tokens > 0
    # A grammar's state advances once per kept token.
    grammar = SamplingParams.create(temperature=0, max_tokens=64, grammar='root ::= ("lamp " | "keeper ")+ "."')
    expected, got = run(plain, prompt, grammar), run(speculative, prompt, grammar)
    assert got.text == expected.text
    assert got.usage.draft_tokens > 0


@pytest.mark.model
def test_output_is_identical_with_other_slots_busy(plain, speculative):
    expected = [run(plain, p, GREEDY).token_ids for p in PROMPTS]
    got = together(speculative, PROMPTS, GREEDY)
    assert [r.token_ids for r in got] == expected
    usage = got[0].usage
    assert usage.draft_tokens > 0 and usage.accepted_tokens > 0


@pytest.mark.model
def test_drafts_fit_a_small_batch_beside_prompt_chunks(demo_path):
    """-b 12: four slots' drafts and a long prompt's chunks share 12 batch positions; nothing
    overflows and the outputs are those of the same engine without speculation."""
    outputs = {}
    for spec in ("ngram", "off"):
        engine = load_engine(demo_path, spec=spec, n_batch=12)
        try:
            outputs[spec] = together(engine, PROMPTS, GREEDY)
        finally:
            engine.close()
    assert [r.token_ids for r in outputs["ngram"]] == [r.token_ids for r in outputs["off"]]
    assert sum(r.usage.accepted_tokens for r in outputs["ngram"]) > 0


@pytest.mark.model
def test_a_draft_model_s_drafts_are_verified_like_lookup_drafts(plain, demo_path):
    """The bundled model drafting for itself (-md): it proposes the greedy continuation, so every
    draft is kept, and the output is the same as without speculation."""
    engine = load_engine(demo_path, spec="draft", model_draft=str(demo_path), draft_max=6)
    try:
        got = [run(engine, prompt, GREEDY) for prompt in PROMPTS[1:3]]
    finally:
        engine.close()
    assert [r.token_ids for r in got] == [run(plain, p, GREEDY).token_ids for p in PROMPTS[1:3]]
    assert all(r.usage.draft_tokens > 20 and r.usage.accepted_tokens == r.usage.draft_tokens for r in got)


@pytest.mark.model
def test_rejected_drafts_leave_no_trace_in_the_kv(plain, speculative):
    """After drafts that were all rejected, the slot's KV holds exactly the prompt and the answer,
    and a follow-up turn in it equals the same two turns without speculation."""
    engine = speculative
    prompt = engine.tokenize(PROMPTS[1])
    engine.scheduler.drafter, ngram = WrongDrafter(), engine.scheduler.drafter
    try:
        first = run(engine, prompt, GREEDY)
    finally:
        engine.scheduler.drafter = ngram
    assert first.usage.draft_tokens > 0 and first.usage.accepted_tokens == 0
    slot = next(s for s in engine.scheduler.slots if s.cached[:len(prompt)] == prompt)
    # Everything but the answer's last token (sampled, never decoded), at positions 0..n-1 and no further.
    assert slot.cached == prompt + first.token_ids[:-1]
    assert engine.scheduler.memory.positions(slot.seq_id) == (0, len(slot.cached) - 1)

    follow_up = engine.tokenize(" And then", add_bos=False)
    prompt2 = prompt + first.token_ids + follow_up
    second = run(engine, prompt2, GREEDY)
    assert second.usage.cached_tokens == len(prompt2) - len(follow_up) - 1
    assert run(plain, prompt, GREEDY).token_ids == first.token_ids
    assert run(plain, prompt2, GREEDY).token_ids == second.token_ids


@pytest.mark.model
@pytest.mark.parametrize("kv_unified", [False, True], ids=["kv-per-slot", "kvu"])
def test_speculation_up_to_the_end_of_a_slot(demo_path, kv_unified):
    """A generation that fills its slot (1024 cells; with -kvu a pool of 1024) ends with "length"
    at the same token with and without speculation. Each side runs on a fresh engine: a reused
    prefix is read in a different batch shape, which rounds differently over 1000 tokens."""
    long = SamplingParams.create(temperature=0, max_tokens=5000, ignore_eos=True)
    outputs = {}
    for spec in ("ngram", "off"):
        engine = load_engine(demo_path, spec=spec, kv_unified=kv_unified, n_ctx=1024 if kv_unified else 4096)
        try:
            outputs[spec] = run(engine, PROMPTS[0], long)
        finally:
            engine.close()
    assert outputs["ngram"].finish_reason == outputs["off"].finish_reason == "length"
    assert outputs["ngram"].token_ids == outputs["off"].token_ids
    assert outputs["ngram"].usage.accepted_tokens > 0
