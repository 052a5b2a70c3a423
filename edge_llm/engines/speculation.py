"""Speculative decoding: who proposes tokens, and how many a step should verify.

A drafter proposes tokens that likely follow what a slot holds; the scheduler puts them into the
same llama_decode as every other slot's work, samples every drafted position with the slot's own
sampler chain and keeps the drafted tokens up to the first that differs from what was sampled
(scheduler.py). Sampling each position and comparing is the standard acceptance rule for a
deterministic draft: the output is exactly what decoding without speculation gives, greedy or
seeded.

Verifying costs. On a CPU a small model is compute-bound, so a decode of 8 tokens of one sequence
takes about 4x one of 1 token (SmolLM2-135M on 2 cores); and with a KV stream per slot llama.cpp
runs one graph per group of consecutive slots with equal token counts (llama_batch_allocr::
split_equal), so one slot verifying drafts beside others decoding one token costs a second graph
run. `plan_drafts` therefore weighs, per step, the tokens each slot is expected to gain (its
acceptance so far) against what the step is expected to cost (`StepCost`: measured run times) and
drafts only where the step's tokens per second rise. With acceptance low or many slots busy it
drafts less, or nothing.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# The engine's acceptance before anything is known: optimistic enough that a found match is tried.
# A new request starts from what the engine's recent drafts achieved (`Acceptance.start`), but no
# lower than START_FLOOR, from where a request that copies is tried within ~30 tokens even on a
# server that has been writing stories all day.
PRIOR_ACCEPTANCE = 0.8
START_FLOOR = 0.72
# Weight of the newest observation in a slot's acceptance (about the last 10 drafted tokens).
ACCEPTANCE_WEIGHT = 0.1
# A slot that stopped drafting drifts back toward the prior by this share per token, so a slot whose
# text turns to copying is tried again; slowly, since each failed try costs a step of several tokens
# (one rejected 3-token draft is tried again after ~100 tokens).
ACCEPTANCE_RECOVERY = 0.003
# Drafting must promise this much more throughput than not drafting (the estimates are noisy).
MIN_GAIN = 1.05
# The shortest match the prompt lookup drafts from. On open-ended text (SmolLM2-135M and Gemma 3
# 270M writing stories, greedy) what followed an earlier 2-token match was kept for 13-23% of the
# drafted tokens, a 4-token match's for 50-75%; a copy is found by its 4-token matches all the same
# (they gave 90% of the copy task's kept drafts). Drafting from 2-token matches cost the 135M model
# 3% on stories and gained nothing on copies; llama.cpp's ngram-simple also matches 4 tokens.
LOOKUP_MIN_MATCH = 4


class Drafter(Protocol):
    """Proposes tokens for the slots that may speculate this step."""

    # Whether proposing costs decodes (a draft model): then only slots worth a full draft are asked.
    costly: bool

    def propose(self, wanted: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        """`wanted`: slot (sequence id) -> (every token the slot holds, its last one sampled but not
        yet decoded; the most tokens to propose). Returns slot -> the proposed tokens that follow,
        at most that many (empty or missing: nothing to propose)."""
        ...

    def close(self) -> None:
        ...


# -- prompt lookup: drafts copied from the slot's own tokens --------------------------------------


@dataclass
class _History:
    tokens: list[int] = field(default_factory=list)  # the tokens indexed so far
    follower: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> where its latest copy ends


class PromptLookup:
    """Drafts by n-gram lookup over the prompt and the output so far (prompt lookup decoding, as
    llama.cpp's ngram drafters and vLLM's ngram proposer): the last n tokens (n from `n_max` down to
    `n_min`) are looked up among the earlier tokens, and what followed their latest occurrence is
    the draft. Each slot's n-grams are indexed as its tokens arrive, so a step costs a few dict
    lookups whatever the prompt's length."""

    costly = False

    def __init__(self, n_min: int = LOOKUP_MIN_MATCH, n_max: int = 4) -> None:
        self.sizes = range(n_max, n_min - 1, -1)
        self._slots: dict[int, _History] = {}

    def propose(self, wanted: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        return {seq_id: self._draft(seq_id, tokens, n) for seq_id, (tokens, n) in wanted.items()}

    def close(self) -> None:
        self._slots.clear()

    def _draft(self, seq_id: int, tokens: Sequence[int], n_draft: int) -> list[int]:
        history = self._index(seq_id, tokens)
        end = len(tokens)
        for n in self.sizes:
            if end <= n:
                continue
            start = history.follower.get(tuple(tokens[end - n:]))
            if start is not None:
                return list(tokens[start:start + n_draft])
        return []

    def _index(self, seq_id: int, tokens: Sequence[int]) -> _History:
        """The slot's index, brought up to `tokens` (started over when they are not a continuation
        of what was indexed: the slot took another conversation)."""
        history = self._slots.get(seq_id)
        known = len(history.tokens) if history else 0
        if history is None or known > len(tokens) or list(tokens[:known]) != history.tokens:
            history = self._slots[seq_id] = _History()
            known = 0
        follower = history.follower
        for i in range(max(known, 1), len(tokens)):
            # The n-grams ending just before position i are followed by the token at i.
            for n in self.sizes:
                if i >= n:
                    follower[tuple(tokens[i - n:i])] = i
        history.tokens.extend(tokens[known:])
        return history


# -- how much to draft -----------------------------------------------------------------------------


def expected_tokens(n_draft: int, acceptance: float) -> float:
    """Tokens a verification step yields for one slot: the sampled one plus each drafted one that
    is accepted after all before it were (1 + a + a^2 + ... + a^n_draft)."""
    return sum(acceptance ** i for i in range(n_draft + 1))


def graph_runs(counts: Sequence[tuple[int, int]], *, unified: bool) -> list[int]:
    """The sizes of the graph runs llama.cpp makes of one batch; `counts`: (sequence id, tokens) of
    each sequence in batch order (ids ascending). With one KV pool (-kvu) it is one run. With a
    stream per sequence llama.cpp's split_equal takes, from the first unfinished sequence on, the
    sequences with consecutive ids and the same number of tokens from each (the fewest any of them
    has left), and again until every token is taken."""
    if unified:
        return [sum(n for _, n in counts)] if counts else []
    left = [[seq_id, n] for seq_id, n in counts]
    runs = []
    while left:
        group = [left[0]]
        for entry in left[1:]:
            if entry[0] != group[-1][0] + 1:
                break
            group.append(entry)
        take = min(n for _, n in group)
        runs.append(take * len(group))
        for entry in group:
            entry[1] -= take
        left = [entry for entry in left if entry[1] > 0]
    return runs


class StepCost:
    """What a graph run of n tokens takes, learnt from the steps actually run: per size, the median
    of the last few steps that were one run of that many tokens (a median, since a busy laptop
    makes single steps many times slower). A size not seen yet is estimated from the nearest size
    seen, with the shape measured for SmolLM2-135M on 2 cores (a run of 2 tokens takes 1.8x one of
    1 token, 4 tokens 2.6x, 8 tokens 4.2x, 16 tokens 7.7x). That is a compute-bound CPU's shape; a
    memory-bound model verifies drafts cheaper, which the medians learn as such runs are made."""

    KEEP = 7

    def __init__(self) -> None:
        self._seconds: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}
        self._estimates: dict[int, float] = {}  # run(n), until the next observation
        self._drafting: deque[float] = deque(maxlen=self.KEEP)  # a drafter's seconds per drafted position

    def observe_drafting(self, positions: int, seconds: float) -> None:
        """A drafter's call that drafted `positions` tokens per slot (a draft model: one decode each)."""
        if positions:
            self._drafting.append(seconds / positions)

    def drafting(self, positions: int) -> float:
        return statistics.median(self._drafting) * positions if self._drafting else 0.0

    def observe(self, n_tokens: int, seconds: float) -> None:
        seen = self._seconds.setdefault(n_tokens, deque(maxlen=self.KEEP))
        seen.append(seconds)
        self._medians[n_tokens] = statistics.median(seen)
        self._estimates.clear()

    def run(self, n_tokens: int) -> float:
        estimate = self._estimates.get(n_tokens)
        if estimate is None:
            if self._medians:
                nearest = min(self._medians, key=lambda n: (abs(n - n_tokens), n))
                estimate = self._medians[nearest] * _shape(n_tokens) / _shape(nearest)
            else:
                estimate = _shape(n_tokens)
            self._estimates[n_tokens] = estimate
        return estimate

    def step(self, counts: Sequence[tuple[int, int]], *, unified: bool, drafted: int = 0) -> float:
        """A step verifying these tokens per sequence, after drafting `drafted` tokens per slot."""
        return sum(self.run(n) for n in graph_runs(counts, unified=unified)) + self.drafting(drafted)


def _shape(n_tokens: int) -> float:
    return 1.0 if n_tokens <= 1 else 0.96 + 0.42 * n_tokens


@dataclass
class Candidate:
    """A slot that may verify drafts this step."""

    seq_id: int
    n_draft: int  # the most drafted tokens it could verify
    acceptance: float


def plan_drafts(candidates: Sequence[Candidate], others: Sequence[tuple[int, int]], cost: StepCost, *,
                unified: bool, draft_min: int = 0) -> dict[int, int]:
    """How many drafted tokens each candidate verifies this step: seq_id -> n (0: none).

    `others`: the step's other sequences as (seq_id, tokens) (generating slots with nothing to
    verify, prompt chunks). Each candidate's own best length is the one that maximises its tokens
    per run time alone; the plan then caps every candidate at one common length L (equal lengths
    keep llama.cpp's runs together) and takes the L whose expected tokens per second beat not
    drafting by MIN_GAIN. A draft shorter than `draft_min` is not verified."""
    if not candidates:
        return {}
    own = {c.seq_id: _best_alone(c, cost, draft_min) for c in candidates}
    base_counts = sorted([*others, *((c.seq_id, 1) for c in candidates)])
    base_tokens = len(others) + len(candidates)  # at least one token each: prompt chunks count as one
    best_rate = base_tokens / cost.step(base_counts, unified=unified) * MIN_GAIN
    best: dict[int, int] = {}
    for cap in sorted(set(own.values()) - {0}):
        plan = {c.seq_id: min(own[c.seq_id], cap) for c in candidates}
        counts = sorted([*others, *((c.seq_id, 1 + plan[c.seq_id]) for c in candidates)])
        tokens = len(others) + sum(expected_tokens(plan[c.seq_id], c.acceptance) for c in candidates)
        rate = tokens / cost.step(counts, unified=unified, drafted=max(plan.values()))
        if rate > best_rate:
            best_rate, best = rate, plan
    return {seq_id: n for seq_id, n in best.items() if n}


def _best_alone(candidate: Candidate, cost: StepCost, draft_min: int) -> int:
    """The draft length with the most expected tokens per run time for this slot alone (0: none)."""
    best_n, best_rate = 0, 1 / cost.run(1)
    tokens, kept = 1.0, 1.0  # expected_tokens(n), acceptance ** n: grown with n
    for n in range(1, candidate.n_draft + 1):
        kept *= candidate.acceptance
        tokens += kept
        if n < draft_min:
            continue
        rate = tokens / (cost.run(n + 1) + cost.drafting(n))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


class Acceptance:
    """The share of drafted tokens kept, recent ones weighing most: one per running choice, and
    one for the engine, from which each new choice starts (a server copying documents all day
    drafts from its first token; one writing stories tries less)."""

    def __init__(self, value: float = PRIOR_ACCEPTANCE) -> None:
        self.value = value

    def start(self) -> Acceptance:
        """A new choice's acceptance, from this (the engine's)."""
        return Acceptance(max(self.value, START_FLOOR))

    def update(self, drafted: int, accepted: int) -> None:
        """After a step that verified `drafted` tokens and kept the first `accepted`: each kept one
        is an observation of 1, the first rejected one of 0 (the ones after it were never really
        tried)."""
        for _ in range(accepted):
            self.value += ACCEPTANCE_WEIGHT * (1 - self.value)
        if accepted < drafted:
            self.value -= ACCEPTANCE_WEIGHT * self.value

    def recover(self) -> None:
        """After a token decoded without drafts: back toward the prior, slowly."""
        self.value += ACCEPTANCE_RECOVERY * (PRIOR_ACCEPTANCE - self.value)
