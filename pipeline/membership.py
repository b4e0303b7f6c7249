"""A segment's membership as sorted runs of changes, merged last-writer-wins in bounded memory.

A run is an Arrow IPC file (lz4) of changes sorted by (identifier, identifier_type), one row per identifier: the
change that wins for it. A change is a staged row plus its operation. Which change wins is a total order, so the
result never depends on the order changes arrive or are applied, and applying one twice changes nothing:

    greater ts wins; at equal ts DELETE wins (a removal is never undone by a simultaneous add); at equal ts and
    operation the greater (session_id, datamart_id, user_point_id) wins (only so that the choice is deterministic)

The state of a segment is one run, the *base*, holding the winner of every identifier seen: members (UPSERT) and
tombstones (DELETE, kept so that an add older than a removal arriving late stays removed, until they are older than
the snapshot's horizon: pipeline/snapshot.py). A snapshot merges
the base with the runs of new changes, streaming: each input is read a batch at a time and the merge emits every
identifier up to the smallest last identifier of the buffered batches, so memory is (number of inputs) x (batch
size), whatever the segment's size. More than MAX_FAN_IN inputs are first merged in groups.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.durable import fsync_dir
from pipeline.model import STAGED_FIELDS, STAGED_SCHEMA

UPSERT_RANK, DELETE_RANK = 0, 1
OPERATION_RANKS = {"UPSERT": UPSERT_RANK, "DELETE": DELETE_RANK}
# identifier first: Arrow sorts by the first key and compares the others only on ties, and most segments hold one
# identifier type (sorting by it first made every row a tie: 30 % slower, measured)
KEY = ("identifier", "identifier_type")
# Sort order inside a key: the winner sorts last.
ORDER = (*KEY, "ts", "op", "session_id", "datamart_id", "user_point_id")
# The staged row with its operation's rank after ts (identifier_type, identifier, ts, op, session_id, ...).
_TS_AT = STAGED_SCHEMA.get_field_index("ts") + 1
SCHEMA = pa.schema([*STAGED_SCHEMA][:_TS_AT] + [pa.field("op", pa.int8())] + [*STAGED_SCHEMA][_TS_AT:])
# Rows per batch read from a run, and per sorted run an apply writes: 64 Ki rows of hex identifiers are ~10 MB; an
# apply sorts RUN_ROWS changes in memory (256 Ki: ~100 MB at the peak of the sort; 1 Mi took the 10 M-member
# snapshot bench past 500 MB).
BATCH_ROWS = 65_536
RUN_ROWS = 262_144
MAX_FAN_IN = 16
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def changes(batch: pa.RecordBatch, operation: str) -> pa.Table:
    """Staged rows of one operation as changes (SCHEMA)."""
    rank = pa.array([OPERATION_RANKS[operation]] * batch.num_rows, pa.int8())
    columns = {name: batch.column(name) for name in STAGED_FIELDS}
    columns["op"] = rank
    return pa.table([columns[f.name].cast(f.type) for f in SCHEMA], schema=SCHEMA)


def winners(table: pa.Table) -> pa.Table:
    """One row per identifier, the winning change, sorted by identifier."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([(name, "ascending") for name in ORDER])
    if table.num_rows == 1:
        return table
    kinds, ids = table.column("identifier_type"), table.column("identifier")
    last_of_key = pc.or_(
        pc.not_equal(kinds.slice(0, len(kinds) - 1), kinds.slice(1)),
        pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)),
    )
    keep = pa.concat_arrays([*pc.fill_null(last_of_key, True).chunks, pa.array([True])])
    return table.filter(keep)


class RunWriter:
    """A run file written whole: hidden temp name, fsync, rename, fsync of the folder."""

    def __init__(self, path: Path):
        self.path = path
        self.temp = path.with_name(f".{path.name}.tmp")
        self.rows = 0
        self._file = open(self.temp, "wb")  # noqa: SIM115 - closed by commit/abort
        self._writer = pa.ipc.new_file(self._file, SCHEMA, options=_IPC_OPTIONS)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table, max_chunksize=BATCH_ROWS)
            self.rows += table.num_rows

    def commit(self) -> int:
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.path)
        fsync_dir(self.path.parent)
        return self.rows

    def abort(self) -> None:
        self._file.close()
        self.temp.unlink(missing_ok=True)


def write_runs(tables: Iterable[pa.Table], folder: Path, prefix: str) -> list[tuple[str, int]]:
    """Changes -> sorted runs `<prefix>-<n>.run` of at most RUN_ROWS changes each; [(name, rows)].

    Deterministic: the same changes in the same order give the same runs, so an apply resumed after a crash
    writes the files it wrote before.
    """
    out: list[tuple[str, int]] = []
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending_rows:
            return
        name = f"{prefix}-{len(out) + 1:04d}.run"
        writer = RunWriter(folder / name)
        try:
            writer.write(winners(pa.concat_tables(pending)))
        except BaseException:
            writer.abort()
            raise
        out.append((name, writer.commit()))
        pending, pending_rows = [], 0

    for table in tables:
        offset = 0
        while offset < table.num_rows:
            take = min(table.num_rows - offset, RUN_ROWS - pending_rows)
            pending.append(table.slice(offset, take))
            pending_rows += take
            offset += take
            if pending_rows >= RUN_ROWS:
                flush()
    flush()
    return out


def read_run(path: Path) -> Iterator[pa.Table]:
    """The batches of a run, in order, one at a time (never memory-mapped: RSS stays the batch size)."""
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def _last_key(table: pa.Table) -> tuple[str, str]:
    n = table.num_rows - 1
    return table.column(KEY[0])[n].as_py(), table.column(KEY[1])[n].as_py()


def _split(table: pa.Table, bound: tuple[str, str]) -> int:
    """Rows of `table` (sorted) whose key is <= bound. Python compares str by code point, which is the order of
    their UTF-8 bytes: the order Arrow sorts in."""
    first, second = table.column(KEY[0]), table.column(KEY[1])
    return bisect_right(range(table.num_rows), bound, key=lambda i: (first[i].as_py(), second[i].as_py()))


def merge(inputs: list[Iterator[pa.Table]]) -> Iterator[pa.Table]:
    """Merge sorted inputs (each one row per key) into the winners, in key order, chunk by chunk."""
    buffers: list[pa.Table | None] = [None] * len(inputs)
    live = list(range(len(inputs)))
    while True:
        for i in list(live):
            while buffers[i] is None or buffers[i].num_rows == 0:  # type: ignore[union-attr]
                batch = next(inputs[i], None)
                if batch is None:
                    live.remove(i)
                    buffers[i] = None
                    break
                buffers[i] = batch.combine_chunks()
        if not live:
            return
        if len(live) == 1:
            yield buffers[live[0]]  # type: ignore[misc]
            buffers[live[0]] = None
            continue
        # every identifier <= bound is buffered already: each input is sorted and unique, so its next batch
        # starts after its buffer's last identifier, which is >= bound
        bound = min(_last_key(buffers[i]) for i in live)  # type: ignore[arg-type]
        heads: list[pa.Table] = []
        for i in live:
            buffer = buffers[i]
            assert buffer is not None
            cut = _split(buffer, bound)
            if cut:
                heads.append(buffer.slice(0, cut))
                buffers[i] = buffer.slice(cut)
        yield winners(pa.concat_tables(heads))


def merge_files(paths: list[Path], work: Path) -> tuple[list[Iterator[pa.Table]], list[Path]]:
    """Inputs for merge() over the runs `paths`, pre-merging groups into `work` when there are too many.

    Returns the inputs and the temporary runs made (the caller removes them once the merge is done).
    """
    paths = list(paths)
    temps: list[Path] = []
    while len(paths) > MAX_FAN_IN:
        group, paths = paths[:MAX_FAN_IN], paths[MAX_FAN_IN:]
        temp = work / f"premerge-{len(temps) + 1:04d}.run"
        writer = RunWriter(temp)
        for table in merge([read_run(p) for p in group]):
            writer.write(table)
        writer.commit()
        temps.append(temp)
        paths.append(temp)
    return [read_run(p) for p in paths], temps


def newest_ts(table: pa.Table) -> int | None:
    """The greatest ts among winners (members and tombstones), None for no rows."""
    value = pc.max(table.column("ts")).as_py() if table.num_rows else None
    return None if value is None else int(value)


def without_tombstones_before(table: pa.Table, horizon_ms: int) -> pa.Table:
    """Winners less the removals whose ts is before `horizon_ms`: members are all kept."""
    old = pc.and_(pc.equal(table.column("op"), DELETE_RANK), pc.less(table.column("ts"), horizon_ms))
    return table.filter(pc.invert(old))


def members(table: pa.Table) -> pa.Table:
    """The current members among merged winners, as staged columns (STAGED_FIELDS)."""
    kept = table.filter(pc.equal(table.column("op"), UPSERT_RANK))
    return kept.select(list(STAGED_FIELDS))
