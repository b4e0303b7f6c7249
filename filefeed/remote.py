"""Delivered files read where they are (a local folder, S3, GCS, SFTP), like local ones, through smart-open.

`open_delivered` gives a stream of one published object, with the feed's own credentials: smart-open's S3 and GCS
readers on the sink's configured client (its endpoint, keys, region), and smart-open's decompression (gzip, zstd)
chosen from the name. SFTP is the exception for the transport only: smart-open's SSH transport accepts an unknown
host key and records it (paramiko's AutoAddPolicy), which filefeed never does, so the bytes come from the SFTP sink's
host-key-checked connection and smart-open decompresses them.

smart-open decompresses zstd with `backports.zstd` before Python 3.14; filefeed already writes zstd with `zstandard`,
so `.zst` is registered to a zstandard reader instead of adding a second zstd library.

`inspect` reads a delivered file's rows through it; `verify --deep` hashes the raw bytes through it, a chunk at a
time, so a large object never sits in memory whole.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import unquote

from config.feed import Destination, FeedProperties, parse_destination
from sinks import SinkError, TerminalError, TransientError

CHUNK = 1 << 20
DATA_SUFFIXES = (".csv", ".csv.gz", ".csv.zst", ".parquet")


def _zstd_reader(file_obj: IO[bytes], mode: str, **_kw: Any) -> IO[bytes]:
    import io

    import zstandard

    if "r" not in mode:
        raise ValueError("filefeed reads .zst through smart-open, it never writes it there")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(file_obj, closefd=True))


def _smart_open() -> Any:
    import smart_open

    smart_open.register_compressor(".zst", _zstd_reader)
    return smart_open


def name_in(dest: Destination, url: str) -> str | None:
    """The object name of `url` under the destination `dest`, or None when the URL is elsewhere."""
    try:
        target = parse_destination(url)
    except ValueError:
        return None
    if (target.scheme, target.host, target.user, target.port) != (dest.scheme, dest.host, dest.user, dest.port):
        return None
    base = dest.path.rstrip("/")
    path = unquote(target.path)
    if dest.scheme in ("s3", "gs"):
        rest = path if not base else path[len(base) + 1:] if path.startswith(base + "/") else None
    else:
        rest = path[len(base) + 1:] if path.startswith(base + "/") else None
    return rest or None


def feed_for_url(url: str, props_by_feed: dict[str, FeedProperties]) -> tuple[str, str] | None:
    """(feed id, object name) of the feed whose destination holds `url`; the longest destination wins."""
    hits = [(len(p.destination.path), fid, name) for fid, p in props_by_feed.items()
            if (name := name_in(p.destination, url)) is not None]
    if not hits:
        return None
    _, fid, name = max(hits)
    return fid, name


def _compression(name: str, decompress: bool) -> str:
    if not decompress:
        return "disable"
    return ".gz" if name.endswith(".gz") else ".zst" if name.endswith(".zst") else "disable"


@contextmanager
def open_delivered(sink: Any, name: str, *, decompress: bool = True) -> Iterator[IO[bytes]]:
    """A binary stream of the published object `name` (decompressed by its extension unless `decompress=False`).
    Errors are SinkErrors (transient: the destination is not reachable; terminal: missing, refused)."""
    from smart_open.compression import compression_wrapper

    smart_open = _smart_open()
    scheme = sink.destination.scheme
    compression = _compression(name, decompress)
    try:
        if scheme == "sftp":
            stream = compression_wrapper(sink.open_read(name), "rb", compression)
        else:
            params: dict[str, Any] = {"client": sink.client} if scheme in ("s3", "gs") else {}
            target = sink.url(name) if scheme != "file" else f"{sink.destination.path.rstrip('/')}/{name}"
            stream = smart_open.open(target, "rb", compression=compression, transport_params=params)
    except SinkError:
        raise
    except FileNotFoundError:
        raise TerminalError(f"{sink.url(name)}: not found", kind="not_found") from None
    except Exception as e:
        raise _classify(e, sink.url(name)) from None
    try:
        yield stream
    finally:
        stream.close()


@contextmanager
def open_local(path: str) -> Iterator[IO[bytes]]:
    """A local delivered file, decompressed by its extension: the same reader as a remote one."""
    with _smart_open().open(path, "rb", compression=_compression(path, True)) as f:
        yield f


def _classify(e: BaseException, url: str) -> SinkError:
    if isinstance(e, ImportError):
        return TerminalError(f"{url}: cannot read it: {e} (pip install the missing module)", kind="config")
    text = f"{type(e).__name__}: {e}"
    if any(s in text for s in ("NoSuchKey", "404", "Not Found", "not found", "No such file")):
        return TerminalError(f"{url}: not found", kind="not_found")
    if any(s in text for s in ("AccessDenied", "403", "Forbidden", "401", "Permission")):
        return TerminalError(f"{url}: access refused ({type(e).__name__})", kind="permission")
    return TransientError(f"{url}: cannot read it ({type(e).__name__})", kind="network")


def sha256_of(sink: Any, name: str) -> str:
    """The sha256 of the object's bytes, streamed."""
    h = hashlib.sha256()
    try:
        with open_delivered(sink, name, decompress=False) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except SinkError:
        raise
    except Exception as e:  # a stream that broke mid-way
        raise _classify(e, sink.url(name)) from None
    return h.hexdigest()


def read_rows(stream: IO[bytes], name: str, limit: int) -> tuple[list[str], list[tuple], int | None]:
    """(header, up to `limit` rows (0 = all), total rows when known without reading further) of a delivered CSV or Parquet stream. CSV cells
    stay text: ids keep their leading zeros, hashes stay strings."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if name.endswith(".parquet"):
        pf = pq.ParquetFile(stream)
        rows: list[tuple] = []
        for batch in pf.iter_batches(batch_size=max(1, min(limit or 65_536, 65_536))):
            rows.extend(tuple(r.values()) for r in batch.to_pylist())
            if limit and len(rows) >= limit:
                break
        return pf.schema_arrow.names, rows[:limit] if limit else rows, pf.metadata.num_rows
    if not name.endswith((".csv", ".csv.gz", ".csv.zst")):
        raise ValueError(f"{name}: not a delivered file ({', '.join(DATA_SUFFIXES)})")
    first = stream.readline().decode("utf-8")
    header = next(csv.reader([first]), [])
    if not header:
        return [], [], 0
    reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(column_names=header),
                            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header}))
    rows = []
    for batch in reader:
        rows.extend(tuple(r.values()) for r in batch.to_pylist())
        if limit and len(rows) >= limit:  # the rest is never downloaded: the total stays unknown
            return header, rows[:limit], None
    return header, rows, len(rows)
