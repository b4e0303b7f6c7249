"""Encoders: staged batches in, files out, read back with independent readers."""

from __future__ import annotations

import csv
import gc
import gzip
import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.feed import parse_columns
from pipeline.encode import EncodeSpec, csv_chunk, encode_batches, output_schema
from pipeline.model import STAGED_FIELDS, STAGED_SCHEMA
from tests.rollover.helpers import decode_file, make_rows

CONSTANTS = {"feed_id": "feed-1", "segment_id": "seg-9", "operation": "UPSERT"}
ALL_COLUMNS = (
    "segment_id=Segment,operation=Op,identifier_type=Type,identifier=Email,ts=TS,feed_id=Feed,"
    "datamart_id=Datamart,session_id=Session,user_point_id=UserPoint"
)


def batches_of(rows: list[tuple], size: int = 1000) -> list[pa.RecordBatch]:
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        out.append(
            pa.RecordBatch.from_arrays(
                [pa.array([r[k] for r in chunk], STAGED_SCHEMA.field(k).type) for k in range(len(STAGED_FIELDS))],
                schema=STAGED_SCHEMA,
            )
        )
    return out


def spec(fmt: str = "csv", compression: str = "gzip", columns: str = ALL_COLUMNS, max_rows: int = 1_000_000):
    return EncodeSpec(fmt, compression, parse_columns(columns), max_rows)


def read_all(out: Path, files) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for f in files:
        rows.extend(decode_file(f.name, (out / f.name).read_bytes()))
    return rows


def expected(rows, columns: str = ALL_COLUMNS) -> list[dict[str, str]]:
    values = {**CONSTANTS}
    out = []
    for r in rows:
        row = dict(zip(STAGED_FIELDS, r, strict=True))
        merged = {**values, **{k: str(v) for k, v in row.items()}}
        out.append({c.header: merged[c.source] for c in parse_columns(columns)})
    return out


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [
        ("csv", "gzip"),
        ("csv", "zstd"),
        ("csv", "none"),
        ("parquet", "snappy"),
        ("parquet", "zstd"),
        ("parquet", "none"),
    ],
)
def test_round_trip_every_row_once_in_order(tmp_path: Path, fmt: str, compression: str) -> None:
    rows = make_rows(2500)
    files = encode_batches(batches_of(rows, 700), spec(fmt, compression), CONSTANTS, tmp_path)
    assert [f.name for f in files] == [f"part-00001.{spec(fmt, compression).extension}"]
    assert read_all(tmp_path, files) == expected(rows)
    assert files[0].rows == 2500


def test_file_facts_match_the_bytes_on_disk(tmp_path: Path) -> None:
    files = encode_batches(batches_of(make_rows(3000)), spec(max_rows=1000), CONSTANTS, tmp_path)
    for f in files:
        data = (tmp_path / f.name).read_bytes()
        assert f.bytes == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in files]  # no temp file left


def test_split_at_max_rows_per_file_with_a_header_in_each(tmp_path: Path) -> None:
    rows = make_rows(2345)
    files = encode_batches(batches_of(rows, 333), spec("csv", "none", max_rows=1000), CONSTANTS, tmp_path)
    assert [f.rows for f in files] == [1000, 1000, 345]
    assert [f.name for f in files] == ["part-00001.csv", "part-00002.csv", "part-00003.csv"]
    for f in files:
        first_line = (tmp_path / f.name).read_text().split("\n", 1)[0]
        assert first_line == "Segment,Op,Type,Email,TS,Feed,Datamart,Session,UserPoint"
    assert read_all(tmp_path, files) == expected(rows)


def test_split_exactly_on_the_boundary_makes_no_empty_file(tmp_path: Path) -> None:
    files = encode_batches(
        batches_of(make_rows(2000), 1000), spec("parquet", "zstd", max_rows=1000), CONSTANTS, tmp_path
    )
    assert [f.rows for f in files] == [1000, 1000]


def test_empty_input_gives_no_file(tmp_path: Path) -> None:
    empty = pa.RecordBatch.from_pylist([], schema=STAGED_SCHEMA)
    assert encode_batches([empty], spec(), CONSTANTS, tmp_path) == []
    assert encode_batches([], spec("parquet", "snappy"), CONSTANTS, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_headers_exact_and_column_selection_order(tmp_path: Path) -> None:
    columns = "identifier=Email,segment_id"
    files = encode_batches(batches_of(make_rows(3)), spec("csv", "gzip", columns), CONSTANTS, tmp_path)
    text = gzip.decompress((tmp_path / files[0].name).read_bytes()).decode()
    assert text == "Email,segment_id\n" + "".join(f"{i:064x},seg-9\n" for i in range(3))


def test_quoting_commas_quotes_unicode_and_line_breaks(tmp_path: Path) -> None:
    tricky = ["plain", "a,b", 'say "hi"', "é日本😀", "", "x\ry", "multi\nline", '",', " lead"]
    rows = [("USER_AGENT", v, i, "s", "dm", "up") for i, v in enumerate(tricky)]
    files = encode_batches(batches_of(rows), spec("csv", "none", "identifier=UA,ts"), CONSTANTS, tmp_path)
    raw = (tmp_path / files[0].name).read_bytes()
    assert raw.startswith(b'UA,ts\nplain,0\n"a,b",1\n"say ""hi""",2\n')  # minimal RFC 4180 quoting
    assert "é日本😀,3\n".encode() in raw  # UTF-8, no escaping, no BOM
    parsed = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert parsed[0] == ["UA", "ts"]
    assert [r[0] for r in parsed[1:]] == tricky
    table = pcsv.read_csv(pa.BufferReader(raw), parse_options=pcsv.ParseOptions(newlines_in_values=True))
    assert table.column("UA").to_pylist()[:4] == tricky[:4]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=30))
def test_any_text_survives_csv(values: list[str]) -> None:
    batch = pa.RecordBatch.from_arrays([pa.array(values, pa.string())], names=["v"])
    data = bytes(csv_chunk(batch, header=True))
    parsed = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert [r[0] if r else "" for r in parsed[1:]] == values


def test_parquet_is_typed_and_never_gzip_wrapped(tmp_path: Path) -> None:
    files = encode_batches(batches_of(make_rows(10)), spec("parquet", "zstd"), CONSTANTS, tmp_path)
    path = tmp_path / files[0].name
    data = path.read_bytes()
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    schema = pq.read_schema(path)
    assert schema.field("TS").type == pa.int64()
    assert schema.field("Email").type == pa.string()
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_table(path).schema.names == output_schema(spec("parquet", "zstd")).names


def test_gzip_is_deterministic_with_zero_mtime(tmp_path: Path) -> None:
    rows = make_rows(5000)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = encode_batches(batches_of(rows, 1000), spec(max_rows=2000), CONSTANTS, a)
    second = encode_batches(batches_of(rows, 77), spec(max_rows=2000), CONSTANTS, b)  # other batching, same bytes
    assert first == second
    data = (a / first[0].name).read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\x00\x00\x00\x00"  # no FNAME flag, mtime 0
    assert gzip.decompress(data).startswith(b"Segment,")


@pytest.mark.parametrize(("fmt", "compression"), [("csv", "zstd"), ("parquet", "snappy")])
def test_other_formats_are_deterministic(tmp_path: Path, fmt: str, compression: str) -> None:
    rows = make_rows(3000)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert encode_batches(batches_of(rows), spec(fmt, compression), CONSTANTS, a) == encode_batches(
        batches_of(rows, 250), spec(fmt, compression), CONSTANTS, b
    )


def test_error_mid_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    def broken():
        yield from batches_of(make_rows(100))
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        encode_batches(broken(), spec(), CONSTANTS, tmp_path)
    gc.collect()  # a compressor abandoned mid-stream must not block in its finalizer
    assert list(tmp_path.iterdir()) == []


def test_files_start_no_thread_of_their_own(tmp_path: Path) -> None:
    """The encode worker and the deflate threads are kept between files: a busy process used to start three or
    four threads per file (about 2 ms while the GIL is held by the loop)."""
    import threading

    def encode(i: int) -> None:
        out = tmp_path / str(i)
        out.mkdir()
        encode_batches(batches_of(make_rows(300)), spec(), CONSTANTS, out)
        encode_batches(batches_of(make_rows(300)), spec("parquet", "zstd"), CONSTANTS, out)

    encode(0)
    # the deflate pool starts its threads as blocks come: make sure both exist, whatever ran before
    from pipeline import gzip_blocks
    from pipeline.encode import GZIP_THREADS

    everyone = threading.Barrier(GZIP_THREADS + 1)
    waits = [gzip_blocks._deflate_pool(GZIP_THREADS).submit(everyone.wait, 30) for _ in range(GZIP_THREADS)]
    everyone.wait(30)
    for w in waits:
        w.result(30)
    started = threading.Thread.start
    count = []

    def counting_start(self: threading.Thread) -> None:
        count.append(self.name)
        started(self)

    threading.Thread.start = counting_start  # type: ignore[method-assign]
    try:
        for i in range(1, 6):
            encode(i)
    finally:
        threading.Thread.start = started  # type: ignore[method-assign]
    assert count == []
    for i in range(1, 6):
        assert [r for f in sorted((tmp_path / str(i)).glob("*.csv.gz")) for r in decode_file(f.name, f.read_bytes())]


def test_a_worker_that_failed_is_not_kept(tmp_path: Path) -> None:
    from pipeline import encode

    def broken():
        yield from batches_of(make_rows(100))
        raise RuntimeError("reader died")

    worker = encode._OrderedWorker.take()
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.drain()
    worker.release()
    assert worker not in encode._idle_workers and not worker._thread.is_alive()
    with pytest.raises(RuntimeError, match="reader died"):
        encode_batches(broken(), spec(), CONSTANTS, tmp_path)
    assert all(w._thread.is_alive() and w._error is None for w in encode._idle_workers)


def test_missing_constant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="segment_id"):
        encode_batches(batches_of(make_rows(1)), spec(), {"feed_id": "f", "operation": "UPSERT"}, tmp_path)


def test_read_schema_parses_only_what_the_files_show(tmp_path: Path) -> None:
    """A roll reads the staged columns its spec shows (ts as text for CSV, int64 for Parquet) and writes the same
    bytes as from fully typed batches."""
    from pipeline.encode import read_schema
    from pipeline.journal import encode_rows
    from pipeline.staging import iter_batches

    rows = make_rows(2500)
    segment = tmp_path / "w1-000001.jnl"
    segment.write_bytes(b"".join(encode_rows(rows[i : i + 700], 0) for i in range(0, len(rows), 700)))
    default = "segment_id,operation,identifier_type,identifier,ts"

    csv_spec = spec("csv", "gzip", default)
    assert read_schema(csv_spec) == pa.schema([("identifier_type", pa.string()), ("identifier", pa.string()),
                                               ("ts", pa.string())])
    pq_spec = spec("parquet", "zstd", "identifier=Email,ts=Time")
    assert read_schema(pq_spec).names == ["identifier_type", "identifier", "ts"]  # identifier_type counts rows
    assert read_schema(pq_spec).field("ts").type == pa.int64()
    assert read_schema(spec("csv", "none", "segment_id")).names == ["identifier_type"]

    for s in (csv_spec, pq_spec, spec("csv", "zstd", "operation,user_point_id=UP")):
        projected = list(iter_batches([segment], chunk_bytes=64 * 1024, schema=read_schema(s)))
        assert sum(b.num_rows for b in projected) == len(rows)
        assert all(b.schema == read_schema(s) for b in projected)
        a, b = tmp_path / f"a-{s.extension}-{len(s.columns)}", tmp_path / f"b-{s.extension}-{len(s.columns)}"
        a.mkdir()
        b.mkdir()
        from_text = encode_batches(projected, s, CONSTANTS, a)
        from_typed = encode_batches(batches_of(rows), s, CONSTANTS, b)
        assert [f.sha256 for f in from_text] == [f.sha256 for f in from_typed]
    with pytest.raises(ValueError, match="staged columns"):
        list(iter_batches([segment], schema=pa.schema([("segment_id", pa.string())])))
