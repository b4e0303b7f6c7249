"""Recovery of orphaned open segments: torn tails cut, damaged middles quarantined, good frames never lost."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.journal import encode_frame, encode_rows
from pipeline.staging import CorruptSegment, Staging, count_rows, iter_batches, verify_segment
from tests.staging.helpers import P, frames, orphan, read_all, rows

GOOD = [rows(0, 3), rows(3, 4), rows(7, 5)]


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda f: f[:5], id="header-cut"),
        pytest.param(lambda f: f[: len(f) // 2], id="payload-cut"),
        pytest.param(lambda f: _flip(f, len(f) - 3), id="bad-crc-at-tail"),
        pytest.param(lambda f: b"\0" * 4096, id="zeros"),
        pytest.param(lambda f: f.replace(b"#", b"#", 1)[:-1], id="last-newline-missing"),
    ],
)
def test_torn_tail_is_cut_and_the_segment_sealed(make_staging, tail) -> None:
    staging = make_staging()
    good = b"".join(frames(*GOOD))
    torn = tail(encode_rows(rows(12, 6), 1))
    path = orphan(staging.root, P, "wdead-00000001", good + torn)
    report = staging.recover()
    assert report.sealed == ["wdead-00000001"]
    assert report.truncated == [("wdead-00000001", len(torn))]
    assert not path.exists()
    sealed = staging.segment_path(P, "wdead-00000001", "sealed")
    assert sealed.read_bytes() == good
    assert verify_segment(sealed).valid
    assert read_all([sealed]) == rows(0, 12)
    assert not (staging.root / "quarantine").exists()


def test_segment_holding_only_a_torn_frame_is_removed(staging: Staging) -> None:
    path = orphan(staging.root, P, "wdead-00000001", encode_rows(rows(0, 5), 1)[:30])
    empty = orphan(staging.root, P, "wdead-00000002", b"")
    report = staging.recover()
    assert sorted(report.removed_empty) == ["wdead-00000001", "wdead-00000002"]
    assert not path.exists() and not empty.exists()
    assert staging.sealed_segments(P) == []


@pytest.mark.parametrize("damage", ["payload-byte", "length-field", "header-garbage"])
def test_corrupt_middle_frame_is_quarantined_and_good_frames_kept(staging: Staging, damage: str) -> None:
    a, b, c = frames(*GOOD)
    if damage == "payload-byte":
        b_bad = _flip(b, len(b) - 10)
    elif damage == "length-field":
        hdr, rest = b.split(b"\n", 1)
        parts = hdr.split(b" ")
        b_bad = b" ".join([parts[0], b"9999999", *parts[2:]]) + b"\n" + rest
    else:
        b_bad = b"garbage that is no header\n" + b[40:]
    original = a + b_bad + c
    path = orphan(staging.root, P, "wdead-00000007", original)
    report = staging.recover()
    assert report.quarantined == ["wdead-00000007"]
    assert not path.exists()
    sealed = staging.segment_path(P, "wdead-00000007", "sealed")
    assert read_all([sealed]) == [*GOOD[0], *GOOD[2]]  # the frames on both sides of the damage survive
    assert verify_segment(sealed).valid
    qdir = staging.quarantine_dir(P)
    assert (qdir / "wdead-00000007.jnl").read_bytes() == original
    rep = json.loads((qdir / "wdead-00000007.jnl.report.json").read_text())
    assert rep["frames_good"] == 2 and rep["frames_bad"] == 1 and rep["rows_good"] == 8
    assert rep["bad_ranges"][0]["start"] == len(a) and rep["bad_ranges"][0]["end"] == len(a) + len(b_bad)
    assert 1 <= rep["rows_lost_estimate"] <= 10
    # Running recovery again changes nothing.
    again = staging.recover()
    assert again.sealed == again.quarantined == again.truncated == []


def test_repair_interrupted_after_publishing_good_frames(staging: Staging) -> None:
    """Crash between 'good frames renamed into sealed/' and 'original removed': the original is simply dropped."""
    a, b, c = frames(*GOOD)
    orphan(staging.root, P, "wdead-00000003", a + c, state="sealed")
    path = orphan(staging.root, P, "wdead-00000003", a + _flip(b, 60) + c)
    report = staging.recover()
    assert report.quarantined == ["wdead-00000003"]
    assert not path.exists()
    assert read_all(staging.sealed_segments(P)) == [*GOOD[0], *GOOD[2]]


def test_open_segment_of_a_live_writer_is_left_alone(make_staging) -> None:
    writer = make_staging()
    other = make_staging()
    res = writer.append_sync(P, rows(0, 2))
    report = other.recover()
    assert report.busy == 1 and report.sealed == []
    assert writer.segment_state(P, res.segment) == "open"
    assert writer.append_sync(P, rows(2, 1)).segment == res.segment  # still appending
    writer.close()
    assert read_all(writer.sealed_segments(P)) == rows(0, 3)


def test_recover_removes_old_unlocked_temp_files_only(staging: Staging) -> None:
    d = staging.root / P.relpath / "open"
    d.mkdir(parents=True)
    s = staging.root / P.relpath / "sealed"
    s.mkdir(parents=True)
    old = [d / ".wdead-00000001.jnl.new", s / ".wdead-00000002.jnl.repair"]
    fresh = d / ".wdead-00000003.jnl.new"  # its writer may be about to lock it
    for path in [*old, fresh]:
        path.write_bytes(b"partial")
    for path in old:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    staging.recover()
    assert list(d.iterdir()) == [fresh] and list(s.iterdir()) == []


def test_hostile_refs_never_become_paths(staging: Staging) -> None:
    victim = orphan(staging.root, P, "wdead-00000001", b"".join(frames(*GOOD)))
    for ref in ["../open/wdead-00000001", "../../../../etc/passwd", "wdead-00000001/../x", ""]:
        assert staging.segment_state(P, ref) is None
        assert staging.wait_sealed(P, [ref], timeout=0.1) == {ref: None}
    assert victim.exists()


def test_wait_sealed_recovers_a_dead_writers_segment(staging: Staging) -> None:
    orphan(staging.root, P, "wdead-00000001", b"".join(frames(*GOOD)) + b"#0000")
    assert staging.wait_sealed(P, ["wdead-00000001"], timeout=5) == {"wdead-00000001": "sealed"}
    assert read_all(staging.sealed_segments(P)) == rows(0, 12)


def test_reader_refuses_a_damaged_sealed_segment_and_repair_keeps_the_good_frames(staging: Staging) -> None:
    a, b, c = frames(*GOOD)
    good = orphan(staging.root, P, "wdead-00000001", a, state="sealed")
    bad = orphan(staging.root, P, "wdead-00000002", a + _flip(b, len(b) - 2) + c, state="sealed")
    with pytest.raises(CorruptSegment) as info:
        list(iter_batches([good, bad]))
    assert info.value.path == bad and info.value.offset == len(a)
    with pytest.raises(CorruptSegment):
        count_rows(bad)
    found = staging.scan_sealed(P, repair=True)
    assert [p for p, _ in found] == [bad]
    assert staging.scan_sealed(P) == []
    assert read_all([bad]) == [*GOOD[0], *GOOD[2]]
    assert (staging.quarantine_dir(P) / "wdead-00000002.jnl.report.json").exists()


def test_reader_refuses_a_sealed_segment_with_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "x.jnl"
    whole = encode_rows(rows(0, 3), 1)
    path.write_bytes(whole + whole[:-4])
    with pytest.raises(CorruptSegment, match="cut short"):
        list(iter_batches([path]))


def test_reader_streams_frames_larger_than_the_chunk(tmp_path: Path) -> None:
    """A frame bigger than the read size must be read whole, and the memory bound follows the chunk size."""
    path = tmp_path / "big.jnl"
    path.write_bytes(b"".join(encode_rows(rows(i * 5000, 5000), 1) for i in range(6)))
    batches = list(iter_batches([path], chunk_bytes=64 * 1024))
    assert sum(b.num_rows for b in batches) == 30_000
    assert max(b.nbytes for b in batches) < 8 * 1024 * 1024
    assert read_all([path]) == rows(0, 30_000)


def test_reader_catches_what_the_checksum_does_not_cover(tmp_path: Path) -> None:
    """Header row counts are outside the checksum, and a checksummed payload could still hold a short row."""
    ok = encode_rows(rows(0, 3), 1)
    lying_header = tmp_path / "a.jnl"
    payload = encode_rows(rows(3, 2), 1).split(b"\n", 1)[1]
    lying_header.write_bytes(ok + encode_frame(payload, 3, 1))
    with pytest.raises(CorruptSegment) as info:
        list(iter_batches([lying_header]))
    assert info.value.path == lying_header and info.value.offset == len(ok)
    short_row = tmp_path / "b.jnl"
    short_row.write_bytes(ok + encode_frame(b"a\tb\tc\n", 1, 1))
    with pytest.raises(CorruptSegment, match="parser refuses"):
        list(iter_batches([short_row]))


def test_value_starting_with_a_byte_order_mark_survives(tmp_path: Path) -> None:
    path = tmp_path / "bom.jnl"
    r = ("\ufefftype", "\ufeffid", 1, "\ufeff", "", "")
    path.write_bytes(encode_rows([r], 1))
    assert read_all([path]) == [r]


def test_first_row_reads_past_empty_segments(tmp_path: Path) -> None:
    from pipeline.staging import first_row

    empty, full = tmp_path / "a.jnl", tmp_path / "b.jnl"
    empty.write_bytes(b"")
    full.write_bytes(encode_rows(rows(7, 5), 0))
    assert first_row([empty]) is None
    assert first_row([empty, full]) == rows(7, 5)[0]
