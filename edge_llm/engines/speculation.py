"""Speculative decoding: who proposes tokens, and how many a step should verify.

A drafter proposes tokens that likely follow what a slot holds; the scheduler puts them into the
same llama_decode as every other slot's work, samples every drafted position with the slot's own
sampler chain and keeps the drafted tokens up to the first that differs from what was sampled
(scheduler.py). Sampling each position and comparing is the standard acceptance rule for a
deterministic draft: the output is exactly what decoding without speculation gives, greedy or
seeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Drafter(Protocol):
    """Proposes tokens for the slots that may speculate this step."""

    def propose(self, wanted: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        """`wanted`: slot (sequence id) -> (every token the slot holds, its last one sampled but not
        yet decoded; the most tokens to propose). Returns slot -> the proposed tokens that follow,
        at most that many (empty or missing: nothing to propose)."""
        ...

    def close(self) -> None:
        ...
