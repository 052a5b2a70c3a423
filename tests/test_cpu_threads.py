"""The CPU thread policy: how OpenMP threads wait, how many threads a decode uses, and that
neither changes what the model generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm.engines import cpu_threads
from edge_llm.engines.cpu_threads import (
    CpuSample,
    ThreadGovernor,
    configure_openmp,
    next_threads,
    openmp_waiting,
    others_load,
    read_cpu_sample,
)


def test_bounded_spinning_unless_the_user_chose():
    env: dict[str, str] = {}
    configure_openmp(env)
    assert env == {"GOMP_SPINCOUNT": cpu_threads.SPIN_COUNT}
    assert openmp_waiting(env) == f"GOMP_SPINCOUNT={cpu_threads.SPIN_COUNT}"
    for users in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(users)
        configure_openmp(env)
        assert env == users  # the user's choice is left exactly as it was
    assert openmp_waiting({}) == "libgomp default"
    assert openmp_waiting({"OMP_WAIT_POLICY": "ACTIVE"}) == "OMP_WAIT_POLICY=ACTIVE"


@pytest.mark.model
@pytest.mark.parametrize(("users", "expected"), [
    ({}, f"GOMP_SPINCOUNT={cpu_threads.SPIN_COUNT}"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE"),
    ({"GOMP_SPINCOUNT": "0"}, "GOMP_SPINCOUNT=0"),
])
def test_doctor_reports_the_waiting_policy_in_effect(users, expected):
    """In a fresh process (libgomp reads its environment once): edge-llm's default, or the user's."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-m", "edge_llm", "doctor", "--json"], capture_output=True, text=True,
                         env={**env, **users}, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["openmp_waiting"] == expected


@pytest.mark.parametrize(("current", "limit", "others", "expected"), [
    (2, 2, 0.0, 2),
    (2, 2, 0.35, 2),   # a light program (the benchmark's own client, a browser tab): keep every core
    (2, 2, 0.5, 1),    # a pinned busy loop gets half a core beside a spinning thread: give one up
    (2, 2, 1.9, 1),    # never below one thread
    (1, 2, 0.35, 1),   # between the thresholds: stay where it is
    (1, 2, 0.2, 2),    # the other program is (nearly) gone: take the core back
    (8, 8, 2.6, 5),    # three cores' worth of others on an 8-core box
    (5, 8, 2.5, 5),
    (5, 8, 1.25, 7),
    (1, 1, 3.0, 1),
])
def test_next_threads(current, limit, others, expected):
    assert next_threads(current, limit, others) == expected


@pytest.mark.parametrize(("current", "limit", "cores", "others", "expected"), [
    (4, 4, 8, 3.0, 4),   # -t 4 on 8 cores: three busy cores still leave four free
    (4, 4, 8, 4.5, 3),   # ... five do not
    (3, 4, 8, 3.2, 4),
    (2, 2, 2, 1.0, 1),   # -t 2 on 2 cores: lowered like the default (#27)
])
def test_an_explicit_thread_count_is_a_ceiling(current, limit, cores, others, expected):
    assert next_threads(current, limit, others, cores) == expected


class FakeCpu:
    """CPU counters that advance as the test says: `others` cores used by other programs."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy = 0.0
        self.own = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float, others: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def sample(self, cores: list[int]) -> CpuSample:
        self.calls += 1
        return CpuSample(self.now, self.busy, self.own)


def test_governor_yields_a_core_to_other_programs_and_takes_it_back():
    cpu = FakeCpu()
    governor = ThreadGovernor(2, cores=[0, 1], sample=cpu.sample, clock=cpu.clock)
    assert governor.threads() == 2
    cpu.advance(0.1, others=1.0)
    assert governor.threads() == 2  # too soon to sample again
    cpu.advance(0.5, others=1.0)
    assert governor.threads() == 1
    assert governor.others == pytest.approx(1.0)
    cpu.advance(0.6, others=0.35)
    assert governor.threads() == 1  # still above the reclaim threshold
    cpu.advance(0.6, others=0.0)
    assert governor.threads() == 2


def test_governor_ignores_a_window_that_spans_idle_time():
    cpu = FakeCpu()
    governor = ThreadGovernor(2, cores=[0, 1], sample=cpu.sample, clock=cpu.clock)
    cpu.advance(60.0, others=1.5)  # the engine slept a minute while something else ran
    assert governor.threads() == 2
    cpu.advance(0.6, others=0.0)
    assert governor.threads() == 2


def test_an_explicit_thread_count_yields_too():
    """-t 2 on a 2-core box beside a busy loop: one thread, not two spinning ones (#27)."""
    cpu = FakeCpu()
    governor = ThreadGovernor(2, cores=[0, 1], sample=cpu.sample, clock=cpu.clock)
    cpu.advance(0.1, others=0.0)
    governor.threads()
    cpu.advance(0.6, others=0.5)
    assert governor.threads() == 1


def test_without_adaptation_the_count_is_fixed_and_nothing_is_sampled():
    cpu = FakeCpu()
    governor = ThreadGovernor(3, adapt=False, cores=[0, 1], sample=cpu.sample, clock=cpu.clock)
    for _ in range(3):
        cpu.advance(1.0, others=2.0)
        assert governor.threads() == 3
    assert cpu.calls == 0


def test_no_proc_means_no_adaptation():
    governor = ThreadGovernor(2, cores=[0], sample=lambda cores: None)
    assert governor.threads() == 2


def test_real_cpu_counters_read():
    cores = cpu_threads.usable_cores()
    first = read_cpu_sample(cores)
    sum(i * i for i in range(200_000))  # some CPU time of our own
    second = read_cpu_sample(cores)
    assert first is not None and second is not None
    assert second.own >= first.own > 0
    assert second.busy >= first.busy > 0
    assert others_load(first, second) >= 0.0
    assert others_load(second, first) == 0.0  # a window of no length says nothing


@pytest.mark.model
def test_explicit_threads_are_the_ceiling_and_the_default_every_core(demo_path):
    from edge_llm.api import load

    with load(str(demo_path), n_ctx=512, n_parallel=1, n_threads=1) as engine:
        assert engine.scheduler.governor.limit == 1
        assert engine.scheduler.thread_counts == (1, 1)
    with load(str(demo_path), n_ctx=512, n_parallel=1, n_threads=2, n_threads_batch=1) as engine:
        assert engine.scheduler.thread_counts == (2, 1)
    with load(str(demo_path), n_ctx=512, n_parallel=1) as engine:
        assert engine.scheduler.governor.limit == cpu_threads.default_threads()
        assert engine.scheduler.governor.adapts  # it samples the CPU counters
    with load(str(demo_path), n_ctx=512, n_parallel=1, n_threads=2, adapt_threads=False) as engine:
        assert not engine.scheduler.governor.adapts  # --no-adapt-threads: always -t


class Yielding:
    """A governor that has given up one of two cores."""

    others = 1.0
    limit = 2

    def threads(self) -> int:
        return 1


@pytest.mark.model
def test_threads_batch_gives_up_as_many_threads_as_threads(demo_path):
    from edge_llm.api import load
    from edge_llm.sampling import SamplingParams

    with load(str(demo_path), n_ctx=512, n_parallel=1, n_threads=2, n_threads_batch=3) as engine:
        engine.scheduler.governor = Yielding()
        list(engine.stream("Hi", SamplingParams.create(max_tokens=2)))
        assert engine.scheduler.thread_counts == (1, 2)


class Alternating:
    """A governor that switches between 2 threads and 1 every few decodes."""

    others = 0.0
    limit = 2

    def __init__(self) -> None:
        self.calls = 0

    def threads(self) -> int:
        self.calls += 1
        return 2 if (self.calls // 3) % 2 == 0 else 1


PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


def _tokens(engine, prompt: str, **params) -> list[int]:
    from edge_llm.sampling import SamplingParams

    return [t for d in engine.stream(prompt, SamplingParams.create(temperature=0, max_tokens=40, **params))
            for t in d.token_ids]


@pytest.mark.model
def test_greedy_output_does_not_depend_on_thread_switches(engine):
    reference = [_tokens(engine, p, ignore_eos=True) for p in PROMPTS]
    saved = engine.scheduler.governor
    engine.scheduler.governor = Alternating()
    try:
        switched = [_tokens(engine, p, ignore_eos=True) for p in PROMPTS]
        assert engine.scheduler.governor.calls > 20
    finally:
        engine.scheduler.governor = saved
    assert switched == reference


@pytest.mark.model
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_argmax_greedy_equals_llama_cpp_greedy_sampler(engine, monkeypatch, ignore_eos):
    from edge_llm.engines import scheduler

    fast = [_tokens(engine, p, ignore_eos=ignore_eos) for p in [*PROMPTS, "Hi!"]]
    monkeypatch.setattr(scheduler, "_plain_greedy", lambda params: False)  # llama.cpp's sampler chain
    chain = [_tokens(engine, p, ignore_eos=ignore_eos) for p in [*PROMPTS, "Hi!"]]
    assert fast == chain
    assert all(fast)
