"""Durable, partitioned staging: rows are fsynced to disk before a request is acknowledged.

Layout under the staging root (state lives in folder names, so `ls` and `head` tell an operator everything)::

    feeds/<feed>/<segment>/<op>/open/<writer_id>-<seq>.jnl    appended by one live writer, which holds an flock on it
    feeds/<feed>/<segment>/<op>/sealed/<writer_id>-<seq>.jnl  closed and complete: ready for a roll
    quarantine/<feed>/<segment>/<op>/<name>.jnl + <name>.jnl.report.json   damaged segments, kept for inspection

Each process has its own writer id, so writers never share a file and the hot path takes no lock. Appends from
concurrent requests are grouped: one committer thread writes one frame per touched segment and fsyncs each touched
file once, then acknowledges every request of the group (group commit). Nothing is acknowledged before its fsync.

Ingest dedup is per writer: a platform retry that lands on another worker process (or on this one after a restart)
is not caught here; the roll/ledger side must tolerate it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, NoReturn

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.durable import atomic_write_bytes, fsync_dir, write_all
from pipeline.journal import (
    MAX_HEADER_BYTES,
    Frame,
    FrameError,
    Row,
    SegmentScan,
    check_frame,
    clean_value,
    encode_frame,
    encode_lines,
    encode_payload,
    is_clean_value,
    iter_payload_lines,
    parse_header,
    scan_buffer,
)
from pipeline.model import STAGED_FIELDS, STAGED_SCHEMA, Partition

__all__ = [
    "AppendResult",
    "CorruptSegment",
    "PartitionStats",
    "RecoveryReport",
    "Staging",
    "StagingClosed",
    "StagingFull",
    "clean_value",
    "count_rows",
    "is_clean_value",
    "first_row",
    "iter_batches",
    "iter_rows",
    "verify_segment",
]

log = logging.getLogger("filefeed.staging")

MiB = 1024 * 1024
SUFFIX = ".jnl"
OPEN, SEALED = "open", "sealed"
INLINE_MAX_HOPS = 4
# How often a writer with open segments looks for seal requests from other processes (see _seal_requested).
SEAL_REQUEST_POLL_SECONDS = 0.05
# Frames are split above this payload size so a reader's chunk always holds whole frames.
MAX_FRAME_PAYLOAD = 4 * MiB
# A header claiming more than this is damage, not data: stop before buffering a whole bogus length.
MAX_READ_FRAME = 64 * MiB
DISK_CHECK_SECONDS = 1.0
STAGED_SCAN_SECONDS = 2.0
ORPHAN_CHECK_SECONDS = 30.0
STALE_TEMP_SECONDS = 60.0
DISK_FULL_RETRY_MS = 5_000
STAGED_FULL_RETRY_MS = 2_000
_WRITER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")
# Refs come back from the platform in batch_update: only this shape may ever become a path.
_SEGMENT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,48}-[0-9]{8,12}")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StagingFull(Exception):
    """Staging refuses new rows for now (disk or staged-bytes limit); retry after `retry_after_ms`."""

    def __init__(self, reason: str, retry_after_ms: int):
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        super().__init__(reason)


class StagingClosed(RuntimeError):
    """append after close(), or a Staging used in a process other than the one that created it."""


class CorruptSegment(Exception):
    """A segment that fails its frame checks when read; `Staging.repair_segment` quarantines it."""

    def __init__(self, path: Path, offset: int, reason: str):
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"{path}: bad frame at byte {offset}: {reason}")


class AppendResult(NamedTuple):
    segment: str  # "<writer_id>-<seq>": the segment holding these rows (or, for duplicates, this writer's latest)
    accepted: int
    duplicates: int


# Bumped in a forked child: a Staging notices it crossed a fork without a getpid() system call per append.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class PartitionStats:
    rows: int
    bytes: int
    oldest_ts_ms: int | None  # commit time of the oldest frame still staged
    open_segments: int
    sealed_segments: int


@dataclass
class RecoveryReport:
    sealed: list[str] = field(default_factory=list)  # orphaned open segments sealed as they were
    truncated: list[tuple[str, int]] = field(default_factory=list)  # (segment, bytes cut from a torn tail)
    quarantined: list[str] = field(default_factory=list)  # damaged in the middle: good frames kept, original moved
    removed_empty: list[str] = field(default_factory=list)
    busy: int = 0  # open segments whose live owner holds the lock


def segment_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:08d}"


def _sort_key(path: Path) -> tuple[str, int]:
    writer, _, seq = path.stem.rpartition("-")
    return (writer, int(seq) if seq.isdigit() else -1)


def _make_dirs(root: Path, rel: Path) -> None:
    """mkdir each missing component and fsync its parent, so a new folder survives a crash."""
    cur = root
    for part in rel.parts:
        nxt = cur / part
        if not nxt.is_dir():
            try:
                nxt.mkdir()
            except FileExistsError:
                pass  # another process made it; it fsyncs it too, and so do we below
            fsync_dir(cur)
        cur = nxt


class _OpenSegment:
    """A segment this writer appends to. Only the committer thread touches it."""

    __slots__ = ("partition", "name", "path", "fd", "size", "created")

    def __init__(self, partition: Partition, name: str, path: Path, fd: int):
        self.partition = partition
        self.name = name
        self.path = path
        self.fd = fd
        self.size = 0
        self.created = time.monotonic()


class _Entry:
    """One append waiting for the next commit."""

    __slots__ = ("partition", "rows", "lines", "payload", "loop", "future", "event", "accepted", "duplicates",
                 "result", "error")

    def __init__(
        self,
        partition: Partition,
        rows: Sequence[Row],
        encoded: tuple[list[str], bytes],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[AppendResult] | None,
    ):
        self.partition = partition
        self.rows = rows
        self.lines, self.payload = encoded
        self.loop = loop
        self.future = future
        self.event = threading.Event() if loop is None else None
        self.accepted = self.duplicates = 0  # set by _dedup
        self.result: AppendResult | None = None
        self.error: BaseException | None = None


def _resolve_async(entries: list[_Entry]) -> None:
    for e in entries:
        fut = e.future
        if fut is None or fut.done():  # the caller went away (cancelled); its rows are durable anyway
            continue
        if e.error is not None:
            fut.set_exception(e.error)
        else:
            fut.set_result(e.result)  # type: ignore[arg-type]


class Staging:
    """The staging buffer of one process: group-committed appends, sealing, recovery, listing and reading.

    Args:
        root: staging root (FILEFEED_STAGING_DIR), shared by every worker process.
        writer_id: unique per process start; default `w<pid>-<6 hex>`.
        seal_after_seconds: an open segment is sealed this long after its first write.
        max_segment_bytes: an open segment is sealed once it reaches this size.
        dedup_window: how many recent row keys this writer remembers to drop retried rows (0 = off).
        min_free_bytes: refuse appends (StagingFull) when the volume has less free space.
        max_staged_bytes: refuse appends when open + sealed segments of all writers hold more.
        inline_commit: async appends are committed on the event loop itself: all appends of one loop iteration
            share one write + fsync run from a `call_soon` callback. On a disk whose fsync takes ~0.1 ms this beats
            handing every commit to the committer thread, whose GIL hand-offs cost more than the fsync. Sync
            appends, sealing and requests still run in the committer thread; `_io_lock` keeps the two apart.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        writer_id: str | None = None,
        seal_after_seconds: float = 1.0,
        max_segment_bytes: int = 64 * MiB,
        dedup_window: int = 200_000,
        min_free_bytes: int = 256 * MiB,
        max_staged_bytes: int | None = None,
        inline_commit: bool = False,
    ):
        self.root = Path(root)
        self.writer_id = writer_id or f"w{os.getpid()}-{secrets.token_hex(3)}"
        if not _WRITER_ID_RE.fullmatch(self.writer_id):
            raise ValueError("writer_id must be 1-48 characters of letters, digits, '_' or '-'")
        self.seal_after_seconds = seal_after_seconds
        self.max_segment_bytes = max_segment_bytes
        self.dedup_window = dedup_window
        self.min_free_bytes = min_free_bytes
        self.max_staged_bytes = max_staged_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._generation = _fork_generation

        # Shared between callers and the committer thread, under _cond.
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Entry] = []
        self._requests: list[tuple[Callable[[], object], concurrent.futures.Future[object]]] = []
        self._stopping = False
        self._closed = False
        self.inline_commit = inline_commit
        self._io_lock = threading.Lock()  # segment files and _open: the committer thread and inline commits
        self._inline_pending: list[_Entry] = []
        self._segments_created = 0  # by the current inline commit (under _io_lock)

        # Committer-thread state.
        self._open: dict[Partition, _OpenSegment] = {}
        self._latest: dict[Partition, str] = {}
        self._ready_dirs: set[Partition] = set()
        self._seq = 0
        self._dedup_keys: set[int] = set()
        self._dedup_fifo: deque[int] = deque()

        # Counters, read by tests, bench and metrics. Written by the committer only.
        self.commits = 0
        self.syncs = 0
        self.frames = 0
        self.rows_written = 0

        # Backpressure figures: free space from statvfs (cached), staged bytes from a periodic scan plus our appends.
        self._disk_free = 0
        self._disk_checked = -1e9
        self._staged_scanned = 0
        # Two counters, each written by one thread only (committer / housekeeping): no lock, no lost update.
        self._appended_total = 0
        self._appended_at_scan = 0
        self._stop_housekeeping = threading.Event()

        self._committer = threading.Thread(
            target=self._run_committer, name=f"staging-committer-{self.writer_id}", daemon=True
        )
        self._committer.start()
        self._housekeeper: threading.Thread | None = None
        if max_staged_bytes is not None:
            self._scan_staged_bytes()
            self._housekeeper = threading.Thread(
                target=self._run_housekeeping, name="staging-housekeeping", daemon=True
            )
            self._housekeeper.start()

    # ------------------------------------------------------------------ paths

    def partition_dir(self, partition: Partition) -> Path:
        return self.root / partition.relpath

    def segment_path(self, partition: Partition, name: str, state: str) -> Path:
        return self.root / partition.relpath / state / (name + SUFFIX)

    def quarantine_dir(self, partition: Partition) -> Path:
        return self.root / "quarantine" / partition.feed_id / partition.segment_id / partition.operation

    # ------------------------------------------------------------------ append

    async def append(self, partition: Partition, rows: Sequence[Row]) -> AppendResult:
        """Stage `rows` durably; return once they are fsynced (group commit with concurrent callers).

        Raises:
            StagingFull: disk or staged-bytes limit reached, nothing written; retry after `retry_after_ms`.
            ValueError: a row is malformed or holds a tab, newline, carriage return or NUL.
        """
        return await self.submit(partition, rows)

    def submit(self, partition: Partition, rows: Sequence[Row]) -> asyncio.Future[AppendResult]:
        """`append` without the coroutine: queue `rows` now, on the running loop, and return the future of their commit.

        The hot route awaits this future itself, one coroutine frame less to resume per request. Raises as `append`
        does, before anything is queued.
        """
        loop = asyncio.get_running_loop()
        if not self.inline_commit:
            return self._entry(partition, rows, loop).future  # type: ignore[return-value]
        self._check_usable()
        full = self._pressure()
        if full is not None:
            raise StagingFull(*full)
        entry = _Entry(partition, rows, encode_lines(rows), loop, loop.create_future())
        pending = self._inline_pending
        pending.append(entry)
        if len(pending) == 1:  # the first append of this loop iteration schedules the commit
            loop.call_soon(self._commit_inline)
        return entry.future  # type: ignore[return-value]

    def _commit_inline(self, seen: int = 0, hops: int = 0) -> None:
        # Wait loop iterations while appends keep arriving (a few at most): under load the requests read in the
        # same poll reach staging one iteration apart, and one fsync for all of them is the point.
        n = len(self._inline_pending)
        if n > seen and hops < INLINE_MAX_HOPS:
            asyncio.get_running_loop().call_soon(self._commit_inline, n, hops + 1)
            return
        entries, self._inline_pending = self._inline_pending, []
        with self._io_lock:
            self._segments_created = 0
            self._commit_guarded(entries)
            created = self._segments_created
        _resolve_async(entries)
        if created:  # a new open segment: the committer thread must time its seal (it may be waiting with no timeout)
            with self._cond:
                self._cond.notify()

    def append_sync(self, partition: Partition, rows: Sequence[Row]) -> AppendResult:
        """`append` for threads and scripts; shares the committer (and its group commits) with async callers."""
        entry = self._entry(partition, rows, None)
        entry.event.wait()  # type: ignore[union-attr]
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _entry(self, partition: Partition, rows: Sequence[Row], loop: asyncio.AbstractEventLoop | None) -> _Entry:
        self._check_usable()
        full = self._pressure()
        if full is not None:
            raise StagingFull(*full)
        encoded = encode_lines(rows)  # bad rows fail here, in the caller, never inside a shared commit
        entry = _Entry(partition, rows, encoded, loop, loop.create_future() if loop is not None else None)
        with self._cond:
            if self._stopping:
                raise StagingClosed("staging is closed")
            self._pending.append(entry)
            if len(self._pending) == 1:  # the committer only sleeps when nothing is pending
                self._cond.notify()
        return entry

    def _check_usable(self) -> None:
        if self._closed or self._stopping:
            raise StagingClosed("staging is closed")
        if _fork_generation != self._generation:
            raise StagingClosed("a Staging cannot cross a fork: create one in each worker process")

    # ------------------------------------------------------------------ backpressure

    def pressure(self) -> str | None:
        """Why appends are refused right now, or None. Cheap: statvfs at most once a second, no directory scan."""
        full = self._pressure()
        return full[0] if full is not None else None

    def _pressure(self) -> tuple[str, int] | None:
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_SECONDS:
            self._disk_checked = now
            try:
                st = os.statvfs(self.root)
                self._disk_free = st.f_bavail * st.f_frsize
            except OSError:
                self._disk_free = 0
        if self._disk_free < self.min_free_bytes:
            return (
                f"free disk space {self._disk_free} bytes is under the {self.min_free_bytes} bytes minimum",
                DISK_FULL_RETRY_MS,
            )
        if self.max_staged_bytes is not None:
            staged = self.staged_bytes()
            if staged > self.max_staged_bytes:
                return f"{staged} bytes staged, over the {self.max_staged_bytes} bytes limit", STAGED_FULL_RETRY_MS
        return None

    def staged_bytes(self) -> int:
        """Open + sealed bytes of every writer: last scan plus what this writer appended since."""
        return self._staged_scanned + self._appended_total - self._appended_at_scan

    def _scan_staged_bytes(self) -> None:
        appended_before = self._appended_total
        total = 0
        for pdir in self._partition_dirs():
            for state in (OPEN, SEALED):
                try:
                    with os.scandir(pdir / state) as it:
                        for e in it:
                            if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                                try:
                                    total += e.stat().st_size
                                except FileNotFoundError:
                                    pass
                except FileNotFoundError:
                    continue
        # Appends made during the scan may be counted twice: erring high only refuses a little early.
        self._staged_scanned = total
        self._appended_at_scan = appended_before

    def _run_housekeeping(self) -> None:
        while not self._stop_housekeeping.wait(STAGED_SCAN_SECONDS):
            try:
                self._scan_staged_bytes()
            except Exception:  # a scan racing with renames must never stop the refresh
                log.exception("staged bytes scan failed")

    # ------------------------------------------------------------------ committer

    def _run_committer(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._requests and not self._stopping:
                    wait = self._seconds_to_next_seal()
                    if wait is None:
                        self._cond.wait()  # nothing open: a new segment or an append notifies
                    elif wait > 0:  # while segments are open, wake often enough to serve seal requests
                        self._cond.wait(min(wait, SEAL_REQUEST_POLL_SECONDS))
                entries, self._pending = self._pending, []
                requests, self._requests = self._requests, []
                stopping = self._stopping
            with self._io_lock:
                if entries:
                    self._commit_guarded(entries)
                try:
                    self._seal_due()
                    self._seal_requested()
                except Exception:
                    log.exception("sealing failed")
                for fn, fut in requests:
                    try:
                        fut.set_result(fn())
                    except BaseException as e:
                        fut.set_exception(e)
            if entries:
                self._resolve(entries)
            if stopping:
                with self._cond:
                    if self._pending or self._requests:
                        continue
                try:
                    with self._io_lock:
                        self._seal(list(self._open.values()))
                except Exception:
                    log.exception("sealing at close failed")
                return

    def _seconds_to_next_seal(self) -> float | None:
        opened = list(self._open.values())  # inline commits may add one concurrently
        if not opened:
            return None
        oldest = min(s.created for s in opened)
        return oldest + self.seal_after_seconds - time.monotonic()

    def _resolve(self, entries: list[_Entry]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Entry]] = {}
        for e in entries:
            if e.loop is None:
                e.event.set()  # type: ignore[union-attr]
            else:
                by_loop.setdefault(e.loop, []).append(e)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_async, group)  # one wake-up per loop per commit
            except RuntimeError:
                pass  # loop closed: nobody is waiting any more

    def _commit_guarded(self, entries: list[_Entry]) -> None:
        """_commit, and on any failure every entry not yet answered gets the error: never a caller waiting forever."""
        try:
            self._commit(entries)
        except BaseException as e:
            log.exception("staging commit failed")
            for en in entries:
                if en.result is None and en.error is None:
                    en.error = e

    def _commit(self, entries: list[_Entry]) -> None:
        by_part: dict[Partition, list[_Entry]] = {}
        for e in entries:
            by_part.setdefault(e.partition, []).append(e)
        ts_ms = time.time_ns() // 1_000_000
        written: list[tuple[list[_Entry], _OpenSegment, int, int, list[int]]] = []
        for partition, group in by_part.items():
            try:
                keys, payloads = self._dedup(partition, group)
                data = self._frames(payloads, ts_ms)
            except Exception as err:  # one partition's trouble must not fail the others' requests
                self._fail(group, err)
                continue
            if not data:
                seg = self._open.get(partition)
                name = seg.name if seg is not None else self._latest.get(partition, "")
                for e in group:
                    e.result = AppendResult(name, 0, e.duplicates)
                continue
            try:
                seg = self._segment_for(partition)
            except OSError as err:
                self._fail(group, err)
                continue
            before = seg.size
            try:
                write_all(seg.fd, data)
            except OSError as err:
                self._undo(seg, before)
                self._fail(group, err)
                continue
            seg.size = before + len(data)
            written.append((group, seg, before, len(data), keys))
        # All writes first, then the fsyncs: the file system can overlap the flushes of different files.
        for group, seg, before, nbytes, keys in written:
            try:
                os.fsync(seg.fd)
            except OSError as err:
                self._undo(seg, before)
                self._fail(group, err)
                continue
            self.syncs += 1
            self._appended_total += nbytes
            self._remember(keys)
            name = seg.name
            for e in group:
                e.result = AppendResult(name, e.accepted, e.duplicates)
            if seg.size >= self.max_segment_bytes:
                self._seal([seg])
        self.commits += 1

    def _dedup(self, partition: Partition, group: list[_Entry]) -> tuple[list[int], list[tuple[bytes, int]]]:
        """Drop rows already committed (or repeated in this commit); return new keys and (payload, rows) per entry.

        Keys only join the window after their fsync: a failed commit must not make its retry look like a duplicate.
        The key hashes (partition, session_id, identifier_type, identifier, ts): a retried request repeats all of
        them, while a user re-added later in the same session has a new ts and must not be dropped.
        """
        keys: list[int] = []
        payloads: list[tuple[bytes, int]] = []
        window = self._dedup_keys
        prefix = partition.relpath
        seen: set[int] = set()
        for e in group:
            if not self.dedup_window:
                payloads.append((e.payload, len(e.lines)))
                e.accepted = len(e.lines)
                continue
            kept: list[str] | None = None
            dups = 0
            for i, r in enumerate(e.rows):
                k = hash((prefix, r[3], r[0], r[1], r[2]))
                if k in window or k in seen:
                    if kept is None:
                        kept = e.lines[:i]
                    dups += 1
                    continue
                seen.add(k)
                keys.append(k)
                if kept is not None:
                    kept.append(e.lines[i])
            if kept is None:
                payloads.append((e.payload, len(e.lines)))
            else:
                payloads.append((encode_payload(kept), len(kept)))
            e.accepted = len(e.lines) - dups
            e.duplicates = dups
        return keys, payloads

    def _remember(self, keys: list[int]) -> None:
        if not keys:
            return
        self._dedup_keys.update(keys)
        self._dedup_fifo.extend(keys)
        fifo, window = self._dedup_fifo, self._dedup_keys
        for _ in range(len(fifo) - self.dedup_window):
            window.discard(fifo.popleft())

    @staticmethod
    def _frames(payloads: list[tuple[bytes, int]], ts_ms: int) -> bytes:
        """One frame for all the entries' rows, split only past MAX_FRAME_PAYLOAD."""
        frames: list[bytes] = []
        parts: list[bytes] = []
        size = rows = 0
        for data, n in payloads:
            if not n:
                continue
            if len(data) > MAX_FRAME_PAYLOAD:
                # a huge single append (a batch of many rows): cut it on row boundaries
                frames.extend(_split_frames(data, ts_ms))
                continue
            if size + len(data) > MAX_FRAME_PAYLOAD and parts:
                frames.append(encode_frame(b"".join(parts), rows, ts_ms))
                parts, size, rows = [], 0, 0
            parts.append(data)
            size += len(data)
            rows += n
        if parts:
            frames.append(encode_frame(b"".join(parts), rows, ts_ms))
        return b"".join(frames)

    def _fail(self, group: list[_Entry], err: Exception) -> None:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            self._disk_checked = -1e9  # re-read free space on the next request instead of trusting the cache
            exc: BaseException = StagingFull(
                f"no space left on the staging volume ({err.strerror})", DISK_FULL_RETRY_MS
            )
        else:
            exc = err
        for e in group:
            e.result = None
            e.error = exc

    def _undo(self, seg: _OpenSegment, size: int) -> None:
        """Cut a failed write back to the last acknowledged byte; drop the segment if even that fails."""
        try:
            os.ftruncate(seg.fd, size)
            os.fsync(seg.fd)
            seg.size = size
        except OSError:
            log.exception("could not cut %s back to %d bytes; leaving it to recovery", seg.path, size)
            self._open.pop(seg.partition, None)
            os.close(seg.fd)  # releases the flock: recover() cuts the torn tail and seals it

    def _segment_for(self, partition: Partition) -> _OpenSegment:
        seg = self._open.get(partition)
        if seg is not None:
            return seg
        if partition not in self._ready_dirs or not (self.root / partition.relpath / OPEN).is_dir():
            for state in (OPEN, SEALED):
                _make_dirs(self.root, Path(partition.relpath) / state)
            self._ready_dirs.add(partition)
        self._seq += 1
        name = segment_name(self.writer_id, self._seq)
        open_dir = self.root / partition.relpath / OPEN
        path = open_dir / (name + SUFFIX)
        # Created under a dot name and renamed once locked: recovery in another process only looks at *.jnl,
        # so it can never take an unlocked new segment for an orphan.
        tmp = open_dir / f".{name}{SUFFIX}.new"
        # O_APPEND: after a failed write is cut back with ftruncate, the next write lands at the new end, not in a hole.
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, path)
            fsync_dir(open_dir)
        except BaseException:
            os.close(fd)
            raise
        seg = _OpenSegment(partition, name, path, fd)
        self._segments_created += 1
        self._open[partition] = seg
        self._latest[partition] = name
        return seg

    # ------------------------------------------------------------------ sealing

    # Seal requests: a batch_update waiting for a segment another live worker still has open asks that worker to seal
    # it now (an empty file in run/seal-requests/<writer>/) instead of waiting for its age. The owner's committer
    # looks every SEAL_REQUEST_POLL_SECONDS while it has open segments; the asker removes its file when done.
    def _seal_request_dir(self, writer_id: str) -> Path:
        return self.root / "run" / "seal-requests" / writer_id

    def _seal_requested(self) -> None:
        folder = self._seal_request_dir(self.writer_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        wanted = {name.rpartition("~")[0] for name in names}  # without the asker's suffix
        due = [seg for seg in self._open.values() if _seal_request_name(seg.partition, seg.name) in wanted]
        if due:
            self._seal(due)
        for name in names:
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass

    def _remove_empty_seal_request_dirs(self) -> None:
        """Writers come and go with their processes; their request folders, once empty, can go too."""
        base = self.root / "run" / "seal-requests"
        try:
            writers = os.listdir(base)
        except FileNotFoundError:
            return
        for writer in writers:
            try:
                os.rmdir(base / writer)
            except OSError:
                pass  # not empty (a request being served) or already gone

    def _ask_seals(self, partition: Partition, names: list[str]) -> list[Path]:
        """Ask the live writers of other processes to seal `names` now; returns the request files to remove."""
        asked: list[Path] = []
        for name in names:
            writer = name.rpartition("-")[0]
            if writer == self.writer_id:
                continue
            folder = self._seal_request_dir(writer)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # one file per asker, so one asker's clean-up never withdraws another's request
                path = folder / f"{_seal_request_name(partition, name)}~{os.getpid()}-{threading.get_ident()}"
                path.touch()  # a hint, not state: no fsync (a lost request only means waiting for the age seal)
            except OSError:
                continue  # e.g. a full volume: the segment is still sealed by age
            asked.append(path)
        return asked

    def _seal_due(self) -> None:
        now = time.monotonic()
        due = [s for s in self._open.values() if now - s.created >= self.seal_after_seconds]
        if due:
            self._seal(due)

    def _seal(self, segs: list[_OpenSegment]) -> None:
        """open/ -> sealed/ for each segment; every rename first, then one fsync per touched folder."""
        dirs: set[Path] = set()
        moved: list[int] = []
        for seg in segs:
            self._open.pop(seg.partition, None)
            open_dir = seg.path.parent
            try:
                if seg.size == 0:
                    os.unlink(seg.path)  # every write to it failed and was cut back
                else:
                    sealed = open_dir.parent / SEALED / seg.path.name
                    try:
                        os.rename(seg.path, sealed)  # data already fsynced by its commit
                    except FileNotFoundError:  # sealed/ removed by hand: make it again
                        _make_dirs(self.root, Path(seg.partition.relpath) / SEALED)
                        os.rename(seg.path, sealed)
                    dirs.add(sealed.parent)
                dirs.add(open_dir)
            except OSError:
                log.exception("could not seal %s; leaving it to recovery", seg.path)
                os.close(seg.fd)
                continue
            moved.append(seg.fd)
        try:
            for d in dirs:
                fsync_dir(d)
        finally:
            for fd in moved:  # closed only now, so the flock covers the whole move
                os.close(fd)

    def seal_all(self) -> None:
        """Seal every open segment of this writer now (blocks until done)."""
        self._call(lambda: self._seal(list(self._open.values()))).result()

    async def seal_all_async(self) -> None:
        await asyncio.wrap_future(self._call(lambda: self._seal(list(self._open.values()))))

    def _seal_named(self, partition: Partition, names: Iterable[str]) -> None:
        seg = self._open.get(partition)
        if seg is not None and seg.name in set(names):
            self._seal([seg])

    def _call(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or not self._committer.is_alive():
                raise StagingClosed("staging is closed")
            self._requests.append((fn, fut))
            self._cond.notify()
        return fut

    def segment_state(self, partition: Partition, name: str) -> str | None:
        """'open', 'sealed' or None (rolled, quarantined, unknown or not a segment name) for a segment ref."""
        name = name.removesuffix(SUFFIX)
        if not _SEGMENT_NAME_RE.fullmatch(name):
            return None
        # Look in the order a segment moves (open -> sealed -> a roll's folder -> the ledger), so a segment that
        # moves while we look is always found further on: checking sealed first could miss one being sealed now.
        was_open = self.segment_path(partition, name, OPEN).exists()
        if self.segment_path(partition, name, SEALED).exists():  # sealed wins: a repair leaves both for a moment
            return SEALED
        return OPEN if was_open else None

    def wait_sealed(self, partition: Partition, names: Iterable[str], timeout: float) -> dict[str, str | None]:
        """Wait (bounded by `timeout`) until none of `names` is open; return each one's final state.

        Own segments are sealed at once; a dead writer's segments are recovered; a live writer is asked to seal its
        segments now (it looks every SEAL_REQUEST_POLL_SECONDS) and otherwise seals them by age.
        """
        wanted = sorted({n.removesuffix(SUFFIX) for n in names})
        deadline = time.monotonic() + timeout
        self._request_own_seals(partition, wanted)
        asked = self._ask_seals(partition, [n for n, st in self._states(partition, wanted).items() if st == OPEN])
        delay = 0.005
        try:
            while True:
                states = self._states_after_recovery(partition, wanted)
                if OPEN not in states.values() or time.monotonic() >= deadline:
                    return states
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
        finally:
            _remove_all(asked)

    async def wait_sealed_async(
        self, partition: Partition, names: Iterable[str], timeout: float
    ) -> dict[str, str | None]:
        wanted = sorted({n.removesuffix(SUFFIX) for n in names})
        deadline = time.monotonic() + timeout
        fut = self._request_own_seals(partition, wanted)
        asked = self._ask_seals(partition, [n for n, st in self._states(partition, wanted).items() if st == OPEN])
        if fut is not None:
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=timeout)
        delay = 0.005
        try:
            while True:
                states = self._states_after_recovery(partition, wanted)
                if OPEN not in states.values() or time.monotonic() >= deadline:
                    return states
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
        finally:
            _remove_all(asked)

    def _request_own_seals(self, partition: Partition, names: list[str]) -> concurrent.futures.Future[object] | None:
        own = [n for n in names if n.rpartition("-")[0] == self.writer_id]
        if not own or self._stopping:
            return None
        return self._call(lambda: self._seal_named(partition, own))

    def _states(self, partition: Partition, names: list[str]) -> dict[str, str | None]:
        return {n: self.segment_state(partition, n) for n in names}

    def _states_after_recovery(self, partition: Partition, names: list[str]) -> dict[str, str | None]:
        states = self._states(partition, names)
        for n, st in states.items():
            if st == OPEN and n.rpartition("-")[0] != self.writer_id:  # OPEN implies a checked name
                # its writer may be dead: an unlocked open segment is recovered (sealed) right here
                self._recover_segment(partition, self.segment_path(partition, n, OPEN), RecoveryReport())
                states[n] = self.segment_state(partition, n)
        return states

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Commit what is pending, seal every open segment, stop the threads. Idempotent."""
        if self._closed:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._generation == _fork_generation:  # a forked child has no threads to join
            self._committer.join()
        self._stop_housekeeping.set()
        if self._housekeeper is not None and self._generation == _fork_generation:
            self._housekeeper.join()
        self._closed = True

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def run_sealer(self) -> None:
        """Background task for a server: seals by age run in the committer; this recovers dead writers' segments.

        A worker that crashed leaves open segments nobody seals; any live process picks them up here.
        """
        while True:
            await asyncio.sleep(ORPHAN_CHECK_SECONDS)
            try:
                await asyncio.to_thread(self.recover)
            except Exception:
                log.exception("periodic recovery failed")

    # ------------------------------------------------------------------ recovery

    def recover(self) -> RecoveryReport:
        """Seal every open segment whose writer is gone, cutting torn tails and quarantining damaged ones.

        Safe to run from several processes at once: a segment is only touched under its flock, and only if it is
        still the file at that path once locked.
        """
        report = RecoveryReport()
        self._remove_empty_seal_request_dirs()
        for partition, pdir in self._partitions_with_dirs():
            odir = pdir / OPEN
            try:
                names = sorted(os.listdir(odir))
            except FileNotFoundError:
                continue
            for n in names:
                if n.endswith(SUFFIX) and not n.startswith("."):
                    self._recover_segment(partition, odir / n, report)
                elif n.startswith(".") and n.endswith(".new"):
                    self._remove_if_stale(odir / n)
            sdir = pdir / SEALED
            try:
                stale = [n for n in os.listdir(sdir) if n.startswith(".") and n.endswith(".repair")]
            except FileNotFoundError:
                stale = []
            for n in stale:
                self._remove_if_stale(sdir / n)
        return report

    @staticmethod
    def _remove_if_stale(path: Path) -> None:
        """Temp files of a crashed writer or repair: removed only when old and unlocked.

        The age test covers the instant between a writer creating its temp file and locking it.
        """
        try:
            if time.time() - path.stat().st_mtime < STALE_TEMP_SECONDS:
                return
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
                fsync_dir(path.parent)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)

    def _recover_segment(self, partition: Partition, path: Path, report: RecoveryReport) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # sealed or recovered by someone else meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                report.busy += 1
                return
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return
            except FileNotFoundError:
                return
            name = path.stem
            sealed = path.parent.parent / SEALED / path.name
            if sealed.exists():
                # A repair that crashed after publishing the good frames: the quarantine copy was made before.
                os.unlink(path)
                fsync_dir(path.parent)
                report.quarantined.append(name)
                return
            size = os.fstat(fd).st_size
            if size == 0:
                os.unlink(path)
                fsync_dir(path.parent)
                report.removed_empty.append(name)
                return
            buf = _read_fd(fd, size)
            scan = scan_buffer(buf)
            if scan.valid:
                pass
            elif scan.torn_tail_only:
                cut = size - scan.good_end
                log.warning("recovery: cutting a torn tail of %d bytes from %s (%s)", cut, path, scan.bad[0][2])
                os.ftruncate(fd, scan.good_end)
                os.fsync(fd)
                report.truncated.append((name, cut))
                if scan.good_end == 0:
                    os.unlink(path)
                    fsync_dir(path.parent)
                    report.removed_empty.append(name)
                    return
            else:
                self._quarantine(partition, path, buf, scan, sealed.parent)
                report.quarantined.append(name)
                return
            _make_dirs(self.root, Path(partition.relpath) / SEALED)
            os.rename(path, sealed)
            fsync_dir(sealed.parent)
            fsync_dir(path.parent)
            report.sealed.append(name)
            log.info("recovery: sealed orphaned segment %s (%d frames, %d rows)", path, len(scan.frames), scan.rows)
        finally:
            os.close(fd)

    def repair_segment(self, partition: Partition, path: Path) -> SegmentScan:
        """Quarantine a damaged sealed segment and keep its good frames in place, under the same name.

        Works wherever the segment lies (sealed/, or a roll's folder). The caller must own the partition (the roll
        lease): sealed segments carry no lock of their own.
        """
        path = Path(path)
        with open(path, "rb") as f:
            buf = f.read()
        scan = scan_buffer(buf)
        if not scan.valid:
            self._quarantine(partition, path, buf, scan, path.parent)
        return scan

    def scan_sealed(self, partition: Partition, *, repair: bool = False) -> list[tuple[Path, SegmentScan]]:
        """Check every sealed segment of `partition`; return the damaged ones (repaired when asked)."""
        bad = []
        for path in self.sealed_segments(partition):
            try:
                scan = verify_segment(path)
            except FileNotFoundError:
                continue
            if not scan.valid:
                if repair:
                    self.repair_segment(partition, path)
                bad.append((path, scan))
        return bad

    def _quarantine(self, partition: Partition, path: Path, buf: bytes, scan: SegmentScan, target_dir: Path) -> None:
        """Copy the original to quarantine/ with a report, then publish its good frames as target_dir/<same name>.

        Order matters for crashes: the quarantine copy exists before the original goes away, and the good frames
        replace the original in one rename. Keeping the name keeps every ref to this segment valid.
        """
        qdir = self.quarantine_dir(partition)
        _make_dirs(self.root, qdir.relative_to(self.root))
        qpath = qdir / path.name
        n = 0
        while qpath.exists() and qpath.stat().st_size != len(buf):
            n += 1
            qpath = qdir / f"{path.name}.{n}"
        atomic_write_bytes(qpath, buf)
        report = {
            "segment": path.name,
            "partition": str(partition),
            "from": path.parent.name,
            "size": scan.size,
            "frames_good": len(scan.frames),
            "frames_bad": len(scan.bad),
            "rows_good": scan.rows,
            "rows_lost_estimate": scan.rows_lost_estimate(),
            "bad_ranges": [{"start": s, "end": e, "reason": r} for s, e, r in scan.bad],
            "quarantined_at_ms": time.time_ns() // 1_000_000,
            "by_writer": self.writer_id,
        }
        atomic_write_bytes(qpath.with_name(qpath.name + ".report.json"), json.dumps(report, indent=2).encode())
        if not target_dir.is_dir():
            _make_dirs(self.root, target_dir.relative_to(self.root))
        target = target_dir / path.name
        good = b"".join(memoryview(buf)[f.offset : f.end] for f in scan.frames)
        if good:
            tmp = target_dir / f".{path.name}.repair"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # so a concurrent recover() does not take it for a stale temp
                write_all(fd, good)
                os.fsync(fd)
                os.replace(tmp, target)
            finally:
                os.close(fd)
            fsync_dir(target_dir)
        if path != target or not good:
            os.unlink(path)
            fsync_dir(path.parent)
        log.error(
            "quarantined %s: %d good frames kept, %d damaged ranges, about %d rows lost; see %s",
            path,
            len(scan.frames),
            len(scan.bad),
            report["rows_lost_estimate"],
            qpath,
        )

    # ------------------------------------------------------------------ listing

    def _partition_dirs(self) -> Iterator[Path]:
        feeds = self.root / "feeds"
        for level1 in _subdirs(feeds):
            for level2 in _subdirs(level1):
                yield from _subdirs(level2)

    def _partitions_with_dirs(self) -> Iterator[tuple[Partition, Path]]:
        for pdir in self._partition_dirs():
            try:
                p = Partition(pdir.parent.parent.name, pdir.parent.name, pdir.name)
            except ValueError:
                continue  # not ours: ignore rather than fail a listing
            yield p, pdir

    def partitions(self) -> list[Partition]:
        """Partitions holding open or sealed segments."""
        out = []
        for p, pdir in self._partitions_with_dirs():
            if any(_segment_files(pdir / OPEN)) or any(_segment_files(pdir / SEALED)):
                out.append(p)
        return sorted(out)

    def sealed_segments(self, partition: Partition) -> list[Path]:
        """Sealed segment files of every writer, ordered by (writer, seq)."""
        return sorted(_segment_files(self.partition_dir(partition) / SEALED), key=_sort_key)

    def open_segments(self, partition: Partition) -> list[Path]:
        return sorted(_segment_files(self.partition_dir(partition) / OPEN), key=_sort_key)

    def stats(self, partition: Partition) -> PartitionStats:
        """Rows, bytes and oldest frame time of open + sealed segments, from frame headers (no checksums)."""
        rows = size = 0
        oldest: int | None = None
        counts = {}
        for state in (OPEN, SEALED):
            paths = _segment_files(self.partition_dir(partition) / state)
            counts[state] = len(paths)
            for path in paths:
                try:
                    r, b, first = _header_totals(path)
                except FileNotFoundError:
                    continue
                rows += r
                size += b
                if first is not None and (oldest is None or first < oldest):
                    oldest = first
        return PartitionStats(rows, size, oldest, counts[OPEN], counts[SEALED])

    # Readers, also reachable from a Staging for callers that only hold one.
    @staticmethod
    def iter_batches(
        paths: Iterable[Path], *, chunk_bytes: int = 8 * MiB, schema: pa.Schema | None = None
    ) -> Iterator[pa.RecordBatch]:
        return iter_batches(paths, chunk_bytes=chunk_bytes, schema=schema)

    @staticmethod
    def count_rows(path: Path) -> int:
        return count_rows(path)

    @staticmethod
    def iter_rows(path: Path) -> Iterator[Row]:
        return iter_rows(path)


def _seal_request_name(partition: Partition, name: str) -> str:
    # ids and segment names hold only [A-Za-z0-9_-]: '~' cannot occur in them
    return f"{partition.feed_id}~{partition.segment_id}~{partition.operation}~{name}"


def _remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _split_frames(payload: bytes, ts_ms: int) -> Iterator[bytes]:
    """Frames of at most about MAX_FRAME_PAYLOAD bytes, cut on row boundaries (a single longer row stays whole)."""
    start = 0
    size = len(payload)
    while start < size:
        stop = payload.rfind(b"\n", start, start + MAX_FRAME_PAYLOAD) + 1
        if stop <= start:
            stop = payload.index(b"\n", start) + 1
        chunk = payload[start:stop]
        yield encode_frame(chunk, chunk.count(b"\n"), ts_ms)
        start = stop


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _segment_files(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _read_fd(fd: int, size: int) -> bytes:
    parts = []
    off = 0
    while off < size:
        chunk = os.pread(fd, size - off, off)
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


def _header_totals(path: Path) -> tuple[int, int, int | None]:
    """(rows, bytes of complete frames, ts of the first frame), hopping from header to header.

    An open segment may end in a frame being written: stop at the first incomplete or unreadable header.
    """
    rows = 0
    first: int | None = None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        whole = f.read() if size <= 4 * MiB else None
        off = 0
        while off < size:
            hdr = (
                whole[off : off + MAX_HEADER_BYTES]
                if whole is not None
                else os.pread(f.fileno(), MAX_HEADER_BYTES, off)
            )
            h = parse_header(hdr, 0, len(hdr))
            if h is None:
                break
            _, plen, n, ts, hlen = h
            if off + hlen + plen > size:
                break
            rows += n
            if first is None:
                first = ts
            off += hlen + plen
    return rows, off, first


# ---------------------------------------------------------------------- reading


def verify_segment(path: Path) -> SegmentScan:
    """Full check of one segment (every checksum and row count)."""
    with open(path, "rb") as f:
        return scan_buffer(f.read())


def _scan_frames(path: Path, read_size: int, *, count_rows: bool = True) -> Iterator[tuple[bytearray, Frame]]:
    """Valid frames of a segment with the buffer holding them, streaming; raise CorruptSegment at the first bad one.

    Each read goes into a fresh buffer: views into an earlier buffer stay valid while the caller batches them.
    """
    with open(path, "rb", buffering=0) as f:
        buf = bytearray()
        end = pos = 0
        base = 0  # file offset of buf[0]
        while True:
            while pos < end:
                res = check_frame(buf, pos, end, count_rows=count_rows)
                if isinstance(res, FrameError):
                    if res.incomplete and not _frame_too_big(buf, pos, end):
                        break  # read more
                    raise CorruptSegment(path, base + pos, res.reason)
                yield buf, res
                pos = res.end
            carry = end - pos
            want = max(read_size, carry + MAX_HEADER_BYTES)
            h = parse_header(buf, pos, end) if carry else None
            if h is not None:
                want = max(want, h[1] + h[4])
            nbuf = bytearray(want)
            nbuf[:carry] = buf[pos:end]
            n = f.readinto(memoryview(nbuf)[carry:])
            if not n:
                if carry:
                    reason = check_frame(buf, pos, end).reason  # type: ignore[union-attr]
                    raise CorruptSegment(path, base + pos, reason)
                return
            base += pos
            buf, pos, end = nbuf, 0, carry + n


def _iter_frames(path: Path, read_size: int = 4 * MiB) -> Iterator[tuple[Frame, memoryview]]:
    """Valid frames of a segment with their payloads, streaming; raise CorruptSegment at the first bad frame."""
    for buf, frame in _scan_frames(path, read_size):
        yield frame, memoryview(buf)[frame.payload_offset : frame.end]


def _frame_too_big(buf: bytearray, pos: int, end: int) -> bool:
    h = parse_header(buf, pos, end)
    return h is not None and h[1] > MAX_READ_FRAME


def _iter_regions(path: Path, read_size: int) -> Iterator[tuple[memoryview, int]]:
    """Runs of whole, checksum-valid frames (headers included) as views into each read buffer, with their row count.

    Handing pyarrow these runs as they lie on disk avoids copying every payload out from between the headers;
    the parser skips the header lines itself (see _skip_frame_header).
    """
    current: bytearray | None = None
    start = stop = rows = 0
    for buf, frame in _scan_frames(path, read_size, count_rows=False):
        if buf is not current:
            if current is not None and stop > start:
                yield memoryview(current)[start:stop], rows
            current, start, rows = buf, frame.offset, 0
        stop = frame.end
        rows += frame.rows
    if current is not None and stop > start:
        yield memoryview(current)[start:stop], rows


def _skip_frame_header(row: pacsv.InvalidRow) -> str:
    """Frame headers reach the parser as one-column lines: skip them; anything else malformed is an error."""
    return "skip" if row.text.startswith("#") and "\t" not in row.text else "error"


# Plain TSV: no quoting and no escaping (values never hold a tab, newline, CR or NUL).
_TSV = {"delimiter": "\t", "quote_char": False, "double_quote": False, "escape_char": False,
        "newlines_in_values": False, "ignore_empty_lines": False}
_PARSE_OPTIONS = pacsv.ParseOptions(**_TSV)
_FRAMED_PARSE_OPTIONS = pacsv.ParseOptions(**_TSV, invalid_row_handler=_skip_frame_header)
# Every value is text as staged: no nulls, checked UTF-8.
_CONVERT = {"null_values": [], "strings_can_be_null": False, "quoted_strings_can_be_null": False, "check_utf8": True}
_CONVERT_OPTIONS = pacsv.ConvertOptions(column_types=STAGED_SCHEMA, **_CONVERT)
# Rolls parse the journal on one thread: on 2 cores, Arrow's parse threads only competed with the compressors
# (bench/rollover.py: every case faster single-threaded).
PARSE_THREADS = False
# Small parse blocks keep each thread's work in cache: measured 6.5-7 M rows/s at 512 KiB vs 4.5-5 M at 1-4 MiB.
_BLOCK_BYTES = 512 * 1024


def _convert_options(schema: pa.Schema | None) -> pacsv.ConvertOptions:
    if schema is None:
        return _CONVERT_OPTIONS
    unknown = [name for name in schema.names if name not in STAGED_FIELDS]
    if unknown or not schema.names:
        raise ValueError(f"schema must name staged columns ({', '.join(STAGED_FIELDS)}), got {schema.names}")
    return pacsv.ConvertOptions(column_types=schema, include_columns=schema.names, **_CONVERT)


def _parse_regions(
    regions: list[memoryview], rows: int, paths: list[Path], convert: pacsv.ConvertOptions
) -> Iterator[pa.RecordBatch]:
    # One region (the usual case with big segments) is parsed in place; small ones are joined first. Every region
    # starts with a frame header, so pyarrow never sees a UTF-8 BOM at the start (it would drop it from a value).
    data = regions[0] if len(regions) == 1 else b"".join(regions)
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                use_threads=PARSE_THREADS, block_size=_BLOCK_BYTES, column_names=list(STAGED_FIELDS)
            ),
            parse_options=_FRAMED_PARSE_OPTIONS,
            convert_options=convert,
        )
    except pa.ArrowInvalid as e:
        _raise_corrupt(paths, f"rows the parser refuses: {e}")
    if table.num_rows != rows:
        # Header row counts sit outside the checksum: a mismatch means a damaged header.
        _raise_corrupt(paths, f"frame headers count {rows} rows, the payloads hold {table.num_rows}")
    yield from table.to_batches()


def _raise_corrupt(paths: list[Path], reason: str) -> NoReturn:
    """Name the damaged segment of a chunk (full scan, only on this rare path), or the chunk's last one."""
    for path in paths:
        scan = verify_segment(path)
        if not scan.valid:
            start, _, why = scan.bad[0]
            raise CorruptSegment(path, start, why)
    raise CorruptSegment(paths[-1], -1, reason)


def iter_batches(
    paths: Iterable[Path], *, chunk_bytes: int = 8 * MiB, schema: pa.Schema | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows of `paths` (in order) as record batches; memory bounded by about 2 x `chunk_bytes`.

    `schema` picks staged columns and their types (default: all of STAGED_SCHEMA); columns left out are not
    converted at all. Frames are checked as they stream (checksums per frame, row counts per chunk); damage raises
    CorruptSegment.
    """
    convert = _convert_options(schema)
    regions: list[memoryview] = []
    in_chunk: list[Path] = []
    size = rows = 0
    read_size = min(max(chunk_bytes, 64 * 1024), 8 * MiB)
    for path in paths:
        path = Path(path)
        in_chunk.append(path)
        for region, n in _iter_regions(path, read_size):
            regions.append(region)
            size += len(region)
            rows += n
            if size >= chunk_bytes:
                yield from _parse_regions(regions, rows, in_chunk, convert)
                regions, in_chunk, size, rows = [], [path], 0, 0
    if size:
        yield from _parse_regions(regions, rows, in_chunk, convert)


def count_rows(path: Path) -> int:
    """Rows in one segment, every frame checked."""
    return sum(frame.rows for frame, _ in _iter_frames(Path(path)))


def first_row(paths: Iterable[Path]) -> Row | None:
    """The first staged row of `paths`, reading only its frame; None when they hold no row."""
    for path in paths:
        for buf, frame in _scan_frames(Path(path), 64 * 1024, count_rows=False):
            if frame.rows:
                end = buf.index(b"\n", frame.payload_offset) + 1
                return next(iter_payload_lines(bytes(buf[frame.payload_offset : end])))
    return None


def iter_rows(path: Path) -> Iterator[Row]:
    """Rows of one segment as Python tuples (for inspection tools; rolls use iter_batches)."""
    for _, payload in _iter_frames(Path(path)):
        yield from iter_payload_lines(bytes(payload))
