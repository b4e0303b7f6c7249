"""Small builders shared by the staging tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.journal import Row, encode_rows
from pipeline.model import Partition
from pipeline.staging import iter_batches

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
