"""What web browsers may do with the server: the Host names it answers to and the origins (web
pages) that may call it.

A server on 127.0.0.1 without an API key is reachable from every web page its user opens. A page
can POST to it without asking anyone (a form, or fetch() in no-cors mode with a "simple" content
type), and a DNS-rebinding page makes its own name resolve to 127.0.0.1 and then reads the
answers as same-origin. So, as Ollama and llama-server do in their own ways:

- Host: a request must name this server by a loopback name (localhost, *.localhost, 127.0.0.1,
  [::1]), by an IP address (a rebinding attack needs a name), by the address it is bound to, or
  by a name given with `--allowed-hosts` (`*`: any, e.g. behind a proxy that checks it). Any port.
  Anything else is a 403.
- Origin: a browser names the page that sends a request in `Origin`. A page of this server (its
  chat UI), of a loopback origin (a local app on another port) or one listed with `--cors` may
  call it, and gets CORS headers (preflights included); any other origin gets a 403. Requests
  without an Origin (curl, SDKs, scripts) are not from web pages and are not affected.
- Content type: a browser request (one with Origin or Sec-Fetch-Site headers) must send its body
  as application/json; the form and text bodies that pages may send cross-site without a preflight
  are refused (403), while curl's `-d '{...}'` (sent as a form, without those headers) is still
  read as JSON by AssumeJSONMiddleware.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_llm.server.errors import error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Origins of loopback pages, any port (a local chat app on :3000, a notebook...).
LOOPBACK_ORIGIN_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
# Content types a page can send cross-site without a CORS preflight.
_SIMPLE_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain")


def split_host(value: str) -> str:
    """The name in a Host header, lowercased, without its port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostPolicy:
    def __init__(self, bound_host: str = "127.0.0.1", allowed_hosts: list[str] | None = None) -> None:
        names = [split_host(h) for h in (allowed_hosts or []) if h.strip()]
        self.any = "*" in names
        self.names = LOOPBACK_NAMES | {split_host(bound_host)} | set(names)

    def allows(self, host: str) -> bool:
        name = split_host(host)
        # No Host at all (HTTP/1.0 probes) cannot come from a browser.
        return self.any or not name or name in self.names or name.endswith(".localhost") or _is_ip(name)


class BrowserPolicyMiddleware:
    """The Host, Origin and content-type checks above; CORS headers come from starlette's
    CORSMiddleware, which this wraps."""

    def __init__(self, app: ASGIApp, *, bound_host: str = "127.0.0.1", allowed_hosts: list[str] | None = None,
                 cors_origins: list[str] | None = None) -> None:
        self.hosts = HostPolicy(bound_host, allowed_hosts)
        origins = [o.strip().rstrip("/") for o in cors_origins or [] if o.strip()]
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_origin_regex=LOOPBACK_ORIGIN_REGEX,
                                   allow_methods=["*"], allow_headers=["*"], max_age=600)

    def origin_allowed(self, origin: str, host: str) -> bool:
        if self.cors.is_allowed_origin(origin):
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()  # this server's own page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.cors(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            await self._refuse(scope, receive, send, f"this server does not answer to the host name {host!r}; "
                               "start it with --allowed-hosts to allow it", "host_not_allowed")
            return
        origin = headers.get(b"origin")
        if origin is not None and not self.origin_allowed(origin.decode("latin-1"), host):
            await self._refuse(scope, receive, send, f"requests from the web page origin {origin.decode('latin-1')!r} "
                               "are not allowed; start the server with --cors ORIGIN to allow it", "origin_not_allowed")
            return
        browser = origin is not None or headers.get(b"sec-fetch-site", b"none") not in (b"none", b"same-origin")
        content_type = headers.get(b"content-type", b"").lower()
        if browser and scope["method"] == "POST" and (not content_type or content_type.startswith(_SIMPLE_TYPES)):
            await self._refuse(scope, receive, send, "requests from web pages must send their body as "
                               "Content-Type: application/json", "content_type_not_allowed")
            return
        await self.cors(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        await error_response(403, message, code=code)(scope, receive, send)
