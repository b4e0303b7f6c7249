"""Append, group commit, acknowledgement order, dedup and sealing."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time

import pytest

from pipeline.journal import clean_value, encode_tag, is_clean_value
from pipeline.staging import AppendResult, Staging, count_rows, iter_rows
from tests.conftest import wait_for
from tests.staging.helpers import P2, P, hold_first_fsync, journal_rows, journal_scan, read_all, row, rows, table


def _is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def test_round_trip_keeps_values_and_types(staging: Staging) -> None:
    special = ("phone", "00123", -5, "", "dm 1", "ü∂ 😀 x\x0by")  # leading zeros, empty, unicode, vertical tab
    r1 = staging.append_sync(P, rows(0, 3))
    r2 = staging.append_sync(P, [special])
    r3 = staging.append_sync(P2, rows(100, 2))
    assert (r1.accepted, r1.duplicates) == (3, 0)
    assert r1.segment == r2.segment == r3.segment  # one journal for every partition of the writer
    assert r1.segment.startswith(staging.writer_id + "-")
    staging.seal_all()
    assert staging.partitions() == sorted([P, P2])
    paths = staging.sealed_segments(P)
    assert [p.stem for p in paths] == [r1.segment]
    assert read_all(paths) == [*rows(0, 3), special]
    t = table(paths)
    assert str(t.schema.field("ts").type) == "int64" and str(t.schema.field("identifier").type) == "string"
    assert list(iter_rows(paths[0])) == [*rows(0, 3), special]
    assert count_rows(paths[0]) == 4
    assert read_all(staging.sealed_segments(P2)) == rows(100, 2)


def test_segment_is_readable_with_head(staging: Staging) -> None:
    res = staging.append_sync(P, rows(0, 2))
    path = staging.segment_path(P, res.segment, "open")
    tag, first, second, third = path.read_bytes().split(b"\n")[:4]
    assert tag.decode().split(" ")[:3] == ["@feed1", "seg1", "UPSERT"]
    crc, length, nrows, ts = first.decode().lstrip("#").split(" ")
    assert len(crc) == 8 and int(length) == len(second) + len(third) + 2 and nrows == "2" and int(ts) > 0
    assert second.decode().split("\t") == [str(v) for v in row(0)]


def test_stats_counts_rows_bytes_and_oldest_frame(staging: Staging) -> None:
    staging.append_sync(P, rows(0, 3))
    staging.seal_all()
    res = staging.append_sync(P, rows(3, 2))
    st = staging.stats(P)
    assert (st.rows, st.open_segments, st.sealed_segments) == (5, 1, 1)
    sealed = staging.sealed_segments(P)[0]
    journal = staging.segment_path(P, res.segment, "open")
    assert st.bytes == sealed.stat().st_size + journal.stat().st_size - len(encode_tag(P))
    first_header = sealed.read_bytes().split(b"\n", 1)[0]
    assert st.oldest_ts_ms == int(first_header.split(b" ")[3])


def test_rows_with_forbidden_characters_are_refused_before_anything_is_written(staging: Staging) -> None:
    for bad in ("a\tb", "a\nb", "a\rb", "a\0b"):
        with pytest.raises(ValueError, match="identifier"):
            staging.append_sync(P, [row(0, ident=bad)])
        assert not is_clean_value(bad)
        with pytest.raises(ValueError):
            clean_value(bad)
    with pytest.raises(ValueError, match="int ts"):
        staging.append_sync(P, [("email", "x", "12", "s", "d", "u")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        staging.append_sync(P, [("email", "\ud800", 1, "s", "d", "u")])  # lone surrogate: not UTF-8
    assert clean_value("fine value") == "fine value"
    assert staging.partitions() == []


def test_group_commit_writes_one_frame_and_one_fsync_for_many_concurrent_appends(
    staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_syncs, entered, gate = hold_first_fsync(monkeypatch)

    async def main() -> list[AppendResult]:
        first = asyncio.create_task(staging.append(P, rows(0, 2)))
        assert await asyncio.to_thread(entered.wait, 10)
        others = [asyncio.create_task(staging.append(P, rows(2 + 2 * i, 2))) for i in range(500)]
        while len(staging._pending) < 500:  # every task has queued its rows
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *others)

    results = asyncio.run(main())
    assert len(file_syncs) == 2  # 501 acknowledged appends, two fsyncs of the segment
    assert staging.commits == 2 and staging.syncs == 2
    assert {r.segment for r in results} == {results[0].segment}
    path = staging.segment_path(P, results[0].segment, "open")
    scan = journal_scan(path)
    assert scan.valid and [f.rows for f in scan.frames[P]] == [2, 1000]  # the 500 queued appends became one frame
    assert journal_rows(path) == rows(0, 1002)


def test_no_acknowledgement_before_fsync_returns(staging: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    entered, gate = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if _is_file(fd):
            entered.set()
            assert gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main() -> None:
        task = asyncio.create_task(staging.append(P, rows(0, 1)))
        assert await asyncio.to_thread(entered.wait, 10)
        await asyncio.sleep(0)
        # The committer sits inside fsync: the rows are written, yet the request is not answered.
        assert staging.open_segments(P)[0].stat().st_size > 0
        assert not task.done()
        sync_done = threading.Event()
        thread = threading.Thread(target=lambda: (staging.append_sync(P, rows(1, 1)), sync_done.set()))
        thread.start()
        assert not sync_done.is_set()
        gate.set()
        res = await task
        assert res.accepted == 1
        await asyncio.to_thread(thread.join, 10)
        assert sync_done.is_set()

    asyncio.run(main())


def test_sync_and_async_callers_share_the_committer(staging: Staging) -> None:
    async def main() -> None:
        def in_thread(k: int) -> None:
            for i in range(50):
                staging.append_sync(P2, [row(k * 1000 + i)])

        threads = [asyncio.to_thread(in_thread, k) for k in range(3)]
        await asyncio.gather(*threads, *(staging.append(P, [row(i)]) for i in range(300)))

    asyncio.run(main())
    staging.seal_all()
    assert sorted(read_all(staging.sealed_segments(P))) == rows(0, 300)
    assert len(read_all(staging.sealed_segments(P2))) == 150


def test_dedup_drops_a_retried_request_within_the_window(make_staging) -> None:
    staging = make_staging(dedup_window=4)
    first = staging.append_sync(P, rows(0, 2))
    retry = staging.append_sync(P, rows(0, 2))
    assert (retry.accepted, retry.duplicates, retry.segment) == (0, 2, first.segment)
    partial = staging.append_sync(P, rows(1, 2))  # one seen, one new
    assert (partial.accepted, partial.duplicates) == (1, 1)
    same_request_twice = staging.append_sync(P, [row(10), row(10)])
    assert (same_request_twice.accepted, same_request_twice.duplicates) == (1, 1)
    # Not duplicates: another ts (user re-added later), another session, another partition.
    later = (*row(0)[:2], row(0)[2] + 1, *row(0)[3:])
    assert staging.append_sync(P, [later]).accepted == 1
    assert staging.append_sync(P, [row(0, session="s2")]).accepted == 1
    assert staging.append_sync(P2, [row(0)]).accepted == 1
    # The window is bounded: row 0's key has been pushed out by 4 newer keys of P.
    assert staging.append_sync(P, [row(0)]).accepted == 1
    staging.seal_all()
    assert len(read_all(staging.sealed_segments(P))) == 2 + 1 + 1 + 1 + 1 + 1


def test_dedup_off(make_staging) -> None:
    staging = make_staging(dedup_window=0)
    staging.append_sync(P, rows(0, 2))
    assert staging.append_sync(P, rows(0, 2)).accepted == 2


def test_seal_by_age(make_staging) -> None:
    staging = make_staging(seal_after_seconds=0.05)
    res = staging.append_sync(P, rows(0, 2))
    wait_for(lambda: staging.segment_state(P, res.segment) == "sealed", timeout=10, what="age seal")
    assert staging.open_segments(P) == []
    nxt = staging.append_sync(P, rows(2, 1))
    assert nxt.segment != res.segment


def test_seal_by_size_happens_before_the_acknowledgement(make_staging) -> None:
    staging = make_staging(max_segment_bytes=2048)
    small = staging.append_sync(P, rows(0, 2))
    assert staging.segment_state(P, small.segment) == "open"
    big = staging.append_sync(P, rows(2, 40))
    assert big.segment == small.segment
    assert staging.append_sync(P, rows(42, 1)).segment != big.segment  # sealed before big was answered
    wait_for(lambda: staging.segment_state(P, big.segment) == "sealed", timeout=10, what="split of the full journal")


def test_seal_all_and_close_seal_every_open_segment(make_staging) -> None:
    staging = make_staging()
    a = staging.append_sync(P, rows(0, 1))
    b = staging.append_sync(P2, rows(1, 1))
    staging.seal_all()
    assert staging.segment_state(P, a.segment) == staging.segment_state(P2, b.segment) == "sealed"
    c = staging.append_sync(P, rows(2, 1))
    staging.close()
    assert staging.segment_state(P, c.segment) == "sealed"
    assert staging.open_segments(P) == []
    with pytest.raises(RuntimeError):
        staging.append_sync(P, rows(3, 1))


def test_wait_sealed_seals_own_segments_at_once(make_staging) -> None:
    staging = make_staging(seal_after_seconds=3600)
    res = staging.append_sync(P, rows(0, 1))
    assert staging.wait_sealed(P, [res.segment], timeout=10) == {res.segment: "sealed"}

    res2 = staging.append_sync(P, rows(1, 1))

    async def main() -> dict[str, str | None]:
        return await staging.wait_sealed_async(P, [res2.segment, "w1-00000099"], timeout=10)

    assert asyncio.run(main()) == {res2.segment: "sealed", "w1-00000099": None}


def test_wait_sealed_on_another_live_writer(make_staging) -> None:
    fast = make_staging(seal_after_seconds=0.05)
    reader = make_staging()
    b = fast.append_sync(P, rows(1, 1))
    assert reader.wait_sealed(P, [b.segment], timeout=10) == {b.segment: "sealed"}


def test_wait_sealed_asks_another_live_writer_to_seal_now(make_staging, tmp_path) -> None:
    """A live writer keeps its lock, so only it may seal its segment: the waiter asks (run/seal-requests/), and the
    owner seals at once instead of at the segment's age, an hour away here."""
    slow = make_staging(seal_after_seconds=3600)
    reader = make_staging()
    a = slow.append_sync(P, rows(0, 1))
    started = time.monotonic()
    assert reader.wait_sealed(P, [a.segment], timeout=30) == {a.segment: "sealed"}
    assert time.monotonic() - started < 5
    b = slow.append_sync(P, rows(1, 1))
    assert b.segment != a.segment

    async def main() -> dict[str, str | None]:
        return await reader.wait_sealed_async(P, [b.segment], timeout=30)

    assert asyncio.run(main()) == {b.segment: "sealed"}
    requests = tmp_path / "staging" / "run" / "seal-requests"
    assert [p for p in requests.rglob("*") if p.is_file()] == []  # served or withdrawn, never left behind
    # the slow writer's next segment is untouched by the old requests
    c = slow.append_sync(P, rows(2, 1))
    assert reader.segment_state(P, c.segment) == "open"
