"""Quarantine: a damaged segment or journal is copied aside with a report; its good frames are kept in place."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

from pipeline.durable import atomic_write_bytes, fsync_dir, write_all
from pipeline.journal import JournalScan, SegmentScan
from pipeline.layout import quarantine_dir
from pipeline.model import Partition

log = logging.getLogger("filefeed.staging")


def make_dirs(root: Path, rel: Path) -> None:
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


def keep_aside(root: Path, partition: Partition | None, path: Path, buf: bytes, scan: SegmentScan | JournalScan,
               by_writer: str) -> Path:
    """Copy the damaged original to quarantine/ (journals: quarantine/journal/) with a JSON report; return the copy.

    The copy exists before anything replaces or removes the original, so a crash never loses the evidence.
    """
    qdir = quarantine_dir(root, partition)
    make_dirs(root, qdir.relative_to(root))
    qpath = qdir / path.name
    n = 0
    while qpath.exists() and qpath.stat().st_size != len(buf):
        n += 1
        qpath = qdir / f"{path.name}.{n}"
    atomic_write_bytes(qpath, buf)
    frames = scan.frames if isinstance(scan, SegmentScan) else [f for fs in scan.frames.values() for f in fs]
    report = {
        "segment": path.name,
        "partition": str(partition) if partition is not None else "(writer journal: every partition)",
        "from": path.parent.name,
        "size": scan.size,
        "frames_good": len(frames),
        "frames_bad": len(scan.bad),
        "rows_good": scan.rows,
        "rows_lost_estimate": scan.rows_lost_estimate(),
        "bad_ranges": [{"start": s, "end": e, "reason": r} for s, e, r in scan.bad],
        "quarantined_at_ms": time.time_ns() // 1_000_000,
        "by_writer": by_writer,
    }
    atomic_write_bytes(qpath.with_name(qpath.name + ".report.json"), json.dumps(report, indent=2).encode())
    log.error("quarantined %s: %d good frames kept, %d damaged ranges, about %d rows lost; see %s",
              path, len(frames), len(scan.bad), report["rows_lost_estimate"], qpath)
    return qpath


def quarantine_segment(root: Path, partition: Partition, path: Path, buf: bytes, scan: SegmentScan,
                       target_dir: Path, by_writer: str) -> None:
    """Copy the original aside, then publish its good frames as target_dir/<same name>.

    The good frames replace the original in one rename. Keeping the name keeps every ref to this segment valid.
    """
    keep_aside(root, partition, path, buf, scan, by_writer)
    if not target_dir.is_dir():
        make_dirs(root, target_dir.relative_to(root))
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
