"""gzip in pigz style on one pool of deflate threads per process.

A file's bytes are cut into blocks (each write, split at `block_size`); every block is deflated on a pool thread,
primed with the previous block's last 32 KiB and ended with a sync flush, and the blocks are written in order behind
a gzip header (mtime 0, no file name) and followed by the CRC and size. This is the stream isal's `igzip_threaded`
writes. When every write but the last is at least one block (the CSV writer's chunks of 32,768 rows, whenever a row
takes 8 bytes or more) the two cut the same blocks and the bytes are the same (tests/unit/test_gzip_blocks.py), so
files do not change; any other input gives a valid stream that depends on the input only. What changes: isal starts three threads for every file (about 2 ms a
file while the GIL is busy, a third of encoding a 100-row file, and its threads poll their queues); here the deflate
threads are started once and shared by every roll of the process. isal releases the GIL while it deflates, so the
pool's threads use both cores.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from isal import isal_zlib

WINDOW_BYTES = 32 * 1024  # deflate's window: what a block may refer back to
# A block deflates in milliseconds: waiting longer than this for one means the process is in deep trouble, and the
# roll fails (transient) instead of waiting forever.
BLOCK_TIMEOUT_SECONDS = 120.0

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


class _Raw(Protocol):
    def write(self, data: Any, /) -> int: ...


def _deflate_pool(threads: int) -> ThreadPoolExecutor:
    """The process's deflate threads (made again in a forked child: threads do not survive a fork)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="filefeed-deflate")
            _pool_pid = os.getpid()
        return _pool


def _deflate(level: int, block: bytes, zdict: bytes) -> tuple[bytes, int]:
    if zdict:
        compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15, zdict=zdict)
    else:
        compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    return compressor.compress(block) + compressor.flush(isal_zlib.Z_SYNC_FLUSH), isal_zlib.crc32(block)


class BlockGzipWriter:
    """A write-only gzip stream into `raw`. One thread writes to it; at most 2 x `threads` blocks are in flight."""

    def __init__(self, raw: _Raw, *, level: int, threads: int, block_size: int):
        self.raw = raw
        self.level = level
        self.block_size = block_size
        self._pool = _deflate_pool(threads)
        self._depth = 2 * threads
        self._in_flight: deque[tuple[Future[tuple[bytes, int]], int]] = deque()
        self._previous = b""
        self._crc = 0
        self._size = 0
        self.closed = False
        raw.write(struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, 0xFF, 4 if level == 0 else 0))

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed gzip stream")
        view = memoryview(data).cast("B")
        length = view.nbytes
        for start in range(0, length, self.block_size) if length else (0,):
            block = bytes(view[start : start + self.block_size])
            zdict, self._previous = self._previous[-WINDOW_BYTES:], block
            self._in_flight.append((self._pool.submit(_deflate, self.level, block, zdict), len(block)))
            while len(self._in_flight) > self._depth:
                self._write_next()
        return length

    def _write_next(self) -> None:
        future, length = self._in_flight.popleft()
        compressed, crc = future.result(timeout=BLOCK_TIMEOUT_SECONDS)
        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
        self._size += length
        self.raw.write(compressed)

    def close(self) -> None:
        """Write every block in flight, the final empty block and the trailer."""
        if self.closed:
            return
        while self._in_flight:
            self._write_next()
        self.raw.write(isal_zlib.compress(b"", wbits=-15))
        self.raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        self.closed = True

    def discard(self) -> None:
        """Give up the stream (the file is thrown away): drop the blocks in flight, write nothing more."""
        for future, _ in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self.closed = True
