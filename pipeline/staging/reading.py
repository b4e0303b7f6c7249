"""Reading staged segments: streaming frame checks, record batches for rolls, rows and totals for tools."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.journal import (
    MAX_HEADER_BYTES,
    Frame,
    FrameError,
    SegmentScan,
    check_frame,
    iter_payload_lines,
    parse_header,
    scan_buffer,
    scan_journal,
)
from pipeline.layout import Row
from pipeline.model import STAGED_FIELDS, STAGED_SCHEMA, Partition
from pipeline.staging.results import CorruptSegment

MiB = 1024 * 1024
# A header claiming more than this is damage, not data: stop before buffering a whole bogus length.
MAX_READ_FRAME = 64 * MiB


def read_fd(fd: int, size: int, start: int = 0) -> bytes:
    """Bytes [start, size) of an open file (fewer if it is shorter)."""
    parts = []
    off = start
    while off < size:
        chunk = os.pread(fd, size - off, off)
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


def header_totals(path: Path) -> tuple[int, int, int | None]:
    """(rows, bytes of complete frames, ts of the first frame), hopping from header to header.

    An open segment may end in a frame being written: stop at the first incomplete or unreadable header.
    """
    rows = 0
    first: int | None = None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        whole = f.read() if size <= 4 * MiB else None
        off = 0
        while off < size:
            hdr = (
                whole[off : off + MAX_HEADER_BYTES]
                if whole is not None
                else os.pread(f.fileno(), MAX_HEADER_BYTES, off)
            )
            h = parse_header(hdr, 0, len(hdr))
            if h is None:
                break
            _, plen, n, ts, hlen = h
            if off + hlen + plen > size:
                break
            rows += n
            if first is None:
                first = ts
            off += hlen + plen
    return rows, off, first


def verify_segment(path: Path) -> SegmentScan:
    """Full check of one segment (every checksum and row count)."""
    with open(path, "rb") as f:
        return scan_buffer(f.read())


def _scan_frames(path: Path, read_size: int, *, count_rows: bool = True) -> Iterator[tuple[bytearray, Frame]]:
    """Valid frames of a segment with the buffer holding them, streaming; raise CorruptSegment at the first bad one.

    Each read goes into a fresh buffer: views into an earlier buffer stay valid while the caller batches them.
    """
    with open(path, "rb", buffering=0) as f:
        # A small segment gets a buffer its size (+1 to see the end at once), not read_size: with thousands of
        # partitions most segments are a few hundred bytes, and zeroing megabytes for each dominated their reads.
        read_size = max(min(read_size, os.fstat(f.fileno()).st_size + 1), MAX_HEADER_BYTES)
        buf = bytearray()
        end = pos = 0
        base = 0  # file offset of buf[0]
        while True:
            while pos < end:
                res = check_frame(buf, pos, end, count_rows=count_rows)
                if isinstance(res, FrameError):
                    if res.incomplete and not _frame_too_big(buf, pos, end):
                        break  # read more
                    raise CorruptSegment(path, base + pos, res.reason)
                yield buf, res
                pos = res.end
            carry = end - pos
            want = max(read_size, carry + MAX_HEADER_BYTES)
            h = parse_header(buf, pos, end) if carry else None
            if h is not None:
                want = max(want, h[1] + h[4])
            nbuf = bytearray(want)
            nbuf[:carry] = buf[pos:end]
            n = f.readinto(memoryview(nbuf)[carry:])
            if not n:
                if carry:
                    reason = check_frame(buf, pos, end).reason  # type: ignore[union-attr]
                    raise CorruptSegment(path, base + pos, reason)
                return
            base += pos
            buf, pos, end = nbuf, 0, carry + n


def _iter_frames(path: Path, read_size: int = 4 * MiB) -> Iterator[tuple[Frame, memoryview]]:
    """Valid frames of a segment with their payloads, streaming; raise CorruptSegment at the first bad frame."""
    for buf, frame in _scan_frames(path, read_size):
        yield frame, memoryview(buf)[frame.payload_offset : frame.end]


def _frame_too_big(buf: bytearray, pos: int, end: int) -> bool:
    h = parse_header(buf, pos, end)
    return h is not None and h[1] > MAX_READ_FRAME


def _iter_regions(path: Path, read_size: int) -> Iterator[tuple[memoryview, int]]:
    """Runs of whole, checksum-valid frames (headers included) as views into each read buffer, with their row count.

    Handing pyarrow these runs as they lie on disk avoids copying every payload out from between the headers;
    the parser skips the header lines itself (see _skip_frame_header).
    """
    current: bytearray | None = None
    start = stop = rows = 0
    for buf, frame in _scan_frames(path, read_size, count_rows=False):
        if buf is not current:
            if current is not None and stop > start:
                yield memoryview(current)[start:stop], rows
            current, start, rows = buf, frame.offset, 0
        stop = frame.end
        rows += frame.rows
    if current is not None and stop > start:
        yield memoryview(current)[start:stop], rows


def _skip_frame_header(row: pacsv.InvalidRow) -> str:
    """Frame headers reach the parser as one-column lines: skip them; anything else malformed is an error."""
    return "skip" if row.text.startswith("#") and "\t" not in row.text else "error"


# Plain TSV: no quoting and no escaping (values never hold a tab, newline, CR or NUL).
_TSV = {"delimiter": "\t", "quote_char": False, "double_quote": False, "escape_char": False,
        "newlines_in_values": False, "ignore_empty_lines": False}
_PARSE_OPTIONS = pacsv.ParseOptions(**_TSV)
_FRAMED_PARSE_OPTIONS = pacsv.ParseOptions(**_TSV, invalid_row_handler=_skip_frame_header)
# Every value is text as staged: no nulls, checked UTF-8.
_CONVERT = {"null_values": [], "strings_can_be_null": False, "quoted_strings_can_be_null": False, "check_utf8": True}
_CONVERT_OPTIONS = pacsv.ConvertOptions(column_types=STAGED_SCHEMA, **_CONVERT)
# Rolls parse the journal on one thread: on 2 cores, Arrow's parse threads only competed with the compressors
# (bench/rollover.py: every case faster single-threaded).
PARSE_THREADS = False
# Small parse blocks keep each thread's work in cache: measured 6.5-7 M rows/s at 512 KiB vs 4.5-5 M at 1-4 MiB.
_BLOCK_BYTES = 512 * 1024


def _convert_options(schema: pa.Schema | None) -> pacsv.ConvertOptions:
    if schema is None:
        return _CONVERT_OPTIONS
    unknown = [name for name in schema.names if name not in STAGED_FIELDS]
    if unknown or not schema.names:
        raise ValueError(f"schema must name staged columns ({', '.join(STAGED_FIELDS)}), got {schema.names}")
    return pacsv.ConvertOptions(column_types=schema, include_columns=schema.names, **_CONVERT)


def _parse_regions(
    regions: list[memoryview], rows: int, paths: list[Path], convert: pacsv.ConvertOptions
) -> Iterator[pa.RecordBatch]:
    # One region (the usual case with big segments) is parsed in place; small ones are joined first. Every region
    # starts with a frame header, so pyarrow never sees a UTF-8 BOM at the start (it would drop it from a value).
    data = regions[0] if len(regions) == 1 else b"".join(regions)
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                use_threads=PARSE_THREADS, block_size=_BLOCK_BYTES, column_names=list(STAGED_FIELDS)
            ),
            parse_options=_FRAMED_PARSE_OPTIONS,
            convert_options=convert,
        )
    except pa.ArrowInvalid as e:
        _raise_corrupt(paths, f"rows the parser refuses: {e}")
    if table.num_rows != rows:
        # Header row counts sit outside the checksum: a mismatch means a damaged header.
        _raise_corrupt(paths, f"frame headers count {rows} rows, the payloads hold {table.num_rows}")
    yield from table.to_batches()


def _raise_corrupt(paths: list[Path], reason: str) -> NoReturn:
    """Name the damaged segment of a chunk (full scan, only on this rare path), or the chunk's last one."""
    for path in paths:
        scan = verify_segment(path)
        if not scan.valid:
            start, _, why = scan.bad[0]
            raise CorruptSegment(path, start, why)
    raise CorruptSegment(paths[-1], -1, reason)


def iter_batches(
    paths: Iterable[Path], *, chunk_bytes: int = 8 * MiB, schema: pa.Schema | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows of `paths` (in order) as record batches; memory bounded by about 2 x `chunk_bytes`.

    `schema` picks staged columns and their types (default: all of STAGED_SCHEMA); columns left out are not
    converted at all. Frames are checked as they stream (checksums per frame, row counts per chunk); damage raises
    CorruptSegment.
    """
    convert = _convert_options(schema)
    regions: list[memoryview] = []
    in_chunk: list[Path] = []
    size = rows = 0
    read_size = min(max(chunk_bytes, 64 * 1024), 8 * MiB)
    for path in paths:
        path = Path(path)
        in_chunk.append(path)
        for region, n in _iter_regions(path, read_size):
            regions.append(region)
            size += len(region)
            rows += n
            if size >= chunk_bytes:
                yield from _parse_regions(regions, rows, in_chunk, convert)
                regions, in_chunk, size, rows = [], [path], 0, 0
    if size:
        yield from _parse_regions(regions, rows, in_chunk, convert)


def count_rows(path: Path) -> int:
    """Rows in one segment, every frame checked."""
    return sum(frame.rows for frame, _ in _iter_frames(Path(path)))


def first_row(paths: Iterable[Path]) -> Row | None:
    """The first staged row of `paths`, reading only its frame; None when they hold no row."""
    for path in paths:
        for buf, frame in _scan_frames(Path(path), 64 * 1024, count_rows=False):
            if frame.rows:
                end = buf.index(b"\n", frame.payload_offset) + 1
                return next(iter_payload_lines(bytes(buf[frame.payload_offset : end])))
    return None


def iter_rows(path: Path, partition: Partition | None = None) -> Iterator[Row]:
    """Rows of one segment as Python tuples (for inspection tools; rolls use iter_batches).

    A writer journal (its first byte is a tag's '@') gives the rows of `partition`, or of every partition.
    """
    path = Path(path)
    with open(path, "rb") as f:
        first = f.read(1)
    if first == b"@":
        data = read_file(path)
        scan = scan_journal(data)
        if scan.bad and not scan.torn_tail_only:  # a torn tail is a commit in progress: its rows were not answered
            raise CorruptSegment(path, scan.bad[0][0], scan.bad[0][2])
        for p, frames in scan.frames.items():
            if partition is None or p == partition:
                for fr in frames:
                    yield from iter_payload_lines(bytes(data[fr.payload_offset : fr.end]))
        return
    for _, payload in _iter_frames(path):
        yield from iter_payload_lines(bytes(payload))


def read_file(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return read_fd(f.fileno(), os.fstat(f.fileno()).st_size)
