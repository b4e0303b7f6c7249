"""pipeline/gzip_blocks.py writes, byte for byte, the gzip stream of isal's igzip_threaded, on threads it keeps."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
import time

import pytest
from isal import igzip_threaded

from pipeline import gzip_blocks
from pipeline.gzip_blocks import BlockGzipWriter

BLOCK = 64 * 1024
CSV = "".join(f"451256,UPSERT,USER_EMAIL,{hashlib.sha256(str(i).encode()).hexdigest()},1717494873000\n"
              for i in range(6000)).encode()

# Chunks as the CSV writer hands them: each at least one block, but the last. isal's stream is cut into blocks by
# its buffered writer, this one at every write: for such chunks the two cut the same blocks.
SAME_BLOCKS = {
    "one write of many blocks": [CSV],
    "a block and a half, then the rest": [CSV[: BLOCK + BLOCK // 2], CSV[BLOCK + BLOCK // 2 :]],
    "exactly one block, then the rest": [CSV[:BLOCK], CSV[BLOCK:]],
    "one small write": [CSV[:999]],
}
OTHER_WRITES = {
    "writes cut anywhere": [CSV[:5], CSV[5:70_000], CSV[70_000:70_001], CSV[70_001:]],
    "an empty write between two": [CSV[:1000], b"", CSV[1000:]],
    "nothing at all": [],
    "incompressible bytes": [os.urandom(3 * BLOCK + 17)],
}


def isal_stream(writes: list[bytes], level: int) -> bytes:
    out = io.BytesIO()
    with igzip_threaded.open(out, "wb", compresslevel=level, threads=2, block_size=BLOCK) as gz:
        for data in writes:
            gz.write(data)
    return out.getvalue()


def block_stream(writes: list[bytes], level: int) -> bytes:
    out = io.BytesIO()
    gz = BlockGzipWriter(out, level=level, threads=2, block_size=BLOCK)
    for data in writes:
        assert gz.write(memoryview(data)) == len(data)
    gz.close()
    return out.getvalue()


@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("case", list(SAME_BLOCKS))
def test_the_same_bytes_as_isal_threaded_gzip(case: str, level: int) -> None:
    writes = SAME_BLOCKS[case]
    ours = block_stream(writes, level)
    assert ours == isal_stream(writes, level)
    assert gzip.decompress(ours) == b"".join(writes)


@pytest.mark.parametrize("case", list(OTHER_WRITES))
def test_any_writes_give_a_valid_stream_that_depends_on_them_only(case: str) -> None:
    writes = OTHER_WRITES[case]
    ours = block_stream(writes, 1)
    assert gzip.decompress(ours) == b"".join(writes)
    assert block_stream(writes, 1) == ours


def test_threads_are_started_once_and_shared_by_every_stream() -> None:
    everyone = threading.Barrier(3)  # the pool starts its two threads as blocks come: both, now
    waits = [gzip_blocks._deflate_pool(2).submit(everyone.wait, 30) for _ in range(2)]
    everyone.wait(30)
    for w in waits:
        w.result(30)
    before = {t.ident for t in threading.enumerate() if t.name.startswith("filefeed-deflate")}
    streams = [BlockGzipWriter(io.BytesIO(), level=1, threads=2, block_size=BLOCK) for _ in range(5)]
    for gz in streams:
        gz.write(CSV)
    for gz in streams:
        gz.close()
    after = {t.ident for t in threading.enumerate() if t.name.startswith("filefeed-deflate")}
    assert before and after == before and len(after) <= 2


def test_interleaved_streams_each_get_their_own_bytes() -> None:
    """Two rolls of one process share the threads, never each other's blocks or dictionaries."""
    outs = [io.BytesIO(), io.BytesIO()]
    streams = [BlockGzipWriter(out, level=1, threads=2, block_size=BLOCK) for out in outs]
    halves = [CSV, CSV[::-1]]
    for start in range(0, len(CSV), 10_000):
        for gz, data in zip(streams, halves, strict=True):
            gz.write(data[start : start + 10_000])
    for gz in streams:
        gz.close()
    for out, data in zip(outs, halves, strict=True):
        assert out.getvalue() == block_stream([data[s : s + 10_000] for s in range(0, len(data), 10_000)], 1)
        assert gzip.decompress(out.getvalue()) == data


def test_a_discarded_stream_writes_nothing_more_and_refuses_writes() -> None:
    out = io.BytesIO()
    gz = BlockGzipWriter(out, level=1, threads=2, block_size=BLOCK)
    header = out.getvalue()
    gz.write(CSV)
    gz.discard()
    assert out.getvalue().startswith(header) and len(out.getvalue()) < len(isal_stream([CSV], 1))
    with pytest.raises(ValueError, match="closed"):
        gz.write(b"x")


def test_a_failed_block_fails_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(level: int, block: bytes, zdict: bytes) -> tuple[bytes, int]:
        raise MemoryError("no room to deflate")

    monkeypatch.setattr(gzip_blocks, "_deflate", broken)
    gz = BlockGzipWriter(io.BytesIO(), level=1, threads=2, block_size=BLOCK)
    with pytest.raises(MemoryError, match="no room"):
        gz.write(CSV)
        gz.close()


def test_a_forked_child_gets_deflate_threads_of_its_own() -> None:
    """Threads do not survive a fork: a child using the parent's pool would wait forever for its blocks."""
    block_stream([CSV], 1)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when its stream is right
        code = 1
        try:
            code = 0 if gzip.decompress(block_stream([CSV], 1)) == CSV else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's stream never finished")
    assert os.waitstatus_to_exitcode(done[1]) == 0
