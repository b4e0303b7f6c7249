"""Staging segment files: the frame format, its encoder, and the scanners that read or repair it.

A segment file is a sequence of frames. A frame is one header line followed by its payload::

    #<crc32 of payload, 8 hex> <payload bytes> <row count> <epoch ms>\\n
    <row count> TSV lines in STAGED_FIELDS order

Values never contain TAB, LF, CR or NUL (they are refused before staging), so the TSV needs no quoting or escaping:
`head` on a segment is readable, and pyarrow's CSV reader parses payloads at C speed.

A writer journal (journal/open/<writer>-<seq>.jnl) holds the rows of every partition its writer staged: each frame
is preceded by one tag line naming its partition, checksummed on its own::

    @<feed_id> <segment_id> <operation> <crc32 of "<feed_id> <segment_id> <operation>", 8 hex>\n
    <frame>

Splitting a journal copies each frame, untouched, into its partition's segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from isal.isal_zlib import crc32  # zlib's CRC-32, about 4x faster than the zlib module's (PCLMUL)

from pipeline.layout import FORBIDDEN_CHARS, FORBIDDEN_RE, Row  # noqa: F401 - FORBIDDEN_CHARS re-exported
from pipeline.model import STAGED_FIELDS, Partition

# '#' + 8 hex + ' ' + up to 10 digits (payload length) + ' ' + up to 9 digits (rows) + ' ' + up to 15 digits + '\n'.
MAX_HEADER_BYTES = 48
_HEADER_RE = re.compile(rb"#([0-9a-f]{8}) (0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,8}) (0|[1-9][0-9]{0,14})\n")
_FIELDS_PER_ROW = len(STAGED_FIELDS)
_TAG_RE = re.compile(rb"@([A-Za-z0-9_-]{1,64}) ([A-Za-z0-9_-]{1,64}) (UPSERT|DELETE) ([0-9a-f]{8})\n")
MAX_TAG_BYTES = 1 + 64 + 1 + 64 + 1 + 6 + 1 + 8 + 1


class FrameError(ValueError):
    """A frame that cannot be trusted: bad header, short payload, or checksum mismatch."""

    def __init__(self, offset: int, reason: str, *, incomplete: bool = False):
        self.offset = offset
        self.reason = reason
        self.incomplete = incomplete  # the bytes stop inside the frame: more may come (or the tail is torn)
        super().__init__(f"bad frame at byte {offset}: {reason}")


def clean_value(value: str, field_name: str = "value") -> str:
    """Return `value` unchanged, or raise ValueError when it holds a character the journal cannot store.

    Identifiers are never rewritten here: silently changing a hashed id would deliver a different person.
    """
    if FORBIDDEN_RE.search(value):
        raise ValueError(f"{field_name} must not contain tab, newline, carriage return or NUL characters")
    return value


def is_clean_value(value: str) -> bool:
    return FORBIDDEN_RE.search(value) is None


def encode_lines(rows: Sequence[Row]) -> tuple[list[str], bytes]:
    """TSV lines of `rows` (newline included) and their UTF-8 payload. Raise ValueError on a malformed row.

    Both are kept: the payload is the frame body when nothing is deduplicated, the lines rebuild it when some are.
    """
    try:
        lines = [f"{r[0]}\t{r[1]}\t{r[2]:d}\t{r[3]}\t{r[4]}\t{r[5]}\n" for r in rows]
    except (ValueError, TypeError, IndexError) as e:
        raise ValueError(f"rows must be ({', '.join(STAGED_FIELDS)}) tuples with an int ts: {e}") from None
    # One pass over the joined text checks every value at C speed; only a failing batch pays for finding the row.
    text = "".join(lines)
    if not _clean_lines(text, len(rows)):
        for i, r in enumerate(rows):
            if len(r) != _FIELDS_PER_ROW:
                raise ValueError(f"row {i} has {len(r)} values, expected {_FIELDS_PER_ROW}")
            for name, v in zip(STAGED_FIELDS, r, strict=True):
                if isinstance(v, str):
                    clean_value(v, f"row {i} {name}")
        raise ValueError("rows hold a tab, newline, carriage return or NUL character")  # pragma: no cover
    return lines, encode_payload(text)


def _clean_lines(text: str, rows: int) -> bool:
    """`text` is `rows` TSV lines of the staged fields, and no value holds a separator."""
    return (text.count("\n") == rows and text.count("\t") == (_FIELDS_PER_ROW - 1) * rows
            and "\r" not in text and "\0" not in text)


def lines_payload(lines: list[str]) -> bytes:
    """The payload of TSV lines built from checked values (batch_update's items); checked again at C speed, since a
    separator in a value would shift every later column of the segment."""
    text = "".join(lines)
    if not _clean_lines(text, len(lines)):
        raise ValueError("rows hold a tab, newline, carriage return or NUL character")
    return encode_payload(text)


def encode_payload(text: str | Iterable[str]) -> bytes:
    try:
        return (text if isinstance(text, str) else "".join(text)).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"rows must be valid unicode text: {e.reason}") from None


def encode_frame(payload: bytes, rows: int, ts_ms: int) -> bytes:
    """One frame: header line + payload."""
    return b"#%08x %d %d %d\n" % (crc32(payload), len(payload), rows, ts_ms) + payload


def encode_rows(rows: Sequence[Row], ts_ms: int) -> bytes:
    """A whole frame holding `rows` (for tests and tools; the hot path builds frames from pre-encoded lines)."""
    return encode_frame(encode_lines(rows)[1], len(rows), ts_ms)


@dataclass(frozen=True)
class Frame:
    """Where one valid frame lies in a segment file."""

    offset: int  # of the header's '#'
    payload_offset: int
    payload_len: int
    rows: int
    ts_ms: int

    @property
    def end(self) -> int:
        return self.payload_offset + self.payload_len


def parse_header(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int, int, int, int] | None:
    """Header at `pos`: (crc, payload_len, rows, ts_ms, header_len), or None when no complete valid header is there.

    `end` bounds the search; a header cut by `end` returns None too, so callers tell "need more bytes" apart by
    checking whether `end - pos < MAX_HEADER_BYTES` and no newline was found.
    """
    m = _HEADER_RE.match(buf, pos, min(end, pos + MAX_HEADER_BYTES))
    if m is None:
        return None
    return int(m[1], 16), int(m[2]), int(m[3]), int(m[4]), m.end() - pos


def check_frame(buf: bytes | bytearray, pos: int, end: int, *, count_rows: bool = True) -> Frame | FrameError:
    """The valid frame at `pos` inside buf[:end], or the FrameError that says why there is none.

    `count_rows=False` skips the newline count, for readers that check row totals another way (the TSV parser).
    """
    h = parse_header(buf, pos, end)
    if h is None:
        if end - pos < MAX_HEADER_BYTES and b"\n" not in bytes(buf[pos:end]):
            return FrameError(pos, "header cut short", incomplete=True)
        return FrameError(pos, "malformed header")
    crc, plen, rows, ts_ms, hlen = h
    start = pos + hlen
    if start + plen > end:
        return FrameError(pos, f"payload cut short ({end - start} of {plen} bytes)", incomplete=True)
    if crc32(memoryview(buf)[start : start + plen]) != crc:
        return FrameError(pos, "checksum mismatch")
    # The row count is outside the checksum: a cheap newline count keeps headers honest for counts and stats.
    if (plen and buf[start + plen - 1] != 0x0A) or (count_rows and buf.count(b"\n", start, start + plen) != rows):
        return FrameError(pos, "row count does not match payload")
    return Frame(pos, start, plen, rows, ts_ms)


@dataclass
class SegmentScan:
    """What a full scan of one segment found."""

    size: int
    frames: list[Frame] = field(default_factory=list)
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, reason) of unreadable byte ranges

    @property
    def valid(self) -> bool:
        return not self.bad

    @property
    def good_end(self) -> int:
        """End of the last valid frame before any damage: where a torn tail gets cut."""
        return self.frames[-1].end if self.frames else 0

    @property
    def torn_tail_only(self) -> bool:
        """True when the only damage is at the end (nothing valid after it): a write that never completed."""
        return len(self.bad) == 1 and self.bad[0][0] == self.good_end and self.bad[0][1] == self.size

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.frames)

    def rows_lost_estimate(self) -> int:
        lost_bytes = sum(e - s for s, e, _ in self.bad)
        good_rows = self.rows
        good_bytes = sum(f.payload_len for f in self.frames)
        avg = good_bytes / good_rows if good_rows else 150.0  # a typical row when nothing valid is left to measure
        return round(lost_bytes / avg) if lost_bytes else 0


def scan_buffer(buf: bytes | bytearray | memoryview) -> SegmentScan:
    """Scan a whole segment held in memory, resynchronising after damage on the next valid frame."""
    size = len(buf)
    scan = SegmentScan(size)
    pos = 0
    raw = bytes(buf) if isinstance(buf, memoryview) else buf
    while pos < size:
        res = check_frame(raw, pos, size)
        if isinstance(res, Frame):
            scan.frames.append(res)
            pos = res.end
            continue
        nxt = _resync(raw, pos + 1, size)
        scan.bad.append((pos, nxt if nxt is not None else size, res.reason))
        if nxt is None:
            break
        pos = nxt
    return scan


def _resync(buf: bytes | bytearray, start: int, end: int) -> int | None:
    """Offset of the next valid frame at or after `start`, or None.

    Any '#' is a candidate, not only one after a newline: the damaged byte may be the newline that ended the bad
    frame. The header pattern and the checksum reject false candidates.
    """
    pos = start
    while True:
        cand = buf.find(b"#", pos, end)
        if cand < 0:
            return None
        if isinstance(check_frame(buf, cand, end), Frame):
            return cand
        pos = cand + 1


def encode_tag(partition: Partition) -> bytes:
    """The tag line that precedes each frame of `partition` in a writer journal."""
    body = f"{partition.feed_id} {partition.segment_id} {partition.operation}".encode()
    return b"@%s %08x\n" % (body, crc32(body))


_TAGS: dict[bytes, Partition] = {}


def parse_tag(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[Partition, int] | None:
    """(partition, tag length) of the valid tag line at `pos`, or None."""
    m = _TAG_RE.match(buf, pos, min(end, pos + MAX_TAG_BYTES))
    if m is None:
        return None
    line = m[0]
    partition = _TAGS.get(line)
    if partition is None:
        if crc32(line[1:-10]) != int(m[4], 16):
            return None
        partition = Partition(m[1].decode(), m[2].decode(), m[3].decode())
        if len(_TAGS) < 65536:
            _TAGS[line] = partition
    return partition, len(line)


def check_record(buf: bytes | bytearray, pos: int, end: int) -> tuple[Partition, Frame] | FrameError:
    """The valid journal record (tag + frame) at `pos`, or why there is none."""
    tag = parse_tag(buf, pos, end)
    if tag is None:
        if end - pos < MAX_TAG_BYTES and b"\n" not in bytes(buf[pos:end]):
            return FrameError(pos, "tag cut short", incomplete=True)
        return FrameError(pos, "malformed partition tag")
    res = check_frame(buf, pos + tag[1], end)
    if isinstance(res, FrameError):
        return FrameError(pos, res.reason, incomplete=res.incomplete)
    return tag[0], res


@dataclass
class JournalScan:
    """What a full scan of one writer journal found: its valid frames by partition, and any damage."""

    size: int
    frames: dict[Partition, list[Frame]] = field(default_factory=dict)
    bad: list[tuple[int, int, str]] = field(default_factory=list)
    good_end: int = 0  # end of the last valid record
    room: int = 0  # zero bytes after the last record: pre-written room never written to (not damage)

    @property
    def valid(self) -> bool:
        return not self.bad

    @property
    def torn_tail_only(self) -> bool:
        return len(self.bad) == 1 and self.bad[0][0] == self.good_end and self.bad[0][1] == self.size

    @property
    def rows(self) -> int:
        return sum(f.rows for frames in self.frames.values() for f in frames)

    def rows_lost_estimate(self) -> int:
        lost = sum(e - s for s, e, _ in self.bad)
        good_rows = self.rows
        good_bytes = sum(f.payload_len for frames in self.frames.values() for f in frames)
        avg = good_bytes / good_rows if good_rows else 150.0
        return round(lost / avg) if lost else 0


def _zero_from(buf: bytes | bytearray | memoryview, pos: int) -> bool:
    """Whether every byte from `pos` to the end is zero."""
    data = buf if isinstance(buf, bytes | bytearray) else bytes(buf[pos:])
    start = pos if data is buf else 0
    return data.count(b"\0", start) == len(data) - start


def scan_journal(buf: bytes | bytearray | memoryview) -> JournalScan:
    """Scan a whole writer journal, resynchronising after damage on the next valid record.

    Zero bytes from a record's start to the end are the journal's pre-written room, not damage: a commit writes into
    it and fsyncs, so acknowledged bytes never follow unwritten room (zeros followed by records are damage, as any
    other bytes that are no record)."""
    size = len(buf)
    scan = JournalScan(size)
    pos = 0
    while pos < size:
        res = check_record(buf, pos, size)  # type: ignore[arg-type]
        if not isinstance(res, FrameError):
            partition, frame = res
            scan.frames.setdefault(partition, []).append(frame)
            pos = scan.good_end = frame.end
            continue
        if buf[pos] == 0 and _zero_from(buf, pos):
            scan.room = size - pos  # the journal's pre-written room (pipeline.staging.commit): nothing was written here
            break
        nxt = pos + 1
        while True:
            cand = buf.find(b"@", nxt, size)  # type: ignore[union-attr]
            if cand < 0 or not isinstance(check_record(buf, cand, size), FrameError):  # type: ignore[arg-type]
                break
            nxt = cand + 1
        scan.bad.append((pos, cand if cand >= 0 else size, res.reason))
        if cand < 0:
            break
        pos = cand
    return scan


def iter_payload_lines(payload: bytes) -> Iterator[Row]:
    """Python tuples of one payload. Split on b'\\n' only: str.splitlines would also split on \\x0b, \\x85..."""
    for line in payload.split(b"\n")[:-1]:
        v = line.decode("utf-8").split("\t")
        yield (v[0], v[1], int(v[2]), v[3], v[4], v[5])
