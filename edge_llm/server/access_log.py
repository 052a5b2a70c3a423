"""One log line per request, as llama-server and Ollama print them: when it ended, who asked, what,
the status, how long the whole answer took (a stream's last event included) and, for the routes that
generate, the tokens read and written:

    2026-01-05 12:00:01 127.0.0.1 POST /v1/chat/completions 200 1.52 s, 12 prompt + 34 generated tokens

`/health` and `/metrics` are left out (monitors poll them); the query string is never written (a
client may put a key there). `edge-llm serve` sends these lines to stderr unless `--no-access-log`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
_KEY = "edge_llm_tokens"  # in the request's state (scope["state"], which starlette's Request.state reads)
_QUIET_PATHS = {"/health", "/v1/health", "/metrics"}


@dataclass
class RequestTokens:
    """Token counts of one request, added as each choice finishes (metrics.RequestObserver)."""

    prompt: int = 0
    generated: int = 0
    counted: bool = False

    def add(self, prompt: int, generated: int) -> None:
        self.prompt += prompt
        self.generated += generated
        self.counted = True


def request_tokens(request: Request) -> RequestTokens | None:
    """Where the pipeline counts this request's tokens for its log line (None: no log)."""
    return request.scope.get("state", {}).get(_KEY)


class AccessLogMiddleware:
    """Outermost, so refusals by the browser policy or the API key are logged too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        tokens = RequestTokens()
        scope.setdefault("state", {})[_KEY] = tokens
        start = time.perf_counter()
        status: list[int] = []

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            if not status:
                status.append(500)  # what starlette's error middleware, outside this one, answers
            raise
        finally:
            logger.info(access_line(scope, status[0] if status else None, time.perf_counter() - start, tokens))


def access_line(scope: dict[str, Any], status: int | None, seconds: float, tokens: RequestTokens) -> str:
    client = (scope.get("client") or ("-",))[0]
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client} {scope['method']} {scope['path']} "
            f"{status if status is not None else '-'} {seconds:.2f} s")
    if tokens.counted:
        line += f", {tokens.prompt} prompt + {tokens.generated} generated tokens"
    return line
