"""Recovery: journals of dead writers are split (torn tails cut, damage quarantined), stale temp files removed.

Safe to run from several processes at once: a journal is only touched under its flock, and only if it is still the
file at that path once locked. Per-partition open segments (`feeds/<p>/open/`, the layout before writer journals)
are still sealed here, so an upgrade loses nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from pipeline.durable import fsync_dir
from pipeline.journal import SegmentScan, scan_buffer
from pipeline.layout import OPEN, SEALED, SUFFIX, iter_partition_dirs, journal_dir
from pipeline.model import Partition
from pipeline.staging.quarantine import make_dirs, quarantine_segment
from pipeline.staging.reading import read_fd, verify_segment
from pipeline.staging.results import RecoveryReport
from pipeline.staging.split import settle_journal

log = logging.getLogger("filefeed.staging")
STALE_TEMP_SECONDS = 60.0


def recover(root: Path, by_writer: str) -> RecoveryReport:
    """Split every journal whose writer is gone and seal old-layout open segments; see the module doc."""
    report = RecoveryReport()
    jdir = journal_dir(root)
    try:
        names = sorted(os.listdir(jdir))
    except FileNotFoundError:
        names = []
    for n in names:
        if n.endswith(SUFFIX) and not n.startswith("."):
            recover_journal(root, jdir / n, report, by_writer)
        elif n.startswith(".") and n.endswith(".new"):
            remove_if_stale(jdir / n)
    for partition, pdir in iter_partition_dirs(root):
        odir = pdir / OPEN
        try:
            names = sorted(os.listdir(odir))
        except FileNotFoundError:
            names = []
        for n in names:
            if n.endswith(SUFFIX) and not n.startswith("."):
                recover_open_segment(root, partition, odir / n, report, by_writer)
            elif n.startswith(".") and n.endswith(".new"):
                remove_if_stale(odir / n)
        sdir = pdir / SEALED
        try:
            temps = [n for n in os.listdir(sdir) if n.startswith(".") and n.endswith((".repair", ".split"))]
        except FileNotFoundError:
            temps = []
        for n in temps:
            # a split temp is only stale once its journal is gone (else its split may be running now)
            if n.endswith(".repair") or not (jdir / n[1 : -len(".split")]).exists():
                remove_if_stale(sdir / n)
    return report


def remove_if_stale(path: Path) -> None:
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


def _lock_orphan(path: Path, report: RecoveryReport) -> int | None:
    """An fd holding the flock of `path` when its owner is gone and it is still that file, else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # split or recovered by someone else meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except BlockingIOError:
        report.busy += 1
    except FileNotFoundError:
        pass
    os.close(fd)
    return None


def recover_journal(root: Path, path: Path, report: RecoveryReport, by_writer: str) -> None:
    fd = _lock_orphan(path, report)
    if fd is None:
        return
    try:
        size = os.fstat(fd).st_size
        name = path.stem
        try:
            scan = settle_journal(root, path, fd, size, resumed=True, by_writer=by_writer)
        except OSError as e:
            # a full volume (the split needs room for a second copy) or any I/O trouble: never a crash loop at
            # start. The journal stays whole and locked by nobody; the next recovery pass splits it.
            report.deferred.append(name)
            log.error("recovery: could not split orphaned journal %s (%s); kept whole, retried at the next "
                      "recovery (free space on the staging volume if it is full)", path, e.strerror or e)
            return
        if scan.bad and not scan.torn_tail_only:
            report.quarantined.append(name)
        elif scan.bad:
            report.truncated.append((name, size - scan.good_end))
        if scan.frames:
            report.sealed.append(name)
            log.info("recovery: split orphaned journal %s (%d partitions, %d rows)", path, len(scan.frames),
                     scan.rows)
        elif not scan.bad or scan.torn_tail_only:
            report.removed_empty.append(name)
    finally:
        os.close(fd)


def recover_open_segment(root: Path, partition: Partition, path: Path, report: RecoveryReport,
                         by_writer: str) -> None:
    """An old-layout open segment: cut its torn tail (or quarantine it) and move it to sealed/."""
    fd = _lock_orphan(path, report)
    if fd is None:
        return
    try:
        name = path.stem
        sealed = path.parent.parent / SEALED / path.name
        if sealed.exists():
            # A repair that crashed after publishing the good frames: the quarantine copy was made before.
            os.unlink(path)
            fsync_dir(path.parent)
            report.quarantined.append(name)
            return
        size = os.fstat(fd).st_size
        buf = read_fd(fd, size) if size else b""
        scan = scan_buffer(buf)
        if not scan.valid and not scan.torn_tail_only:
            quarantine_segment(root, partition, path, buf, scan, sealed.parent, by_writer)
            report.quarantined.append(name)
            return
        if not scan.valid:
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
        make_dirs(root, Path(partition.relpath) / SEALED)
        os.rename(path, sealed)
        fsync_dir(sealed.parent)
        fsync_dir(path.parent)
        report.sealed.append(name)
        log.info("recovery: sealed orphaned segment %s (%d frames, %d rows)", path, len(scan.frames), scan.rows)
    finally:
        os.close(fd)


def repair_segment(root: Path, partition: Partition, path: Path, by_writer: str) -> SegmentScan:
    """Quarantine a damaged sealed segment and keep its good frames in place, under the same name.

    Works wherever the segment lies (sealed/, or a roll's folder). The caller must own the partition (the roll
    lease): sealed segments carry no lock of their own.
    """
    path = Path(path)
    with open(path, "rb") as f:
        buf = f.read()
    scan = scan_buffer(buf)
    if not scan.valid:
        quarantine_segment(root, partition, path, buf, scan, path.parent, by_writer)
    return scan


def scan_sealed(root: Path, partition: Partition, paths: list[Path], *, repair: bool,
                by_writer: str) -> list[tuple[Path, SegmentScan]]:
    """Check sealed segments; return the damaged ones (repaired when asked)."""
    bad = []
    for path in paths:
        try:
            scan = verify_segment(path)
        except FileNotFoundError:
            continue
        if not scan.valid:
            if repair:
                repair_segment(root, partition, path, by_writer)
            bad.append((path, scan))
    return bad
