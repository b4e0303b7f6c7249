"""The hot routes served straight from the HTTP protocol (filefeed/hotpath.py `DirectRoutesProtocol`).

A uvicorn server runs in a thread of the test, on a loopback socket, with filefeed's protocol and app; raw sockets
talk to it. A request with a Content-Length body takes the direct path; the same request with a chunked body takes
uvicorn's ASGI path (HotRoutes, then the same endpoint). Both must answer the same bytes, and everything HTTP/1.1
promises around them (keep-alive, HTTP/1.0, `Connection: close`, pipelining, `Expect: 100-continue`, the read
deadline) must hold on the direct path too.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import uvicorn

from config.settings import load_settings
from filefeed import app as app_module
from filefeed import guard, hotpath
from pipeline.staging import Staging
from tests.conftest import free_port, wait_for
from tests.service.test_hotpath import CASES, _update, embedded_feed_env

READ_TIMEOUT = 2.0


class Served:
    def __init__(self, port: int, staging: Path):
        self.port = port
        self.staging = staging
        self.direct = 0  # requests the protocol handed to FeedEndpoint.serve
        self.spawned = 0  # of those, served by the async handler in a task (the feed's context was not at hand)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.settimeout(10)
        return s

    def staged_rows(self) -> int:
        st = Staging(self.staging)
        return sum(st.stats(p).rows for p in st.partitions())


@pytest.fixture
def served(tmp_path: Path, monkeypatch) -> Iterator[Served]:
    staging = embedded_feed_env(tmp_path, monkeypatch)
    monkeypatch.setenv("FILEFEED_REQUEST_READ_TIMEOUT_SECONDS", str(READ_TIMEOUT))
    state = Served(free_port(), staging)
    serve, spawn = app_module.FeedEndpoint.serve, hotpath.Exchange.spawn

    def counting_serve(self, plugin, raw, exchange):
        state.direct += 1
        return serve(self, plugin, raw, exchange)

    def counting_spawn(self, coro):
        state.spawned += 1
        return spawn(self, coro)

    monkeypatch.setattr(app_module.FeedEndpoint, "serve", counting_serve)
    monkeypatch.setattr(hotpath.Exchange, "spawn", counting_spawn)
    config = uvicorn.Config(app_module.create_app(load_settings()), host="127.0.0.1", port=state.port,
                            http=guard.GuardedHttpToolsProtocol, loop="uvloop", access_log=False, log_config=None,
                            proxy_headers=False, timeout_graceful_shutdown=5)
    guard.configure(load_settings())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, what="the in-process server")
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()
        guard.GuardedHttpToolsProtocol.read_timeout = 10.0


_LEFTOVER: dict[int, bytes] = {}  # bytes read past an answer (pipelined answers can arrive in one recv), by socket


def _read_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer (Content-Length framed) from the socket."""
    got = _LEFTOVER.pop(id(s), b"")
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-answer: {got[:200]!r}")
        got += chunk
    head, rest = got.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert m, head
    length = int(m.group(1))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-answer: {got[:200]!r}")
        rest += chunk
    if len(rest) > length:
        _LEFTOVER[id(s)] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


def _without_date(answer: bytes) -> bytes:
    return re.sub(rb"(?im)^date: [^\r]*\r\n", b"", answer)


def _request(path: str, body: bytes, *, chunked: bool = False, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/" + version + b"\r\nhost: x\r\ncontent-type: application/json\r\n" + extra
    if chunked:
        return head + b"transfer-encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") \
            + b"0\r\n\r\n"
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def _ask(served: Served, raw: bytes) -> bytes:
    with served.connect() as s:
        s.sendall(raw)
        return _read_answer(s)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("route", "body"), CASES)
def test_direct_answers_are_the_asgi_paths_answers_byte_for_byte(served: Served, route: str, body: bytes) -> None:
    path = f"/v1/{route}"
    _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("warm"))))  # the feed's context is built
    before = served.direct
    direct = _ask(served, _request(path, body))
    assert served.direct == before + 1
    asgi = _ask(served, _request(path, body, chunked=True))
    assert served.direct == before + 1, "a chunked body must take uvicorn's ASGI path"
    assert _without_date(direct) == _without_date(asgi)


@pytest.mark.timeout(60)
def test_a_staged_update_answers_the_same_bytes_on_both_paths_and_its_rows_are_staged(served: Served) -> None:
    first = _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("u" * 12))))
    assert served.direct == 1 and served.spawned == 1  # the first call builds the feed's context in a task
    direct = _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("d" * 12))))
    assert served.direct == 2 and served.spawned == 1  # then the context is at hand: no task, no coroutine
    asgi = _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("a" * 12)), chunked=True))
    assert served.direct == 2
    assert direct.startswith(b"HTTP/1.1 200 OK\r\n")
    assert _without_date(direct).replace(b"d" * 12, b"a" * 12) == _without_date(asgi)
    assert _without_date(first).replace(b"u" * 12, b"a" * 12) == _without_date(asgi)
    body = orjson.loads(direct.split(b"\r\n\r\n", 1)[1])
    assert [i["content"]["identifier"] for i in body["data"]] == ["d" * 12, "ab" * 32]
    assert served.staged_rows() == 4  # 3 user points and the email they share (the same row: staged once)


@pytest.mark.timeout(60)
def test_keep_alive_http10_and_connection_close(served: Served) -> None:
    update = orjson.dumps(_update("k"))
    with served.connect() as s:  # keep-alive: three answers on one connection, in order
        for i in range(3):
            s.sendall(_request("/v1/user_segment_update", orjson.dumps(_update(f"k{i}"))))
            answer = _read_answer(s)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and f"k{i}".encode() in answer
            assert b"connection: close" not in answer
    for raw in (_request("/v1/user_segment_update", update, version=b"1.0"),
                _request("/v1/user_segment_update", update, extra=b"connection: close\r\n")):
        with served.connect() as s:
            s.sendall(raw)
            answer = _read_answer(s)
            assert b"\r\nconnection: close\r\n" in answer
            s.settimeout(5)
            assert s.recv(1) == b"", "the server must close the connection after this answer"
    assert served.direct == 5


@pytest.mark.timeout(60)
def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    with served.connect() as s:
        s.sendall(b"".join(_request("/v1/user_segment_update", orjson.dumps(_update(f"p{i}"))) for i in range(4))
                  + b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
        answers = [_read_answer(s) for _ in range(5)]
        assert id(s) not in _LEFTOVER, "bytes beyond the five answers"
    for i, answer in enumerate(answers[:4]):
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and f"p{i}".encode() in answer, answer[:300]
    assert answers[4].startswith(b"HTTP/1.1 200 OK\r\n")
    assert served.staged_rows() == 5  # 4 user points and their shared email


@pytest.mark.timeout(60)
def test_expect_100_continue_is_left_to_uvicorn(served: Served) -> None:
    body = orjson.dumps(_update("e"))
    with served.connect() as s:
        s.sendall(_request("/v1/user_segment_update", b"", extra=b"expect: 100-continue\r\n").replace(
            b"content-length: 0", b"content-length: " + str(len(body)).encode()))
        got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got
        s.sendall(body)
        rest = got[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        answer = rest if b"\r\n\r\n" in rest else _read_answer(s)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert served.direct == 0


@pytest.mark.timeout(60)
def test_a_client_gone_before_its_answer_keeps_its_rows_and_the_server_serves_on(served: Served) -> None:
    _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("warm"))))
    for i in range(20):
        s = served.connect()
        s.sendall(_request("/v1/user_segment_update", orjson.dumps(_update(f"gone{i}"))))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    wait_for(lambda: served.staged_rows() >= 2 + 20, 20, what="the rows of the requests whose client left")
    answer = _ask(served, _request("/v1/user_segment_update", orjson.dumps(_update("after"))))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.timeout(60)
def test_a_hot_route_body_shorter_than_its_content_length_gets_408(served: Served) -> None:
    body = orjson.dumps(_update("slow"))
    with served.connect() as s:
        t0 = time.monotonic()
        s.sendall(_request("/v1/user_segment_update", body)[:-10])
        s.settimeout(READ_TIMEOUT + 5)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 3, took
    assert served.staged_rows() == 0
