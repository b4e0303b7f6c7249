"""Slow clients: a deadline for reading each request, and a cap on open connections per worker.

uvicorn has a keep-alive timeout (between requests) but no timeout while a request arrives: a client sending one
header line every few seconds, or a body shorter than its Content-Length, holds its connection (and, for the body, a
running request) forever. This protocol is uvicorn's httptools protocol (as filefeed/hotpath.py serves it, hot
routes included) with one deadline per request read: set when the connection opens and when a request's first byte
arrives, cleared when the whole request (headers and body) is in; each worker sweeps its connections' deadlines every
SWEEP_SECONDS. When one passes first, the client gets `408 Request Timeout` (if no answer has started) and the
connection is closed; the request's handler then sees the client gone. Connections beyond `max_connections` are
closed at once, before reading anything, so a flood of idle sockets cannot take the file descriptors the staging
volume needs.

It relies on uvicorn internals (`connections`, `cycle`, the parser callbacks), hence the pinned range in
pyproject.toml and tests/service/test_guard.py, which fails when the library changes under it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from filefeed.hotpath import DirectRoutesProtocol

if TYPE_CHECKING:
    from config.settings import ServiceSettings

PROTOCOL = "filefeed.guard:GuardedHttpToolsProtocol"  # uvicorn.Config(http=...): imported by name in each worker
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: 30\r\nconnection: close\r\n\r\nrequest not received in time\r\n")


# How often each worker looks for requests past their read deadline: a deadline fires at most this late. One sweep
# per worker instead of a timer armed and cancelled for every request (a TimerHandle and two heap operations per
# request were 3 % of a worker's time under wrk).
SWEEP_SECONDS = 0.25


class GuardedHttpToolsProtocol(DirectRoutesProtocol):
    # set in each worker by configure(), before it accepts connections
    read_timeout: float = 10.0
    max_connections: int = 2048

    _read_deadline: float | None = None  # loop time by which the request being read must be in; None: not reading

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()
            return
        _sweep_deadlines(self.loop, self.server_state)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.time() + self.read_timeout

    def _disarm(self) -> None:
        self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        cycle: Any = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:  # no answer begun for this one
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def _sweep_deadlines(loop: asyncio.AbstractEventLoop, server_state: Any) -> None:
    """Start the sweep of this server's read deadlines once; it runs every SWEEP_SECONDS while the loop lives."""
    if getattr(server_state, "filefeed_sweep", None) is not None:
        return
    connections = server_state.connections

    def sweep() -> None:
        now = loop.time()
        for protocol in [p for p in connections if getattr(p, "_read_deadline", None) is not None]:
            if protocol._read_deadline <= now:
                protocol._read_timed_out()
        if not loop.is_closed():
            server_state.filefeed_sweep = loop.call_later(SWEEP_SECONDS, sweep)

    server_state.filefeed_sweep = loop.call_later(SWEEP_SECONDS, sweep)


def configure(settings: ServiceSettings) -> None:
    GuardedHttpToolsProtocol.read_timeout = settings.request_read_timeout_seconds
    GuardedHttpToolsProtocol.max_connections = settings.max_connections
