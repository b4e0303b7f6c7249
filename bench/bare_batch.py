"""Baselines of bench/batch_update.py, served exactly like filefeed (bench/serve_bare.py).

- `create_app`: the same HTTP stack; parses the body and each JSON-string item, answers a constant batch answer.
  Nothing staged, nothing published.
- `create_durable_app`: the least that a batch_update keeping filefeed's promises must do, done the cheapest way
  known here, on filefeed's own serving path (filefeed/hotpath.py): decode the body and every item in one msgspec
  call, append the rows as TSV to one staging file and fsync it (acknowledged means durable), write them as CSV +
  gzip (isal, filefeed's level) to a temp name, fsync, rename into the delivery folder and fsync the folder
  (published atomically, so `sent_items_in_success` is honest), then answer the count. No validation, no refs, no
  dedup, no ledger, no roll folder, no manifest: the ceiling of filefeed's batch_update on this disk and these
  cores (`bench/batch_update.py --peer node-sdk --ceiling`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import orjson
from isal import isal_zlib
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def batch_update(request: Request) -> Response:
    body = orjson.loads(await request.body())
    n = 0
    for it in body["batch_content"]:
        if isinstance(it, str):
            it = orjson.loads(it)
        n += isinstance(it, dict)
    return Response(orjson.dumps({"status": "OK", "sent_items_in_success": n, "sent_items_in_error": 0}),
                    media_type="application/json")


async def status(request: Request) -> Response:
    return Response(b"")


def create_app() -> Starlette:
    return Starlette(routes=[Route("/v1/batch_update", batch_update, methods=["POST"]),
                             Route("/v1/status", status, methods=["GET"])])


class _Row(msgspec.Struct, gc=False):
    segment_id: str
    operation: str
    identifier_type: str
    identifier: str
    ts: int
    session_id: str = ""
    datamart_id: str = ""
    user_point_id: str = ""


_decode_rows = msgspec.json.Decoder(list[_Row]).decode
_HEADER = b"segment_id,operation,identifier_type,identifier,ts\n"  # filefeed's default columns


class _DurableBatch:
    """The work of `create_durable_app`, on one thread per worker (batch_update's blocking I/O is off the loop in
    filefeed too)."""

    def __init__(self) -> None:
        self.folder = Path(os.environ.get("BENCH_FLOOR_DIR") or tempfile.mkdtemp(prefix="bench-floor-"))
        (self.folder / "out").mkdir(parents=True, exist_ok=True)
        self.staging = os.open(self.folder / f"staging-{os.getpid()}.tsv", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                               0o644)
        self.out_fd = os.open(self.folder / "out", os.O_RDONLY)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bench-floor")
        self.count = 0

    def deliver(self, raw: bytes) -> bytes:
        items = orjson.loads(raw)["batch_content"]
        rows = _decode_rows(b"[" + ",".join(items).encode() + b"]")
        staged = "".join([f"{r.identifier_type}\t{r.identifier}\t{r.ts:d}\t{r.session_id}\t{r.datamart_id}\t"
                          f"{r.user_point_id}\n" for r in rows]).encode()
        os.write(self.staging, staged)
        os.fsync(self.staging)
        csv = _HEADER + "".join([f"{r.segment_id},{r.operation},{r.identifier_type},{r.identifier},{r.ts:d}\n"
                                 for r in rows]).encode()
        data = isal_zlib.compress(csv, 1, 31)
        self.count += 1
        final = self.folder / "out" / f"{os.getpid()}-{self.count:08d}.csv.gz"
        temp = final.with_name("." + final.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        os.fsync(self.out_fd)
        return orjson.dumps({"status": "OK", "sent_items_in_success": len(rows), "sent_items_in_error": 0})


class _DurableBatchEndpoint:
    """POST /v1/batch_update in the shape filefeed/hotpath.py serves straight from the protocol: the work on the
    worker's thread, the answer sent from the loop when it is done."""

    def __init__(self) -> None:
        self.work: _DurableBatch | None = None  # opened in the worker, on its first request
        self.lock = threading.Lock()

    def serve(self, plugin, raw: bytes, exchange) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            if self.work is None:
                self.work = _DurableBatch()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.work.executor, self.work.deliver, raw)
        future.add_done_callback(lambda f: exchange.respond(
            Response(b'{"status":"error"}', 500, media_type="application/json") if f.exception() is not None
            else Response(f.result(), media_type="application/json")))


def create_durable_app():  # type: ignore[no-untyped-def]
    from bench.bare_app import create_direct_app

    app = create_direct_app()  # the raw app on filefeed's direct serving path, with this endpoint instead
    app.direct_routes = {b"/v1/batch_update": _DurableBatchEndpoint()}  # type: ignore[attr-defined]
    return app
