"""Shared fixtures: the real servers (tests/servers.py) and a filefeed server run as a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["tests.servers", "tests.pgp_keys"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `condition` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_feeds(path: Path, feeds: dict[str, dict]) -> Path:
    lines = []
    for feed_id, props in feeds.items():
        lines.append(f'[feeds."{feed_id}"]')
        for k, v in props.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int):
                lines.append(f"{k} = {v}")
            else:
                s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                lines.append(f'{k} = "{s}"')
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class FilefeedServer:
    url: str
    staging: Path
    proc: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    # the log's size when this server was started: a restart on the same port appends to the same file
    log_offset: int = 0

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, trust_env=False, **kw)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        import orjson

        content = kw.pop("content", None)
        if content is None and body is not None:
            content = orjson.dumps(body)
        with self.client() as c:
            return c.post(path, content=content, **kw)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def started_workers(self) -> int:
        """How many workers have logged the end of their start-up since this server was started."""
        if not self.log.exists():
            return 0
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().count(b"Application startup complete.")

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /v1/status answers 200 and every worker has started; fail at once, with the log, if the server
        exited. One worker answering is not enough: the others may still be starting, and one that fails its start
        stops the whole server (uvicorn's supervisor), refusing the test's next connections. The count is of uvicorn's
        INFO line, so a multi-worker server started with FILEFEED_LOG_LEVEL above INFO would never be ready here."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"filefeed serve exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if self.workers > 1 and self.started_workers() < self.workers:
                return False
            try:
                return httpx.get(f"{self.url}/v1/status", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, what=f"filefeed serve ({self.workers} workers) to start and answer /v1/status")


def start_filefeed(tmp: Path, *, feeds: dict[str, dict] | None = None, env: dict[str, str] | None = None,
                   workers: int = 1, staging: Path | None = None) -> FilefeedServer:
    port = free_port()
    staging = staging or tmp / "staging"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    full_env.update({"FILEFEED_STAGING_DIR": str(staging), "FILEFEED_FLUSH_CHECK_SECONDS": "3600",
                     "FILEFEED_MIN_FREE_BYTES": "0"})
    if feeds is not None:
        full_env["FILEFEED_FEEDS"] = str(write_feeds(tmp / f"feeds-{port}.toml", feeds))
    full_env.update(env or {})
    log = tmp / f"serve-{port}.log"
    with open(log, "ab") as f:
        offset = f.tell()
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers)], env=full_env, stdout=f, stderr=f, cwd=str(ROOT))
    srv = FilefeedServer(f"http://127.0.0.1:{port}", staging, proc, log, full_env, workers, offset)
    srv.wait_ready(30)
    return srv


@pytest.fixture
def filefeed_factory(tmp_path) -> Iterator:
    started: list[FilefeedServer] = []

    def factory(**kw) -> FilefeedServer:
        srv = start_filefeed(tmp_path, **kw)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def local_feed(tmp_path) -> dict:
    out = tmp_path / "delivery"
    out.mkdir()
    return {"destination_uri": out.as_uri(), "identifier_types": "USER_EMAIL,USER_ACCOUNT,USER_POINT,"
            "USER_DEVICE_TECHNICAL_ID:MOBILE_ADVERTISING_ID"}
