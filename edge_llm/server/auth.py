"""API keys: `Authorization: Bearer KEY` on every route but /health (llama-server's rule), or
`x-api-key: KEY`, the header Anthropic's clients send.

Keys are compared as SHA-256 digests with hmac.compare_digest, so neither the content nor the
length of a guess changes the time a refusal takes.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from edge_llm.errors import EdgeLLMError
from edge_llm.files import read_text
from edge_llm.server.errors import error_response

OPEN_PATHS = frozenset({"/health"})


def read_api_keys(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    lines = read_text(path, "API key file").splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise EdgeLLMError(f"API key file {path} has no key")
    return keys


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._digests = [_digest(k.encode("utf-8")) for k in keys]

    def allowed(self, authorization: bytes, api_key: bytes = b"") -> bool:
        scheme, _, token = authorization.partition(b" ")
        bearer = scheme.lower() == b"bearer"
        given = _digest(token.strip() if bearer else api_key.strip())
        # Compare with every key (no early exit), so which key matched does not show in the timing.
        matches = [hmac.compare_digest(given, d) for d in self._digests]
        return (bearer or bool(api_key)) and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        api_key = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"")
        if self.allowed(authorization, api_key):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided" if authorization or api_key else
                   "You didn't provide an API key: send the header 'Authorization: Bearer YOUR_KEY'")
        response = error_response(401, message, type="invalid_request_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
