"""Backpressure: StagingFull before writing when disk or staged bytes run out; ENOSPC never leaves a torn frame."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat

import pytest

import pipeline.staging.pressure as staging_module
from pipeline.staging import StagingFull
from tests.conftest import wait_for
from tests.staging.helpers import P, fill_the_volume_mid_write, journal_scan, read_all, rows


def test_refused_when_free_disk_is_under_the_minimum(make_staging) -> None:
    staging = make_staging(min_free_bytes=1 << 62)
    assert "free disk space" in (staging.pressure() or "")
    with pytest.raises(StagingFull) as info:
        staging.append_sync(P, rows(0, 1))
    assert info.value.retry_after_ms > 0
    with pytest.raises(StagingFull):
        asyncio.run(staging.append(P, rows(0, 1)))
    assert staging.partitions() == []


def test_refused_over_max_staged_bytes_and_accepted_again_once_rolled(
    make_staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging_module, "STAGED_SCAN_SECONDS", 0.05)
    staging = make_staging(max_staged_bytes=2000)
    accepted = []
    with pytest.raises(StagingFull) as info:
        for i in range(1000):
            staging.append_sync(P, rows(i * 5, 5))
            accepted.extend(rows(i * 5, 5))
    assert "staged" in info.value.reason and info.value.retry_after_ms > 0
    assert 2000 < staging.staged_bytes() < 4000
    staging.seal_all()
    assert read_all(staging.sealed_segments(P)) == accepted  # nothing acknowledged was touched

    # Another process starting now sees what is staged at once (split segments lose the journal's partition tags).
    sealed_bytes = sum(path.stat().st_size for path in staging.sealed_segments(P))
    other = make_staging(max_staged_bytes=sealed_bytes - 1)
    with pytest.raises(StagingFull):
        other.append_sync(P, rows(10_000, 1))

    # A roll takes the sealed segments away: the periodic scan notices and appends are accepted again.
    shutil.rmtree(staging.root / P.relpath / "sealed")
    wait_for(lambda: staging.pressure() is None, timeout=10, what="staged bytes to drop")
    assert staging.append_sync(P, rows(20_000, 1)).accepted == 1


def test_enospc_mid_write_cuts_the_frame_back_and_reports_staging_full(
    staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = staging.append_sync(P, rows(0, 3))
    path = staging.segment_path(P, first.segment, "open")
    size_before = path.stat().st_size
    fill_the_volume_mid_write(monkeypatch)
    with pytest.raises(StagingFull, match="no space"):
        staging.append_sync(P, rows(3, 50))
    assert path.stat().st_size == size_before
    assert journal_scan(path).valid
    monkeypatch.undo()

    retry = staging.append_sync(P, rows(3, 50))  # the failed rows were never remembered as seen
    assert (retry.accepted, retry.duplicates) == (50, 0)
    staging.seal_all()
    assert read_all(staging.sealed_segments(P)) == rows(0, 53)


def test_fsync_error_fails_the_request_and_keeps_acknowledged_rows(staging, monkeypatch: pytest.MonkeyPatch) -> None:
    first = staging.append_sync(P, rows(0, 2))
    real_fsync = os.fsync
    failures = {"left": 1}

    def failing(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        staging.append_sync(P, rows(2, 2))
    # Cut back and fsynced again: the segment stays in use.
    assert staging.append_sync(P, rows(4, 1)).segment == first.segment

    # When even the cut cannot be made durable, the segment is given up (lock released) and recovery seals it.
    failures["left"] = 2
    with pytest.raises(OSError, match="I/O error"):
        staging.append_sync(P, rows(5, 2))
    monkeypatch.undo()
    assert staging.segment_state(P, first.segment) == "open"
    report = staging.recover()
    assert report.sealed == [first.segment]
    after = staging.append_sync(P, rows(7, 1))
    assert after.segment != first.segment
    staging.seal_all()
    assert read_all(staging.sealed_segments(P)) == [*rows(0, 2), *rows(4, 1), *rows(7, 1)]


def test_an_append_checked_while_another_thread_reads_the_free_space_sees_the_real_value(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appends check the free space from several threads (the loop, append_sync's callers). The check used to mark
    the free space fresh before its statvfs returned, so another thread read the placeholder, "0 bytes free", and
    refused a good append (seen in CI: test_inline_and_sync_callers_together_and_dedup)."""
    import threading

    pressure = staging_module.Backpressure(tmp_path, 0, None)
    pressure.recheck_disk()  # the next check reads statvfs again
    inside, release = threading.Event(), threading.Event()
    real, calls = os.statvfs, []

    def slow_statvfs(path):
        calls.append(path)
        if len(calls) == 1:  # the first reader stays inside until the second thread has checked
            inside.set()
            release.wait(30)
        return real(path)

    monkeypatch.setattr(staging_module.os, "statvfs", slow_statvfs)
    first = threading.Thread(target=pressure.check, args=(100,))
    first.start()
    try:
        assert inside.wait(30)
        assert pressure.check(100) is None  # 100 bytes fit on this volume
    finally:
        release.set()
        first.join(30)


def test_a_recheck_asked_for_during_a_read_is_not_lost(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After ENOSPC the committer asks for the free space to be read again; a read already under way in another
    thread must not publish its older figure as fresh (review of the whole-tuple cache)."""
    import threading

    pressure = staging_module.Backpressure(tmp_path, 0, None)
    pressure.recheck_disk()
    inside, release = threading.Event(), threading.Event()
    real, calls = os.statvfs, []

    def slow_statvfs(path):
        calls.append(path)
        if len(calls) == 1:
            inside.set()
            release.wait(30)
        return real(path)

    monkeypatch.setattr(staging_module.os, "statvfs", slow_statvfs)
    first = threading.Thread(target=pressure.check)
    first.start()
    assert inside.wait(30)
    pressure.recheck_disk()  # ENOSPC while the first read is under way
    release.set()
    first.join(30)
    assert len(calls) == 1
    pressure.check()
    assert len(calls) == 2  # the first read, published after the recheck, was not trusted
