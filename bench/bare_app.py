"""The baseline of bench/ingest.py: the same HTTP stack (uvicorn + httptools + uvloop + Starlette) with an endpoint
that reads and parses the body with orjson and answers a constant, doing nothing durable."""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ANSWER = orjson.dumps({"status": "ok", "data": [], "stats": []})


async def update(request: Request) -> Response:
    body = orjson.loads(await request.body())
    if not isinstance(body, dict):
        return Response(b'{"status":"error"}', 500, media_type="application/json")
    return Response(ANSWER, media_type="application/json")


async def status(request: Request) -> Response:
    return Response(b"")


def create_app() -> Starlette:
    return Starlette(routes=[Route("/v1/user_segment_update", update, methods=["POST"]),
                             Route("/v1/status", status, methods=["GET"])])
