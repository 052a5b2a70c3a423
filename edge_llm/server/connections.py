"""HTTP connections that do nothing cannot pile up (uvicorn's h11 protocol, bounded).

uvicorn closes a connection idle between two requests after its keep-alive timeout, but a new
connection that sends nothing, or sends its headers a byte at a time, is kept forever: 350 of
them sat for minutes, and enough of them exhaust the process's file descriptors, after which
nobody is served. Here:

- a request's headers must be complete within HEADER_SECONDS of the connection opening or of
  the previous response ending, however the bytes trickle in; otherwise the connection is closed;
- at most MAX_CONNECTIONS are open; past that, a new connection makes room by closing the
  connection that has been idle longest (no request in progress: waiting for, or trickling,
  its headers). Connections with a request in progress are never closed for this; if every
  other one is busy, the new connection is the one closed. So idle connections cannot crowd
  out a real request, and busy ones are bounded by the models' queues (--max-queue);
- a request body must arrive within BODY_SECONDS (limits.py);
- the soft limit of open files is raised to the hard one at start (as Go's runtime does): a burst
  of connections is accepted in batches before any of them can make room, and must not meet the
  1024 files many systems start a process with.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5  # uvicorn's default, stated: idle between two requests of one connection
MAX_CONNECTIONS = 512


class BoundedH11Protocol(H11Protocol):
    _header_timer: asyncio.TimerHandle | None = None
    _idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        if len(self.connections) > MAX_CONNECTIONS:  # cheap test first: the set holds closing ones too
            self._make_room()
        if not transport.is_closing():
            self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._idle():
            self._disarm_header_timer()  # the headers are complete: a request runs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._idle() and not self.transport.is_closing():
            self._idle_since = self.loop.time()
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request in progress: waiting for (or receiving) the headers of the next one."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        idle = sorted((c for c in open_ if isinstance(c, BoundedH11Protocol) and c._idle()),
                      key=lambda c: c._idle_since)
        for connection in idle[:len(open_) - MAX_CONNECTIONS]:
            connection.transport.close()


def raise_open_files_limit() -> None:
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 1 << 20, 65536, 10240):  # macOS refuses more than OPEN_MAX (10240)
        if target == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and target <= soft):
            continue
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
