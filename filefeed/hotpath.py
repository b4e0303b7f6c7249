"""The serving path of the two hot routes: one call per user (`user_segment_update`) and the batches.

Measured under wrk (bench/ingest.py), most of a worker's CPU per request went to the HTTP stack, not to filefeed:
- Starlette's per-request objects: the middleware stack (ServerErrorMiddleware, ExceptionMiddleware and their send
  wrappers), the router's regex match over the routes, the Request object, the endpoint wrapper. `HotRoutes` answers
  `POST /v1/user_segment_update` and `POST /v1/batch_update` itself, with the same endpoint function as the Starlette
  route (filefeed/app.py `feed_endpoint`: the same bodies, codes and headers), and hands everything else (other
  routes, other methods, lifespan) to the Starlette app.
- uvicorn writes a response's head and its body in two transport writes, and uvloop sends each at once: two send
  syscalls and two wake-ups of the client per answer. `OneWriteHttpToolsProtocol` holds the head back until the
  first body message and writes both together. The bytes on the wire are unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

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

    def __init__(self, app: Any, endpoints: dict[str, Callable[[Any, Callable[[], Awaitable[bytes]]],
                                                             Awaitable[Any]]]):
        self.app = app
        self.endpoints = endpoints

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
