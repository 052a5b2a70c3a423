"""The scheduler's decisions about slots, as plain Python: which idle slot a request takes, how much
of its prompt a slot already holds, whether a saved state is worth restoring, which slots give
their cells up first, and which prompts a step reads. No llama.cpp calls: `scheduler.py` acts on
what these return, and tests drive them with plain token lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_llm.engines.media import ImageSpan, whole_images
from edge_llm.engines.speculation import graph_runs

if TYPE_CHECKING:
    from edge_llm.engines.scheduler import Choice

# Restoring a saved state copies the whole entry (and may read a file); a few tokens more than the
# best idle slot offers are cheaper to evaluate.
MIN_RESTORE_GAIN = 4
# Below this many tokens a decode costs clearly more per token (measured on 2 cores), so a step
# that finished one prompt still takes the next short ones.
MIN_STEP_TOKENS = 16
# A slot holding up to this many prompt tokens fewer than the best one is as good a place for the
# prompt: evaluating them costs a few decode steps once, while a slot apart from the running ones
# costs a graph run more on every decode step of the request (decode_runs).
NEAR_PREFIX = 64


@dataclass
class Slot:
    """One llama.cpp sequence: the tokens its KV cells hold and the choice running in it."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    last_used: float = 0.0
    choice: Choice | None = None
    prefill: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    copies: list[Slot] = field(default_factory=list)  # slots to receive this prompt's KV (n > 1)

    @property
    def idle(self) -> bool:
        return self.choice is None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def least_recently_used(slots: Sequence[Slot]) -> Slot:
    return min(slots, key=lambda s: s.last_used)


def decode_runs(seq_ids: Iterable[int]) -> int:
    """The graph runs of a decode step that gives each of these sequences one token, with a KV
    stream per sequence (not -kvu): llama.cpp's split_equal puts only consecutive sequence ids
    in one run (speculation.graph_runs), so {0, 1, 2, 3} is one run and {0, 2, 5, 7} four, each
    reading every weight."""
    return len(graph_runs([(seq_id, 1) for seq_id in sorted(set(seq_ids))], unified=False))


def best_placed(candidates: Sequence[Slot], running: Sequence[int], *, unified: bool) -> Slot:
    """Of these idle slots, the one beside which the running sequences decode in the fewest graph
    runs (the least recently used of equals, so that no slot's cache is given up for nothing)."""
    return min(candidates, key=lambda s: (1 if unified else decode_runs([*running, s.seq_id]), s.last_used))


def pick_slot(tokens: Sequence[int], idle: Sequence[Slot], running: Sequence[int] = (), *,
              unified: bool = True) -> tuple[Slot, int]:
    """The idle slot for a prompt, and how many of its tokens that slot already holds: the slot
    sharing the longest prefix with the prompt, where the others hold at most NEAR_PREFIX tokens
    less; among those, the one that keeps the `running` sequences' ids together (best_placed),
    then the longest prefix, then the least recently used. With nothing to reuse, best_placed of
    all. (Scattered slots made every decode step of 4 clients on 8 slots up to 4 graph runs:
    0.65-0.87x llama-server's tokens/s, whose slot choice packs them at the low ids.)"""
    held = {s.seq_id: common_prefix(s.cached, tokens) for s in idle}
    top = max(held.values())
    near = [s for s in idle if held[s.seq_id] >= top - NEAR_PREFIX]
    runs = {s.seq_id: 1 if unified else decode_runs([*running, s.seq_id]) for s in near}
    best = min(near, key=lambda s: (runs[s.seq_id], -held[s.seq_id], s.last_used))
    reuse = usable_prefix(held[best.seq_id], len(tokens))
    if reuse == 0:  # e.g. a one-token prompt that a slot's cache starts with
        return best_placed(idle, running, unified=unified), 0
    return best, reuse


def usable_prefix(held: int, n_prompt: int) -> int:
    """Of the `held` prompt tokens a slot or a saved state holds, those that may be kept: not the
    last prompt token, which must be evaluated to get logits for the first sample."""
    return min(held, n_prompt - 1)


def worth_restoring(usable: int, reuse: int) -> bool:
    """Whether restoring a saved state whose `usable` prompt tokens may be kept beats the `reuse`
    tokens the chosen slot holds already."""
    return usable >= reuse + MIN_RESTORE_GAIN


@dataclass
class Placement:
    """Where an admitted prompt goes (`place`): `slot`, keeping `reuse` of the tokens it holds;
    or, when a saved state of the prompt cache covers the prompt better, `entry` restored into
    `target` and cut to its first `found` tokens (should the restore fail, `slot` as before)."""

    slot: Slot
    reuse: int
    entry: Any = None  # prompt_cache.CacheEntry worth restoring; None: none
    target: Slot | None = None
    found: int = 0


def place(tokens: Sequence[int], idle: Sequence[Slot], running: Sequence[int], *, unified: bool,
          images: Sequence[ImageSpan] = (), saved: tuple[Any, int] | None = None,
          free: int = 0) -> Placement:
    """The slot for a prompt and the longest cached prefix it can start from: its own (pick_slot),
    or `saved` (the prompt cache's best entry and the prompt tokens it shares) restored into the
    idle slot beside the running ones (the least recently used of equals: the cheapest to give
    up), if it is worth it. Image spans are kept whole. With -kvu (`unified`) the whole entry must
    fit in the pool (`free` cells) beside what the target gives up, before it is cut to the prompt."""
    main, reuse = pick_slot(tokens, idle, running, unified=unified)
    reuse = whole_images(reuse, images)
    if saved is not None:
        entry, found = saved
        found = whole_images(usable_prefix(found, len(tokens)), images)
        if entry is not None and worth_restoring(found, reuse):
            target = best_placed(idle, running, unified=unified)
            if not unified or entry.n_tokens <= free + len(target.cached):
                return Placement(main, reuse, entry, target, found)
    return Placement(main, reuse)


def slots_for_copies(idle: Sequence[Slot], main: Slot, n: int) -> list[Slot]:
    """The slots that take a request's other n - 1 choices: the least recently used caches are
    overwritten first."""
    return sorted((s for s in idle if s is not main), key=lambda s: s.last_used)[: n - 1]


def free_cells(slots: Sequence[Slot], n_ctx: int) -> int:
    """Cells of a unified pool (-kvu) not yet promised: every slot's cached tokens and the prompt
    tokens it still has to evaluate count (n > 1 copies share cells, so this errs on the safe side)."""
    return n_ctx - sum(len(s.cached) + len(s.prefill) for s in slots)


def eviction_order(idle: Sequence[Slot], tokens: Sequence[int]) -> list[Slot]:
    """The idle slots with cells to give up for a prompt, in the order they give them: least
    recently used first, and the one that shares most with the prompt last."""
    best = max(idle, key=lambda s: common_prefix(s.cached, tokens))
    victims = sorted((s for s in idle if s.cached and s is not best), key=lambda s: s.last_used)
    return [*victims, best] if best.cached else victims


def plan_prefill(pending: Sequence[int], *, used: int, n_batch: int) -> list[tuple[int, int]]:
    """Which prompts one step reads, and how many tokens of each.

    `pending`: the prompt tokens each admitted request still has to read, in admission order;
    `used`: the batch's tokens already taken (one per generating stream); `n_batch`: the batch's
    size. Returns (position in `pending`, tokens to read) in batch order: shortest prompt first,
    and one prompt finished per step once the batch holds MIN_STEP_TOKENS. On a CPU, prefill is
    compute-bound from a few tokens, so packing several prompts into one decode saves nothing and
    only makes each wait for the others' tokens; a long prompt is spread over several steps and
    never stalls the running streams."""
    plan: list[tuple[int, int]] = []
    budget = n_batch - used
    finished_one = False
    for i in sorted(range(len(pending)), key=lambda i: pending[i]):  # stable: ties in admission order
        if budget <= 0 or (finished_one and used >= MIN_STEP_TOKENS):
            break
        take = min(pending[i], budget)
        plan.append((i, take))
        used += take
        budget -= take
        finished_one = finished_one or take == pending[i]
    return plan
