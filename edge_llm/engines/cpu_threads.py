"""How llama.cpp's CPU threads wait, and how many of them a decode uses.

llama-cpp-python's wheels build ggml with OpenMP, so every matrix op of a decode ends in an OpenMP
barrier (hundreds per token) and the threads' waiting is libgomp's: spin GOMP_SPINCOUNT times,
then sleep on a futex. ggml's own threadpool (`--poll`, `--cpu-strict` in llama-server) is not
used by OpenMP builds. Measured on a 2-core box, single stream (scripts/bench_engine_overhead.py):

- Sleeping at once (OMP_WAIT_POLICY=PASSIVE, spin 0) costs a futex wake per barrier: 0.36x the
  speed of spinning on a quiet machine.
- Spinning (libgomp's default of 300k spins, what llama-server gets) is fast while the cores are
  free, but when another program holds one core a spinning thread burns its time slice waiting
  for a partner that is not running: 3-20x slower, and jittery.
- One thread has no barriers: under that contention it decodes ~6x faster than two spinning
  threads, and 1.3x faster than two passive ones.

So edge-llm keeps libgomp's spinning while the cores are free and lets `ThreadGovernor` yield a
core to other programs while they keep it busy (one thread has no barriers to spin at). The count is
set explicitly (GOMP_SPINCOUNT=300000, libgomp's own default; `edge-llm doctor` shows it): a shorter
spin (10000, tried first) cost 5-10% single-stream on a quiet machine (0.90x against 0.98x
llama-server in the same run of scripts/bench_serving.py) and bought nothing under contention,
where the governor already decodes on one thread; an idle server burns nothing either way (threads
sleep after the spin). The user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT always win.

-t / -tb are the most threads a decode uses, not a promise to use them all: the governor lowers both
while other programs hold cores, an explicit -t as much as the default. (It used to leave an explicit
-t alone, and a benchmark that passed `-t 2`, as llama-server users do, saw two spinning threads
collapse beside a busy loop: 11 tokens/s against 33 with OMP_WAIT_POLICY=PASSIVE, issue #27.)
--no-adapt-threads keeps exactly -t (llama.cpp's CPU flash attention rounds differently with another
thread count, so only then is greedy output independent of the machine's load).

When to yield, measured on the 2-core VM (SmolLM2-135M, single stream, tokens/s of 2 spinning threads
over 1 thread, beside a program pinned to one core that is busy this share of each 20 ms):
0 -> 1.71x, 0.25 -> 1.34x, 0.5 -> 1.16x, 0.75 -> 0.88x, 1.0 -> 0.21x. So one thread wins from about
two thirds of a core on, and loses little below that. The governor sees what the others *got*
(/proc/stat), which beside two spinning threads is at most about half a core however much they want
(the scheduler shares the core between them and our spinner); so it yields above 0.4 of a core
(a pinned busy loop shows 0.5-1.0) and, on one thread (where the others can have a whole core and
show what they want), takes the core back below 0.3.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

SPIN_COUNT = "300000"
# Other programs' CPU use (in cores) above which the governor gives up a core, and below which
# it takes one back (measured, see above): apart, so that it does not flap around one value.
YIELD_ABOVE = 0.4
RECLAIM_BELOW = 0.3
SAMPLE_SECONDS = 0.5


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Bounded spinning unless the user chose how OpenMP threads wait. It must run before llama_cpp
    is imported: libgomp reads its environment once, when it is loaded."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def openmp_waiting(environ: MutableMapping[str, str] = os.environ) -> str:
    """The waiting policy in effect, for `edge-llm doctor`."""
    policy = environ.get("OMP_WAIT_POLICY")
    spin = environ.get("GOMP_SPINCOUNT")
    parts = ([f"OMP_WAIT_POLICY={policy}"] if policy else []) + ([f"GOMP_SPINCOUNT={spin}"] if spin else [])
    return " ".join(parts) or "libgomp default"


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """llama.cpp's own default: one thread per core this process may run on."""
    return max(1, len(usable_cores()))


@dataclass(frozen=True)
class CpuSample:
    wall: float  # seconds
    busy: float  # CPU-seconds spent by anything on our cores (steal included)
    own: float  # CPU-seconds spent by this process


def read_cpu_sample(cores: list[int]) -> CpuSample | None:
    """Busy time of our cores (/proc/stat) and this process's CPU time (/proc/self/stat); None
    where /proc is not there (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{c}" for c in cores}
    try:
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in wanted:
                    # user nice system idle iowait irq softirq steal ...: all but idle and iowait
                    v = [int(x) for x in rest.split()[:8]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(time.monotonic(), busy / tick, own / tick)


def others_load(before: CpuSample, after: CpuSample) -> float:
    """Cores kept busy by other programs between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def next_threads(current: int, limit: int, others: float, cores: int | None = None) -> int:
    """Threads for the next decodes, at most `limit`: of the `cores` this process may use (default:
    `limit`), a core is given up as soon as other programs use more than YIELD_ABOVE of it, and
    taken back only once they use less than RECLAIM_BELOW."""
    cores = limit if cores is None else cores
    down = min(limit, cores - math.ceil(max(0.0, others - YIELD_ABOVE)))
    up = min(limit, cores - math.ceil(max(0.0, others - RECLAIM_BELOW)))
    if down < current:
        return max(1, down)
    if up > current:
        return max(1, up)
    return current


class ThreadGovernor:
    """The thread count for each decode: `limit` (-t, or every usable core) while the machine is
    quiet, fewer while other programs keep cores busy. Asked before every decode; it samples the
    CPU counters at most every SAMPLE_SECONDS."""

    def __init__(self, limit: int, *, adapt: bool = True, cores: list[int] | None = None,
                 sample: Callable[[list[int]], CpuSample | None] = read_cpu_sample,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = max(1, limit)
        self.current = self.limit
        self._cores = cores if cores is not None else usable_cores()
        self._sample = sample
        self._clock = clock
        self._last: CpuSample | None = sample(self._cores) if adapt else None  # None: always `limit`
        self.others = 0.0  # the last measurement, for logs and tests

    @property
    def adapts(self) -> bool:
        """Whether it follows the machine's load (else always `limit`: --no-adapt-threads)."""
        return self._last is not None

    def threads(self) -> int:
        if self._last is None:
            return self.current
        if self._clock() - self._last.wall < SAMPLE_SECONDS:
            return self.current
        sample = self._sample(self._cores)
        if sample is None:
            return self.current
        if sample.wall - self._last.wall > 4 * SAMPLE_SECONDS:
            # The engine was idle: the window is stale and says nothing about running now.
            self._last = sample
            return self.current
        self.others = others_load(self._last, sample)
        self._last = sample
        self.current = next_threads(self.current, self.limit, self.others, len(self._cores))
        return self.current
