"""Streaming encoders: staged record batches of one partition -> CSV (gzip/zstd/none) or Parquet files on local disk.

Memory stays bounded whatever the number of rows: rows are regrouped into chunks of `CSV_CHUNK_ROWS`, a bounded
queue holds a few encoded chunks, and Parquet keeps at most one row group in memory. Encoding overlaps the two cores:
the caller's thread reads the input and formats CSV (or projects columns); a worker thread compresses, hashes and
writes (gzip deflates on two block threads). Arrow, isal and zstd release the GIL in their hot loops.

Output is deterministic: the same rows with the same spec give the same file names and the same bytes, however the
input was batched (fixed chunk and row-group boundaries; gzip header mtime 0 and no file name; fixed zstd level;
Parquet from a fixed writer version). Files are written to a hidden
temporary name, fsynced, then renamed, so a reader of the output folder never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from isal import isal_zlib

from config.feed import COMPRESSIONS, Column, FeedProperties, parse_columns
from pipeline.durable import fsync_dir
from pipeline.gzip_blocks import BlockGzipWriter
from pipeline.model import STAGED_FIELDS

# Rows per chunk handed from the formatting thread to the compressing one: a few MB of CSV (about 100 bytes a row),
# so the queue stays small in bytes and per-chunk overhead negligible.
CSV_CHUNK_ROWS = 32_768
# About 30 MB of Arrow data per Parquet row group: large enough for readers, small enough for the 300 MB ceiling.
PARQUET_ROW_GROUP_ROWS = 262_144
# Level 1 is isal's fastest that still compresses CSV about 2.8x; higher levels cost speed for a few percent.
GZIP_LEVEL = 1
# Deflate is the slowest stage of a CSV+gzip roll: two block compressors keep both cores busy.
GZIP_THREADS = 2
# Blocks handed to those threads: 256 KiB lets the files of a 10,000-item batch (about 1 MB of CSV) use both; the
# ratio is the same as with 1 MiB (each block is primed with the previous block's last 32 KiB).
GZIP_BLOCK_BYTES = 256 * 1024
# zstd level 1 measured faster AND smaller than level 3 on identifier CSV (hex hashes), at about 500 MB/s.
ZSTD_LEVEL = 1
ZSTD_THREADS = 2
# Chunks in flight between the formatting thread and the compressing thread.
QUEUE_DEPTH = 3
# Writes in flight to a background digest thread: Parquet pages of about 1 MB or less, so a few MB at most.
DIGEST_QUEUE_DEPTH = 16

# Partition-level values: one per roll, become constant columns.
CONSTANT_SOURCES = ("feed_id", "segment_id", "operation", "blank")
# Columns that are unique per row: a dictionary would only cost time before Parquet falls back to plain encoding.
HIGH_CARDINALITY_SOURCES = frozenset({"identifier", "user_point_id", "ts"})
# A staged column that is always read, so a spec showing only constant columns still counts its rows.
ROW_COUNT_SOURCE = "identifier_type"


@dataclass(frozen=True)
class EncodeSpec:
    """What the files look like: the part of the feed properties that decides the bytes."""

    file_format: str  # csv | parquet
    compression: str  # csv: gzip | zstd | none; parquet: snappy | zstd | none
    columns: tuple[Column, ...]
    max_rows_per_file: int
    max_file_bytes: int | None = None  # uncompressed bytes per file (CSV bytes; Parquet: the same rows as CSV)
    csv_delimiter: str = ","
    csv_header: bool = True

    def __post_init__(self) -> None:
        if self.file_format not in COMPRESSIONS:
            raise ValueError(f"unknown file format {self.file_format!r}")
        if self.compression not in COMPRESSIONS[self.file_format]:
            raise ValueError(f"compression {self.compression!r} is not valid for {self.file_format}")
        if self.max_rows_per_file < 1:
            raise ValueError("max_rows_per_file must be at least 1")
        if not self.columns:
            raise ValueError("at least one column is needed")

    @classmethod
    def from_props(cls, props: FeedProperties) -> EncodeSpec:
        return cls(
            file_format=props.file_format,
            compression=props.compression or "none",
            columns=props.column_list,
            max_rows_per_file=props.max_rows_per_file,
            max_file_bytes=props.max_file_bytes,
            csv_delimiter=props.csv_delimiter,
            csv_header=props.csv_header,
        )

    @property
    def extension(self) -> str:
        if self.file_format == "parquet":
            return "parquet"
        return {"gzip": "csv.gz", "zstd": "csv.zst", "none": "csv"}[self.compression]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_format": self.file_format,
            "compression": self.compression,
            "columns": ",".join(f"{c.source}={c.header}" for c in self.columns),
            "max_rows_per_file": self.max_rows_per_file,
            "max_file_bytes": self.max_file_bytes,
            "csv_delimiter": self.csv_delimiter,
            "csv_header": self.csv_header,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodeSpec:
        return cls(
            file_format=str(data["file_format"]),
            compression=str(data["compression"]),
            columns=parse_columns(str(data["columns"])),
            max_rows_per_file=int(data["max_rows_per_file"]),
            # plans written before these properties existed: today's defaults
            max_file_bytes=int(data["max_file_bytes"]) if data.get("max_file_bytes") else None,
            csv_delimiter=str(data.get("csv_delimiter", ",")),
            csv_header=bool(data.get("csv_header", True)),
        )


@dataclass(frozen=True)
class EncodedFile:
    """One finished local file. `name` is its file name inside the output folder."""

    name: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_type(source: str, file_format: str) -> pa.DataType:
    """Type of a column in the files: Parquet keeps ts as int64; everything else is text.

    CSV reads ts as the digits the journal holds and writes them back unchanged: the same bytes as an int64 column,
    without parsing and formatting every timestamp.
    """
    return pa.int64() if source == "ts" and file_format == "parquet" else pa.string()


def output_schema(spec: EncodeSpec) -> pa.Schema:
    """Schema of the files: headers as field names, ts as int64 in Parquet, everything else as string."""
    return pa.schema([(c.header, source_type(c.source, spec.file_format)) for c in spec.columns])


def read_schema(spec: EncodeSpec) -> pa.Schema:
    """The staged columns `spec` shows (plus one to count rows by), typed as the files want them.

    Readers parse only these: a roll of the default columns skips converting half of what the journal holds.
    """
    wanted = {c.source for c in spec.columns} | {ROW_COUNT_SOURCE}
    return pa.schema([(name, source_type(name, spec.file_format)) for name in STAGED_FIELDS if name in wanted])


class _ColumnProjector:
    """Select, order and rename the columns of staged batches; partition values become constant columns."""

    def __init__(self, spec: EncodeSpec, constants: Mapping[str, str]):
        missing = [s for s in CONSTANT_SOURCES if s in {c.source for c in spec.columns} and s not in constants]
        if missing:
            raise ValueError(f"constant value(s) missing for column(s): {', '.join(missing)}")
        self.spec = spec
        self.schema = output_schema(spec)
        self.constants = dict(constants)
        self._constant_arrays: dict[str, pa.Array] = {}

    def _constant(self, source: str, rows: int) -> pa.Array:
        cached = self._constant_arrays.get(source)
        if cached is None or len(cached) < rows:
            # Built once at the largest size seen, then sliced (zero copy) for every batch.
            cached = pa.repeat(pa.scalar(self.constants[source], pa.string()), max(rows, CSV_CHUNK_ROWS))
            self._constant_arrays[source] = cached
        return cached.slice(0, rows)

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        rows = batch.num_rows
        arrays: list[pa.Array] = []
        for column, field in zip(self.spec.columns, self.schema, strict=True):
            if column.source in CONSTANT_SOURCES:
                arrays.append(self._constant(column.source, rows))
                continue
            array = batch.column(column.source)
            if array.type != field.type:
                array = array.cast(field.type)
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


class _OrderedWorker:
    """One background thread running submitted calls in order; the first error is raised back in the caller.

    Take one with `take()` and give it back with `release()`: idle workers are kept (up to MAX_IDLE_WORKERS) for the
    next file, since starting a thread while the GIL is busy costs about half a millisecond."""

    def __init__(self, depth: int = QUEUE_DEPTH, name: str = "filefeed-encode"):
        self.depth = depth
        self._pid = os.getpid()
        self._tasks: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def take(cls, depth: int = QUEUE_DEPTH, name: str = "filefeed-encode") -> _OrderedWorker:
        with _idle_lock:
            for i, worker in enumerate(_idle_workers):
                if worker.depth == depth:
                    del _idle_workers[i]
                    if worker._pid == os.getpid() and worker._thread.is_alive():  # threads do not survive a fork
                        return worker
                    break
        return cls(depth, name)

    def release(self) -> None:
        """Back to the idle workers once every call ran, or closed (after an error, or when enough are idle)."""
        if self._error is None and self._pid == os.getpid():
            self._tasks.join()
            if self._error is None:
                with _idle_lock:
                    if len(_idle_workers) < MAX_IDLE_WORKERS:
                        _idle_workers.append(self)
                        return
        self.close()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                if self._error is None:  # after an error, drain without running so submit() never blocks forever
                    fn, args = task
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                self._error = e
            finally:
                self._tasks.task_done()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._raise_if_failed()
        self._tasks.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted call ran; raise the first error."""
        self._tasks.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join()


MAX_IDLE_WORKERS = 4  # idle encode and digest threads a process keeps (a roll uses one or two at a time)
_idle_workers: list[_OrderedWorker] = []
_idle_lock = threading.Lock()


class _DigestFile:
    """A write-only file that hashes and counts what goes through it (no second read to get the sha256).

    With `background=True`, hashing and writing happen on a thread of their own, in order: the Parquet writer's
    thread (the slowest stage of a Parquet roll) then only encodes. Errors surface at the next write or at the close.
    """

    def __init__(self, path: Path, *, background: bool = False):
        self.path = path
        # O_EXCL: a leftover temp from a crashed run was removed by the caller; anything else is a bug to surface.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._sha = hashlib.sha256()
        self._worker = _OrderedWorker.take(DIGEST_QUEUE_DEPTH, name="filefeed-digest") if background else None
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        if self._worker is None:
            self._write_now(data)
        else:
            # bytes are immutable: queued as they are; anything else may be reused by its owner, so it is copied.
            self._worker.submit(self._write_now, data if type(data) is bytes else bytes(data))
        n = memoryview(data).nbytes
        self.size += n
        return n

    def _write_now(self, data: Any) -> None:
        self._sha.update(data)
        self._file.write(data)

    def _stop_worker(self) -> None:
        if self._worker is not None:
            try:
                self._worker.drain()
            finally:
                self._worker.release()
                self._worker = None

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def sync_and_close(self) -> str:
        self._stop_worker()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.closed = True
        return self._sha.hexdigest()

    def close(self) -> None:
        # pyarrow may close the sink it was given; the real close (with fsync) is sync_and_close().
        pass

    def discard(self) -> None:
        try:
            self._stop_worker()
        except Exception:  # noqa: BLE001,S110 - already failing; the caller reports the first error
            pass
        if not self._file.closed:
            self._file.close()
        self.closed = True
        self.path.unlink(missing_ok=True)


class _Compressor(Protocol):
    def compress(self, data: Any, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _NoCompression:
    def compress(self, data: Any, /) -> Any:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(compression: str) -> _Compressor:
    if compression == "gzip":
        # Single-stream fallback (one thread); the file writer uses _GzipStream. wbits=31: gzip header, mtime 0.
        return isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
    if compression == "zstd":
        import zstandard

        # threads=2: zstd's own workers (its output does not depend on their number, so bytes stay deterministic)
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, threads=ZSTD_THREADS).compressobj()
    return _NoCompression()


_CSV_OPTIONS = {
    (header, delimiter): pcsv.WriteOptions(
        include_header=header, delimiter=delimiter, quoting_style="none", quoting_header="none", batch_size=8192
    )
    for header in (True, False)
    for delimiter in (",", "\t", "|", ";")
}


def _quote_minimal(value: object, delimiter: str = ",") -> str:
    if value is None:
        return ""
    text = str(value)
    if any(ch in text for ch in (delimiter, '"', "\r", "\n")):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_chunk(batch: pa.RecordBatch | pa.Table, header: bool, delimiter: str = ",") -> Any:
    """CSV bytes of `batch`: RFC 4180 with minimal quoting, UTF-8, `\\n` line ends, header names never quoted.

    Arrow's writer either quotes every string or none, so the fast path writes unquoted and, when a value holds the
    delimiter, a quote or a line break (Arrow refuses it), that slice is written by a small pure-Python minimal
    quoter. Header names cannot need quotes: they are validated without the delimiter, quotes or control characters.
    """
    sink = pa.BufferOutputStream()
    try:
        pcsv.write_csv(batch, sink, _CSV_OPTIONS[(header, delimiter)])
        return sink.getvalue()
    except pa.ArrowInvalid:
        pass
    lines: list[str] = []
    if header:
        lines.append(delimiter.join(batch.schema.names))
    for row in zip(*(column.to_pylist() for column in batch.columns), strict=True):
        lines.append(delimiter.join(_quote_minimal(v, delimiter) for v in row))
    return ("\n".join(lines) + "\n").encode("utf-8")


def header_bytes(spec: EncodeSpec) -> int:
    """Bytes of the CSV header line of `spec` (0 without a header)."""
    if not spec.csv_header:
        return 0
    return len(spec.csv_delimiter.join(c.header for c in spec.columns).encode("utf-8")) + 1


def row_bytes(batch: pa.RecordBatch, delimiter: str = ",") -> pa.Array:
    """Bytes of each row of `batch` as a CSV line (delimiters, minimal quoting and the newline included), int64.

    What `max_file_bytes` counts: computed from the values only, so a resumed roll splits at the same rows.
    """
    sizes: Any = pa.scalar(batch.num_columns, pa.int64())  # the delimiters and the newline
    for column in batch.columns:
        if pa.types.is_integer(column.type):
            sizes = pc.add(sizes, _digits(column))
            continue
        text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
        sizes = pc.add(sizes, pc.cast(pc.fill_null(pc.binary_length(text), 0), pa.int64()))
        if _may_need_quotes(text, delimiter):
            quoted = pc.fill_null(pc.match_substring_regex(text, _special_pattern(delimiter)), False)
            sizes = pc.add(sizes, pc.multiply(pc.cast(quoted, pa.int64()), 2))
            sizes = pc.add(sizes, pc.cast(pc.fill_null(pc.count_substring(text, '"'), 0), pa.int64()))
    return sizes


def _may_need_quotes(text: pa.Array, delimiter: str) -> bool:
    """Whether any value may hold a character that needs quotes: one memchr-speed scan of the values' bytes (the
    regex runs only then; values needing quotes are rare in identifiers)."""
    data = text.buffers()[2]
    if data is None or len(text) == 0:
        return False
    # only the bytes of this array's values: a slice shares its parent's (possibly much larger) buffer
    width = pa.int64() if pa.types.is_large_string(text.type) else pa.int32()
    offsets = pa.Array.from_buffers(width, len(text) + 1, [None, text.buffers()[1]], offset=text.offset)
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    raw = data.slice(start, end - start).to_pybytes()
    return any(ch.encode() in raw for ch in (delimiter, '"', "\r", "\n"))


def _special_pattern(delimiter: str) -> str:
    return "[" + "".join("\\" + ch if ch in "|\\^]-[" else ch for ch in delimiter) + '"\r\n]'


_POWERS_OF_TEN = [10**k for k in range(1, 19)]


def _digits(column: pa.Array) -> pa.Array:
    """Characters of each integer as text (a minus sign included), null as 0, without formatting them."""
    magnitude = pc.abs_checked(pc.cast(column, pa.int64()))
    digits: Any = pc.cast(pc.is_valid(column), pa.int64())
    for power in _POWERS_OF_TEN:
        digits = pc.add(digits, pc.cast(pc.fill_null(pc.greater_equal(magnitude, power), False), pa.int64()))
    return pc.add(digits, pc.cast(pc.fill_null(pc.less(column, 0), False), pa.int64()))


class _FileWriter(Protocol):
    rows: int

    def write(self, batch: pa.RecordBatch) -> None: ...

    def finish(self) -> EncodedFile: ...

    def abort(self) -> None: ...


class _LocalFile:
    """Temp name while writing, final name after fsync + rename."""

    def __init__(self, out_dir: Path, name: str, *, background: bool = False):
        self.name = name
        self.final = out_dir / name
        self.temp = out_dir / f".{name}.tmp"
        self.temp.unlink(missing_ok=True)  # a leftover of a crashed encode
        self.digest = _DigestFile(self.temp, background=background)

    def commit(self, rows: int) -> EncodedFile:
        sha256 = self.digest.sync_and_close()
        os.replace(self.temp, self.final)
        return EncodedFile(self.name, rows, self.digest.size, sha256)

    def discard(self) -> None:
        self.digest.discard()


class _Rechunker:
    """Regroup batches into chunks of exactly `rows` rows (the last may be short), whatever the input batching.

    Fixed chunk boundaries make the output bytes depend on the rows only, not on how the reader batched them, and
    make one CSV write or one queue item large enough that per-chunk overhead stays negligible.
    """

    def __init__(self, rows: int, emit: Callable[[pa.Table], None]):
        self.rows = rows
        self._emit = emit
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        offset = 0
        while offset < batch.num_rows:
            take = min(batch.num_rows - offset, self.rows - self._pending_rows)
            self._pending.append(batch.slice(offset, take))
            self._pending_rows += take
            offset += take
            if self._pending_rows == self.rows:
                self.flush()

    def flush(self) -> None:
        if self._pending_rows:
            self._emit(pa.Table.from_batches(self._pending))
        self._pending, self._pending_rows = [], 0


class _GzipStream:
    """gzip through isal in pigz style: 256 KiB blocks deflated on the process's two deflate threads, each primed with
    the previous block's last 32 KiB, written in order (pipeline/gzip_blocks.py). The header has mtime 0 and no file
    name, so bytes depend on the data only. Never Arrow's own gzip stream: it was about 15x slower on this project's
    benchmark machine (bench/rollover.py)."""

    def __init__(self, target: _DigestFile):
        self._gz = BlockGzipWriter(target, level=GZIP_LEVEL, threads=GZIP_THREADS, block_size=GZIP_BLOCK_BYTES)

    def compress(self, data: Any, /) -> bytes:
        self._gz.write(data)
        return b""

    def flush(self) -> bytes:
        self._gz.close()
        return b""

    def discard(self) -> None:
        """The file being thrown away: its blocks in flight are dropped."""
        self._gz.discard()


class _WorkerFileWriter:
    """What both file writers share: the last chunk, then closing on the ordered worker, in order."""

    _worker: _OrderedWorker
    _chunks: Any

    def _close(self, result: list[EncodedFile]) -> None:
        raise NotImplementedError

    def finish(self) -> EncodedFile:
        self._chunks.flush()
        result: list[EncodedFile] = []
        self._worker.submit(self._close, result)
        self._worker.drain()
        return result[0]


class _CsvFileWriter(_WorkerFileWriter):
    def __init__(self, out_dir: Path, name: str, spec: EncodeSpec, worker: _OrderedWorker):
        self.rows = 0
        self._worker = worker
        self._file = _LocalFile(out_dir, name)
        self._compressor: _Compressor = (
            _GzipStream(self._file.digest) if spec.compression == "gzip" else _compressor(spec.compression)
        )
        self._chunks = _Rechunker(CSV_CHUNK_ROWS, self._format)
        self._header_done = not spec.csv_header
        self._delimiter = spec.csv_delimiter

    def _format(self, table: pa.Table) -> None:
        # Formatting runs on the caller's thread, compression on the worker: the two cores overlap.
        self._worker.submit(self._sink, csv_chunk(table, header=not self._header_done, delimiter=self._delimiter))
        self._header_done = True

    def _sink(self, chunk: Any) -> None:
        data = self._compressor.compress(chunk)
        if data:
            self._file.digest.write(data)

    def write(self, batch: pa.RecordBatch) -> None:
        self._chunks.add(batch)
        self.rows += batch.num_rows

    def _close(self, result: list[EncodedFile]) -> None:
        tail = self._compressor.flush()
        if tail:
            self._file.digest.write(tail)
        result.append(self._file.commit(self.rows))

    def abort(self) -> None:
        if isinstance(self._compressor, _GzipStream):
            self._compressor.discard()
        self._file.discard()


class _ParquetFileWriter(_WorkerFileWriter):
    def __init__(self, out_dir: Path, name: str, spec: EncodeSpec, worker: _OrderedWorker):
        self.rows = 0
        self._worker = worker
        self._file = _LocalFile(out_dir, name, background=True)  # the worker encodes; hashing and writing overlap
        schema = output_schema(spec)
        dictionary = [c.header for c in spec.columns if c.source not in HIGH_CARDINALITY_SOURCES]
        self._writer = pq.ParquetWriter(
            self._file.digest,
            schema,
            compression=spec.compression,
            use_dictionary=dictionary or False,
            write_statistics=True,
        )
        # Chunks go to the worker, which collects whole row groups: at most one row group (+ a chunk) in memory.
        self._chunks = _Rechunker(CSV_CHUNK_ROWS, lambda table: self._worker.submit(self._row_groups.add_table, table))
        self._row_groups = _TableRechunker(PARQUET_ROW_GROUP_ROWS, self._write_row_group)

    def _write_row_group(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=PARQUET_ROW_GROUP_ROWS)

    def write(self, batch: pa.RecordBatch) -> None:
        self._chunks.add(batch)
        self.rows += batch.num_rows

    def _close(self, result: list[EncodedFile]) -> None:
        self._row_groups.flush()
        self._writer.close()
        result.append(self._file.commit(self.rows))

    def abort(self) -> None:
        self._file.discard()


class _TableRechunker(_Rechunker):
    """A _Rechunker fed with tables (chunks of whole row groups, on the worker thread)."""

    def add_table(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            self.add(batch)


def local_file_name(part: int, spec: EncodeSpec) -> str:
    return f"part-{part:05d}.{spec.extension}"


def encode_batches(
    batches: Iterable[pa.RecordBatch],
    spec: EncodeSpec,
    constants: Mapping[str, str],
    out_dir: Path,
    *,
    on_file: Callable[[EncodedFile], None] | None = None,
) -> list[EncodedFile]:
    """Encode staged batches into files `part-00001.<ext>`, ... in `out_dir`.

    Args:
        batches: record batches holding the staged columns of read_schema(spec) (more are ignored, other types
            cast), in the order rows must appear.
        spec: format, compression, columns and the row cap per file.
        constants: feed_id, segment_id and operation of the partition (the constant columns).
        out_dir: existing local folder; finished files appear there only complete (temp + fsync + rename).
        on_file: called after each file is renamed into place (progress, lease heartbeat, crash tests).

    Returns the files in part order; an input without rows gives no file at all.
    """
    project = _ColumnProjector(spec, {"blank": "", **constants})
    writer_class = _ParquetFileWriter if spec.file_format == "parquet" else _CsvFileWriter
    files: list[EncodedFile] = []
    current: _FileWriter | None = None
    budget = _ByteBudget(spec)
    worker = _OrderedWorker.take()
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            projected = project(batch)
            budget.measure(projected)
            offset = 0
            while offset < projected.num_rows:
                if current is None:
                    current = writer_class(out_dir, local_file_name(len(files) + 1, spec), spec, worker)
                    budget.start_file()
                take = budget.rows_that_fit(
                    offset, min(projected.num_rows - offset, spec.max_rows_per_file - current.rows), current.rows
                )
                if take:
                    current.write(projected.slice(offset, take))
                    offset += take
                if current.rows >= spec.max_rows_per_file or not take or budget.full:
                    files.append(_finish(current, on_file))
                    current = None
        if current is not None:
            files.append(_finish(current, on_file))
            current = None
    except BaseException:
        if current is not None:
            try:
                worker.drain()
            except BaseException:  # noqa: BLE001,S110 - the original error is the one to report
                pass
            current.abort()
        raise
    finally:
        worker.release()
    if files:
        fsync_dir(out_dir)
    return files


class _ByteBudget:
    """Where `max_file_bytes` splits: the most rows whose CSV lines (plus the header) fit in what is left of the
    file. A row larger than the whole cap goes alone into its own file rather than blocking the roll."""

    def __init__(self, spec: EncodeSpec):
        self.cap = spec.max_file_bytes
        self.delimiter = spec.csv_delimiter
        self.header = header_bytes(spec)
        self.used = 0
        self.full = False
        self._cumulative: pa.Array | None = None  # bytes of the batch's rows before each row, then the total

    def measure(self, batch: pa.RecordBatch) -> None:
        if self.cap is not None:
            self._cumulative = pa.concat_arrays(
                [pa.array([0], pa.int64()), pc.cumulative_sum(row_bytes(batch, self.delimiter))]
            )

    def start_file(self) -> None:
        self.used = self.header
        self.full = False

    def rows_that_fit(self, offset: int, wanted: int, rows_in_file: int) -> int:
        if self.cap is None or self._cumulative is None:
            return wanted
        base = self._cumulative[offset].as_py()
        # cumulative sizes only grow: the rows that fit are those whose running total stays within the budget
        window = self._cumulative.slice(offset + 1, wanted)
        take = pc.sum(pc.cast(pc.less_equal(window, base + self.cap - self.used), pa.int64())).as_py() or 0
        if take == 0 and rows_in_file == 0:
            take = 1
        self.used += self._cumulative[offset + take].as_py() - base
        self.full = take < wanted
        return take


def _finish(writer: _FileWriter, on_file: Callable[[EncodedFile], None] | None) -> EncodedFile:
    encoded = writer.finish()
    if on_file is not None:
        on_file(encoded)
    return encoded
