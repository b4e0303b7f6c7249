"""Pre-written journals: the splitter writes the next journal's room (zeros, fsynced) and commits overwrite it.

The room is never damage: scans, the journal index, splits and recovery read zeros from a record's start to the end
as unwritten room. Commits into it keep every promise of a growing journal (cut back on a failed write, nothing
acknowledged lost, nothing unacknowledged kept)."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from pipeline.journal import encode_rows, encode_tag, scan_journal
from pipeline.staging import Staging
from pipeline.staging.commit import spare_path
from pipeline.staging.recovery import recover
from pipeline.staging.results import StagingFull
from tests.staging.helpers import P2, P, fill_the_volume_mid_write, journal_rows, read_all, rows


def _spare_ready(staging: Staging, timeout: float = 10.0) -> Path:
    spare = spare_path(staging.root, staging.writer_id)
    deadline = time.monotonic() + timeout
    while not spare.exists():
        assert time.monotonic() < deadline, "the splitter wrote no spare journal"
        time.sleep(0.005)
    return spare


def _room_journal(staging: Staging) -> Path:
    """Seal a first journal, wait for the spare, and open the next journal from it; returns its path."""
    staging.append_sync(P, rows(1000, 2))
    staging.seal_all()
    spare = _spare_ready(staging)
    room = spare.stat().st_size
    res = staging.append_sync(P, rows(0, 3))
    path = staging.segment_path(P, res.segment, "open")
    assert path.stat().st_size == room > staging._journal.size  # the commit wrote into the room
    return path


def test_the_next_journal_is_pre_written_and_holds_exactly_the_rows(make_staging) -> None:
    staging = make_staging()
    path = _room_journal(staging)
    staging.append_sync(P2, rows(3, 4))
    assert not spare_path(staging.root, staging.writer_id).exists()  # taken
    assert set(path.read_bytes()[staging._journal.size:]) == {0}
    scan = scan_journal(path.read_bytes())
    assert scan.valid and scan.room == path.stat().st_size - staging._journal.size
    assert journal_rows(path) == rows(0, 3) and journal_rows(path, P2) == rows(3, 4)
    assert staging.stats(P).rows == 5 and staging.stats(P2).rows == 4  # the journal index stops at the room
    staging.seal_all()
    assert read_all(staging.sealed_segments(P)) == rows(1000, 2) + rows(0, 3)
    assert read_all(staging.sealed_segments(P2)) == rows(3, 4)
    staging.close()
    assert not spare_path(staging.root, staging.writer_id).exists()  # a closed writer leaves no spare behind


def test_room_is_sized_on_the_last_journal_within_the_setting(make_staging, tmp_path: Path) -> None:
    staging = make_staging(journal_room_bytes=300 * 1024)
    staging.append_sync(P, rows(0, 2))
    staging.seal_all()
    spare = _spare_ready(staging)
    assert spare.stat().st_size == 256 * 1024  # a small journal: the minimum room
    staging.append_sync(P, rows(2, 3000))  # about 180 KB: twice that is past the setting
    staging.seal_all()
    spare = _spare_ready(staging)
    assert spare.stat().st_size == 300 * 1024
    off = make_staging(journal_room_bytes=0, root=tmp_path / "off")
    off.append_sync(P, rows(0, 2))
    off.seal_all()
    off.close()
    assert not [n for n in os.listdir(off.root / "journal" / "open") if "spare" in n]


def test_a_spare_that_cannot_be_written_leaves_nothing_behind(make_staging, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = make_staging()
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if stat.S_ISREG(os.fstat(fd).st_mode) and set(bytes(data[:64])) == {0}:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    staging.append_sync(P, rows(0, 2))
    staging.seal_all()
    staging.close()  # joins the splitter: its attempt at a spare is over
    assert os.listdir(staging.root / "journal" / "open") == []  # no half-written spare holds the space
    assert read_all(staging.sealed_segments(P)) == rows(0, 2)


def test_a_failed_write_into_the_room_is_cut_back_and_the_next_commit_follows_the_acknowledged_bytes(
    make_staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = make_staging()
    path = _room_journal(staging)
    acknowledged = staging._journal.size
    fill_the_volume_mid_write(monkeypatch)
    with pytest.raises(StagingFull, match="no space"):
        staging.append_sync(P, rows(3, 50))
    monkeypatch.undo()
    assert path.stat().st_size == acknowledged  # cut back, room and all: no half frame left in it
    staging.append_sync(P, rows(3, 50))
    data = path.read_bytes()
    scan = scan_journal(data)
    assert scan.valid and scan.good_end == len(data)  # written right after the acknowledged bytes, no hole
    staging.seal_all()
    assert read_all(staging.sealed_segments(P)) == rows(1000, 2) + rows(0, 53)


def test_recovery_splits_a_dead_writers_pre_written_journal_with_no_torn_tail(tmp_path: Path) -> None:
    """A writer killed after its commits: its journal ends in room, which recovery does not take for damage."""
    root = tmp_path / "staging"
    folder = root / "journal" / "open"
    folder.mkdir(parents=True)
    records = encode_tag(P) + encode_rows(rows(0, 3), 1) + encode_tag(P2) + encode_rows(rows(3, 2), 2)
    (folder / "wdead-00000001.jnl").write_bytes(records + bytes(64 * 1024))
    report = recover(root, "wtest")
    assert report.truncated == [] and report.quarantined == [] and report.sealed == ["wdead-00000001"]
    staging = Staging(root, min_free_bytes=0)
    try:
        assert read_all(staging.sealed_segments(P)) == rows(0, 3)
        assert read_all(staging.sealed_segments(P2)) == rows(3, 2)
    finally:
        staging.close()
    assert not (folder / "wdead-00000001.jnl").exists()


def test_a_torn_commit_in_the_room_is_cut_and_records_after_zeros_are_damage(tmp_path: Path) -> None:
    good = encode_tag(P) + encode_rows(rows(0, 3), 1)
    torn = (encode_tag(P) + encode_rows(rows(3, 40), 2))[:-100]
    scan = scan_journal(good + torn + bytes(4096))
    assert scan.torn_tail_only and scan.good_end == len(good) and scan.room == 0
    # zeros, then a record: not room (a commit's fsync covers every byte before it), damage to quarantine
    later = encode_tag(P) + encode_rows(rows(50, 2), 3)
    scan = scan_journal(good + bytes(512) + later + bytes(512))
    assert scan.bad and not scan.torn_tail_only and scan.room == 512
    assert [f.rows for f in scan.frames[P]] == [3, 2]
