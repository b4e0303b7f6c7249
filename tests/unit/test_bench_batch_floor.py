"""bench/batch_update.py's durable floor really does the durable part: every row fsynced in staging, then one
complete file published by fsync + rename, before its answer counts the rows."""

from __future__ import annotations

import asyncio
import gzip
import os
from pathlib import Path

import orjson
import pytest

from bench.bare_batch import _DurableBatch, _DurableBatchEndpoint
from bench.batch_update import batch, item


def test_rows_are_staged_and_published_durably_before_the_answer(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_FLOOR_DIR", str(tmp_path))
    work = _DurableBatch()
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: os.PathLike, dst: os.PathLike) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    answer = orjson.loads(work.deliver(batch([item(i) for i in range(25)])))

    assert answer == {"status": "OK", "sent_items_in_success": 25, "sent_items_in_error": 0}
    (published,) = (tmp_path / "out").iterdir()
    (staged,) = tmp_path.glob("staging-*.tsv")
    assert [kind for kind, _ in events] == ["fsync", "fsync", "rename", "fsync"]
    assert events[0][1] == str(staged)  # staged rows first
    assert events[1][1].endswith(".tmp") and events[2][1] == str(published)  # a complete file, then its name
    assert events[3][1] == str(tmp_path / "out")  # and the name itself
    assert len(staged.read_text().splitlines()) == 25
    lines = gzip.decompress(published.read_bytes()).decode().splitlines()
    assert lines[0] == "segment_id,operation,identifier_type,identifier,ts" and len(lines) == 26


def test_the_endpoint_answers_from_the_loop_after_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_FLOOR_DIR", str(tmp_path))
    endpoint = _DurableBatchEndpoint()

    class Exchange:
        def __init__(self, done: asyncio.Future) -> None:
            self.done = done

        def respond(self, response) -> None:  # type: ignore[no-untyped-def]
            self.done.set_result((response.status_code, orjson.loads(response.body)))

    async def main() -> tuple[int, dict]:
        done = asyncio.get_running_loop().create_future()
        endpoint.serve(None, batch([item(i) for i in range(3)]), Exchange(done))
        assert not done.done()  # answered only when the thread's work is done
        return await asyncio.wait_for(done, 30)

    code, answer = asyncio.run(main())
    assert (code, answer["sent_items_in_success"]) == (200, 3)
    assert len(list((tmp_path / "out").iterdir())) == 1
