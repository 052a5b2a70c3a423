"""Chat templates rendered for HTTP requests, off the event loop and out of the shared thread pool.

A model's own template renders in its sandbox process (edge_llm/template_sandbox.py), bounded in
time and memory; a worker thread waits for it. At most one render per engine is in flight here,
so a model whose template is slow or hostile holds one thread, never the pool that tokenize,
completions and the other models need. A request that cannot start its render within one
worst-case render time gets a 503 with Retry-After instead of waiting behind the others. The
request pipeline (pipeline.py) holds `rendering(engine)` while its `prepare` renders.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from edge_llm.engines.base import Engine
from edge_llm.errors import OverloadedError
from edge_llm.template_sandbox import KILL_GRACE_SECONDS, RENDER_SECONDS

QUEUE_SECONDS = RENDER_SECONDS + KILL_GRACE_SECONDS
_gates: weakref.WeakKeyDictionary[Any, tuple[asyncio.AbstractEventLoop, asyncio.Semaphore]] = \
    weakref.WeakKeyDictionary()


def _gate(engine: Engine) -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    held = _gates.get(engine)
    if held is None or held[0] is not loop:  # asyncio primitives belong to one loop
        held = (loop, asyncio.Semaphore(1))
        _gates[engine] = held
    return held[1]


@asynccontextmanager
async def rendering(engine: Engine) -> AsyncIterator[None]:
    """Hold the engine's one template render slot; 503 when it stays busy for a worst-case render."""
    gate = _gate(engine)
    try:
        await asyncio.wait_for(gate.acquire(), QUEUE_SECONDS)
    except asyncio.TimeoutError:
        raise OverloadedError("this model's chat template is busy with other requests; retry later") from None
    try:
        yield
    finally:
        gate.release()

