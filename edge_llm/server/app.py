"""create_app(): the FastAPI application around a ModelManager.

Middleware order (outermost first): the log line of each request (with `access_log`), the Host /
Origin policy for browsers, the chat page, the API key, then the body size limit, so a client
without the key is refused before its body is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from edge_llm.server.access_log import AccessLogMiddleware
from edge_llm.server.auth import APIKeyMiddleware
from edge_llm.server.browsers import BrowserPolicyMiddleware
from edge_llm.server.errors import install_error_handlers
from edge_llm.server.forward import peer_client
from edge_llm.server.jsonio import AssumeJSONMiddleware, JSONResponse
from edge_llm.server.limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimitMiddleware
from edge_llm.server.media import ImagePolicy
from edge_llm.server.metrics import ServerMetrics
from edge_llm.server.models import ModelManager
from edge_llm.server.state import ServerState
from edge_llm.version import package_version
from edge_llm.webui import install_webui


def create_app(manager: ModelManager, *, api_keys: list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, preload: bool = False, bound_host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None,
               reasoning_format: str = "auto", sampling_defaults: dict[str, Any] | None = None,
               image_policy: ImagePolicy | None = None, access_log: bool = False) -> FastAPI:
    from edge_llm.server import (
        anthropic_routes,
        ollama_routes,
        openai_routes,
        rerank_routes,
        responses_routes,
        simple_routes,
    )

    state = ServerState(manager, ServerMetrics(manager), reasoning_format=reasoning_format,
                        sampling_defaults=dict(sampling_defaults or {}), image_policy=image_policy or ImagePolicy())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.peer_client = peer_client()
        await manager.start(preload=preload)
        try:
            yield
        finally:
            await state.peer_client.aclose()
            await manager.close()

    app = FastAPI(title="edge-llm", version=package_version(), lifespan=lifespan, default_response_class=JSONResponse,
                  description="OpenAI-compatible API for local models (chat, completions, embeddings, Responses), rerank, "
                              "Anthropic's Messages API, the Ollama API, and the simple JSON APIs of vLLM's "
                              "api_server (/generate), mosec-style services (/inference) and the FastAPI "
                              "chat demo (/).")
    app.state.edge = state
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(simple_routes.router)
    app.include_router(rerank_routes.router)
    app.add_middleware(AssumeJSONMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=api_keys)
    install_webui(app)  # GET / and /ui serve the chat page without a key
    # Outermost: which Host names and web pages may reach anything at all (browsers.py).
    app.add_middleware(BrowserPolicyMiddleware, bound_host=bound_host, allowed_hosts=allowed_hosts,
                       cors_origins=cors_origins)
    if access_log:  # around everything, refusals included
        app.add_middleware(AccessLogMiddleware)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents validation errors as 422; this server answers them with 400 (as OpenAI
    does), so the schema says so and schema-driven clients expect the right code."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
