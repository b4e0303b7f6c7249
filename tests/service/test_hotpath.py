"""The hot routes' serving path (filefeed/hotpath.py): the same answers as the Starlette routes, one send each."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import uvicorn
from starlette.testclient import TestClient
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from config.settings import load_settings
from filefeed import hotpath
from filefeed.app import create_app


def embedded_feed_env(tmp_path: Path, monkeypatch) -> Path:
    """Feed 42 (USER_EMAIL + USER_POINT into a local folder) in embedded mode; returns the staging folder."""
    out = tmp_path / "delivery"
    out.mkdir()
    feeds = tmp_path / "feeds.toml"
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{out.as_uri()}"\nidentifier_types = "USER_EMAIL,USER_POINT"\n')
    monkeypatch.setenv("FILEFEED_FEEDS", str(feeds))
    monkeypatch.setenv("FILEFEED_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("FILEFEED_MIN_FREE_BYTES", "0")
    return tmp_path / "staging"


@pytest.fixture()
def clients(tmp_path: Path, monkeypatch):
    """(hot, starlette): one app, reached through HotRoutes and through its Starlette app directly."""
    embedded_feed_env(tmp_path, monkeypatch)
    app = create_app(load_settings())
    assert isinstance(app, hotpath.HotRoutes)
    with TestClient(app) as hot:  # runs the lifespan, which builds the plugin on the Starlette app's state
        yield hot, TestClient(app.app)


def _update(user: str) -> dict:
    return {"feed_id": "42", "session_id": "1", "datamart_id": "1023", "segment_id": "451256", "ts": 1717494873000,
            "operation": "UPSERT", "user_identifiers": [{"type": "USER_POINT", "user_point_id": user},
                                                        {"type": "USER_EMAIL", "hash": "ab" * 32}]}


CASES = [
    ("user_segment_update", b""),
    ("user_segment_update", b"{}"),
    ("user_segment_update", b"{not json"),
    ("user_segment_update", b"[1, 2]"),
    ("user_segment_update", b'{"feed_id": "42"}'),
    ("user_segment_update", orjson.dumps({**_update("u"), "feed_id": "999"})),
    ("user_segment_update", orjson.dumps({**_update("u"), "operation": "MERGE"})),
    ("user_segment_update", orjson.dumps({**_update("u"), "user_identifiers": [{"type": "USER_AGENT"}]})),
    ("batch_update", b""),
    ("batch_update", b'{"batch_content": []}'),
    ("batch_update", b'{"batch_content": "x", "context": {"feed_id": "42"}}'),
    ("batch_update", b'{"batch_content": ["nope"], "context": {"feed_id": "42", "segment_id": "1",'
                     b' "grouping_key": "UPSERT"}}'),
]


@pytest.mark.parametrize(("route", "body"), CASES)
def test_hot_routes_answer_exactly_as_the_starlette_routes(clients, route: str, body: bytes) -> None:
    hot, starlette = clients
    a = hot.post(f"/v1/{route}", content=body)
    b = starlette.post(f"/v1/{route}", content=body)
    assert (a.status_code, a.headers.items(), a.content) == (b.status_code, b.headers.items(), b.content)


def test_a_staged_update_answers_the_same_bytes_on_both_paths(clients) -> None:
    hot, starlette = clients
    a = hot.post("/v1/user_segment_update", content=orjson.dumps(_update("h" * 12)))
    b = starlette.post("/v1/user_segment_update", content=orjson.dumps(_update("s" * 12)))
    assert a.status_code == b.status_code == 200
    assert a.headers.items() == b.headers.items()
    assert a.headers["content-type"] == "application/json"
    assert [i["content"]["identifier"] for i in a.json()["data"]] == ["h" * 12, "ab" * 32]
    assert a.content.replace(b"h" * 12, b"s" * 12) == b.content


def test_a_body_larger_than_the_limit_is_refused_by_its_content_length(clients, monkeypatch) -> None:
    monkeypatch.setattr(hotpath, "MAX_BODY_BYTES", 100)
    hot, starlette = clients
    body = orjson.dumps(_update("x" * 200))
    a = hot.post("/v1/user_segment_update", content=body)
    b = starlette.post("/v1/user_segment_update", content=body)
    assert a.status_code == b.status_code == 500
    assert a.json() == b.json() == {"status": "error", "message": "request body is larger than 100 bytes"}


def test_other_methods_and_paths_still_go_through_starlette(clients) -> None:
    hot, _ = clients
    assert hot.get("/v1/user_segment_update").status_code == 405
    assert hot.get("/v1/status").status_code == 200
    assert hot.post("/v1/user_segment_update/", content=b"{}", follow_redirects=False).status_code == 307


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _serve_two_requests(protocol_class: type[HttpToolsProtocol]) -> list[bytes]:
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None)
    config.load()
    proto = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    proto.connection_made(transport)
    request = b"POST /v1/user_segment_update HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    for _ in range(2):
        proto.data_received(request)
        for _ in range(20):
            await asyncio.sleep(0)
    proto.connection_lost(None)
    return transport.writes


def test_each_answer_leaves_in_one_write() -> None:
    writes = asyncio.run(_serve_two_requests(hotpath.OneWriteHttpToolsProtocol))
    assert len(writes) == 2
    for w in writes:
        assert w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b"\r\n\r\n{}")
    # uvicorn's own protocol sends the same bytes in two writes per answer
    plain = asyncio.run(_serve_two_requests(HttpToolsProtocol))
    assert len(plain) == 4 and b"".join(plain) == b"".join(writes)
