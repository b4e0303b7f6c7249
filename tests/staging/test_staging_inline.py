"""The inline commit mode the server uses: appends of one event-loop iteration share one write + fsync on the loop."""

from __future__ import annotations

import asyncio
import os

import pytest

from pipeline.staging import Staging, verify_segment
from tests.conftest import wait_for
from tests.staging.helpers import P2, P, read_all, row, rows


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
    assert [f.rows for f in verify_segment(path).frames] == [600]
    assert read_all([path]) == rows(0, 600)


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
