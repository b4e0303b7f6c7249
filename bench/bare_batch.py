"""Baseline of bench/batch_update.py: the same HTTP stack; parses the body and each JSON-string item, answers a
constant batch answer. Nothing staged, nothing published."""

from __future__ import annotations

import orjson
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
