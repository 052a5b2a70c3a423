"""A workaround, applied to the engines this server loads, for a scheduler bug (reported to the
owner of edge_llm/engines/scheduler.py; delete this module once it is fixed there).

The bug: `Scheduler._sample` calls `sampler.sample()` -- llama.cpp's `llama_sampler_sample`,
which already accepts the sampled token into the whole sampler chain -- and then
`sampler.accept(token)` a second time. Every generated token is accepted twice. With penalties
that double-counts tokens; with a grammar (response_format, forced tool calls) the grammar
advances twice per token, finds no valid stack, and llama.cpp throws a C++ exception that
aborts the whole process ("Unexpected empty grammar stack after accepting piece").

The wrapper forwards accepts made before the first sample (the prompt tokens fed to the
repetition penalty) and drops the one accept that follows each sample. Once the scheduler stops
accepting twice, the wrapper changes nothing.
"""

from __future__ import annotations

from typing import Any


class _AcceptOnce:
    def __init__(self, sampler: Any) -> None:
        self._sampler = sampler
        self._just_sampled = False

    def sample(self, ctx: Any, index: int = -1) -> int:
        token = self._sampler.sample(ctx, index)  # llama_sampler_sample has accepted `token`
        self._just_sampled = True
        return token

    def accept(self, token: int) -> None:
        if self._just_sampled:
            self._just_sampled = False
            return
        self._sampler.accept(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def accept_each_token_once(engine: Any) -> Any:
    scheduler = getattr(engine, "scheduler", None)
    build = getattr(scheduler, "_build_sampler", None)
    if build is not None:
        scheduler._build_sampler = lambda params, seed: _AcceptOnce(build(params, seed))
    return engine
