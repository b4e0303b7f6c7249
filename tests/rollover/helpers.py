"""Helpers for the rollover tests: stage segments in the journal format, read what reached the destination."""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from config.feed import FeedProperties
from pipeline.journal import Row, encode_rows
from pipeline.model import Partition
from sinks.base import PublishResult
from sinks.local import LocalSink

BASE_MS = 1_700_000_000_000


def make_rows(n: int, start: int = 0, *, identifier_type: str = "USER_EMAIL", datamart_id: str = "1509") -> list[Row]:
    return [
        (identifier_type, f"{i:064x}", BASE_MS + i, f"sess-{i // 100}", datamart_id, f"up-{i}")
        for i in range(start, start + n)
    ]


def stage_segment(
    root: Path, partition: Partition, name: str, rows: Sequence[Row], *, frame_rows: int = 1000, ts_ms: int = BASE_MS
) -> Path:
    """Write one sealed segment in the staging frame format (journal.encode_rows), whole or not at all."""
    sealed = root / partition.relpath / "sealed"
    sealed.mkdir(parents=True, exist_ok=True)
    data = b"".join(encode_rows(rows[i : i + frame_rows], ts_ms + i) for i in range(0, len(rows), frame_rows))
    temp = sealed / f".{name}.tmp"
    temp.write_bytes(data)
    os.replace(temp, sealed / name)
    return sealed / name


def props_for(dest: Path, **overrides: object) -> FeedProperties:
    return FeedProperties(destination_uri=f"file://{dest}", **overrides)


def decode_file(name: str, data: bytes) -> list[dict[str, str]]:
    """Rows of one published file as dicts of strings (header -> value), whatever its format."""
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        return [{k: "" if v is None else str(v) for k, v in row.items()} for row in table.to_pylist()]
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    text = data.decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def destination_files(dest: Path) -> dict[str, bytes]:
    """Every visible file under `dest` by relative name; fails on any leftover temp/hidden file."""
    out: dict[str, bytes] = {}
    for path in sorted(dest.rglob("*")):
        if path.is_file():
            rel = path.relative_to(dest).as_posix()
            assert not any(seg.startswith(".") for seg in rel.split("/")), f"temp/hidden file left: {rel}"
            out[rel] = path.read_bytes()
    return out


def destination_rows(dest: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name, data in destination_files(dest).items():
        if not name.endswith(".manifest.json"):
            rows.extend(decode_file(name, data))
    return rows


class ScriptedSink(LocalSink):
    """A local-folder sink that raises the queued errors on its next publish calls, optionally after publishing."""

    def __init__(
        self, props: FeedProperties, errors: Iterable[BaseException] = (), *, fail_after_publish: bool = False
    ):
        super().__init__(props)
        self.errors = list(errors)
        self.fail_after_publish = fail_after_publish
        self.calls: list[str] = []

    def publish(self, local_path: Path, name: str) -> PublishResult:
        self.calls.append(name)
        if self.errors and not self.fail_after_publish:
            raise self.errors.pop(0)
        result = super().publish(local_path, name)
        if self.errors:
            raise self.errors.pop(0)
        return result
