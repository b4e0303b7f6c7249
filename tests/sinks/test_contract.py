"""One contract suite, run against every backend on real servers: local folder, SeaweedFS (S3), OpenSSH (SFTP),
fake-gcs-server (GCS). Fault tests at the end run on their own server instances so the shared ones stay up.

Decision, same for every backend: re-publishing a name with the same bytes is `already_present`; with different
bytes it is TerminalError(kind="conflict") and the existing object is left untouched (create-only). Deterministic
names make a different-content collision a bug upstream, never something to paper over by overwriting.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from sinks import PublishResult, Sink, SinkError, TerminalError, TransientError, open_sink
from tests.servers import REPO, SCHEMES, sink_props

pytest_plugins = ["tests.servers"]
pytestmark = [pytest.mark.servers, pytest.mark.timeout(300)]

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------------------------
def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def pseudo_random(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes, fast: a random 1 MiB block, varied per MiB so parts never repeat."""
    block = os.urandom(MiB)
    out = bytearray()
    i = seed
    while len(out) < size:
        out += i.to_bytes(8, "little") + block[8:]
        i += 1
    return bytes(out[:size])


class FailingReader:
    """A file object that reads normally, then raises (or runs `action`) once `after` bytes were read."""

    def __init__(self, f: BinaryIO, after: int, action: Any = None):
        self._f = f
        self._after = after
        self._read = 0
        self._action = action
        self._fired = False

    def read(self, n: int = -1) -> bytes:
        if self._read >= self._after and not self._fired:
            if self._action is None:
                raise OSError(errno.EIO, "injected read failure")
            self._fired = True
            self._action()
        if n is None or n < 0:
            n = 1 << 62
        if not self._fired:
            n = min(n, max(1, self._after - self._read))
        data = self._f.read(n)
        self._read += len(data)
        return data

    def __getattr__(self, name: str) -> Any:  # seek/tell/fileno/... from the real file
        return getattr(self._f, name)

    def __enter__(self) -> FailingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def inject(sink: Sink, after: int, action: Any = None) -> None:
    sink.open_source = lambda p: FailingReader(open(p, "rb"), after, action)  # type: ignore[method-assign]
    if hasattr(sink, "link_sources"):
        sink.link_sources = False  # the local sink would hard-link the file instead of reading it


def names(sink: Sink, prefix: str = "") -> list[str]:
    return sorted(o.name for o in sink.list(prefix))


def s3_open_uploads(sink: Sink) -> list[dict]:
    key_prefix = sink.destination.path.strip("/") + "/"
    r = sink.client.list_multipart_uploads(Bucket=sink.destination.host, Prefix=key_prefix)  # type: ignore[attr-defined]
    return r.get("Uploads", []) or []


def assert_nothing_left(sink: Sink, scheme: str) -> None:
    """Nothing visible under the prefix (temp files included) and, on S3, no multipart upload left open."""
    assert names(sink) == []
    if scheme == "s3":
        assert s3_open_uploads(sink) == []


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def sink(scheme: str, servers: dict[str, str], unique_prefix: str) -> Iterator[Sink]:
    s = open_sink(sink_props(scheme, servers, unique_prefix))
    try:
        yield s
    finally:
        try:
            for o in list(s.list()):
                s.remove(o.name)
        finally:
            s.close()


# -- publish and idempotence -----------------------------------------------------------------------------------
def test_publish_then_read_back(sink: Sink, tmp_path: Path) -> None:
    data = b"segment_id,operation,identifier\n1,ADD,abc\n"
    r = sink.publish(write(tmp_path / "f.csv", data), "seg1/f.csv")
    assert r == PublishResult("seg1/f.csv", len(data), sink.url("seg1/f.csv"), already_present=False)
    assert sink.read("seg1/f.csv") == data
    assert sink.stat("seg1/f.csv").size == len(data)
    assert names(sink) == ["seg1/f.csv"]


def test_republish_same_bytes_is_already_present(sink: Sink, tmp_path: Path) -> None:
    src = write(tmp_path / "f.csv", b"a,b\n1,2\n")
    assert not sink.publish(src, "x/f.csv").already_present
    again = sink.publish(src, "x/f.csv")
    assert again.already_present and again.size == src.stat().st_size
    # a copy of the bytes under another local name is the same content
    assert sink.publish(write(tmp_path / "copy.csv", src.read_bytes()), "x/f.csv").already_present
    assert names(sink) == ["x/f.csv"]


@pytest.mark.parametrize("other", [b"a,b\n1,3\n", b"a,b\n1,2\n3,4\n"], ids=["same-size", "other-size"])
def test_republish_different_bytes_is_a_conflict(sink: Sink, tmp_path: Path, other: bytes) -> None:
    original = b"a,b\n1,2\n"
    sink.publish(write(tmp_path / "f.csv", original), "x/f.csv")
    with pytest.raises(TerminalError) as e:
        sink.publish(write(tmp_path / "g.csv", other), "x/f.csv")
    assert e.value.kind == "conflict"
    assert sink.read("x/f.csv") == original  # untouched
    assert names(sink) == ["x/f.csv"]


def test_empty_file(sink: Sink, tmp_path: Path) -> None:
    r = sink.publish(write(tmp_path / "empty", b""), "e/empty.csv")
    assert r.size == 0 and sink.read("e/empty.csv") == b""
    assert sink.publish(tmp_path / "empty", "e/empty.csv").already_present


def test_large_file(sink: Sink, scheme: str, tmp_path: Path) -> None:
    """>= 40 MB: S3 multipart with parallel parts, GCS resumable chunks, SFTP pipelined writes."""
    data = pseudo_random(45 * MiB + 12345)
    src = write(tmp_path / "big.bin", data)
    r = sink.publish(src, "big/part-0001.bin")
    assert r.size == len(data) and not r.already_present
    assert sink.stat("big/part-0001.bin").size == len(data)
    assert hashlib.sha256(sink.read("big/part-0001.bin")).digest() == hashlib.sha256(data).digest()
    assert sink.publish(src, "big/part-0001.bin").already_present
    # same size, one byte different at the end: still a conflict (content compared, not just size)
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    with pytest.raises(TerminalError) as e:
        sink.publish(write(tmp_path / "big2.bin", bytes(changed)), "big/part-0001.bin")
    assert e.value.kind == "conflict"
    assert names(sink) == ["big/part-0001.bin"]
    if scheme == "s3":
        assert s3_open_uploads(sink) == []


# -- failures leave nothing behind -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [100_000, 45 * MiB], ids=["small", "large"])
def test_failure_mid_upload_leaves_nothing(sink: Sink, scheme: str, tmp_path: Path, size: int) -> None:
    src = write(tmp_path / "f.bin", pseudo_random(size))
    inject(sink, after=size * 2 // 3)
    with pytest.raises(SinkError):
        sink.publish(src, "fail/f.bin")
    assert sink.stat("fail/f.bin") is None
    assert_nothing_left(sink, scheme)
    # and the same name publishes cleanly afterwards
    sink.open_source = lambda p: open(p, "rb")  # type: ignore[method-assign]
    assert not sink.publish(src, "fail/f.bin").already_present
    assert sink.stat("fail/f.bin").size == size


# -- check() ---------------------------------------------------------------------------------------------------
def test_check_good(sink: Sink) -> None:
    sink.check()
    assert names(sink) == []  # the probe is gone


def test_check_bad_credentials(scheme: str, servers: dict[str, str], unique_prefix: str, tmp_path: Path) -> None:
    if scheme == "file":
        blocker = write(tmp_path / "not-a-folder", b"x")  # root lies under a regular file (root bypasses chmod)
        props = sink_props(scheme, servers, unique_prefix, destination_uri=f"file://{blocker}/{unique_prefix}")
        expected = "not_found"
    elif scheme == "s3":
        props = sink_props(scheme, servers, unique_prefix, aws_secret_access_key="not-the-secret")
        expected = "auth"
    elif scheme == "sftp":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
        props = sink_props(scheme, servers, unique_prefix, sftp_private_key=(tmp_path / "other").read_text())
        expected = "auth"
    else:
        # fake-gcs-server accepts any credentials: what can be refused is an unusable service-account key
        props = sink_props(scheme, servers, unique_prefix, gcs_service_account_json='{"type": "service_account"}')
        expected = "auth"
    with open_sink(props) as s, pytest.raises(TerminalError) as e:
        s.check()
    assert e.value.kind == expected
    secret = props.aws_secret_access_key or props.sftp_private_key or props.gcs_service_account_json
    if secret is not None:
        assert secret.get_secret_value() not in str(e.value)


@pytest.mark.parametrize("bucket_scheme", ["s3", "gs"])  # only these have buckets
def test_check_missing_bucket(bucket_scheme: str, servers: dict[str, str], unique_prefix: str) -> None:
    scheme = bucket_scheme
    uri = f"{scheme}://no-such-bucket-{unique_prefix[-8:]}/{unique_prefix}"
    with open_sink(sink_props(scheme, servers, unique_prefix, destination_uri=uri)) as s, \
            pytest.raises(TerminalError) as e:
        s.check()
    assert e.value.kind == "not_found"


def test_sftp_wrong_host_key_is_refused(servers: dict[str, str], unique_prefix: str, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "fake_host")], check=True)
    wrong = " ".join((tmp_path / "fake_host.pub").read_text().split()[:2])
    with open_sink(sink_props("sftp", servers, unique_prefix, sftp_host_key=wrong)) as s:
        with pytest.raises(TerminalError) as e:
            s.check()
        assert e.value.kind == "host_key"
        with pytest.raises(TerminalError) as e:
            s.publish(write(tmp_path / "f", b"x"), "f")
        assert e.value.kind == "host_key"


def test_sftp_host_key_by_fingerprint_and_known_hosts_setting(
    servers: dict[str, str], unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config import settings as settings_mod
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", servers["SFTP_KNOWN_HOSTS"]],
                         capture_output=True, text=True, check=True).stdout
    fp = next(tok for tok in out.split() if tok.startswith("SHA256:"))
    with open_sink(sink_props("sftp", servers, unique_prefix, sftp_host_key=fp)) as s:
        s.check()
    # no pin in the properties: the known_hosts file of the service settings decides; neither: refused
    monkeypatch.setattr(settings_mod, "_active", None)
    settings_mod.load_settings(feeds=Path("config/feeds.toml"), sftp_known_hosts=Path(servers["SFTP_KNOWN_HOSTS"]))
    with open_sink(sink_props("sftp", servers, unique_prefix, sftp_host_key=None)) as s:
        s.check()
    monkeypatch.setattr(settings_mod, "_active", None)
    with open_sink(sink_props("sftp", servers, unique_prefix, sftp_host_key=None)) as s, \
            pytest.raises(TerminalError) as e:
        s.check()
    assert e.value.kind == "host_key"


def test_sftp_without_posix_rename(servers: dict[str, str], unique_prefix: str, tmp_path: Path) -> None:
    """The plain-rename fallback (servers lacking posix-rename@openssh.com) keeps the same semantics."""
    with open_sink(sink_props("sftp", servers, unique_prefix)) as s:
        s.posix_rename_supported = False  # type: ignore[attr-defined]
        src = write(tmp_path / "f", b"abc\n")
        assert not s.publish(src, "n/f.csv").already_present
        assert s.publish(src, "n/f.csv").already_present
        with pytest.raises(TerminalError) as e:
            s.publish(write(tmp_path / "g", b"abd\n"), "n/f.csv")
        assert e.value.kind == "conflict"
        # plain rename onto an existing name is refused by the server: the sink compares instead of failing
        # a publisher racing us: the name is absent at the first look, present when we rename
        real_stat, calls = s._stat, []  # type: ignore[attr-defined]

        def racing_stat(sftp: Any, path: str) -> Any:
            calls.append(path)
            return None if len(calls) == 1 else real_stat(sftp, path)

        s._stat = racing_stat  # type: ignore[attr-defined]
        assert s.publish(src, "n/f.csv").already_present  # plain rename refused, then compared
        assert len(calls) == 2
        del s._stat  # type: ignore[attr-defined]
        assert names(s) == ["n/f.csv"]
        for o in s.list():
            s.remove(o.name)


# -- list / stat / read / remove -------------------------------------------------------------------------------
def test_list_stat_read_remove_nested(sink: Sink, tmp_path: Path) -> None:
    files = {"a/b/c.csv": b"1\n", "a/d.csv": b"22\n", "e.csv": b"333\n", "a/bc/f.csv": b"4444\n"}
    for name, data in files.items():
        sink.publish(write(tmp_path / name.replace("/", "_"), data), name)
    assert names(sink) == sorted(files)
    assert names(sink, "a/") == ["a/b/c.csv", "a/bc/f.csv", "a/d.csv"]
    assert names(sink, "a/b") == ["a/b/c.csv", "a/bc/f.csv"]
    assert names(sink, "a/b/") == ["a/b/c.csv"]
    assert names(sink, "zzz/") == []
    assert {o.name: o.size for o in sink.list()} == {n: len(d) for n, d in files.items()}
    assert sink.stat("a/missing.csv") is None
    assert sink.stat("nope/x.csv") is None
    assert sink.read("a/d.csv") == b"22\n"
    sink.remove("a/d.csv")
    assert sink.stat("a/d.csv") is None
    sink.remove("a/d.csv")  # absent is fine
    assert names(sink) == sorted(set(files) - {"a/d.csv"})


@pytest.mark.parametrize("bad", ["../escape.csv", "/abs.csv", "a/../../b.csv", "a\\b.csv", "a\x00b", "a//b", ""])
def test_names_never_escape_the_root(sink: Sink, tmp_path: Path, bad: str) -> None:
    src = write(tmp_path / "f", b"x")
    with pytest.raises(TerminalError) as e:
        sink.publish(src, bad)
    assert e.value.kind == "invalid_name"
    assert names(sink) == []


def test_local_symlink_out_of_root_is_refused(servers: dict[str, str], unique_prefix: str, tmp_path: Path) -> None:
    with open_sink(sink_props("file", servers, unique_prefix)) as s:
        root = Path(s.destination.path)
        root.mkdir(parents=True)
        outside = tmp_path / "outside"
        outside.mkdir()
        (root / "link").symlink_to(outside)
        with pytest.raises(TerminalError) as e:
            s.publish(write(tmp_path / "f", b"x"), "link/f.csv")
        assert e.value.kind == "invalid_name"
        assert list(outside.iterdir()) == []


def test_local_publish_links_on_the_same_filesystem(
    servers: dict[str, str], unique_prefix: str, tmp_path: Path
) -> None:
    with open_sink(sink_props("file", servers, unique_prefix)) as s:
        src = write(tmp_path / "f.csv", b"a,b\n1,2\n")
        if os.stat(tmp_path).st_dev != os.stat(Path(s.destination.path).parent).st_dev:
            pytest.fail("the test destination must share the temp folder's filesystem")
        assert not s.publish(src, "d/f.csv").already_present
        published = Path(s.destination.path) / "d" / "f.csv"
        assert published.stat().st_ino == src.stat().st_ino  # no second copy of the bytes
        assert s.publish(src, "d/f.csv").already_present
        src.unlink()  # the roll removes its output folder after the ledger: the published file stays whole
        assert published.read_bytes() == b"a,b\n1,2\n"
        # copy mode (what a mounted destination on another filesystem gets) gives the same bytes, another inode
        s.link_sources = False  # type: ignore[attr-defined]
        other = write(tmp_path / "g.csv", b"x\n")
        s.publish(other, "d/g.csv")
        assert (Path(s.destination.path) / "d" / "g.csv").stat().st_ino != other.stat().st_ino
        assert names(s) == ["d/f.csv", "d/g.csv"]


def test_local_publish_copies_when_the_filesystems_cannot_link(
    servers: dict[str, str], unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    src = write(tmp_path / "f.csv", b"1,2\n")

    def cross_device(a: Any, b: Any) -> None:
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(a, b)

    monkeypatch.setattr("sinks.local.os.link", cross_device)
    with open_sink(sink_props("file", servers, unique_prefix)) as s:
        assert not s.publish(src, "f.csv").already_present
        published = Path(s.destination.path) / "f.csv"
        assert published.read_bytes() == b"1,2\n" and published.stat().st_ino != src.stat().st_ino
        assert names(s) == ["f.csv"]  # no temp file left


# -- faults on dedicated server instances ----------------------------------------------------------------------
def _start(script: str, env: dict[str, str]) -> dict[str, str]:
    r = subprocess.run([str(REPO / "scripts" / script)], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        pytest.fail(f"{script} failed:\n{r.stdout}\n{r.stderr}")
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _stop(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_fault_sftp_server_killed_mid_upload(servers: dict[str, str], tmp_path: Path) -> None:
    env = _start("start-sftp.sh", {"SFTP_PORT": "12232", "SFTP_STATE_DIR": str(tmp_path / "sftp")})
    server = int(env["SFTP_PID"])
    try:
        shutil.rmtree(Path(env["SFTP_LOCAL_ROOT"]) / "fault", ignore_errors=True)  # leftovers of an earlier run
        own = {**servers, **env}
        size = 48 * MiB
        src = write(tmp_path / "f.bin", pseudo_random(size))

        def kill_server() -> None:  # the listener and every session process: connections reset mid-write
            for pid in [server, *_descendants(server)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        with open_sink(sink_props("sftp", own, "fault")) as s:
            s.timeout = 10  # type: ignore[attr-defined]
            inject(s, after=size // 3, action=kill_server)
            t0 = time.monotonic()
            with pytest.raises(TransientError) as e:
                s.publish(src, "seg/f.bin")
            assert time.monotonic() - t0 < 30
            assert e.value.kind in ("network", "timeout")
        folder = Path(env["SFTP_LOCAL_ROOT"]) / "fault" / "seg"
        assert not (folder / "f.bin").exists()
        # the server died before the sink could remove its temp file: only a dot-prefixed name may remain
        assert all(p.name.startswith(".f.bin.filefeed-tmp-") for p in folder.iterdir())
        shutil.rmtree(Path(env["SFTP_LOCAL_ROOT"]) / "fault", ignore_errors=True)
    finally:
        _stop(server)


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_fault_gcs_server_frozen_mid_upload(servers: dict[str, str], tmp_path: Path) -> None:
    env = _start("start-gcs.sh", {"GCS_PORT": "14453", "GCS_STATE_DIR": str(tmp_path / "gcs")})
    server = int(env["GCS_PID"])
    try:
        own = {**servers, **env}
        size = 80 * MiB
        src = write(tmp_path / "f.bin", pseudo_random(size))
        with open_sink(sink_props("gs", own, "fault")) as s:
            s.timeout = (2.0, 2.0)  # type: ignore[attr-defined]
            s.retry_deadline = 0  # type: ignore[attr-defined]
            inject(s, after=40 * MiB, action=lambda: os.kill(server, signal.SIGSTOP))
            t0 = time.monotonic()
            with pytest.raises(TransientError):
                s.publish(src, "seg/f.bin")
            assert time.monotonic() - t0 < 30
        os.kill(server, signal.SIGCONT)
        with open_sink(sink_props("gs", own, "fault")) as s:
            assert s.stat("seg/f.bin") is None
            assert names(s) == []
    finally:
        _stop(server)


@pytest.mark.reliability
@pytest.mark.timeout(180)
def test_fault_s3_server_frozen_mid_multipart(servers: dict[str, str], tmp_path: Path) -> None:
    """Server frozen mid-upload: parts time out (TransientError); the abort is retried until the server is back."""
    env = _start("start-s3.sh", {"S3_PORT": "13000", "S3_STATE_DIR": str(tmp_path / "s3")})
    server = int(env["S3_PID"])
    thawed = threading.Event()
    try:
        own = {**servers, **env}
        size = 96 * MiB
        src = write(tmp_path / "f.bin", pseudo_random(size))

        def freeze() -> None:
            os.kill(server, signal.SIGSTOP)

            def thaw() -> None:
                os.kill(server, signal.SIGCONT)
                thawed.set()

            threading.Timer(4.0, thaw).start()

        with open_sink(sink_props("s3", own, "fault")) as s:
            s.connect_timeout = s.read_timeout = 1.0  # type: ignore[attr-defined]
            s.max_attempts = 1  # type: ignore[attr-defined]
            inject(s, after=40 * MiB, action=freeze)
            with pytest.raises(TransientError) as e:
                s.publish(src, "seg/f.bin")
            assert e.value.kind in ("timeout", "network")
        assert thawed.wait(30)
        with open_sink(sink_props("s3", own, "fault")) as s:
            assert s.stat("seg/f.bin") is None
            assert_nothing_left(s, "s3")
    finally:
        thawed.wait(10)
        _stop(server)
