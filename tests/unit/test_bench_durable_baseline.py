"""bench/ingest.py's durable baseline really waits for a shared write + fsync before answering."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from bench.bare_app import ROW_BYTES, _GroupCommit, create_durable_app


def test_concurrent_waiters_share_one_write_and_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_DURABLE_DIR", str(tmp_path))
    real_fsync = os.fsync
    synced_sizes: list[int] = []

    def fsync(fd: int) -> None:
        synced_sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main() -> None:
        group = _GroupCommit()
        waits = [group.wait() for _ in range(50)]
        assert not any(w.done() for w in waits)  # nobody is answered before the commit
        await asyncio.gather(*waits)
        assert Path(group.path).stat().st_size == 50 * 2 * ROW_BYTES

    asyncio.run(main())
    assert synced_sizes == [50 * 2 * ROW_BYTES]


def test_a_pre_written_file_is_overwritten_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`durable-room`: the commits overwrite the zeros from the start; the file never grows within its room."""
    monkeypatch.setenv("BENCH_DURABLE_DIR", str(tmp_path))
    monkeypatch.setenv("BENCH_ROOM_BYTES", str(3 * 1024 * 1024 + 5))

    async def main() -> Path:
        group = _GroupCommit()
        assert Path(group.path).stat().st_size == 3 * 1024 * 1024 + 5
        for _ in range(2):
            await asyncio.gather(*(group.wait() for _ in range(50)))
        return Path(group.path)

    data = asyncio.run(main()).read_bytes()
    used = 2 * 50 * 2 * ROW_BYTES
    assert len(data) == 3 * 1024 * 1024 + 5 and data[:used] == b"x" * used and set(data[used:]) == {0}


def test_the_durable_endpoint_answers_like_the_bare_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_DURABLE_DIR", str(tmp_path))

    async def main() -> None:
        transport = httpx.ASGITransport(app=create_durable_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            answers = await asyncio.gather(*(client.post("/v1/user_segment_update", json={"feed_id": "42"})
                                             for _ in range(10)))
        assert [a.status_code for a in answers] == [200] * 10
        assert answers[0].json() == {"status": "ok", "data": [], "stats": []}

    asyncio.run(main())
    (data,) = list(tmp_path.glob("durable-baseline-*.bin"))
    assert data.stat().st_size == 10 * 2 * ROW_BYTES
