"""The baselines of bench/ingest.py, served exactly like filefeed (bench/serve_bare.py).

- `create_app`: the same HTTP stack (uvicorn + httptools + uvloop + Starlette) with an endpoint that reads and parses
  the body with orjson and answers a constant, doing nothing durable.
- `create_durable_app`: the same endpoint, plus the least that "fsynced before the answer" costs: every request
  waits for a group commit that appends its share of bytes to one file and fsyncs it, grouped the way filefeed's
  staging groups them (one write + fsync for all requests that arrive while the loop keeps finding new ones, at most
  INLINE_MAX_HOPS loop iterations). No identifiers, no frames, no dedup, no per-row answer: it is the ceiling of
  any durable endpoint on this stack and disk, and the gap between it and filefeed is filefeed's own work.
- `create_raw_app`: the same parse-and-constant endpoint as a raw ASGI callable (no Starlette, no per-request
  objects), served like filefeed: the most any endpoint on uvicorn + httptools can answer on this machine.
- `create_direct_app`: the same endpoint answered straight from the HTTP protocol's parser callbacks, the way
  filefeed's hot routes are served (filefeed/hotpath.py `DirectRoutesProtocol`).
- `create_direct_durable_app`: `create_direct_app` plus the group commit of `create_durable_app`: the ceiling of any
  durable endpoint on filefeed's serving path and this disk (`--ceiling`). With `BENCH_ROOM_BYTES=N` its file is
  pre-written once at start (N zero bytes, fsynced) and the commits overwrite it in place: no commit changes the
  file's size or extents, so its fsync writes the data alone (`durable-room` of `--ceiling`).
- `rsgi_app`: the same endpoint on granian's RSGI interface (HTTP parsing and writing in Rust), for
  `bench/ingest.py --peer node-sdk --ceiling`: what a change of server could reach at most.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from filefeed import server

ANSWER = orjson.dumps({"status": "ok", "data": [], "stats": []})
ROW_BYTES = 150  # about one staged row of the bench's requests


async def update(request: Request) -> Response:
    body = orjson.loads(await request.body())
    if not isinstance(body, dict):
        return Response(b'{"status":"error"}', 500, media_type="application/json")
    return Response(ANSWER, media_type="application/json")


async def status(request: Request) -> Response:
    return Response(b"")


def create_app() -> Starlette:
    server.settle_gc()  # as filefeed's workers do once started
    return Starlette(routes=[Route("/v1/user_segment_update", update, methods=["POST"]),
                             Route("/v1/status", status, methods=["GET"])])


class _GroupCommit:
    """One append-only file per worker; waiters of one group share one write and one fsync."""

    def __init__(self) -> None:
        folder = os.environ.get("BENCH_DURABLE_DIR") or tempfile.gettempdir()
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"durable-baseline-{os.getpid()}.bin")
        room = int(os.environ.get("BENCH_ROOM_BYTES") or 0)
        # no O_APPEND: a pre-written file is written from its start, in place (past its room the file grows)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if room:
            from pipeline.durable import write_zeros

            write_zeros(self.fd, room)
            os.fsync(self.fd)
            os.lseek(self.fd, 0, os.SEEK_SET)
        self.pending: list[asyncio.Future[None]] = []
        from pipeline.staging.writer import INLINE_MAX_HOPS  # here, so the plain baseline never loads pyarrow

        self.max_hops = INLINE_MAX_HOPS

    def wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append(fut)
        if len(self.pending) == 1:
            loop.call_soon(self.commit)
        return fut

    def commit(self, seen: int = 0, hops: int = 0) -> None:
        n = len(self.pending)
        if n > seen and hops < self.max_hops:
            asyncio.get_running_loop().call_soon(self.commit, n, hops + 1)
            return
        waiters, self.pending = self.pending, []
        os.write(self.fd, b"x" * (2 * ROW_BYTES * len(waiters)))
        os.fsync(self.fd)
        for f in waiters:
            if not f.done():
                f.set_result(None)


class _ThreadedGroupCommit(_GroupCommit):
    """`_GroupCommit` with the write + fsync on a thread of its own, pipelined: while one group's fsync runs, the loop
    goes on parsing and the next group gathers; it is written as soon as the fsync before it returns (at most one
    in flight). The loop never blocks on the disk."""

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._queue: list[list[asyncio.Future[None]]] = []
        threading.Thread(target=self._run, daemon=True, name="bench-fsync").start()

    def commit(self, seen: int = 0, hops: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        if self._busy:  # the thread takes this group when its fsync returns (_done)
            return
        waiters, self.pending = self.pending, []
        if waiters:
            self._busy = True
            with self._cond:
                self._queue.append(waiters)
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait(1.0)
                waiters = self._queue.pop(0)
            os.write(self.fd, b"x" * (2 * ROW_BYTES * len(waiters)))
            os.fsync(self.fd)
            self._loop.call_soon_threadsafe(self._done, waiters)  # type: ignore[union-attr]

    def _done(self, waiters: list[asyncio.Future[None]]) -> None:
        for f in waiters:
            if not f.done():
                f.set_result(None)
        self._busy = False
        if self.pending:
            self.commit()


def create_durable_app() -> Starlette:
    group = _GroupCommit()
    server.settle_gc()

    async def durable_update(request: Request) -> Response:
        body = orjson.loads(await request.body())
        if not isinstance(body, dict):
            return Response(b'{"status":"error"}', 500, media_type="application/json")
        await group.wait()
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/v1/user_segment_update", durable_update, methods=["POST"]),
                             Route("/v1/status", status, methods=["GET"])])


_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _raw_lifespan(receive, send) -> None:  # type: ignore[no-untyped-def]
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            server.settle_gc()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _parse_and_answer(body: bytes) -> tuple[int, bytes]:
    if not body:  # GET /v1/status
        return 200, b""
    if not isinstance(orjson.loads(body), dict):
        return 500, b'{"status":"error"}'
    return 200, ANSWER


def create_raw_app():  # type: ignore[no-untyped-def]
    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            await _raw_lifespan(receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        code, answer = _parse_and_answer(b"".join(chunks))
        await send({"type": "http.response.start", "status": code, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": answer})

    return app


class _ConstantEndpoint:
    """The parse-and-constant endpoint in the shape filefeed/hotpath.py serves straight from the protocol."""

    def serve(self, plugin, raw: bytes, exchange) -> None:  # type: ignore[no-untyped-def]
        code, answer = _parse_and_answer(raw)
        exchange.respond(Response(answer, code, media_type="application/json"))


def create_direct_app():  # type: ignore[no-untyped-def]
    """`create_raw_app`, with POST /v1/user_segment_update answered by filefeed's direct protocol path (the serving
    path filefeed's hot routes take): the most that path allows with nothing durable behind it."""
    app = create_raw_app()

    class _State:
        plugin = None

    app.direct_routes = {b"/v1/user_segment_update": _ConstantEndpoint()}  # type: ignore[attr-defined]
    app.state = _State()  # type: ignore[attr-defined]
    return app


class _DurableConstantEndpoint:
    """`_ConstantEndpoint` plus the group commit of `create_durable_app`, answered from the commit's callback (no
    task, no coroutine), as filefeed's direct path answers a staged update."""

    def __init__(self) -> None:
        self.group: _GroupCommit | None = None  # opened in the worker, on its first request

    def serve(self, plugin, raw: bytes, exchange) -> None:  # type: ignore[no-untyped-def]
        code, answer = _parse_and_answer(raw)
        if code != 200:
            exchange.respond(Response(answer, code, media_type="application/json"))
            return
        if self.group is None:
            self.group = _ThreadedGroupCommit() if os.environ.get("BENCH_FSYNC_THREAD") else _GroupCommit()
        self.group.wait().add_done_callback(
            lambda _: exchange.respond(Response(answer, code, media_type="application/json")))


def create_direct_durable_app():  # type: ignore[no-untyped-def]
    """`create_direct_app` with every answer after a group-committed write + fsync: the most any durable endpoint
    on filefeed's serving path and this disk can answer (no identifiers, no frames, no per-row answer)."""
    app = create_direct_app()
    app.direct_routes = {b"/v1/user_segment_update": _DurableConstantEndpoint()}  # type: ignore[attr-defined]
    return app


class _RSGIApp:
    def __rsgi_init__(self, loop) -> None:  # type: ignore[no-untyped-def]
        server.settle_gc()

    async def __rsgi__(self, scope, protocol) -> None:  # type: ignore[no-untyped-def]
        code, answer = _parse_and_answer(await protocol())
        protocol.response_bytes(code, [("content-type", "application/json")], answer)


rsgi_app = _RSGIApp()
