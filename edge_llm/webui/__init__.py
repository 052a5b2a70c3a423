"""The built-in chat page: `GET /` and `GET /ui` on `edge-llm serve`.

Plain static files (no build step, no CDN) served by an outermost ASGI middleware, so that:
- the page loads without an API key (it holds no secret; the user pastes the key into the page,
  which sends it on its own API calls, as llama-server's web UI does);
- `POST /` stays the FastAPI-demo JSON API, and the page is not part of the OpenAPI schema.
The page talks to the server only through the OpenAI API (/v1/models, /v1/chat/completions).
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/ui": "index.html", "/ui/": "index.html", "/ui/index.html": "index.html",
         "/ui/app.js": "app.js", "/ui/style.css": "style.css"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Everything the page loads comes from this server: a CDN or an injected script is refused by the browser.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class WebUIMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = PAGES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        response: Response = FileResponse(STATIC / name, media_type=MEDIA_TYPES[Path(name).suffix],
                                          headers=HEADERS)
        await response(scope, receive, send)


def install_webui(app) -> None:
    """Serve the page in front of every other middleware (API key included). Call last."""
    app.add_middleware(WebUIMiddleware)
