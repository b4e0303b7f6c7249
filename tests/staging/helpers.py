"""Small builders shared by the staging tests."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.journal import JournalScan, Row, encode_rows, scan_journal
from pipeline.model import Partition
from pipeline.staging import iter_batches, iter_rows

P = Partition("feed1", "seg1", "UPSERT")
P2 = Partition("feed1", "seg1", "DELETE")


def row(i: int, *, session: str = "sess", ident: str | None = None) -> Row:
    return (
        "email_sha256",
        ident if ident is not None else f"id-{i:06d}",
        1_700_000_000_000 + i,
        session,
        "dm1",
        f"up{i}",
    )


def rows(start: int, n: int) -> list[Row]:
    return [row(i) for i in range(start, start + n)]


def read_all(paths: list[Path]) -> list[Row]:
    """Every row of `paths` through the roll reader, as tuples."""
    out: list[Row] = []
    for batch in iter_batches(paths):
        cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        out.extend(zip(*cols, strict=True))
    return out


def journal_rows(path: Path, partition: Partition = P) -> list[Row]:
    """Rows of `partition` in a writer journal."""
    return list(iter_rows(path, partition))


def journal_scan(path: Path) -> JournalScan:
    return scan_journal(path.read_bytes())


def table(paths: list[Path]) -> pa.Table:
    return pa.Table.from_batches(list(iter_batches(paths)))


def frames(*groups: list[Row], ts_ms: int = 1_700_000_000_000) -> list[bytes]:
    return [encode_rows(g, ts_ms) for g in groups]


def orphan(root: Path, partition: Partition, name: str, data: bytes, state: str = "open") -> Path:
    """A segment left behind by a writer that is gone (no flock held on it)."""
    d = root / partition.relpath / state
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.jnl"
    path.write_bytes(data)
    return path


def hold_first_fsync(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], threading.Event, threading.Event]:
    """Count fsyncs of regular files and hold the first one until `gate` is set, so every other request queues
    behind it: returns (file fsyncs so far, entered, gate)."""
    real_fsync = os.fsync
    file_syncs: list[int] = []
    entered, gate = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            file_syncs.append(fd)
            if len(file_syncs) == 1:
                entered.set()
                assert gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return file_syncs, entered, gate


def fill_the_volume_mid_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on a write to a regular file writes half its bytes, then the volume is full (ENOSPC)."""
    real_write = os.write

    def short_then_full(fd: int, data: bytes) -> int:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if len(data) > 1:
                return real_write(fd, memoryview(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_full)
