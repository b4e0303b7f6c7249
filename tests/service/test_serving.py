"""`filefeed serve --workers N`: every worker listens on its own SO_REUSEPORT socket, so connections spread over
the workers; the supervisor replaces a dead worker; a taken port fails at once with a clear message."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, free_port, wait_for

LISTEN, ESTABLISHED = "0A", "01"


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except FileNotFoundError:
        pass
    return out


def _tcp_inodes(port: int, state: str) -> set[str]:
    """Inodes of this machine's TCP sockets whose local port is `port`, in `state` (from /proc/net/tcp*)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                out.add(f[9])
    return out


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _listening_workers(pid: int, port: int) -> dict[int, set[str]]:
    """Worker pid -> its listening socket inodes on `port`."""
    listening = _tcp_inodes(port, LISTEN)
    return {w: mine for w in _children(pid) if (mine := _socket_inodes(w) & listening)}


def test_connections_spread_over_workers_and_a_dead_worker_is_replaced(filefeed_factory) -> None:
    srv = filefeed_factory(workers=2, env={"FILEFEED_FEEDS": str(ROOT / "config" / "feeds.toml")})
    port = urlsplit(srv.url).port
    assert port is not None
    workers = wait_for(lambda: (w := _listening_workers(srv.proc.pid, port)) and len(w) == 2 and w, 30,
                       what="two workers listening on sockets of their own")
    assert len(set.union(*workers.values())) == 2  # two listening sockets, not one shared

    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(24)]
    try:
        for c in conns:  # keep-alive: each connection stays with the worker that accepted it
            c.request("GET", "/v1/status")
            assert c.getresponse().read() is not None
        established = _tcp_inodes(port, ESTABLISHED)
        per_worker = {w: len(_socket_inodes(w) & established) for w in workers}
        # 24 connections hashed over 2 sockets: all on one worker has odds of 1 in 8 million
        assert sum(per_worker.values()) == 24 and min(per_worker.values()) >= 1, per_worker
    finally:
        for c in conns:
            c.close()

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: (w := _listening_workers(srv.proc.pid, port)) and len(w) == 2 and victim not in w
                        and w, 60, interval=0.2, what="the supervisor to start a new worker")
    assert victim not in replaced
    for _ in range(8):  # fresh connections all answered, whichever worker they reach
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/v1/status")
        assert c.getresponse().status == 200
        c.close()


def test_a_taken_port_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))  # no SO_REUSEPORT: outside the group, so nobody else may bind
    holder.listen(1)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
        env.update({"FILEFEED_STAGING_DIR": str(tmp_path / "staging"), "FILEFEED_MIN_FREE_BYTES": "0",
                    "FILEFEED_FEEDS": str(ROOT / "config" / "feeds.toml")})
        done = subprocess.run([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "2"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    finally:
        holder.close()


def test_a_second_server_on_the_same_port_is_refused(filefeed_factory, tmp_path: Path) -> None:
    """Reuse-port would let a second instance join the first one's port and take half its connections."""
    srv = filefeed_factory(workers=2, env={"FILEFEED_FEEDS": str(ROOT / "config" / "feeds.toml")})
    port = urlsplit(srv.url).port
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
    env.update({"FILEFEED_STAGING_DIR": str(tmp_path / "other"), "FILEFEED_MIN_FREE_BYTES": "0",
                "FILEFEED_FEEDS": str(ROOT / "config" / "feeds.toml")})
    done = subprocess.run([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "2"], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "another server listens there" in done.stderr, done.stderr
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/v1/status")
    assert c.getresponse().status == 200  # the first server is untouched
    c.close()



def test_one_worker_that_fails_to_start_exits_with_uvicorns_startup_failure(monkeypatch) -> None:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from filefeed import server

    class NeverStarts:
        started = False

        def __init__(self, config: uvicorn.Config) -> None:
            self.config = config

        def run(self) -> None:  # what uvicorn does when the lifespan startup fails: log, return, started False
            return None

    monkeypatch.setattr(server.uvicorn, "Server", NeverStarts)
    with pytest.raises(SystemExit) as e:
        server.run(uvicorn.Config("filefeed.app:create_app", factory=True, workers=1))
    assert e.value.code == STARTUP_FAILURE
