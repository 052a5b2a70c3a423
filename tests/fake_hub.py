"""A Hugging Face Hub stand-in on 127.0.0.1 that serves the endpoints huggingface_hub downloads
through (point HF_ENDPOINT at it): repo info, the file tree, and `resolve/` with HEAD, ETag, the
commit header and Range requests, so resumed downloads can be checked too."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], token: str | None = None):
        self.repos = repos
        self.token = token
        self.sha = "0123456789abcdef0123456789abcdef01234567"
        self.requests: list[tuple[str, str, dict]] = []
        self.fail_after: dict[str, int] = {}  # filename -> bytes to send before dropping the connection
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _json(self, handler, body, head: bool) -> None:
        data = json.dumps(body).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    def _error(self, handler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def handle(self, handler, head: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path, {k.lower(): v for k, v in handler.headers.items()}))
        if self.token and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(handler, 401, "RepoNotFound")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self._error(handler, 404, "RepoNotFound")
            return self._json(handler, {"id": m[1], "sha": self.sha, "private": False,
                                        "siblings": [{"rfilename": f} for f in repo]}, head)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self._error(handler, 404, "RepoNotFound")
            return self._json(handler, [{"type": "file", "path": f, "size": len(data),
                                         "oid": hashlib.sha1(data).hexdigest()} for f, data in repo.items()], head)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self._error(handler, 404, "RepoNotFound")
            if m[3] not in repo:
                return self._error(handler, 404, "EntryNotFound")
            return self._file(handler, m[3], repo[m[3]], head)
        return self._error(handler, 404, "NotFound")

    def _file(self, handler, name: str, data: bytes, head: bool) -> None:
        start = 0
        if rng := re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", "")):
            start = int(rng[1])
        body = data[start:]
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", self.sha)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(body)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if head:
            return
        cut = self.fail_after.pop(name, None)
        if cut is not None:  # a dropped connection mid-file
            handler.wfile.write(body[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(body)
