"""The inline commit mode the server uses: appends of one event-loop iteration share one write + fsync on the loop."""

from __future__ import annotations

import asyncio
import os

import pytest

from pipeline.staging import Staging, StagingClosed, StagingFull
from tests.conftest import wait_for
from tests.staging.helpers import P2, P, journal_rows, journal_scan, read_all, row, rows


def _is_file(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


@pytest.fixture
def inline(make_staging) -> Staging:
    return make_staging(inline_commit=True)


def test_one_loop_iteration_one_frame_one_fsync(inline: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    file_syncs: list[int] = []

    def fsync(fd: int) -> None:
        if _is_file(fd):
            file_syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main():
        return await asyncio.gather(*(inline.append(P, rows(2 * i, 2)) for i in range(300)))

    results = asyncio.run(main())
    assert len(file_syncs) == 1 and inline.syncs == 1
    path = inline.segment_path(P, results[0].segment, "open")
    assert [f.rows for f in journal_scan(path).frames[P]] == [600]
    assert journal_rows(path) == rows(0, 600)


def test_no_acknowledgement_before_the_fsync(inline: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    seen: dict[str, bool] = {}

    async def main() -> None:
        task = asyncio.create_task(inline.append(P, rows(0, 1)))

        def fsync(fd: int) -> None:
            if _is_file(fd):
                seen["task_done_during_fsync"] = task.done()
                seen["bytes_written_before_fsync"] = os.fstat(fd).st_size > 0
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        res = await task
        assert res.accepted == 1

    asyncio.run(main())
    assert seen == {"task_done_during_fsync": False, "bytes_written_before_fsync": True}


def test_inline_and_sync_callers_together_and_dedup(make_staging) -> None:
    st = make_staging(inline_commit=True)

    async def main() -> None:
        def in_thread(k: int) -> None:
            for i in range(50):
                st.append_sync(P2, [row(k * 1000 + i)])

        threads = [asyncio.to_thread(in_thread, k) for k in range(3)]
        await asyncio.gather(*threads, *(st.append(P, [row(i)]) for i in range(300)))
        again = await st.append(P, [row(5)])  # a retried request: dropped by the window
        assert (again.accepted, again.duplicates) == (0, 1)

    asyncio.run(main())
    st.seal_all()
    assert sorted(read_all(st.sealed_segments(P))) == rows(0, 300)
    assert len(read_all(st.sealed_segments(P2))) == 150


def test_inline_segments_are_sealed_by_age(make_staging) -> None:
    st = make_staging(inline_commit=True, seal_after_seconds=0.05)

    async def main():
        return await st.append(P, rows(0, 3))

    res = asyncio.run(main())
    wait_for(lambda: st.segment_state(P, res.segment) == "sealed", timeout=10, what="age seal of an inline segment")
    assert read_all(st.sealed_segments(P)) == rows(0, 3)


def test_continuous_inline_appends_keep_being_sealed_by_age(make_staging) -> None:
    """A segment opened by an inline commit while the committer seals another must still get its age seal."""
    st = make_staging(inline_commit=True, seal_after_seconds=0.02)

    async def main() -> set[str]:
        refs: set[str] = set()
        i = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:
            res = await st.append(P, rows(i, 1))
            refs.add(res.segment)
            i += 1
        return refs

    refs = asyncio.run(main())
    assert len(refs) > 5  # many age seals happened while appending
    wait_for(lambda: all(st.segment_state(P, r) == "sealed" for r in refs), timeout=5,
             what="every segment sealed by age after the appends stop")


def test_submit_refuses_before_queuing_and_its_future_is_the_commit(make_staging) -> None:
    full = make_staging(inline_commit=True, min_free_bytes=1 << 62, root=make_staging().root)
    st = make_staging(inline_commit=True)

    async def main() -> None:
        with pytest.raises(StagingFull):
            full.submit(P, rows(0, 1))  # raised at the call, not from the future
        assert full._inline_pending == []
        fut = st.submit(P, rows(0, 2))
        assert not fut.done()  # nothing is answered before its commit
        res = await fut
        assert (res.accepted, res.duplicates) == (2, 0)
        assert journal_rows(st.segment_path(P, res.segment, "open")) == rows(0, 2)

    asyncio.run(main())


@pytest.mark.parametrize("inline_commit", [True, False], ids=["inline", "thread"])
def test_an_unexpected_error_in_a_commit_is_every_callers_error(make_staging, monkeypatch: pytest.MonkeyPatch,
                                                                 inline_commit: bool) -> None:
    """Not only OSError: whatever stops a commit after the dedup step, no caller of it gets an acknowledgement."""
    st = make_staging(inline_commit=inline_commit)
    import pipeline.staging.commit as staging_mod

    real_write_all = staging_mod.write_all

    def broken_write_all(fd: int, data: bytes) -> None:
        raise RuntimeError("injected")

    async def main() -> list[object]:
        monkeypatch.setattr(staging_mod, "write_all", broken_write_all)
        first = await asyncio.gather(*(st.append(P, rows(i, 1)) for i in range(5)), return_exceptions=True)
        monkeypatch.setattr(staging_mod, "write_all", real_write_all)
        after = await st.append(P, rows(0, 5))  # nothing of the failed commit was remembered as a duplicate
        assert (after.accepted, after.duplicates) == (5, 0)
        return first

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results), results
    st.seal_all()
    assert read_all(st.sealed_segments(P)) == rows(0, 5)


def test_a_staging_refuses_appends_in_a_forked_child(make_staging) -> None:
    st = make_staging(inline_commit=True)
    st.append_sync(P, rows(0, 1))
    pid = os.fork()
    if pid == 0:  # the child: every append must be refused, nothing written
        code = 1
        try:
            st.append_sync(P, rows(1, 1))
        except StagingClosed:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert st.append_sync(P, rows(2, 1)).accepted == 1  # the parent goes on
    st.seal_all()
    assert read_all(st.sealed_segments(P)) == [row(0), row(2)]
