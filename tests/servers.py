"""pytest plugin: the real S3 / SFTP / GCS servers for sink tests (`pytest_plugins = ["tests.servers"]`).

`servers` (session) is the KEY=VALUE environment written by `scripts/servers.sh start`: read from
$FILEFEED_SERVERS_ENV, else from .servers/env when those servers are alive, else the fixture starts its own set in a
temp folder and stops it at the end of the session. If the servers cannot be started the fixture FAILS: a sink test
that silently skips proves nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.feed import FeedProperties

REPO = Path(__file__).resolve().parents[1]
SERVERS_SH = REPO / "scripts" / "servers.sh"
SCHEMES = ("file", "s3", "sftp", "gs")


def read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            env[key] = value
    return env


def servers_alive(state_dir: Path) -> bool:
    r = subprocess.run([str(SERVERS_SH), "status", str(state_dir)], capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def start_servers(state_dir: Path) -> dict[str, str]:
    """Run scripts/servers.sh start; raise RuntimeError with its output (server logs included) on failure."""
    r = subprocess.run([str(SERVERS_SH), "start", str(state_dir)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/servers.sh start failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return read_env(state_dir / "env")


def stop_servers(state_dir: Path) -> None:
    subprocess.run([str(SERVERS_SH), "stop", str(state_dir)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    explicit = os.environ.get("FILEFEED_SERVERS_ENV")
    default = REPO / ".servers" / "env"
    started: Path | None = None
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            pytest.fail(f"FILEFEED_SERVERS_ENV={explicit} does not exist (run scripts/servers.sh start)")
        if not servers_alive(path.parent):
            pytest.fail(f"the servers listed in {explicit} are not running (scripts/servers.sh start)")
        env = read_env(path)
    elif default.is_file() and servers_alive(default.parent):
        env = read_env(default)
    else:
        started = tmp_path_factory.mktemp("servers")
        try:
            env = start_servers(started)
        except Exception as e:  # the fixture fails, never skips
            stop_servers(started)
            pytest.fail(str(e))
    env = dict(env)
    env["FILE_ROOT"] = str(tmp_path_factory.mktemp("file-sink"))
    try:
        yield env
    finally:
        if started is not None:
            stop_servers(started)


@pytest.fixture
def unique_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix no other test (or earlier run) uses: test name + random suffix."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:60]
    return f"t-{base}-{uuid.uuid4().hex[:8]}"


def host_key_lines(known_hosts: Path) -> str:
    """The `type base64` part of each known_hosts line: what a user pastes into sftp_host_key."""
    out = []
    for line in known_hosts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            out.append(f"{parts[1]} {parts[2]}")
    if not out:
        raise RuntimeError(f"{known_hosts} holds no host key")
    return "\n".join(out)


def sink_props(scheme: str, servers: dict[str, str], prefix: str, **overrides: Any) -> FeedProperties:
    """Valid FeedProperties for `scheme` against the test servers, destination under `prefix`."""
    prefix = prefix.strip("/")
    if scheme == "file":
        raw: dict[str, Any] = {"destination_uri": f"file://{servers['FILE_ROOT']}/{prefix}"}
    elif scheme == "s3":
        raw = {
            "destination_uri": f"s3://{servers['S3_BUCKET']}/{prefix}",
            "s3_endpoint_url": servers["S3_ENDPOINT"],
            "s3_region": servers.get("AWS_DEFAULT_REGION", "us-east-1"),
            "aws_access_key_id": servers["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": servers["AWS_SECRET_ACCESS_KEY"],
        }
    elif scheme == "sftp":
        raw = {
            "destination_uri": (
                f"sftp://{servers['SFTP_USER']}@{servers['SFTP_HOST']}:{servers['SFTP_PORT']}"
                f"{servers['SFTP_ROOT']}/{prefix}"
            ),
            "sftp_private_key": Path(servers["SFTP_KEY"]).read_text(),
            "sftp_host_key": host_key_lines(Path(servers["SFTP_KNOWN_HOSTS"])),
        }
    elif scheme == "gs":
        raw = {
            "destination_uri": f"gs://{servers['GCS_BUCKET']}/{prefix}",
            "gcs_endpoint_url": servers["GCS_ENDPOINT"],
            "gcs_project": servers.get("GCS_PROJECT", "filefeed-test"),
        }
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    raw.update(overrides)
    return FeedProperties.model_validate(raw)
