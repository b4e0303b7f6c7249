"""The writer journal: one write + one fsync per commit whatever the partitions, split into per-partition sealed
segments under the journal's name, crash-safe splits, damaged journals quarantined, EMFILE answered as StagingFull."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.journal import encode_tag
from pipeline.ledger import Ledger, LedgerEntry
from pipeline.model import Partition
from pipeline.staging import AppendResult, Staging, StagingFull
from tests.conftest import wait_for
from tests.staging.helpers import frames, hold_first_fsync, read_all, rows

REPO = Path(__file__).resolve().parents[2]
PARTS = [Partition("feed1", f"seg{i}", "UPSERT") for i in range(200)]


def _is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def test_one_write_and_one_fsync_per_commit_whatever_the_partitions(
    staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 partitions in one commit window: one file fsync (the old layout made one per partition)."""
    real_write = os.write
    file_syncs, entered, gate = hold_first_fsync(monkeypatch)
    file_writes: list[int] = []

    def write(fd: int, data) -> int:
        if _is_file(fd):
            file_writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)

    async def main() -> list[AppendResult]:
        first = asyncio.create_task(staging.append(PARTS[0], rows(0, 1)))
        assert await asyncio.to_thread(entered.wait, 10)
        others = [asyncio.create_task(staging.append(p, rows(10 * i, 2))) for i, p in enumerate(PARTS)]
        while len(staging._pending) < len(PARTS):
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *others)

    results = asyncio.run(main())
    assert len(file_syncs) == 2 and len(file_writes) == 2  # the held commit, then ONE for all 200 partitions
    assert {r.segment for r in results} == {results[0].segment}
    monkeypatch.undo()
    staging.seal_all()
    for i, p in enumerate(PARTS):
        expected = rows(10 * i, 2)  # seg0: row 0 twice, deduplicated
        assert read_all(staging.sealed_segments(p)) == expected


def test_split_gives_each_partition_its_rows_under_the_journal_name(make_staging) -> None:
    staging = make_staging()
    a = staging.append_sync(PARTS[0], rows(0, 3))
    b = staging.append_sync(PARTS[1], rows(3, 2))
    assert a.segment == b.segment
    assert staging.stats(PARTS[0]).rows == 3 and staging.stats(PARTS[0]).open_segments == 1
    assert [p.stem for p in staging.open_segments(PARTS[1])] == [a.segment]
    assert staging.partitions() == [PARTS[0], PARTS[1]]
    assert staging.segment_state(PARTS[2], a.segment) == "open"  # not answerable before the split
    staging.seal_all()
    assert [p.name for p in staging.sealed_segments(PARTS[0])] == [a.segment + ".jnl"]
    assert read_all(staging.sealed_segments(PARTS[0])) == rows(0, 3)
    assert read_all(staging.sealed_segments(PARTS[1])) == rows(3, 2)
    # the journal is gone; only its writer's next journal, pre-written (or being written), may be there, dot names
    spare = f".{staging.writer_id}-spare"
    assert {p.name for p in (staging.root / "journal" / "open").iterdir()} <= {spare + ".jnl.new", spare + "-next.jnl.new"}
    # a partition that had no rows in that journal simply has no such segment
    assert staging.segment_state(PARTS[2], a.segment) is None
    assert staging.stats(PARTS[0]).rows == 3 and staging.stats(PARTS[0]).open_segments == 0


def test_stats_read_each_sealed_segment_once_until_it_changes(make_staging, monkeypatch) -> None:
    """The gauges list every partition every few seconds: sealed segments are read once, not on every pass (a busy
    partition gains one per worker per second until its next roll). A segment cut by a repair is read again."""
    from pipeline.staging import listing

    staging = make_staging()
    for i in range(5):
        staging.append_sync(PARTS[0], rows(10 * i, 3))
        staging.seal_all()
    reads: list[str] = []
    real = listing.header_totals

    def counting(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(listing, "header_totals", counting)
    assert staging.stats(PARTS[0]).rows == 15
    assert staging.stats(PARTS[0]).rows == 15 and staging.stats(PARTS[0]).sealed_segments == 5
    assert len(reads) == 5, reads  # each segment once, though stats ran three times
    last = staging.sealed_segments(PARTS[0])[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a torn segment, as a repair would leave it shorter
    assert staging.stats(PARTS[0]).rows == 12
    assert reads[-1] == last.name and len(reads) == 6


_CHILD = """
import sys
from pipeline.model import Partition
from pipeline.staging import Staging
st = Staging(sys.argv[1], writer_id="wcrash", min_free_bytes=0, seal_after_seconds=3600)
for i in range(30):
    st.append_sync(Partition("feed1", f"seg{i}", "UPSERT"), [("e", f"id{i}-{k}", k, "s", "d", "u") for k in range(3)])
st.seal_all()  # dies inside the split (FILEFEED_CRASH_AT)
"""


def _crash_child(root: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FILEFEED_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]


def _expected(i: int) -> list[tuple]:
    return [("e", f"id{i}-{k}", k, "s", "d", "u") for k in range(3)]


@pytest.mark.parametrize("point", ["split_rename:1", "split_rename:10", "split_done"])
def test_a_crash_mid_split_is_finished_by_recovery_without_recreating_what_rolls_took(
    tmp_path: Path, point: str
) -> None:
    root = tmp_path / "staging"
    _crash_child(root, point)
    journal = root / "journal" / "open" / "wcrash-00000001.jnl"
    assert journal.exists()
    name = journal.name
    parts = [Partition("feed1", f"seg{i}", "UPSERT") for i in range(30)]
    split_before = [p for p in parts if (root / p.relpath / "sealed" / name).exists()]
    # Rolls take two split partitions meanwhile: one is in a roll's folder, one is published (ledger only).
    taken = {}
    for p, how in zip(split_before[:2], ("rolling", "published"), strict=False):
        seg = root / p.relpath / "sealed" / name
        if how == "rolling":
            dest = root / p.relpath / "rolling" / "r1" / "segments"
            dest.mkdir(parents=True)
            os.rename(seg, dest / name)
        else:
            os.unlink(seg)
            Ledger(root / p.relpath).record(LedgerEntry("r2", str(p), "t", "t", (), None, 3, 1, (name,)))
        taken[p] = how
    reader = Staging(root, min_free_bytes=0)
    try:
        report = reader.recover()
        assert report.sealed == ["wcrash-00000001"]
        assert not journal.exists()
        for i, p in enumerate(parts):
            sealed = reader.sealed_segments(p)
            if p in taken:
                assert sealed == [], f"{p}: a segment a roll took was made again"
            else:
                assert read_all(sealed) == _expected(i), f"{p}: rows lost or doubled"
        assert not list(root.glob("feeds/*/*/*/sealed/.*.split"))
    finally:
        reader.close()


def _orphan_journal(root: Path, name: str, records: list[tuple[Partition, bytes]]) -> Path:
    d = root / "journal" / "open"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.jnl"
    path.write_bytes(b"".join(encode_tag(p) + f for p, f in records))
    return path


def test_recovery_cuts_a_torn_journal_tail(staging: Staging) -> None:
    good = frames(rows(0, 2), rows(2, 3))
    path = _orphan_journal(staging.root, "wdead-00000001", [(PARTS[0], good[0]), (PARTS[1], good[1])])
    with open(path, "ab") as f:
        f.write(encode_tag(PARTS[0]) + frames(rows(5, 4))[0][:-7])  # a commit that never completed
    report = staging.recover()
    assert report.truncated and report.truncated[0][0] == "wdead-00000001"
    assert read_all(staging.sealed_segments(PARTS[0])) == rows(0, 2)
    assert read_all(staging.sealed_segments(PARTS[1])) == rows(2, 3)
    assert not path.exists() and not (staging.root / "quarantine").exists()


def test_a_damaged_journal_is_quarantined_and_the_good_frames_around_the_damage_kept(staging: Staging) -> None:
    good = frames(rows(0, 2), rows(2, 3), rows(5, 1))
    path = _orphan_journal(staging.root, "wdead-00000002",
                           [(PARTS[0], good[0]), (PARTS[1], good[1]), (PARTS[0], good[2])])
    data = bytearray(path.read_bytes())
    middle = len(encode_tag(PARTS[0]) + good[0]) + len(encode_tag(PARTS[1])) + 60
    data[middle] ^= 0x01  # one flipped bit inside the second record's payload
    path.write_bytes(bytes(data))
    report = staging.recover()
    assert report.quarantined == ["wdead-00000002"]
    assert read_all(staging.sealed_segments(PARTS[0])) == [*rows(0, 2), *rows(5, 1)]
    assert staging.sealed_segments(PARTS[1]) == []
    q = staging.root / "quarantine" / "journal"
    assert (q / path.name).read_bytes() == bytes(data)
    rep = json.loads((q / (path.name + ".report.json")).read_text())
    assert rep["frames_good"] == 2 and rep["frames_bad"] == 1 and rep["rows_lost_estimate"] > 0


def test_emfile_opening_a_journal_is_staging_full_and_nothing_is_lost(
    staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.staging.commit as commit

    real_open = os.open

    def no_fds(path, flags, mode=0o777):
        if str(path).endswith(".jnl.new"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode)

    monkeypatch.setattr(commit.os, "open", no_fds)
    with pytest.raises(StagingFull, match="too many open files") as info:
        staging.append_sync(PARTS[0], rows(0, 2))
    assert info.value.retry_after_ms > 0
    monkeypatch.undo()
    assert staging.append_sync(PARTS[0], rows(0, 2)).accepted == 2  # the retry is not taken for a duplicate
    staging.seal_all()
    assert read_all(staging.sealed_segments(PARTS[0])) == rows(0, 2)


def test_the_descriptor_cap_refuses_appends_while_splits_lag(make_staging, monkeypatch) -> None:
    """With max_open_files=3 one sealed journal may wait for its split; the next seal must wait for it."""
    import pipeline.staging.split as split

    gate = threading.Event()
    real = split.settle_journal

    def slow(*a, **kw):
        assert gate.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(split, "settle_journal", slow)
    staging = make_staging(max_open_files=3, max_segment_bytes=1024)
    staging.append_sync(PARTS[0], rows(0, 30))  # full: sealed, its split held
    with pytest.raises(StagingFull, match="descriptor cap"):
        staging.append_sync(PARTS[0], rows(30, 1))
    gate.set()
    wait_for(lambda: len(staging._splitter) == 0, timeout=30, what="the held split to finish")
    assert staging.append_sync(PARTS[0], rows(30, 1)).accepted == 1
    staging.seal_all()
    assert read_all(staging.sealed_segments(PARTS[0])) == rows(0, 31)
