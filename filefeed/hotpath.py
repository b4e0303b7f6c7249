"""The serving path of the two hot routes: one call per user (`user_segment_update`) and the batches.

Measured under wrk (bench/ingest.py), most of a worker's CPU per request went to the HTTP stack, not to filefeed:
- uvicorn's ASGI machinery: a scope dict, a RequestResponseCycle, an asyncio.Event, a Task running the app, and the
  receive/send coroutines with their message dicts. A parse-and-constant endpoint costs 91-115 us of CPU per request
  as a raw ASGI app and 40-45 us answered straight from the protocol's parser callbacks. `DirectRoutesProtocol`
  does that for `POST /v1/user_segment_update` and `POST /v1/batch_update` with a Content-Length body: it collects
  the body in the parser callbacks and hands it to the route's `FeedEndpoint.serve` (filefeed/app.py: the same
  handler, the same answers), which answers through an `Exchange`, at once or from the staging commit's callback:
  no Task, no coroutine. Everything else (other routes and methods, chunked or `Expect: 100-continue` bodies,
  pipelined requests, the lifespan) takes uvicorn's ASGI path unchanged.
- On that ASGI path, Starlette's per-request objects (middleware stack, router, Request): `HotRoutes` answers the
  hot routes there with the same endpoint, and hands everything else to the Starlette app.
- uvicorn writes a response's head and its body in two transport writes, and uvloop sends each at once: two send
  syscalls and two wake-ups of the client per answer. `OneWriteHttpToolsProtocol` holds the head back until the
  first body message and writes both together; an `Exchange` writes each answer in one write too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from filefeed.protocol import MAX_BODY_BYTES, BadRequest

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def read_body(scope: Scope, receive: Receive) -> bytes:
    """The request body, refused past MAX_BODY_BYTES (by its Content-Length when it has one, else while reading)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes")
            break
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class HotRoutes:
    """ASGI app in front of the Starlette app: the hot POST routes go straight to their endpoint.

    `endpoints` maps a path to `endpoint(plugin, read)`, where `read()` returns the body and the result is a
    Starlette Response (its status, raw headers and body are sent as Starlette would send them).
    """

    def __init__(self, app: Any, endpoints: dict[str, Any]):
        self.app = app
        self.endpoints = endpoints
        # the same endpoints by raw request target, for DirectRoutesProtocol (an exact match: no query, no escapes)
        self.direct_routes = {path.encode("ascii"): endpoint for path, endpoint in endpoints.items()}

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                response = await endpoint(self.app.state.plugin, lambda: read_body(scope, receive))
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": response.raw_headers})
                await send({"type": "http.response.body", "body": response.body})
                return
        await self.app(scope, receive, send)


class _Gather:
    """Stands in for the transport while uvicorn writes one response's head and first body part."""

    __slots__ = ("parts", "closed")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return False


def _send_in_one_write(cycle: RequestResponseCycle) -> None:
    send = cycle.send
    held: list[dict[str, Any]] = []

    async def one_write_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not cycle.response_started:
            held[:] = [message]  # a second start (uvicorn's 500 after a failure) replaces an unsent one
            return
        if not held:
            await send(message)
            return
        start = held.pop()
        if message["type"] != "http.response.body":
            await send(start)
            await send(message)
            return
        transport, gather = cycle.transport, _Gather()
        cycle.transport = gather  # type: ignore[assignment]
        try:
            await send(start)
            await send(message)
        finally:
            cycle.transport = transport
            if gather.parts:
                transport.write(b"".join(gather.parts))
            if gather.closed:
                transport.close()

    cycle.send = one_write_send  # type: ignore[method-assign]


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing each response's head together with its first body part."""

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not before:
            _send_in_one_write(self.cycle)


class _NoEvent:
    """Stands in for the cycle's asyncio.Event: uvicorn's connection_lost sets it, nobody waits on it."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class Exchange:
    """One request served by DirectRoutesProtocol, from its headers to its answer.

    It stands in for uvicorn's RequestResponseCycle where the protocol and filefeed/guard.py look at the current
    request (`response_started`, `response_complete`, `disconnected`, `keep_alive`, `message_event`).
    """

    __slots__ = ("protocol", "endpoint", "chunks", "keep_alive", "response_started", "response_complete",
                 "disconnected", "message_event")

    def __init__(self, protocol: DirectRoutesProtocol, endpoint: Any, keep_alive: bool):
        self.protocol = protocol
        self.endpoint = endpoint
        self.chunks: list[bytes] = []
        self.keep_alive = keep_alive
        self.response_started = self.response_complete = self.disconnected = False
        self.message_event = _NO_EVENT

    def respond(self, response: Any) -> None:
        """Send a Starlette Response (status, raw headers, body) in one write, as uvicorn's ASGI path would."""
        if self.response_complete:
            return
        self.response_started = self.response_complete = True
        protocol = self.protocol
        transport = protocol.transport
        if self.disconnected or transport.is_closing():  # the client went away; staged rows stay staged
            return
        parts = [STATUS_LINE[response.status_code]]
        for name, value in protocol.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in response.raw_headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", response.body)
        transport.write(b"".join(parts))
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run the rest of this request as a task the server waits for at shutdown (as uvicorn's own)."""
        protocol = self.protocol
        task = protocol.loop.create_task(coro)  # type: ignore[arg-type]
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)


class DirectRoutesProtocol(OneWriteHttpToolsProtocol):
    """uvicorn's httptools protocol, serving the hot routes' requests straight from its parser callbacks."""

    def on_headers_complete(self) -> None:
        routes = getattr(self.app, "direct_routes", None)
        endpoint = routes.get(self.url) if routes else None
        if endpoint is not None and self._direct_eligible():
            parser = self.parser
            keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
            # A request read in the same chunk as an answered one (pipelined) must not leave that answer's keep-alive
            # timer running while it is served.
            self._unset_keepalive_if_required()
            self.cycle = Exchange(self, endpoint, keep_alive)  # type: ignore[assignment]
            return
        super().on_headers_complete()

    def _direct_eligible(self) -> bool:
        """A POST with a Content-Length within the limit, nothing unusual: else uvicorn's ASGI path serves it."""
        cycle = self.cycle
        if (self.parser.get_method() != b"POST" or self.expect_100_continue or self.root_path
                or self.limit_concurrency is not None or self.parser.should_upgrade()
                or not (cycle is None or cycle.response_complete)):  # pipelined behind an unanswered request
            return False
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return False
                length = value
            elif name == b"transfer-encoding":
                return False
        return length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is Exchange:
            cycle.chunks.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is Exchange:
            chunks = cycle.chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            cycle.chunks = []
            cycle.endpoint.serve(self.app.state.plugin, body, cycle)
            return
        super().on_message_complete()
