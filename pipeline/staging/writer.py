"""The staging buffer of one process: appends, the committer thread, the writer journal's life, and the facade.

Each process has its own writer id and one open journal (`journal/open/<writer>-<seq>.jnl`, flocked), so writers
never share a file and the hot path takes no lock. A journal is sealed by age, size, a seal request or close, and
then split by the writer's splitter thread into `feeds/<p>/sealed/<same name>.jnl` (pipeline/staging/split.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.journal import SegmentScan, encode_lines
from pipeline.layout import OPEN, SUFFIX, WRITER_ID_RE, Row, journal_dir, partition_dir, quarantine_dir, writer_of
from pipeline.model import Partition
from pipeline.staging import listing, recovery
from pipeline.staging.commit import Entry, GroupCommit, OpenJournal, open_journal, resolve, resolve_async, spare_path
from pipeline.staging.dedup import DedupWindow
from pipeline.staging.pressure import Backpressure
from pipeline.staging.results import (
    FILES_FULL_RETRY_MS,
    AppendResult,
    PartitionStats,
    RecoveryReport,
    StagingClosed,
    StagingFull,
)
from pipeline.staging.sealing import (
    SEAL_REQUEST_POLL_SECONDS,
    SealWaits,
    remove_empty_seal_request_dirs,
    requested_names,
)
from pipeline.staging.split import SealedJournal, Splitter

log = logging.getLogger("filefeed.staging")

MiB = 1024 * 1024
INLINE_MAX_HOPS = 4
ORPHAN_CHECK_SECONDS = 30.0
CLOSE_SPLIT_SECONDS = 30.0
# Descriptors one Staging holds at most: its open journal, the sealed ones waiting for their split (each keeps its
# flock), and the one file a split writes at a time.
DEFAULT_MAX_OPEN_FILES = 16

# Bumped in a forked child: a Staging notices it crossed a fork without a getpid() system call per append.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class Staging(GroupCommit, SealWaits):
    """The staging buffer of one process: group-committed appends, sealing, recovery, listing and reading.

    Args:
        root: staging root (FILEFEED_STAGING_DIR), shared by every worker process.
        writer_id: unique per process start; default `w<pid>-<6 hex>`.
        seal_after_seconds: the open journal is sealed (and split) this long after its first write.
        max_segment_bytes: the open journal is sealed once it reaches this size.
        journal_room_bytes: the most the splitter pre-writes of the next journal (twice the last one's size, at least
            256 KiB, at most this and max_segment_bytes; 0 = off): commits into written room fsync faster.
        dedup_window: how many recent row keys this writer remembers to drop retried rows (0 = off).
        min_free_bytes: refuse appends (StagingFull) when the volume has less free space.
        max_staged_bytes: refuse appends when journals + sealed segments of all writers hold more.
        max_open_files: descriptors this Staging may hold (>= 3): the open journal, sealed journals waiting for
            their split, the split's output file. At the cap appends are refused (StagingFull) until splits catch up.
        inline_commit: async appends are committed on the event loop itself: all appends of one loop iteration
            share one write + fsync run from a `call_soon` callback. On a disk whose fsync takes ~0.1 ms this
            beats handing every commit to the committer thread, whose GIL hand-offs cost more than the fsync. Sync
            appends, sealing and requests still run in the committer thread; `_io_lock` keeps the two apart.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        writer_id: str | None = None,
        seal_after_seconds: float = 1.0,
        max_segment_bytes: int = 64 * MiB,
        journal_room_bytes: int = 16 * MiB,
        dedup_window: int = 200_000,
        min_free_bytes: int = 256 * MiB,
        max_staged_bytes: int | None = None,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        inline_commit: bool = False,
    ):
        self.root = Path(root)
        self.writer_id = writer_id or f"w{os.getpid()}-{secrets.token_hex(3)}"
        if not WRITER_ID_RE.fullmatch(self.writer_id):
            raise ValueError("writer_id must be 1-48 characters of letters, digits, '_' or '-'")
        if max_open_files < 3:
            raise ValueError("max_open_files must be at least 3")
        self.seal_after_seconds = seal_after_seconds
        self.max_segment_bytes = max_segment_bytes
        self.journal_room_bytes = max(0, min(journal_room_bytes, max_segment_bytes))
        self.max_open_files = max_open_files
        self.root.mkdir(parents=True, exist_ok=True)
        self._generation = _fork_generation
        self.dedup = DedupWindow(dedup_window)
        self.backpressure = Backpressure(self.root, min_free_bytes, max_staged_bytes)
        self._index = listing.JournalIndex(self.root)

        # Shared between callers and the committer thread, under _cond.
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[Entry] = []
        self._requests: list[tuple[Callable[[], object], concurrent.futures.Future[object]]] = []
        self._stopping = False
        self._closed = False
        self.inline_commit = inline_commit
        self._io_lock = threading.Lock()  # the journal: the committer thread and inline commits
        self._inline_pending: list[Entry] = []
        # payload bytes queued and not yet committed (inline: loop thread only; thread mode: under _cond)
        self._inline_pending_bytes = 0
        self._pending_bytes = 0
        self._journal_created = False  # by the current inline commit (under _io_lock)

        # Committing state (under _io_lock).
        self._journal: OpenJournal | None = None
        self._latest: dict[Partition, str] = {}
        self._tags: dict[Partition, bytes] = {}
        self._seq = 0

        # Counters, read by tests, bench and metrics. Written by the committer only.
        self.commits = 0
        self.syncs = 0
        self.frames = 0
        self.rows_written = 0

        self._splitter: Splitter | None = None  # started with the first journal: read-only users never need it
        self._committer = threading.Thread(
            target=self._run_committer, name=f"staging-committer-{self.writer_id}", daemon=True
        )
        self._committer.start()

    # ------------------------------------------------------------------ paths

    def partition_dir(self, partition: Partition) -> Path:
        return partition_dir(self.root, partition)

    def segment_path(self, partition: Partition, name: str, state: str) -> Path:
        """Where segment `name` of `partition` lies in `state`; OPEN: the writer journal holding its rows."""
        if state == OPEN:
            return journal_dir(self.root) / (name + SUFFIX)
        return partition_dir(self.root, partition) / state / (name + SUFFIX)

    def quarantine_dir(self, partition: Partition | None) -> Path:
        return quarantine_dir(self.root, partition)

    # ------------------------------------------------------------------ append

    async def append(self, partition: Partition, rows: Sequence[Row]) -> AppendResult:
        """Stage `rows` durably; return once they are fsynced (group commit with concurrent callers).

        Raises:
            StagingFull: disk, staged-bytes or descriptor limit reached, nothing written; retry after
                `retry_after_ms`.
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
        encoded = encode_lines(rows)
        size = len(encoded[1])
        full = self.backpressure.check(self._unsplit(self._inline_pending_bytes + size))
        if full is not None:
            raise StagingFull(*full)
        entry = Entry(partition, rows, encoded, loop, loop.create_future())
        self._inline_pending_bytes += size
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
        self._inline_pending_bytes = 0  # all of them are in `entries`: nothing is submitted during this commit
        with self._io_lock:
            self._journal_created = False
            self._commit_guarded(entries)
            created = self._journal_created
        resolve_async(entries)
        if created:  # a new journal: the committer thread must time its seal (it may be waiting with no timeout)
            with self._cond:
                self._cond.notify()

    def append_sync(self, partition: Partition, rows: Sequence[Row]) -> AppendResult:
        """`append` for threads and scripts; shares the committer (and its group commits) with async callers."""
        entry = self._entry(partition, rows, None)
        entry.event.wait()  # type: ignore[union-attr]
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _entry(self, partition: Partition, rows: Sequence[Row], loop: asyncio.AbstractEventLoop | None) -> Entry:
        self._check_usable()
        encoded = encode_lines(rows)  # bad rows fail here, in the caller, never inside a shared commit
        full = self.backpressure.check(self._unsplit(self._pending_bytes + len(encoded[1])))
        if full is not None:
            raise StagingFull(*full)
        entry = Entry(partition, rows, encoded, loop, loop.create_future() if loop is not None else None)
        with self._cond:
            if self._stopping:
                raise StagingClosed("staging is closed")
            self._pending_bytes += len(encoded[1])
            self._pending.append(entry)
            if len(self._pending) == 1:  # the committer only sleeps when nothing is pending
                self._cond.notify()
        return entry

    def _unsplit(self, queued: int) -> int:
        """The free space this writer needs once `queued` bytes more are committed: those bytes themselves, then room
        for its largest split (splits run one at a time, each removing its journal once copied): the open journal
        with them, or the largest sealed journal waiting. Backpressure.check refuses appends it does not have."""
        journal, splitter = self._journal, self._splitter
        open_size = queued + (journal.size if journal is not None else 0)
        return queued + max(open_size, splitter.pending_max if splitter is not None else 0)

    def _check_usable(self) -> None:
        if self._closed or self._stopping:
            raise StagingClosed("staging is closed")
        if _fork_generation != self._generation:
            raise StagingClosed("a Staging cannot cross a fork: create one in each worker process")

    def pressure(self) -> str | None:
        """Why appends are refused right now, or None. Cheap: statvfs at most once a second, no directory scan."""
        full = self.backpressure.check(self._unsplit(0))
        return full[0] if full is not None else None

    def staged_bytes(self) -> int:
        return self.backpressure.staged_bytes()

    # ------------------------------------------------------------------ the journal (under _io_lock)

    def _journal_for_write(self) -> OpenJournal:
        if self._journal is not None:
            return self._journal
        splitter = self._splitter
        if splitter is None:
            splitter = self._splitter = Splitter(self.root, self.writer_id, self.max_open_files - 2,
                                                        self.journal_room_bytes)
        if len(splitter) >= splitter.max_pending:
            raise StagingFull(f"{len(splitter)} journals wait for their split (descriptor cap "
                              f"{self.max_open_files})", FILES_FULL_RETRY_MS)
        self._seq += 1
        self._journal = open_journal(self.root, self.writer_id, self._seq)
        self._journal_created = True
        return self._journal

    def _current_journal_name(self) -> str | None:
        return self._journal.name if self._journal is not None else None

    def _seal_journal(self) -> concurrent.futures.Future[None] | None:
        """Stop appending to the open journal and hand it to the splitter; the future resolves once it is split."""
        journal, self._journal = self._journal, None
        if journal is None:
            return None
        if journal.size == 0:  # every write to it failed and was cut back
            try:
                os.unlink(journal.path)
            except OSError:
                log.exception("could not remove the empty journal %s; leaving it to recovery", journal.path)
            os.close(journal.fd)
            return None
        assert self._splitter is not None
        return self._splitter.submit(SealedJournal(journal.path, journal.fd, journal.size))

    def _abandon_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is not None:
            os.close(journal.fd)  # releases the flock: recovery cuts the torn tail and splits it

    # ------------------------------------------------------------------ committer

    def _run_committer(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._requests and not self._stopping:
                    wait = self._seconds_to_next_seal()
                    if wait is None:
                        self._cond.wait()  # nothing open: a new journal or an append notifies
                    elif wait > 0:  # while a journal is open, wake often enough to serve seal requests
                        self._cond.wait(min(wait, SEAL_REQUEST_POLL_SECONDS))
                entries, self._pending = self._pending, []
                requests, self._requests = self._requests, []
                stopping = self._stopping
            with self._io_lock:
                if entries:
                    self._commit_guarded(entries)
                try:
                    self._seal_due()
                except Exception:
                    log.exception("sealing failed")
                for fn, fut in requests:
                    try:
                        fut.set_result(fn())
                    except BaseException as e:
                        fut.set_exception(e)
            if entries:
                committed = sum(len(e.payload) for e in entries)
                with self._cond:
                    self._pending_bytes -= committed
                resolve(entries)
            if stopping:
                with self._cond:
                    if self._pending or self._requests:
                        continue
                try:
                    with self._io_lock:
                        self._seal_journal()
                except Exception:
                    log.exception("sealing at close failed")
                return

    def _seconds_to_next_seal(self) -> float | None:
        journal = self._journal  # an inline commit may open one concurrently
        if journal is None:
            return None
        return journal.created + self.seal_after_seconds - time.monotonic()

    def _seal_due(self) -> None:
        journal = self._journal
        if journal is None:
            return
        if (time.monotonic() - journal.created >= self.seal_after_seconds
                or journal.name in requested_names(self.root, self.writer_id)):
            self._seal_journal()

    def _call(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or not self._committer.is_alive():
                raise StagingClosed("staging is closed")
            self._requests.append((fn, fut))
            self._cond.notify()
        return fut

    def _request_own_seals(self, names: list[str]) -> concurrent.futures.Future[object] | None:
        own = {n for n in names if writer_of(n) == self.writer_id}
        if not own or self._stopping:
            return None

        def seal_named() -> object:
            if self._journal is not None and self._journal.name in own:
                return self._seal_journal()
            return None

        return self._call(seal_named)

    def seal_all(self, timeout: float = CLOSE_SPLIT_SECONDS) -> None:
        """Seal this writer's journal now and wait (bounded) until it is split into sealed segments."""
        split = self._call(self._seal_journal).result(timeout)
        if isinstance(split, concurrent.futures.Future):
            concurrent.futures.wait([split], timeout)

    async def seal_all_async(self, timeout: float = CLOSE_SPLIT_SECONDS) -> None:
        split = await asyncio.wait_for(asyncio.wrap_future(self._call(self._seal_journal)), timeout)
        if isinstance(split, concurrent.futures.Future):
            await asyncio.wait([asyncio.wrap_future(split)], timeout=timeout)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Commit what is pending, seal and split the journal, stop the threads. Idempotent."""
        if self._closed:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        same_process = self._generation == _fork_generation  # a forked child has no threads to join
        if same_process:
            self._committer.join()
        if self._splitter is not None:
            self._splitter.stop(CLOSE_SPLIT_SECONDS, join=same_process)
            with contextlib.suppress(OSError):
                os.unlink(spare_path(self.root, self.writer_id))  # nobody takes it now (else recovery removes it)
        self.backpressure.stop(join=same_process)
        self._closed = True

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def run_sealer(self) -> None:
        """Background task for a server: seals by age run in the committer; this recovers dead writers' journals.

        A worker that crashed leaves a journal nobody splits; any live process picks it up here.
        """
        while True:
            await asyncio.sleep(ORPHAN_CHECK_SECONDS)
            try:
                await asyncio.to_thread(self.recover)
            except Exception:
                log.exception("periodic recovery failed")

    # ------------------------------------------------------------------ recovery, listing

    def recover(self) -> RecoveryReport:
        """Split every journal whose writer is gone (torn tails cut, damage quarantined); see recovery.py."""
        remove_empty_seal_request_dirs(self.root)
        return recovery.recover(self.root, self.writer_id)

    def repair_segment(self, partition: Partition, path: Path) -> SegmentScan:
        return recovery.repair_segment(self.root, partition, path, self.writer_id)

    def scan_sealed(self, partition: Partition, *, repair: bool = False) -> list[tuple[Path, SegmentScan]]:
        """Check every sealed segment of `partition`; return the damaged ones (repaired when asked)."""
        return recovery.scan_sealed(self.root, partition, self.sealed_segments(partition), repair=repair,
                                    by_writer=self.writer_id)

    def partitions(self) -> list[Partition]:
        """Partitions holding rows: sealed, or still in a writer journal."""
        return listing.partitions(self.root, self._index)

    def sealed_segments(self, partition: Partition) -> list[Path]:
        return listing.sealed_segments(self.root, partition)

    def open_segments(self, partition: Partition) -> list[Path]:
        """Writer journals still holding rows of `partition` (not split yet); their stems are segment refs."""
        return listing.open_segments(self.root, partition, self._index)

    def stats(self, partition: Partition) -> PartitionStats:
        return listing.stats(self.root, partition, self._index)
