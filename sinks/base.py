"""The sink contract: a small class per destination, registered by URL scheme.

Every sink publishes atomically (nothing half-visible) and idempotently (a re-publish of the same deterministic name
never creates a second object), and classifies its own errors once, here at the edge: `TransientError` (retry with
backoff, the platform gets RETRY) or `TerminalError` (the rows go to failed/, the platform gets ERROR): the one
taxonomy of sinks/errors.py.
Error messages never contain a credential.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from sinks.errors import Classified, Terminal, Transient

if TYPE_CHECKING:
    from config.feed import FeedProperties


class SinkError(Classified):
    """Base of every error a sink raises; its mixin says whether a retry can help, `kind` what went wrong
    ("network", "auth", "permission", "not_found", ...: sinks/errors.py)."""


class TransientError(Transient, SinkError):
    pass


class TerminalError(Terminal, SinkError):
    pass


def name_problem(name: str) -> str | None:
    """What makes `name` unsafe as a relative object name, or None: the one rule for every name filefeed writes.

    Refused: empty, absolute, backslash, NUL or control characters, empty / '.' / '..' segments, a trailing '/'.
    The same rule for every backend, so a name that works on one never escapes the root on another
    (pipeline/naming.py adds what only rendered file names must avoid: hidden segments, excessive length).
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if name.startswith("/"):
        return "is absolute"
    if "\\" in name:
        return "contains a backslash"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "contains NUL or control characters"
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def check_name(name: str) -> str:
    """Return `name` if it is a safe relative object name, else raise TerminalError(kind="invalid_name")."""
    problem = name_problem(name)
    if problem:
        raise TerminalError(f"object name {name!r} {problem}", kind="invalid_name")
    return name


def same_bytes(local_path: Path, remote_chunks: Iterable[bytes], chunk_size: int = 1 << 20) -> bool:
    """True when the streamed remote bytes equal the local file; stops at the first difference."""
    with open(local_path, "rb") as f:
        pending = b""
        for chunk in remote_chunks:
            pending += chunk
            while len(pending) >= chunk_size:
                if f.read(chunk_size) != pending[:chunk_size]:
                    return False
                pending = pending[chunk_size:]
        return f.read(len(pending) + 1) == pending


def classify_os_error(e: OSError, what: str) -> SinkError:
    """Map a local or socket OSError to Transient/Terminal with a kind. `what` says what was being done.

    A full disk is transient (kind "no_space"): an operator can free space, and the caller's bounded retry budget
    still ends in failed/ if nobody does.
    """
    code = e.errno
    detail = e.strerror or type(e).__name__
    if isinstance(e, (socket.timeout, TimeoutError)):
        return TransientError(f"{what}: timed out", kind="timeout")
    if isinstance(e, (ConnectionError, socket.gaierror)) or code in (
        errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH,
        errno.ENETUNREACH, errno.ENETDOWN, errno.ETIMEDOUT,
    ):
        return TransientError(f"{what}: {detail}", kind="network")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return TransientError(f"{what}: {detail}", kind="no_space")
    if code in (errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR):
        return TransientError(f"{what}: {detail}", kind="io")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return TerminalError(f"{what}: {detail}", kind="permission")
    if code in (errno.ENOENT, errno.ENOTDIR):
        return TerminalError(f"{what}: {detail}", kind="not_found")
    if code in (errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY):
        return TerminalError(f"{what}: {detail}", kind="conflict")
    return TerminalError(f"{what}: {detail}", kind="io")


@dataclass
class Deadlines:
    """Every network call of every sink: `connect` to open a connection (and SSH banner, handshake, auth), `read`
    for any single wait on the partner (one socket read, one SFTP request). Set once from the service settings."""

    connect: float = 10.0
    read: float = 30.0


DEADLINES = Deadlines()


def set_deadlines(connect: float, read: float) -> None:
    DEADLINES.connect, DEADLINES.read = connect, read


@dataclass(frozen=True)
class RemoteObject:
    name: str  # relative to the destination prefix, '/'-separated
    size: int


@dataclass(frozen=True)
class Leftover:
    """An unfinished upload of filefeed's own making: a temp file, or an incomplete multipart upload."""

    name: str  # what an operator sees: the temp file's relative name, or the upload's key and id
    age_seconds: float
    handle: Any = None  # the backend's own (an upload id)


# Temp files are `.<final name>.filefeed-tmp-<12 hex>` in the final name's folder: nobody else names files so.
TEMP_MARK = ".filefeed-tmp-"
TEMP_NAME = re.compile(r"\.(?P<final>[^/]+)\.filefeed-tmp-[0-9a-f]{12}")


def temp_name(final_basename: str) -> str:
    return f".{final_basename}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


def temp_leftover(rel: str, mtime: float, now: float, older_than: float,
                  own: Callable[[str], bool]) -> Leftover | None:
    """`rel` as a Leftover when it is one of our temp files, for a name this feed renders, older than `older_than`."""
    folder, _, base = rel.rpartition("/")
    m = TEMP_NAME.fullmatch(base)
    if m is None or now - mtime <= older_than:
        return None
    final = f"{folder}/{m['final']}" if folder else m["final"]
    return Leftover(rel, now - mtime) if own(final) else None


@dataclass(frozen=True)
class PublishResult:
    name: str  # relative name as published
    size: int
    url: str  # full URL of the published object (no credentials)
    already_present: bool = False  # True when an identical object was there already (idempotent re-publish)


class Sink(abc.ABC):
    """A destination. Names are relative to the destination URI's prefix/path, '/'-separated, never '..'."""

    scheme: ClassVar[str]
    # One object may serve concurrent rolls (thread-safe, nothing per publish kept on it): see SinkPool.
    shareable: ClassVar[bool] = False

    def __init__(self, props: FeedProperties):
        self.props = props
        self.destination = props.destination
        # per instance, so a test can shorten them before first use
        self.connect_timeout: float = DEADLINES.connect
        self.read_timeout: float = DEADLINES.read

    def open_source(self, local_path: Path) -> BinaryIO:
        """Open the local file to publish. The one place the bytes are read from (tests inject failures here)."""
        return open(local_path, "rb")  # noqa: SIM115 - caller closes

    @abc.abstractmethod
    def check(self) -> None:
        """Prove the destination is reachable and writable: write then remove a small probe object."""

    def publish(self, local_path: Path, name: str) -> PublishResult:
        """Make `local_path` visible as `name`, atomically and create-only; idempotent for the same name and bytes.

        The one publish sequence of every backend: check the name, look it up (an idempotent re-publish costs one
        lookup), upload create-only; a name that exists (before, or created meanwhile by another publisher) is done
        when its bytes are ours and a terminal conflict otherwise.
        """
        check_name(name)
        url = self.url(name)
        try:
            size = os.stat(local_path).st_size
        except OSError as e:
            raise classify_os_error(e, f"reading {local_path}") from None
        try:
            found = self._lookup(name)
            if found is None:
                if self._create(local_path, name, size):
                    return PublishResult(name, size, url)
                found = self._lookup(name)
                if found is None:
                    raise TerminalError(f"{url}: the destination refused the create-only upload", kind="unsupported")
            if self._size_of(found) == size and self._same_content(local_path, name, found):
                return PublishResult(name, size, url, already_present=True)
            raise TerminalError(f"{url}: name exists with different content", kind="conflict")
        except Exception as e:
            raise self._classify(e, f"publishing {url}") from None

    # -- the backend's hooks for publish -----------------------------------------------------------------------
    @abc.abstractmethod
    def _lookup(self, name: str) -> Any | None:
        """The backend's view of the existing object `name` (stat result, HEAD answer, blob), or None."""

    @abc.abstractmethod
    def _size_of(self, found: Any) -> int:
        """The size of a `_lookup` result (-1 when it is not a regular file)."""

    @abc.abstractmethod
    def _same_content(self, local_path: Path, name: str, found: Any) -> bool:
        """Whether the existing object holds exactly the bytes of `local_path` (same size already checked)."""

    @abc.abstractmethod
    def _create(self, local_path: Path, name: str, size: int) -> bool:
        """Upload create-only and atomically; False when the name exists (created by someone else meanwhile)."""

    def _classify(self, e: BaseException, what: str) -> SinkError:
        """The backend's error mapping: Transient/Terminal with a kind."""
        if isinstance(e, SinkError):
            return e
        if isinstance(e, OSError):
            return classify_os_error(e, what)
        return TerminalError(f"{what}: unexpected {type(e).__name__}", kind="client")

    def key(self, name: str) -> str:
        """The object key of `name` under the destination's prefix (object stores)."""
        check_name(name)
        prefix = self.destination.path.strip("/")
        return f"{prefix}/{name}" if prefix else name

    # -- leftovers ---------------------------------------------------------------------------------------------
    def leftovers(self, prefixes: Iterable[str], older_than: float,
                  own: Callable[[str], bool]) -> Iterator[Leftover]:
        """Unfinished uploads of filefeed's own naming under `prefixes`, older than `older_than` seconds.

        `own(name)` says whether a final name is one this feed renders (the backend adds its own mark: the temp
        name, or the multipart upload's key). None by default: the backend leaves nothing behind (GCS: an abandoned
        resumable session holds no object and expires by itself).
        """
        return iter(())

    def remove_leftover(self, leftover: Leftover) -> None:  # noqa: B027 - optional hook
        """Remove a leftover `leftovers` found; absent is fine."""

    @abc.abstractmethod
    def stat(self, name: str) -> RemoteObject | None:
        """The object `name`, or None when absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[RemoteObject]:
        """Objects whose relative name starts with `prefix` (recursive)."""

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of `name` (verify, tests)."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Delete `name`; absent is fine."""

    def url(self, name: str) -> str:
        base = self.destination.uri.rstrip("/")
        return f"{base}/{name}"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
