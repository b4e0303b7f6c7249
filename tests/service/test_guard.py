"""Slow clients are cut off and connections are capped (issue 13, finding 6), with raw sockets on 127.0.0.1.

Also: the uvicorn internals filefeed builds on (its httptools protocol in filefeed/guard.py, its supervisor's worker
class in filefeed/server.py) are those of the tested uvicorn range in pyproject.toml.
"""

from __future__ import annotations

import inspect
import socket
import time
import tomllib
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

READ_TIMEOUT = 2.0
ENV = {"FILEFEED_REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT), "FILEFEED_MAX_CONNECTIONS": "30"}
BODY = b'{"feed_id": "42", "action": "FETCH_DESTINATION_AUDIENCE"}'


def _addr(srv) -> tuple[str, int]:
    u = urlsplit(srv.url)
    return u.hostname, u.port


def _connect(srv) -> socket.socket:
    s = socket.create_connection(_addr(srv), timeout=10)
    s.settimeout(10)
    return s


def _closed_answer(s: socket.socket, within: float) -> tuple[bytes, float]:
    """Read until the server closes the connection; what it sent and when it closed (fails after `within`)."""
    t0 = time.monotonic()
    s.settimeout(within)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {within} s; received {got[:200]!r}")
    except ConnectionResetError:
        pass
    return got, time.monotonic() - t0


@pytest.fixture
def server(filefeed_factory, local_feed):
    return filefeed_factory(feeds={"42": local_feed}, env=ENV)


@pytest.mark.timeout(60)
def test_headers_sent_too_slowly_are_cut_off(server):
    conns = [_connect(server) for _ in range(20)]
    try:
        t0 = time.monotonic()
        for s in conns:
            s.sendall(b"POST /v1/troubleshoot HTTP/1.1\r\nhost: x\r\n")
        closed: dict[int, bytes] = {}
        line = 0
        while len(closed) < len(conns) and time.monotonic() - t0 < READ_TIMEOUT + 8:
            line += 1
            for i, s in enumerate(conns):  # one more header line each 0.5 s: never a whole request
                if i in closed:
                    continue
                try:
                    s.sendall(f"x-slow-{line}: {line}\r\n".encode())
                    s.settimeout(0.02)
                    data = s.recv(4096)
                    closed[i] = data or b"(closed)"
                except (TimeoutError, BlockingIOError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed[i] = b"(reset)"
            time.sleep(0.5)
        took = time.monotonic() - t0
        assert len(closed) == len(conns), f"{len(conns) - len(closed)} slow connections still open after {took:.1f} s"
        assert took < READ_TIMEOUT + 4, took
        assert any(b"408" in v for v in closed.values()), closed
    finally:
        for s in conns:
            s.close()
    # and the server still serves
    with server.client() as c:
        assert c.post("/v1/troubleshoot", content=BODY).status_code == 200


@pytest.mark.timeout(60)
def test_body_shorter_than_its_content_length_gets_408(server):
    with _connect(server) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/troubleshoot HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n" + BODY[:20])
        got, _ = _closed_answer(s, READ_TIMEOUT + 5)
        took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert READ_TIMEOUT - 0.5 < took < READ_TIMEOUT + 3, took
    assert "Traceback" not in server.log_text()


@pytest.mark.timeout(60)
def test_idle_connection_that_never_sends_is_closed(server):
    with _connect(server) as s:
        got, took = _closed_answer(s, READ_TIMEOUT + 5)
    assert took < READ_TIMEOUT + 3


@pytest.mark.timeout(60)
def test_a_client_sending_in_time_is_served_on_one_connection(server):
    with _connect(server) as s:
        for _ in range(3):  # three requests, each sent in two pieces well within the deadline
            head = (b"POST /v1/troubleshoot HTTP/1.1\r\nhost: x\r\ncontent-length: " + str(len(BODY)).encode()
                    + b"\r\n\r\n")
            s.sendall(head)
            time.sleep(READ_TIMEOUT / 4)
            s.sendall(BODY)
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(4096)
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            length = int(next(x for x in got.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
            rest = got.split(b"\r\n\r\n", 1)[1]
            while len(rest) < length:
                rest += s.recv(4096)


def test_default_keep_alive_outlasts_the_usual_client_idle_timeout():
    """The client must close an idle connection first: a server closing it at the same moment races the client's next
    request, which then gets a reset instead of an answer (httpx and Node keep an idle connection 5 s)."""
    from config.settings import ServiceSettings

    client_idle = httpx.Limits().keepalive_expiry
    assert client_idle == 5.0, client_idle
    assert ServiceSettings.model_fields["keep_alive_seconds"].default > 12 * client_idle


@pytest.mark.timeout(60)
def test_an_idle_keep_alive_connection_is_closed_after_the_setting(filefeed_factory, local_feed):
    srv = filefeed_factory(feeds={"42": local_feed}, env={**ENV, "FILEFEED_KEEP_ALIVE_SECONDS": "1"})
    with _connect(srv) as s:
        s.sendall(b"POST /v1/troubleshoot HTTP/1.1\r\nhost: x\r\ncontent-length: " + str(len(BODY)).encode()
                  + b"\r\n\r\n" + BODY)
        got, took = _closed_answer(s, 10)  # the answer, then the server's close once the connection idled 1 s
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert b"connection: close" not in got.lower()
    assert 1.0 <= took < 5, took


@pytest.mark.timeout(60)
def test_connections_beyond_the_cap_are_closed_at_once(server):
    held = [_connect(server) for _ in range(30)]
    try:
        time.sleep(0.3)
        extra = [_connect(server) for _ in range(10)]
        t0 = time.monotonic()
        for s in extra:
            got, _ = _closed_answer(s, 3)
            assert got == b""
            s.close()
        assert time.monotonic() - t0 < 3
    finally:
        for s in held:
            s.close()
    with server.client() as c:
        assert c.post("/v1/troubleshoot", content=BODY).status_code == 200


def test_uvicorn_is_the_tested_range_and_its_internals_are_there():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("uvicorn"))
    assert Version(uvicorn.__version__) in spec.specifier, (uvicorn.__version__, str(spec.specifier))
    assert Version("999") not in spec.specifier, "uvicorn needs an upper bound: filefeed builds on its internals"

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.supervisors import multiprocess

    # filefeed/guard.py overrides these callbacks and reads these attributes
    for name in ("connection_made", "connection_lost", "on_message_begin", "on_message_complete"):
        assert callable(getattr(HttpToolsProtocol, name, None)), name
    init = inspect.getsource(HttpToolsProtocol.__init__)
    for attr in ("self.connections", "self.cycle", "self.loop", "self.transport"):
        assert attr in init, attr
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.response_started" in cycle and "self.response_complete" in cycle
    # filefeed/server.py replaces the supervisor's worker class by this module-level name and overrides `target`
    assert "sockets" in inspect.signature(multiprocess.Process.target).parameters
    src = inspect.getsource(multiprocess.Multiprocess)
    assert src.count("Process(self.config, self.sockets)") >= 2, "workers are no longer built through Process"
    assert list(inspect.signature(multiprocess.Multiprocess.__init__).parameters) == ["self", "config", "sockets"]
