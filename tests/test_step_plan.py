"""A scheduler step's plan (engines/step_plan.py) made from plain slots: which slots generate,
which prompt chunks and image rows a step reads, which drafts it verifies. No model."""

from __future__ import annotations

from types import SimpleNamespace

from edge_llm.engines.media import ImageSpan, MediaTokens
from edge_llm.engines.slots import Slot
from edge_llm.engines.speculation import Acceptance, StepCost
from edge_llm.engines.step_plan import DraftLimits, StepPlan, plan_step, plan_step_drafts
from edge_llm.sampling import SamplingParams


def choice(request_id: int, tokens: list[int], *, pending: int | None = None, generated: int = 0, **params):
    request = SimpleNamespace(id=request_id, tokens=tokens, params=SamplingParams.create(**params))
    return SimpleNamespace(request=request, pending=pending, generated=generated, acceptance=Acceptance(0.9))


def generating(seq_id: int, n_cached: int, *, request_id: int = 0, **params) -> Slot:
    tokens = list(range(1, n_cached + 1))
    return Slot(seq_id, cached=list(tokens), choice=choice(request_id, tokens, pending=7, **params))


def reading(seq_id: int, n_prompt: int, *, request_id: int, n_cached: int = 0) -> Slot:
    tokens = list(range(1, n_prompt + 1))
    return Slot(seq_id, cached=tokens[:n_cached], prefill=tokens[n_cached:], choice=choice(request_id, tokens))


def test_generating_slots_take_one_token_each_and_prompts_share_the_rest_shortest_first():
    slots = [generating(0, 5), generating(1, 9), reading(2, 40, request_id=5), reading(3, 10, request_id=6),
             Slot(4, cached=[1, 2, 3])]
    plan = plan_step(slots, n_batch=512)
    assert plan == StepPlan(generating=slots[:2], chunks={3: 10, 2: 40})
    assert list(plan.chunks) == [3, 2]  # batch order: the shorter prompt first


def test_a_long_prompt_is_spread_over_steps_within_the_batch():
    slots = [generating(0, 5), reading(1, 100, request_id=3)]
    assert plan_step(slots, n_batch=32).chunks == {1: 31}
    slots[1].prefill = slots[1].prefill[31:]
    slots[1].cached = list(range(1, 32))
    assert plan_step(slots, n_batch=32).chunks == {1: 31}


def test_one_prompt_is_finished_per_step_once_the_batch_is_busy():
    slots = [reading(0, 30, request_id=1), reading(1, 20, request_id=2)]
    assert plan_step(slots, n_batch=512).chunks == {1: 20}  # the second waits: first tokens come sooner


def test_an_idle_engine_plans_nothing():
    plan = plan_step([Slot(0), Slot(1, cached=[1, 2])], n_batch=512)
    assert plan == StepPlan() and not plan.waiting_on_vision


def image_prompt(n_text: int, n_rows: int, *, encoded: bool, non_causal: bool = False) -> MediaTokens:
    span = ImageSpan(start=n_text, n_tokens=n_rows, n_pos=n_rows, digest="ab" * 32,
                     chunk=SimpleNamespace(non_causal=non_causal), embeddings=object() if encoded else None)
    return MediaTokens([*range(1, n_text + 1), *([-5] * n_rows), 99], [span])


def image_slot(seq_id: int, tokens: MediaTokens, *, n_cached: int, request_id: int = 1) -> Slot:
    return Slot(seq_id, cached=list(tokens[:n_cached]), prefill=list(tokens[n_cached:]),
                choice=choice(request_id, tokens))


def test_a_prompt_reads_its_text_up_to_the_image_then_the_encoded_image_as_rows_of_their_own():
    tokens = image_prompt(6, 10, encoded=True)
    assert plan_step([image_slot(0, tokens, n_cached=0)], n_batch=512, images=True).chunks == {0: 6}
    plan = plan_step([image_slot(0, tokens, n_cached=6)], n_batch=4, images=True)
    assert plan.images == {0: 4} and plan.chunks == {}  # causal rows: as many as the batch takes
    plan = plan_step([image_slot(0, image_prompt(6, 10, encoded=True, non_causal=True), n_cached=6)], n_batch=4,
                     images=True)
    assert plan.images == {0: 10}  # rows that attend both ways go in whole


def test_a_prompt_at_an_image_not_yet_encoded_waits_for_the_vision_worker():
    slots = [image_slot(0, image_prompt(6, 10, encoded=False), n_cached=6)]
    plan = plan_step(slots, n_batch=512, images=True)
    assert plan.chunks == {} and plan.images == {} and plan.waiting_on_vision
    slots.append(generating(1, 4))
    assert not plan_step(slots, n_batch=512, images=True).waiting_on_vision  # the others go on


class Flat(StepCost):
    """Every run costs the same: drafting always pays."""

    def run(self, n_tokens: int) -> float:
        return 1.0


class Proposer:
    """Proposes `n` times token 7 for every slot asked, recording what it was asked."""

    def __init__(self, *, costly: bool = False) -> None:
        self.costly = costly
        self.asked: dict[int, tuple[list[int], int]] = {}

    def propose(self, wanted):
        self.asked = {seq_id: (list(tokens), n) for seq_id, (tokens, n) in wanted.items()}
        return {seq_id: [7] * n for seq_id, (_, n) in wanted.items()}

    def close(self) -> None:
        pass


def test_drafts_are_bounded_by_draft_max_the_request_max_tokens_and_the_context():
    slots = [generating(0, 5), generating(1, 5, draft_max=2), generating(2, 5, max_tokens=4, generated=1),
             generating(3, 60)]
    plan = plan_step(slots, n_batch=512)
    drafter = Proposer()
    drafts = plan_step_drafts(plan, drafter, Flat(), DraftLimits(n_batch=512, n_ctx_seq=64, draft_max=6))
    assert {seq_id: n for seq_id, (_, n) in drafter.asked.items()} == {0: 6, 1: 2, 2: 2, 3: 3}
    assert drafter.asked[0][0] == [*range(1, 6), 7]  # the slot's tokens and its pending one
    # plan_drafts then caps them at one common length (equal lengths keep llama.cpp's runs together)
    assert {seq_id: len(d) for seq_id, d in drafts.items()} == {0: 2, 1: 2, 2: 2, 3: 2}


def test_drafts_share_what_the_batch_and_the_pool_leave():
    slots = [generating(0, 5), generating(1, 5), reading(2, 20, request_id=9)]
    plan = plan_step(slots, n_batch=30)
    limits = DraftLimits(n_batch=30, n_ctx_seq=512, draft_max=16)
    assert plan.chunks == {2: 20}
    assert {k: len(v) for k, v in plan_step_drafts(plan, Proposer(), Flat(), limits).items()} == {0: 4, 1: 4}
    drafts = plan_step_drafts(plan, Proposer(), Flat(), limits, pool_room=2)
    assert {k: len(v) for k, v in drafts.items()} == {0: 1, 1: 1}


def test_no_drafter_or_no_generating_slot_plans_no_draft():
    limits = DraftLimits(n_batch=512, n_ctx_seq=512, draft_max=16)
    assert plan_step_drafts(plan_step([generating(0, 5)], n_batch=512), None, Flat(), limits) == {}
    drafter = Proposer()
    assert plan_step_drafts(plan_step([reading(0, 9, request_id=1)], n_batch=512), drafter, Flat(), limits) == {}
    assert drafter.asked == {}


def test_a_draft_model_is_not_asked_for_a_prompt_with_images():
    with_image = generating(0, 5)
    with_image.choice.request.tokens = image_prompt(2, 2, encoded=True)
    plan = plan_step([with_image, generating(1, 5)], n_batch=512)
    drafter = Proposer(costly=True)
    drafts = plan_step_drafts(plan, drafter, Flat(), DraftLimits(n_batch=512, n_ctx_seq=512, draft_max=4))
    assert list(drafter.asked) == [1] and list(drafts) == [1]
