"""Rows a roll cannot encode are set aside with a report; the rest of the roll is delivered.

Every value is checked before it is staged (pipeline.identifiers, pipeline.batch), so a row that fails here was
staged by an older version or written by hand. Only `ts` has a type to check: it must be the decimal digits of an
epoch in milliseconds in [MIN_TS_MS, MAX_TS_MS] (a CSV reader such as DuckDB then infers an integer column; Parquet
stores int64). Such rows are left out of the files, counted, and listed in `rejected/<roll_id>.json` beside the
partition's ledger, which `filefeed status` shows. No single row can fail a roll.

The common case costs two vectorised passes over the ts column of each batch (all decimal, at most 14 digits:
every value below 10**14 is in range); only a batch that fails them is screened row by row (still vectorised).
Parquet reads ts as int64: a value that does not fit makes the reader refuse the chunk, and the roll reads again
with ts as text and screens it. Both reads give the same rows, so a resumed roll writes the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.durable import atomic_write_bytes
from pipeline.encode import EncodedFile, EncodeSpec, encode_batches, read_schema
from pipeline.identifiers import MAX_TS_MS, MIN_TS_MS

REJECTED = "rejected"
# Rows copied into a report; the count covers every rejected row.
MAX_REPORTED_ROWS = 1000
_SAFE_DIGITS = 14  # any 14-digit epoch ms is below MAX_TS_MS (10**14 ms is in the year 5138)
REASON = f"ts is not an integer epoch in milliseconds in [{MIN_TS_MS}, {MAX_TS_MS}]"

BatchFilter = Callable[[pa.RecordBatch], pa.RecordBatch]


class RejectedRows:
    """The rows of one roll set aside, and the check that finds them."""

    def __init__(self, int_ts: bool):
        self.int_ts = int_ts  # the files want ts as int64 (Parquet); CSV keeps the digits as text
        self.count = 0
        self.samples: list[dict[str, Any]] = []

    def screen(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if "ts" not in batch.schema.names:
            return batch
        index = batch.schema.get_field_index("ts")
        ts = batch.column(index)
        if pa.types.is_integer(ts.type):
            lo_hi = pc.min_max(ts)
            if batch.num_rows == 0 or (lo_hi["min"].as_py() >= MIN_TS_MS and lo_hi["max"].as_py() <= MAX_TS_MS):
                return batch
            good = pc.and_(pc.greater_equal(ts, MIN_TS_MS), pc.less_equal(ts, MAX_TS_MS))
            return self._keep(batch, good)
        if pc.all(pc.ascii_is_decimal(ts)).as_py() is not False and (
                batch.num_rows == 0 or pc.max(pc.binary_length(ts)).as_py() <= _SAFE_DIGITS):
            return self._typed(batch, index, ts)
        lengths = pc.binary_length(ts)
        digits = pc.and_(pc.ascii_is_decimal(ts), pc.less_equal(lengths, 15))
        # 15 digits may still exceed MAX_TS_MS: compare those as numbers, the rest cannot
        as_int = pc.cast(pc.if_else(digits, ts, "0"), pa.int64())
        good = pc.and_(digits, pc.less_equal(as_int, MAX_TS_MS))
        kept = self._keep(batch, good)
        return self._typed(kept, index, kept.column(index))

    def _typed(self, batch: pa.RecordBatch, index: int, ts: pa.Array) -> pa.RecordBatch:
        if not self.int_ts:
            return batch
        return batch.set_column(index, "ts", pc.cast(ts, pa.int64()))

    def _keep(self, batch: pa.RecordBatch, good: pa.Array) -> pa.RecordBatch:
        bad = batch.filter(pc.invert(good))
        self.count += bad.num_rows
        room = MAX_REPORTED_ROWS - len(self.samples)
        if room > 0:
            self.samples.extend(bad.slice(0, room).to_pylist())
        return batch.filter(good)

    def report(self, roll_id: str, partition: str) -> dict[str, Any]:
        return {"roll_id": roll_id, "partition": partition, "rejected_rows": self.count, "reason": REASON,
                "rows": [{k: str(v) for k, v in row.items()} for row in self.samples],
                "rows_not_listed": self.count - len(self.samples)}


def _text_ts(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string()) if f.name == "ts" else f for f in schema])


def encode_screened(
    read: Callable[[pa.Schema], Iterable[pa.RecordBatch]],
    spec: EncodeSpec,
    constants: dict[str, str],
    out: Path,
    *,
    extra: pa.Schema | None = None,
    make_filter: Callable[[], BatchFilter] | None = None,
    on_file: Callable[[EncodedFile], None] | None = None,
) -> tuple[list[EncodedFile], RejectedRows, BatchFilter | None]:
    """Encode the rows `read(schema)` yields, minus the rows that cannot be encoded and what the filter drops.

    `extra` names staged columns the filter needs beyond what the files show; `make_filter` gives a fresh filter
    for each read (a second read must not see the first one's rows as seen). Returns the filter that was used.
    """
    from pipeline.staging import CorruptSegment  # late: staging imports the encoders' neighbours

    schema = read_schema(spec)
    for f in extra or ():
        if f.name not in schema.names:
            schema = schema.append(f)
    int_ts = pa.types.is_integer(schema.field("ts").type) if "ts" in schema.names else False
    rejects = RejectedRows(int_ts)
    then = make_filter() if make_filter else None
    try:
        files = encode_batches(_filtered(read(schema), rejects, then), spec, constants, out, on_file=on_file)
        return files, rejects, then
    except CorruptSegment as e:
        if e.offset != -1 or not int_ts:
            raise  # a damaged frame, not a value the typed reader refused
    # valid frames whose ts does not fit int64: read ts as text and screen it
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    rejects = RejectedRows(int_ts)
    then = make_filter() if make_filter else None
    files = encode_batches(_filtered(read(_text_ts(schema)), rejects, then), spec, constants, out, on_file=on_file)
    return files, rejects, then


# A filter works on batches of at least this many rows: the parser's batches hold a few thousand rows, and a
# vectorised filter pays a fixed cost per call (measured: about half of the dedup's time on 4,000-row batches).
FILTER_ROWS = 65_536


def _filtered(batches: Iterable[pa.RecordBatch], rejects: RejectedRows, then: BatchFilter | None
              ) -> Iterator[pa.RecordBatch]:
    if then is None:
        for batch in batches:
            batch = rejects.screen(batch)
            if batch.num_rows:
                yield batch
        return
    group: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        batch = rejects.screen(batch)
        group.append(batch)
        rows += batch.num_rows
        if rows >= FILTER_ROWS:
            yield from _apply(then, group)
            group, rows = [], 0
    if rows:
        yield from _apply(then, group)


def _apply(then: BatchFilter, group: list[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    batch = group[0] if len(group) == 1 else pa.Table.from_batches(group).combine_chunks().to_batches()[0]
    batch = then(batch)
    if batch.num_rows:
        yield batch


def write_report(pdir: Path, rejects: RejectedRows, roll_id: str, partition: str) -> Path | None:
    """`rejected/<roll_id>.json` when the roll set rows aside (rewritten whole by a resumed roll)."""
    if not rejects.count:
        return None
    import json

    folder = pdir / REJECTED
    folder.mkdir(exist_ok=True)
    path = folder / f"{roll_id}.json"
    body = json.dumps(rejects.report(roll_id, partition), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, body.encode("utf-8"))
    return path


def rejected_rows(pdir: Path) -> tuple[int, list[str]]:
    """(rows set aside, report names) of a partition, for status and troubleshoot."""
    import json

    try:
        names = sorted(n for n in (p.name for p in (pdir / REJECTED).iterdir()) if n.endswith(".json")
                       and not n.startswith("."))
    except FileNotFoundError:
        return 0, []
    total = 0
    for name in names:
        try:
            total += int(json.loads((pdir / REJECTED / name).read_bytes()).get("rejected_rows", 0))
        except (OSError, ValueError, AttributeError):
            continue
    return total, names
