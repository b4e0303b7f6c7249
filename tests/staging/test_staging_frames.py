"""Property tests of the frame format: what is encoded is what both readers give back; damage never passes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.journal import FORBIDDEN_CHARS, encode_lines, encode_rows, iter_payload_lines, scan_buffer
from tests.staging.helpers import read_all

# Any text the journal accepts: no TAB/LF/CR/NUL, no lone surrogates (not encodable as UTF-8).
value = st.text(st.characters(blacklist_characters=FORBIDDEN_CHARS, blacklist_categories=("Cs",)), max_size=20)
row = st.tuples(value, value, st.integers(-(2**63), 2**63 - 1), value, value, value)
groups = st.lists(st.lists(row, min_size=1, max_size=8), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(groups)
def test_frames_round_trip_through_both_readers(gs: list[list[tuple]]) -> None:
    data = b"".join(encode_rows(g, 1_700_000_000_000 + i) for i, g in enumerate(gs))
    scan = scan_buffer(data)
    assert scan.valid and [f.rows for f in scan.frames] == [len(g) for g in gs]
    flat = [r for g in gs for r in g]
    decoded = [r for f in scan.frames for r in iter_payload_lines(data[f.payload_offset : f.end])]
    assert decoded == flat
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.jnl"
        path.write_bytes(data)
        assert read_all([path]) == flat  # pyarrow's parse agrees with Python's, byte for byte


@settings(max_examples=200, deadline=None)
@given(groups, st.data())
def test_any_payload_byte_change_is_detected(gs: list[list[tuple]], data: st.DataObject) -> None:
    buf = b"".join(encode_rows(g, 1) for g in gs)
    frames = scan_buffer(buf).frames
    frame = data.draw(st.sampled_from(frames))
    pos = data.draw(st.integers(frame.payload_offset, frame.end - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = buf[:pos] + bytes([buf[pos] ^ (1 << bit)]) + buf[pos + 1 :]
    scan = scan_buffer(damaged)
    assert not scan.valid
    assert scan.rows == sum(len(g) for g in gs) - frame.rows  # only the damaged frame is lost


@given(st.text(max_size=5), st.sampled_from(FORBIDDEN_CHARS), st.text(max_size=5), st.sampled_from([0, 1, 3, 4, 5]))
def test_values_with_forbidden_characters_are_refused(head: str, bad: str, tail: str, column: int) -> None:
    r: list = ["t", "id", 1, "s", "d", "u"]
    r[column] = head + bad + tail
    try:
        encode_lines([tuple(r)])
    except ValueError:
        return
    raise AssertionError(f"{r!r} was accepted")
