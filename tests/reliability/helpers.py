"""Shared helpers of the reliability suites: servers in their own process group, CLI runs, destination reading,
extra S3/SFTP/GCS instances, summaries.

Everything started here is stopped by PID (or by its own process group) in the fixtures' teardown.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import FilefeedServer, wait_for, write_feeds

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
RESULTS_DIR = Path(os.environ.get("FILEFEED_RELIABILITY_RESULTS",
                                  Path(tempfile.gettempdir()) / "filefeed-reliability-results"))
SUMMARIES: list[tuple[str, dict[str, Any]]] = []  # printed by conftest.pytest_terminal_summary


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw and raw.strip().isdigit() else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def record_summary(name: str, data: dict[str, Any]) -> Path:
    """Print a one-line summary and keep it as JSON under RESULTS_DIR (printed again at the end of the session)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"suite": name, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **data}
    path.write_text(json.dumps(data, indent=2, default=str))
    line = f"[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in data.items()
                                                 if k not in ("suite", "recorded_at") and not isinstance(v, (dict, list)))
    print(line)
    SUMMARIES.append((name, data))
    return path


def rng() -> random.Random:
    seed = env_int("FILEFEED_RELIABILITY_SEED", int(time.time()))
    print(f"[reliability] random seed {seed} (FILEFEED_RELIABILITY_SEED to replay)")
    return random.Random(seed)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- filefeed serve in its own process group ---------------------------------------------------------------------
def base_env(staging: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    env.update({"FILEFEED_STAGING_DIR": str(staging), "FILEFEED_FLUSH_CHECK_SECONDS": "3600",
                "FILEFEED_MIN_FREE_BYTES": "0", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


class Group:
    """filefeed servers started in their own session, so kill -9 reaches the master and every worker at once."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[FilefeedServer] = []

    def start(self, *, feeds: dict[str, dict] | None = None, feeds_file: Path | None = None,
              env: dict[str, str] | None = None, workers: int = 1, staging: Path | None = None,
              expect_ready: bool = True, timeout: float = 30) -> FilefeedServer:
        port = free_port()
        staging = staging or self.tmp / "staging"
        full_env = base_env(staging)
        if feeds is not None:
            full_env["FILEFEED_FEEDS"] = str(write_feeds(self.tmp / f"feeds-{port}.toml", feeds))
        elif feeds_file is not None:
            full_env["FILEFEED_FEEDS"] = str(feeds_file)
        full_env.update(env or {})
        log = self.tmp / f"serve-{port}.log"
        with open(log, "ab") as f:
            offset = f.tell()
            proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port",
                                     str(port), "--workers", str(workers)], env=full_env, stdout=f, stderr=f,
                                    cwd=str(REPO), start_new_session=True)
        srv = FilefeedServer(f"http://127.0.0.1:{port}", staging, proc, log, full_env, workers, offset)
        self.started.append(srv)
        if expect_ready:
            srv.wait_ready(timeout)
        return srv

    @staticmethod
    def kill9(srv: FilefeedServer) -> None:
        """SIGKILL the server's whole process group (master and workers) and reap the master."""
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        srv.proc.wait(30)
        wait_for(lambda: not _group_alive(srv.proc.pid), 30, what="every worker of the killed server to be gone")

    @staticmethod
    def stop(srv: FilefeedServer) -> int | None:
        rc = srv.stop()
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)  # a worker the master failed to reap
        except ProcessLookupError:
            pass
        return rc

    def close(self) -> None:
        for srv in self.started:
            if srv.proc.poll() is None:
                self.stop(srv)
            else:
                try:
                    os.killpg(srv.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _group_alive(pgid: int) -> bool:
    return bool(group_pids(pgid))


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d))
    return sorted(out)


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_cli(env: dict[str, str], *args: str, timeout: float = 120, extra_env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
    full = dict(env)
    full.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "filefeed", *args], env=full, cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)


def cli_json(env: dict[str, str], *args: str, ok_codes=(0,), **kw) -> Any:
    p = run_cli(env, *args, "--json", **kw)
    assert p.returncode in ok_codes, f"filefeed {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def status_json(env: dict[str, str]) -> dict:
    return cli_json(env, "status")


# ---- requests ------------------------------------------------------------------------------------------------------
def update_body(identifiers: list[str], *, feed: str = "42", segment: str = "7", op: str = "UPSERT",
                session: str = "1") -> dict:
    return {"feed_id": feed, "session_id": session, "datamart_id": "1023", "segment_id": segment,
            "ts": 1717494873000, "operation": op,
            "user_identifiers": [{"type": "USER_ACCOUNT", "user_account_id": i, "creation_ts": 1} for i in identifiers]}


def batch_body(items: list[dict], *, feed: str = "42", segment: str = "7", op: str = "UPSERT",
               session: str = "1") -> dict:
    return {"batch_content": items, "ts": 1717494999000,
            "context": {"endpoint": "/v1/user_segment_update", "feed_id": feed, "feed_session_id": session,
                        "segment_id": segment, "datamart_id": "1023", "grouping_key": op}}


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    return client.post(path, content=orjson.dumps(body))


def stage_rows(srv: FilefeedServer, identifiers: list[str], *, per_request: int = 500, **kw) -> list[dict]:
    """Stage rows through user_segment_update (many identifiers per call); return the BATCH_DELIVERY contents."""
    items: list[dict] = []
    with srv.client() as c:
        for i in range(0, len(identifiers), per_request):
            r = post(c, "/v1/user_segment_update", update_body(identifiers[i:i + per_request], **kw))
            assert r.status_code == 200, r.text[:500]
            items.extend(d["content"] for d in r.json()["data"])
    return items


def wait_all_sealed(staging: Path, timeout: float = 30) -> None:
    """Every writer journal sealed and split into its partitions' sealed/ (and no old-layout open segment)."""
    wait_for(lambda: not any(staging.glob("journal/open/*.jnl")) and not any(staging.glob("feeds/*/*/*/open/*.jnl")),
             timeout, what="every writer journal to be sealed and split")


# ---- destination ---------------------------------------------------------------------------------------------------
@dataclass
class Delivered:
    rows: Counter = field(default_factory=Counter)  # (segment_id, operation, identifier) -> copies
    files: int = 0
    manifests: int = 0
    partial: list[str] = field(default_factory=list)  # visible files that do not read whole
    temp: list[str] = field(default_factory=list)  # hidden temp leftovers (never listed as data by consumers)
    where: dict = field(default_factory=dict)  # row -> files holding it (to explain a duplicate)

    def duplicates(self, limit: int = 5) -> list:
        return [(row, self.where.get(row)) for row, n in self.rows.items() if n > 1][:limit]

    def check(self, acked: set[tuple[str, str, str]]) -> dict[str, int]:
        lost = len(acked - set(self.rows))
        dup = sum(n - 1 for n in self.rows.values() if n > 1)
        return {"lost": lost, "duplicated": dup, "partial": len(self.partial), "temp_leftovers": len(self.temp)}


def parse_csv_gz(data: bytes) -> list[dict[str, str]]:
    text = gzip.decompress(data).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def add_file(out: Delivered, name: str, data: bytes) -> None:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "filefeed-tmp" in base or base.endswith((".tmp", ".part")):
        out.temp.append(name)
        return
    if base.endswith(".manifest.json"):
        try:
            json.loads(data)
            out.manifests += 1
        except ValueError:
            out.partial.append(name)
        return
    if not base.endswith(".csv.gz"):
        out.partial.append(name)
        return
    try:
        rows = parse_csv_gz(data)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error):
        out.partial.append(name)
        return
    out.files += 1
    for r in rows:
        key = (r["segment_id"], r["operation"], r["identifier"])
        out.rows[key] += 1
        out.where.setdefault(key, []).append(name)


def read_local(root: Path) -> Delivered:
    out = Delivered()
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        if path.is_file():
            add_file(out, path.relative_to(root).as_posix(), path.read_bytes())
    return out


def s3_client(info: dict[str, str], *, secret: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=info["S3_ENDPOINT"], region_name="us-east-1",
                        aws_access_key_id=info["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=secret or info["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                      connect_timeout=3, read_timeout=10))


def read_s3(info: dict[str, str], prefix: str) -> Delivered:
    c = s3_client(info)
    out = Delivered()
    token = None
    while True:
        kw = {"Bucket": info["S3_BUCKET"], "Prefix": prefix.strip("/") + "/"}
        if token:
            kw["ContinuationToken"] = token
        page = c.list_objects_v2(**kw)
        for obj in page.get("Contents", []):
            data = c.get_object(Bucket=info["S3_BUCKET"], Key=obj["Key"])["Body"].read()
            add_file(out, obj["Key"], data)
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def read_gcs(info: dict[str, str], prefix: str) -> Delivered:
    base = info["GCS_ENDPOINT"]
    out = Delivered()
    with httpx.Client(timeout=10, trust_env=False) as c:
        page_token = None
        while True:
            params = {"prefix": prefix.strip("/") + "/"}
            if page_token:
                params["pageToken"] = page_token
            r = c.get(f"{base}/storage/v1/b/{info['GCS_BUCKET']}/o", params=params)
            r.raise_for_status()
            body = r.json()
            for item in body.get("items", []):
                d = c.get(f"{base}/download/storage/v1/b/{info['GCS_BUCKET']}/o/{_quote(item['name'])}",
                          params={"alt": "media"})
                d.raise_for_status()
                add_file(out, item["name"], d.content)
            page_token = body.get("nextPageToken")
            if not page_token:
                return out


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def read_sftp_local(info: dict[str, str], prefix: str) -> Delivered:
    """The SFTP server's upload folder seen from this host (the chroot), under `prefix`."""
    return read_local(Path(info["SFTP_LOCAL_ROOT"]) / prefix.strip("/"))


# ---- extra S3 / SFTP / GCS instances -----------------------------------------------------------------------------
PID_KEYS = {"s3": "S3_PID", "sftp": "SFTP_PID", "gs": "GCS_PID"}
SCRIPT = {"s3": "start-s3.sh", "sftp": "start-sftp.sh", "gs": "start-gcs.sh"}


def _pick_port(kind: str, r: random.Random) -> int:
    for _ in range(200):
        if kind == "s3":
            p = r.randrange(13000, 14900, 10)
            if all(port_free(p + i) and port_free(p + 10000 + i) for i in range(5)):
                return p
        else:
            p = r.randrange(15000, 19999)
            if port_free(p):
                return p
    raise RuntimeError(f"no free port for an extra {kind} server")


@contextmanager
def extra_server(kind: str, state: Path) -> Iterator[ExtraServer]:
    """Our own `kind` server for one test or module, stopped by PID whatever happens; fails the test if it cannot
    start (a fault test that skips proves nothing)."""
    import pytest

    srv = ExtraServer(kind, state)
    try:
        srv.start()
    except RuntimeError as e:
        srv.stop()
        pytest.fail(f"could not start our own {kind} server: {e}")
    try:
        yield srv
    finally:
        srv.stop()


class ExtraServer:
    """One of scripts/start-*.sh on its own port and state dir; stop/start keep the state (data, keys)."""

    def __init__(self, kind: str, state: Path, port: int | None = None):
        self.kind = kind
        self.state = state
        self.port = port or _pick_port(kind, random.Random())
        self.info: dict[str, str] = {}
        self.pid: int | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.kind == "s3":
            env.update(S3_PORT=str(self.port), S3_STATE_DIR=str(self.state))
        elif self.kind == "sftp":
            env.update(SFTP_PORT=str(self.port), SFTP_STATE_DIR=str(self.state),
                       SFTP_CHROOT=f"/srv/filefeed-sftp-rel-{self.port}",
                       SFTP_KEYS_DIR=f"/srv/filefeed-sftp-keys/rel-{self.port}")
        else:
            env.update(GCS_PORT=str(self.port), GCS_STATE_DIR=str(self.state))
        return env

    def start(self) -> dict[str, str]:
        if self.kind == "s3":  # the bind check needs the previous instance's sockets gone
            wait_for(lambda: all(port_free(self.port + i) and port_free(self.port + 10000 + i) for i in range(5)),
                     30, what="the S3 ports to be free again")
        else:
            wait_for(lambda: port_free(self.port), 30, what=f"port {self.port} to be free again")
        p = subprocess.run([str(SCRIPTS / SCRIPT[self.kind])], env=self._env(), capture_output=True, text=True,
                           timeout=120)
        for line in p.stdout.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                self.info[k] = v
        if p.returncode != 0:
            raise RuntimeError(f"{SCRIPT[self.kind]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
        self.pid = int(self.info[PID_KEYS[self.kind]])
        return self.info

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2:].split()[0] != "Z"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.pid is None:
            return
        pid = self.pid
        for child in descendants(pid):  # sshd's per-connection processes: a stopped server keeps no session
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            self.pid = None
            return
        try:
            wait_for(lambda: not self.alive(), 20, interval=0.1, what=f"{self.kind} server {pid} to stop")
        except AssertionError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_for(lambda: not self.alive(), 10, interval=0.1, what=f"{self.kind} server {pid} to die")
        try:  # reap it if it is our child's child that got reparented to us (never the case with the scripts)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if self.kind == "sftp":  # sshd forks a process per connection: end the ones of this instance
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")
                    except OSError:
                        continue
                    if f"{self.state}/sshd_config".encode() in cmd:
                        try:
                            os.kill(int(d), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        self.pid = None


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def host_key_line(info: dict[str, str]) -> str:
    for line in Path(info["SFTP_KNOWN_HOSTS"]).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            return f"{parts[1]} {parts[2]}"
    raise RuntimeError("no host key")


def feed_props(kind: str, info: dict[str, str], prefix: str, **over: Any) -> dict[str, Any]:
    if kind == "s3":
        p = {"destination_uri": f"s3://{info['S3_BUCKET']}/{prefix}", "s3_endpoint_url": info["S3_ENDPOINT"],
             "s3_region": "us-east-1", "aws_access_key_id": info["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": info["AWS_SECRET_ACCESS_KEY"]}
    elif kind == "sftp":
        p = {"destination_uri": f"sftp://{info['SFTP_USER']}@127.0.0.1:{info['SFTP_PORT']}/upload/{prefix}",
             "sftp_private_key": Path(info["SFTP_KEY"]).read_text(), "sftp_host_key": host_key_line(info)}
    else:
        p = {"destination_uri": f"gs://{info['GCS_BUCKET']}/{prefix}", "gcs_endpoint_url": info["GCS_ENDPOINT"],
             "gcs_project": "filefeed-test"}
    p.update(identifier_types="USER_ACCOUNT", **over)
    return p
