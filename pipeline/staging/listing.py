"""Listing staged rows: which partitions hold rows, their sealed segments, and rows still in writer journals."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pipeline.journal import MAX_HEADER_BYTES, MAX_TAG_BYTES, parse_header, parse_tag
from pipeline.layout import (
    OPEN,
    SEALED,
    SUFFIX,
    iter_partition_dirs,
    journal_dir,
    partition_dir,
    segment_files,
    sort_key,
)
from pipeline.model import Partition
from pipeline.staging.reading import header_totals, read_fd
from pipeline.staging.results import PartitionStats


class _Indexed:
    __slots__ = ("ino", "offset", "parts")

    def __init__(self, ino: int):
        self.ino = ino
        self.offset = 0
        self.parts: dict[Partition, list[int]] = {}  # [rows, frame bytes, ts of the first frame]


class JournalIndex:
    """Rows per partition in the writer journals, from their tags and frame headers (no checksums).

    Incremental: a journal is read once, then only the bytes appended since the last look.
    """

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, _Indexed] = {}
        self._lock = threading.Lock()

    def refresh(self) -> dict[str, dict[Partition, list[int]]]:
        """{journal name: {partition: [rows, bytes, first ts]}} for every journal not yet split."""
        paths = segment_files(journal_dir(self.root))
        with self._lock:
            seen = {}
            for path in paths:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                c = self._cache.get(path.stem)
                if c is None or c.ino != st.st_ino or st.st_size < c.offset:
                    c = _Indexed(st.st_ino)
                if st.st_size > c.offset:
                    try:
                        _index_more(path, c, st.st_size)
                    except FileNotFoundError:
                        continue
                seen[path.stem] = c
            self._cache = seen
            return {name: c.parts for name, c in seen.items()}


# The index reads a journal this much at a time: a pre-written journal's room (zeros) is never read whole.
INDEX_READ_BYTES = 1024 * 1024


def _index_more(path: Path, c: _Indexed, size: int) -> None:
    """Index the records of `path` after `c.offset`, up to `size`; stops at a record being written or at the room."""
    with open(path, "rb", buffering=0) as f:
        want = INDEX_READ_BYTES
        while c.offset < size:
            data = read_fd(f.fileno(), min(size, c.offset + want), c.offset)
            pos, cut = _index_records(data, c)
            c.offset += pos
            if pos == len(data) and data:
                continue  # whole records to the end of what was read: read on
            if not cut or c.offset + len(data) - pos >= size:
                return  # the room, or the end of the file: a commit being written
            want = max(want, 2 * (len(data) - pos))  # a record longer than what was read: read it whole


def _index_records(data: bytes, c: _Indexed) -> tuple[int, bool]:
    """(bytes of whole records at the start of `data`, whether the next one is cut short by the end of `data`)."""
    pos, end = 0, len(data)
    while pos < end:
        tag = parse_tag(data, pos, min(end, pos + MAX_TAG_BYTES))
        if tag is None:
            return pos, end - pos < MAX_TAG_BYTES and data[pos] != 0
        h = parse_header(data, pos + tag[1], min(end, pos + tag[1] + MAX_HEADER_BYTES))
        if h is None:
            return pos, end - pos - tag[1] < MAX_HEADER_BYTES
        _, plen, rows, ts, hlen = h
        stop = pos + tag[1] + hlen + plen
        if stop > end:
            return pos, True
        t = c.parts.setdefault(tag[0], [0, 0, ts])
        t[0] += rows
        t[1] += hlen + plen
        pos = stop
    return pos, False


def partitions(root: Path, index: JournalIndex) -> list[Partition]:
    """Partitions holding rows: in sealed segments, old-layout open segments, or writer journals."""
    out = {p for p, pdir in iter_partition_dirs(root) if segment_files(pdir / SEALED) or segment_files(pdir / OPEN)}
    for parts in index.refresh().values():
        out.update(parts)
    return sorted(out)


def sealed_segments(root: Path, partition: Partition) -> list[Path]:
    """Sealed segment files of every writer, ordered by (writer, seq)."""
    return sorted(segment_files(partition_dir(root, partition) / SEALED), key=sort_key)


def open_segments(root: Path, partition: Partition, index: JournalIndex) -> list[Path]:
    """Where rows of `partition` wait to be split: writer journals (and old-layout open segments)."""
    pdir = partition_dir(root, partition)
    jdir = journal_dir(root)
    out = segment_files(pdir / OPEN)
    out += [jdir / (name + SUFFIX) for name, parts in index.refresh().items()
            if partition in parts and not (pdir / SEALED / (name + SUFFIX)).exists()]
    return sorted(out, key=sort_key)


# (path, size, mtime) -> header_totals of that segment. A sealed segment never changes once renamed in (a repair that
# cuts it changes its size and mtime), so the gauges, which list every partition every few seconds, read each segment
# once instead of every pass: a busy partition gains a segment per worker per second until its next roll.
_TOTALS: dict[tuple[str, int, int], tuple[int, int, int | None]] = {}
_MAX_TOTALS = 65_536
_TOTALS_LOCK = threading.Lock()


def _segment_totals(path: Path) -> tuple[int, int, int | None]:
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    totals = _TOTALS.get(key)
    if totals is None:
        totals = header_totals(path)
        with _TOTALS_LOCK:
            if len(_TOTALS) >= _MAX_TOTALS:
                _TOTALS.clear()
            _TOTALS[key] = totals
    return totals


def stats(root: Path, partition: Partition, index: JournalIndex) -> PartitionStats:
    """Rows, bytes and oldest frame time of the partition's sealed segments and of its rows in writer journals."""
    pdir = partition_dir(root, partition)
    rows = size = 0
    oldest: int | None = None
    sealed = segment_files(pdir / SEALED)
    legacy = segment_files(pdir / OPEN)
    for path in sealed + legacy:
        try:
            r, b, first = _segment_totals(path)
        except FileNotFoundError:
            continue
        rows += r
        size += b
        if first is not None and (oldest is None or first < oldest):
            oldest = first
    split = {p.name for p in sealed}
    in_journals = 0
    for name, parts in index.refresh().items():
        t = parts.get(partition)
        if t is None or name + SUFFIX in split:  # split already: counted in sealed/
            continue
        in_journals += 1
        rows += t[0]
        size += t[1]
        if oldest is None or t[2] < oldest:
            oldest = t[2]
    return PartitionStats(rows, size, oldest, in_journals + len(legacy), len(sealed))
