"""`edge-llm serve`: an OpenAI-compatible HTTP server, plus the simple JSON APIs of existing
deployments (vLLM's /generate, a mosec-style /inference, the FastAPI demo's /).

    from edge_llm.server import create_app, ModelManager
"""

from __future__ import annotations

from edge_llm.server.app import create_app
from edge_llm.server.models import ModelManager

__all__ = ["ModelManager", "create_app"]
