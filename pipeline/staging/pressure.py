"""Backpressure: refuse appends (StagingFull -> `retry`) before the staging volume or its limits run out."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from pipeline.layout import OPEN, SEALED, SUFFIX, iter_partition_dirs, journal_dir
from pipeline.staging.results import DISK_FULL_RETRY_MS, STAGED_FULL_RETRY_MS

log = logging.getLogger("filefeed.staging")

DISK_CHECK_SECONDS = 1.0
STAGED_SCAN_SECONDS = 2.0


def _folder_bytes(folder: Path) -> int:
    total = 0
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                    try:
                        total += e.stat().st_size
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return total


class Backpressure:
    """Free space from statvfs (cached a second), staged bytes from a periodic scan plus this writer's appends."""

    def __init__(self, root: Path, min_free_bytes: int, max_staged_bytes: int | None):
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.max_staged_bytes = max_staged_bytes
        self._staged_scanned = 0
        # Two counters, each written by one thread only (committer / housekeeping): no lock, no lost update.
        self.appended_total = 0
        # (when, free bytes, appended_total then, rechecks then): replaced whole, never field by field, because
        # appends check it from several threads (the loop, append_sync's callers). A placeholder published before
        # its statvfs returned let another thread read "0 bytes free" and refuse a good append. A recheck asked for
        # while a read is under way (ENOSPC) makes that read stale as soon as it is published.
        self._rechecks = 0
        self._disk = self._read_disk()
        self._appended_at_scan = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if max_staged_bytes is not None:
            self.scan()
            self._thread = threading.Thread(target=self._run, name="staging-housekeeping", daemon=True)
            self._thread.start()

    def check(self, unsplit: int = 0) -> tuple[str, int] | None:
        """(why, retry ms) when appends must be refused now, else None. Cheap: no directory scan.

        `unsplit`: the free space this writer needs once the append is made: what is queued and the append itself,
        then room for its largest split (Staging._unsplit). A split copies a journal's rows before removing it, so an
        append is refused while the free space, less what this writer appended since statvfs was read, would not
        hold that: every acknowledged row can then be split without the operator freeing space, whatever
        FILEFEED_MIN_FREE_BYTES says (0 included).
        """
        disk = self._disk
        if time.monotonic() - disk[0] >= DISK_CHECK_SECONDS or disk[3] != self._rechecks:
            disk = self._disk = self._read_disk()
        _, disk_free, appended_at_disk, _ = disk
        if disk_free < self.min_free_bytes:
            return (
                f"free disk space {disk_free} bytes is under the {self.min_free_bytes} bytes minimum",
                DISK_FULL_RETRY_MS,
            )
        if unsplit:
            free = disk_free - (self.appended_total - appended_at_disk)
            if free < unsplit:
                self.recheck_disk()  # near the end of the space: read it again on the next append
                return (
                    f"free disk space {max(0, free)} bytes would not hold the split of what this worker holds "
                    f"({unsplit} bytes needed); appends resume as splits and rolls free space",
                    DISK_FULL_RETRY_MS,
                )
        if self.max_staged_bytes is not None:
            staged = self.staged_bytes()
            if staged > self.max_staged_bytes:
                return f"{staged} bytes staged, over the {self.max_staged_bytes} bytes limit", STAGED_FULL_RETRY_MS
        return None

    def _read_disk(self) -> tuple[float, int, int, int]:
        appended, rechecks = self.appended_total, self._rechecks
        try:
            st = os.statvfs(self.root)
        except OSError:
            return -1e9, 0, appended, rechecks  # refused now, read again on the next append
        return time.monotonic(), st.f_bavail * st.f_frsize, appended, rechecks

    def recheck_disk(self) -> None:
        """Re-read free space on the next request instead of trusting the cache (after ENOSPC)."""
        self._rechecks += 1  # a lost increment of two racing threads still changes the value: no lock needed

    def staged_bytes(self) -> int:
        """Journal + sealed bytes of every writer: last scan plus what this writer appended since."""
        return self._staged_scanned + self.appended_total - self._appended_at_scan

    def scan(self) -> None:
        appended_before = self.appended_total
        total = _folder_bytes(journal_dir(self.root))
        for _, pdir in iter_partition_dirs(self.root):
            total += _folder_bytes(pdir / OPEN) + _folder_bytes(pdir / SEALED)
        # Appends made during the scan (or a journal being split) may be counted twice: erring high only refuses a
        # little early.
        self._staged_scanned = total
        self._appended_at_scan = appended_before

    def _run(self) -> None:
        while not self._stop.wait(STAGED_SCAN_SECONDS):
            try:
                self.scan()
            except Exception:  # a scan racing with renames must never stop the refresh
                log.exception("staged bytes scan failed")

    def stop(self, join: bool) -> None:
        self._stop.set()
        if self._thread is not None and join:
            self._thread.join()
