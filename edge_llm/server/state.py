"""What every route shares for the life of the app (`ServerState`), and how a route finds it.

It sits below the routes and the pipeline and above models/metrics/media, so any of them can name
it without importing app.py (the top, which creates it and assembles the routes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request

from edge_llm.server.media import ImagePolicy
from edge_llm.server.metrics import ServerMetrics
from edge_llm.server.models import ModelManager


@dataclass
class ServerState:
    manager: ModelManager
    metrics: ServerMetrics
    peer_client: httpx.AsyncClient | None = None
    # Set when a shutdown's drain period is over: running generations end now (generation.py).
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    reasoning_format: str = "auto"  # --reasoning-format: auto | deepseek | none (edge_llm/reasoning.py)
    # serve's sampling flags (--temp, -n ...): for what a request leaves unset, above a model's
    # registry defaults (pipeline.start_run); SamplingParams names, max_tokens included.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)  # image limits, allowed URL hosts


def server_state(request: Request) -> ServerState:
    return request.app.state.edge
