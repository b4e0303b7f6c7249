"""Splitting a sealed writer journal into the per-partition segments rolls read, off the hot path, crash-safe.

One split, whatever the number of partitions in the journal: write every partition's frames to a temp file
`feeds/<p>/sealed/.<name>.split`, one syncfs(2) of the staging file system, rename them all to `<name>.jnl`, one
more syncfs for the renames, then remove the journal. A crash anywhere leaves the journal in place (its writer's
flock is gone), and recovery splits it again: a partition whose segment is already in sealed/, in a roll's folder
or consumed per the ledger is skipped, so no segment is ever made twice nor lost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from pipeline.durable import fsync_dir, write_all
from pipeline.journal import JournalScan, scan_journal
from pipeline.layout import SEALED, partition_dir, roll_folder_holding
from pipeline.ledger import consumed_segments
from pipeline.model import Partition
from pipeline.staging.commit import prepare_spare
from pipeline.staging.quarantine import keep_aside, make_dirs
from pipeline.staging.reading import read_fd

log = logging.getLogger("filefeed.staging")
SPLIT_RETRY_SECONDS = 1.0
ROOM_MIN_BYTES = 256 * 1024  # a pre-written journal holds at least this much room
# Test hook (as in pipeline/rollover.py): `split_rename:N` (1-based) or `split_done` kills the process there.
_CRASH_AT = os.environ.get("FILEFEED_CRASH_AT", "")


def _crash_point(point: str) -> None:
    if _CRASH_AT == point:
        os._exit(137)


def _load_syncfs():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_SYNCFS = _load_syncfs()


def sync_filesystem(root: Path) -> bool:
    """syncfs(2) of the file system holding `root`: every written byte and rename on it is durable. False when the
    system has no syncfs (the caller then fsyncs each file and folder)."""
    if _SYNCFS is None:
        return False
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(root))
    finally:
        os.close(fd)
    return True


def already_split(root: Path, partition: Partition, name: str) -> bool:
    """The partition's segment `name` exists or existed: in sealed/, in a roll's folder, or consumed per the ledger.

    Looked up in the order a segment moves (sealed -> rolling/failed -> ledger; a roll writes its ledger entry before
    removing its folder), so a segment a roll takes meanwhile is found further on.
    """
    pdir = partition_dir(root, partition)
    if (pdir / SEALED / name).exists() or roll_folder_holding(pdir, name) is not None:
        return True
    return name in consumed_segments(root, partition)


def split_journal(root: Path, path: Path, data: bytes, scan: JournalScan, *, resumed: bool,
                  ready: dict[Partition, str] | None = None) -> int:
    """Publish the frames of each partition of a journal as feeds/<p>/sealed/<journal name>; return how many.

    The caller holds the journal's flock. `resumed`: an earlier split of this journal may have run (a crash, a
    failed attempt), so partitions already split are skipped; a first split by the owner skips the lookups.
    `ready` caches the sealed/ folders known to exist (plain strings: this loop runs once per partition).
    """
    name = path.name
    syncfs = _SYNCFS is not None
    view = memoryview(data)
    ready = {} if ready is None else ready
    moves: list[tuple[str, str]] = []
    for partition, frames in sorted(scan.frames.items()):
        sealed = ready.get(partition)
        if sealed is None:
            folder = partition_dir(root, partition) / SEALED
            make_dirs(root, folder.relative_to(root))
            sealed = ready[partition] = str(folder)
        tmp = f"{sealed}/.{name}.split"
        if resumed:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if already_split(root, partition, name):
                continue
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # sealed/ removed by hand: make it again, and look again next time
            del ready[partition]
            raise
        try:
            write_all(fd, b"".join([view[f.offset : f.end] for f in frames]))
            if not syncfs:
                os.fdatasync(fd)
        except OSError:
            # ENOSPC and the like: give back the space of this split's temp files; the journal stays whole
            for written in [tmp, *(t for t, _ in moves)]:
                with contextlib.suppress(OSError):
                    os.unlink(written)
            raise
        finally:
            os.close(fd)
        moves.append((tmp, f"{sealed}/{name}"))
    if not moves:
        return 0
    sync_filesystem(root)  # the temp files' bytes, before any of them gets its final name
    for i, (tmp, target) in enumerate(moves, 1):
        if _CRASH_AT:
            _crash_point(f"split_rename:{i}")
        os.rename(tmp, target)
    if not sync_filesystem(root):  # the renames
        for folder in {os.path.dirname(target) for _, target in moves}:
            fsync_dir(Path(folder))
    return len(moves)


def settle_journal(root: Path, path: Path, fd: int, size: int, *, resumed: bool, by_writer: str,
                   ready: dict[Partition, str] | None = None) -> JournalScan:
    """Split the locked journal at `path` (its first `size` bytes), then remove it. Damage in the middle is
    quarantined first (the good frames around it are split); a torn tail is left out (never acknowledged)."""
    data = read_fd(fd, size)
    scan = scan_journal(data)
    if scan.bad and not scan.torn_tail_only:
        keep_aside(root, None, path, data, scan, by_writer)
    elif scan.bad:
        log.warning("cutting a torn tail of %d bytes from %s (%s)", size - scan.good_end, path, scan.bad[0][2])
    split_journal(root, path, data, scan, resumed=resumed, ready=ready)
    if _CRASH_AT:
        _crash_point("split_done")
    os.unlink(path)
    fsync_dir(path.parent)
    return scan


class SealedJournal:
    """A journal its writer stopped appending to: its fd (and flock) stay open until its split is done."""

    __slots__ = ("path", "fd", "size", "future", "attempts")

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.attempts = 0


class Splitter:
    """The writer's thread that splits its sealed journals in order. At most `max_pending` wait (each holds a
    descriptor): the writer refuses appends beyond that rather than open more files."""

    def __init__(self, root: Path, writer_id: str, max_pending: int, room_bytes: int = 0):
        self.root = root
        self.writer_id = writer_id
        self.max_pending = max_pending
        self.room_bytes = room_bytes  # the most of the writer's next journal pre-written after a split (0 = none)
        self.splits = 0
        self.split_seconds = 0.0
        self.pending_max = 0  # the largest journal in the queue: the most one split copies at once (under _cond)
        self._queue: deque[SealedJournal] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._ready: dict[Partition, str] = {}
        self._thread = threading.Thread(target=self._run, name=f"staging-splitter-{writer_id}", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, journal: SealedJournal) -> concurrent.futures.Future[None]:
        with self._cond:
            self._queue.append(journal)
            self.pending_max = max(self.pending_max, journal.size)
            self._cond.notify()
        return journal.future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                journal = self._queue[0]
            try:
                started = time.perf_counter()
                settle_journal(self.root, journal.path, journal.fd, journal.size, resumed=journal.attempts > 0,
                               by_writer=self.writer_id, ready=self._ready)
                self.split_seconds += time.perf_counter() - started
                self.splits += 1
            except Exception as e:
                journal.attempts += 1
                log.error("splitting %s failed (%s); retrying in %.0f s", journal.path, e, SPLIT_RETRY_SECONDS)
                with self._cond:
                    if self._stopping:
                        self._drop_all()
                        return
                    self._cond.wait(SPLIT_RETRY_SECONDS)
                continue
            with self._cond:
                self._queue.popleft()
                self.pending_max = max((j.size for j in self._queue), default=0)
            os.close(journal.fd)
            journal.future.set_result(None)
            self._prepare_spare(journal.size)

    def _prepare_spare(self, used: int) -> None:
        """The writer's next journal, pre-written: twice what the last one held (at least ROOM_MIN_BYTES)."""
        if self.room_bytes <= 0 or self._queue:  # splits come first
            return
        size = min(self.room_bytes, max(ROOM_MIN_BYTES, 1 << max(0, 2 * used - 1).bit_length()))
        try:
            prepare_spare(self.root, self.writer_id, size)
        except OSError as e:  # a full volume: the next journal grows as it is written, as without room
            log.warning("could not pre-write the next journal of %s (%s)", self.writer_id, e.strerror or e)

    def _drop_all(self) -> None:
        """Release what is left to recovery (closing the fds drops the flocks). Called under _cond."""
        while self._queue:
            journal = self._queue.popleft()
            os.close(journal.fd)
            journal.future.set_exception(RuntimeError(f"{journal.path} left to recovery"))
        self.pending_max = 0

    def stop(self, timeout: float, join: bool) -> None:
        """Finish the queue (bounded by `timeout`), then leave the rest to the next recovery."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if join:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("splitting did not finish in %.0f s; the next start recovers the rest", timeout)
