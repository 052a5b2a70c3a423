"""One scheduler step's decisions as a plain dataclass, as vLLM splits `schedule()` ->
`SchedulerOutput` -> executing it: which slots decode their pending token, which prompt chunks
this step reads (text in the batch, image rows in decodes of their own before it), and which
drafted tokens are verified. Made from the slots by plain Python (`plan_step`, `plan_step_drafts`);
`Scheduler._execute` runs a plan against llama.cpp and samples what it produced. Per step, never
per token: the plan is a few lists and dicts the step built before, named.

Admission (which request takes which idle slot, what it reuses) is decided in slots.py and applied
by the scheduler before a step is planned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_llm.engines.media import images_of, next_image
from edge_llm.engines.slots import Slot, plan_prefill
from edge_llm.engines.speculation import Candidate, Drafter, StepCost, plan_drafts


@dataclass
class StepPlan:
    """What one step runs. Chunks and drafts are keyed by the slot's seq_id."""

    generating: list[Slot] = field(default_factory=list)  # decode their pending token (and drafts)
    chunks: dict[int, int] = field(default_factory=dict)  # prompt text tokens read in the batch
    images: dict[int, int] = field(default_factory=dict)  # image rows decoded before the batch, in slot order
    drafts: dict[int, list[int]] = field(default_factory=dict)  # tokens verified after the pending one
    # Nothing to run but prompts waiting for the vision worker's images.
    waiting_on_vision: bool = False


def runnable_tokens(slot: Slot) -> int:
    """Prompt tokens a reading slot can evaluate now: its text up to the next image; an image once
    the vision worker has encoded it (what is left of it); none while it has not."""
    at = len(slot.cached)
    span = next_image(at, images_of(slot.choice.request.tokens))
    if span is None:
        return len(slot.prefill)
    if at < span.start:
        return span.start - at
    return span.end - at if span.embeddings is not None else 0


def plan_step(slots: Sequence[Slot], *, n_batch: int, images: bool = False) -> StepPlan:
    """The step's slots and prompt chunks (drafts are planned after the image rows are in:
    `plan_step_drafts`). Generating slots each take one batch token; the prompts share the rest as
    `plan_prefill` says, in admission order; with `images` (a projector is loaded) a prompt reads
    up to its next image, and a chunk that starts at an encoded image becomes image rows (all of
    the image's rows where they attend both ways, Gemma 3)."""
    generating = [s for s in slots if s.choice is not None and s.choice.pending is not None and not s.prefill]
    reading = sorted((s for s in slots if s.prefill), key=lambda s: s.choice.request.id)
    runnable = [runnable_tokens(s) for s in reading] if images else [len(s.prefill) for s in reading]
    waiting_on_vision = bool(reading) and not generating and not any(runnable)
    reading = [s for s, n in zip(reading, runnable, strict=True) if n]
    chunks = {reading[i].seq_id: n for i, n in plan_prefill([n for n in runnable if n], used=len(generating),
                                                             n_batch=n_batch)}
    rows: dict[int, int] = {}
    if images:
        for slot in slots:
            n = chunks.get(slot.seq_id)
            if not n:
                continue
            at = len(slot.cached)
            span = next_image(at, images_of(slot.choice.request.tokens))
            if span is None or at < span.start:
                continue
            del chunks[slot.seq_id]
            rows[slot.seq_id] = span.end - at if span.chunk.non_causal else n
    return StepPlan(generating, chunks, rows, {}, waiting_on_vision)


@dataclass(frozen=True)
class DraftLimits:
    """What bounds a step's drafts besides the slots themselves."""

    n_batch: int
    n_ctx_seq: int
    draft_max: int  # --draft-max
    draft_min: int = 0  # --draft-min
    unified: bool = False
    images: bool = False  # a projector is loaded: a draft stops before an image's placeholders


def plan_step_drafts(plan: StepPlan, drafter: Drafter | None, cost: StepCost, limits: DraftLimits, *,
                     pool_room: int | None = None) -> dict[int, list[int]]:
    """The drafted tokens each generating slot verifies this step (speculation.py): the drafter's
    proposals, as long as `plan_drafts` finds worth verifying. Drafts share what the batch (and,
    with -kvu, the pool: `pool_room`, its cells left after one per running stream) has left after
    one token per generating slot and the step's prompt text."""
    generating, chunks = plan.generating, plan.chunks
    if drafter is None or not generating:
        return {}
    spare = limits.n_batch - len(generating) - sum(chunks.values())
    if pool_room is not None:
        spare = min(spare, pool_room)
    room = {s.seq_id: draft_room(s, spare // len(generating), limits) for s in generating}
    others = [(seq_id, n) for seq_id, n in chunks.items()]

    def lengths(drafts: dict[int, int]) -> dict[int, int]:
        # A slot with no draft (or one under --draft-min) is planned as one token, like the others.
        candidates = [Candidate(s.seq_id, drafts.get(s.seq_id, 0), s.choice.acceptance.value) for s in generating]
        return plan_drafts(candidates, others, cost, unified=limits.unified, draft_min=limits.draft_min)

    # A costly drafter (a draft model) is asked only for slots that would verify a full draft; a
    # cheap one (lookup) first, so that a step without proposals spends nothing on the plan.
    asked = lengths(room) if drafter.costly else {seq_id: n for seq_id, n in room.items() if n > 0}
    if drafter.costly:  # a draft model has no projector: it cannot follow a prompt with images
        asked = {s.seq_id: asked[s.seq_id] for s in generating
                 if s.seq_id in asked and not images_of(s.choice.request.tokens)}
    if not asked:
        return {}
    start = time.perf_counter()
    proposals = drafter.propose({s.seq_id: ([*s.cached, s.choice.pending], asked[s.seq_id])
                                 for s in generating if s.seq_id in asked})
    if limits.images:  # an image's placeholders are not tokens: a draft stops before one
        proposals = {k: _before_placeholder(v) for k, v in proposals.items()}
    cost.observe_drafting(max(map(len, proposals.values()), default=0), time.perf_counter() - start)
    if not any(proposals.values()):
        return {}
    kept = lengths({seq_id: len(tokens) for seq_id, tokens in proposals.items()})
    return {seq_id: proposals[seq_id][:n] for seq_id, n in kept.items()}


def draft_room(slot: Slot, share: int, limits: DraftLimits) -> int:
    """The most tokens a slot may draft: its `share` of the batch, --draft-max and the request's
    draft_max, its context (the pending token and the drafts must fit), and max_tokens (a step
    yields one token past its drafts)."""
    params = slot.choice.request.params
    room = min(share, limits.draft_max, limits.n_ctx_seq - len(slot.cached) - 1)
    if params.draft_max is not None:
        room = min(room, params.draft_max)
    if params.max_tokens is not None:
        room = min(room, params.max_tokens - slot.choice.generated - 1)
    return max(room, 0)


def _before_placeholder(tokens: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token < 0:
            return tokens[:i]
    return tokens
