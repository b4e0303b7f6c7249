"""Roll-time dedup: a row identical to one published in the partition within FILEFEED_DEDUP_SECONDS is dropped.

A platform retry of user_segment_update may land on any worker process; each stages the row in its own journal, so
the copies only meet when a roll reads every writer's segments of the partition. The roll drops a row whose key
(identifier_type, identifier, ts, session_id; feed, segment and operation are the partition's) it already kept, or
that a roll planned within the window before it published.

On disk, in the partition folder (read and written only under the partition's lease):
- `recent-rows/<roll_id>.<planned_ms>.bin`: one run per roll published since the last compaction, the sorted uint64
  hashes it kept. The roll writes them in its own folder when it encodes (fsynced) and renames that file in here
  after publishing, before its ledger entry: no roll rewrites the window.
- `recent-rows.arrow`: the compacted store, one Arrow IPC file of (hash uint64, roll uint32) sorted by hash, with
  the rolls it covers (id, planned time) in its metadata (the only file before runs existed: read as it is). When
  more than MAX_RUNS runs (or more than FILEFEED_DEDUP_MAX_ROWS of their rows) wait, a roll merges them in (rolls out
  of the window dropped), writes the store (temp + fsync + rename), then removes the runs; a run whose roll the store
  already covers (a crash between the two) is ignored.
Crash-safe with the roll's state machine: a resumed roll that encodes again ignores its own hashes and the rolls
planned after it, so it makes the same decision and writes the same bytes.

Bounded: a roll looks up at most FILEFEED_DEDUP_MAX_ROWS hashes (the newest rolls'); on disk the store holds at most
that many (12 bytes each) and the runs at most as many again (8 bytes each), in at most MAX_RUNS + 1 files. Hashes
are 64-bit (two different rows collide with odds about 1 in 10**19 per pair), computed with NumPy over Arrow's
buffers: no Python work per row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.durable import atomic_write_bytes, fsync_dir

STORE_NAME = "recent-rows.arrow"
KEPT_NAME = "recent-rows.bin"  # in a roll folder: the hashes this roll keeps, moved into RUNS_DIR after publishing
RUNS_DIR = "recent-rows"
RUN_SUFFIX = ".bin"
# Runs waiting before a compaction: each roll's lookup searches every run (a binary search each), and a compaction
# rewrites the store, so 16 keeps both cheap (a compaction per 16 rolls instead of a rewrite per roll).
MAX_RUNS = 16
KEY_COLUMNS = ("identifier_type", "identifier", "ts", "session_id")
KEY_SCHEMA = pa.schema([(c, pa.int64() if c == "ts" else pa.string()) for c in KEY_COLUMNS])
DEFAULT_MAX_ROWS = 1_000_000



@dataclass
class DedupSettings:
    seconds: float = 600.0  # FILEFEED_DEDUP_SECONDS; 0 = off
    max_rows: int = DEFAULT_MAX_ROWS  # FILEFEED_DEDUP_MAX_ROWS


# What new plans snapshot; the service and the CLI set it from their settings at start-up (configure).
SETTINGS = DedupSettings()


def configure(seconds: float, max_rows: int) -> None:
    SETTINGS.seconds = seconds
    SETTINGS.max_rows = max_rows


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_K = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def _string_hashes(a: pa.Array) -> np.ndarray:
    """64-bit hashes of a string array: the bytes as 8-byte words, one odd multiply per word, then a full mix."""
    n = len(a)
    if n == 0:
        return np.zeros(0, np.uint64)
    if a.null_count:
        a = pc.fill_null(a, "")
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    offsets = np.frombuffer(a.buffers()[1], np.int32, n + 1, a.offset * 4)
    lengths = np.diff(offsets)
    longest = int(lengths.max())
    width = max(8, (longest + 7) // 8 * 8)
    if longest == width and int(lengths.min()) == longest:  # fixed-width values (hex hashes): read in place
        data = np.frombuffer(a.buffers()[2], np.uint8, n * width, int(offsets[0]))
    else:
        # each value followed by zeros, cut at `width` bytes (the length is hashed too, so "a" != "a\0")
        padded = pc.binary_join_element_wise(a.cast(pa.binary()), pa.scalar(b"\0" * width, pa.binary()),
                                             pa.scalar(b"", pa.binary()))
        padded = pc.binary_slice(padded, 0, width)
        po = np.frombuffer(padded.buffers()[1], np.int32, n + 1, padded.offset * 4)
        data = np.frombuffer(padded.buffers()[2], np.uint8, n * width, int(po[0]))
    words = data.reshape(n, width).view(np.uint64)
    h = lengths.astype(np.uint64) * _K
    for j in range(words.shape[1]):
        h ^= words[:, j]
        h *= _M1
    return _mix(h)


def _low_cardinality_hashes(a: pa.Array) -> np.ndarray:
    """Columns with few values (type, session): hash the distinct values only."""
    n = len(a)
    if n and not a.null_count and not isinstance(a, pa.ChunkedArray):
        offsets = np.frombuffer(a.buffers()[1], np.int32, n + 1, a.offset * 4)
        width = int(offsets[1] - offsets[0])
        # one value in the whole batch (the usual case): equal lengths and every row equal to the first
        if offsets[-1] - offsets[0] == n * width and (np.diff(offsets) == width).all():
            data = np.frombuffer(a.buffers()[2], np.uint8, n * width, int(offsets[0])) if width else None
            if data is None or (data.reshape(n, width) == data[:width]).all():
                return np.full(n, _string_hashes(a.slice(0, 1))[0], np.uint64)
    encoded = pc.dictionary_encode(a)
    return _string_hashes(encoded.dictionary)[np.asarray(encoded.indices)]


def row_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """One uint64 per row of `batch`, from its KEY_COLUMNS (ts as int64 or as its digits: the same hash)."""
    ts = batch.column(batch.schema.get_field_index("ts"))
    if not pa.types.is_integer(ts.type):
        ts = pc.cast(ts, pa.int64())
    h = np.asarray(ts, dtype=np.int64).view(np.uint64) * _K
    h ^= _string_hashes(batch.column(batch.schema.get_field_index("identifier")))
    h = _mix(h)
    for name in ("identifier_type", "session_id"):
        h ^= _low_cardinality_hashes(batch.column(batch.schema.get_field_index(name)))
        h *= _M2
    return _mix(h)


def _run_name(roll_id: str, planned_ms: int) -> str:
    return f"{roll_id}.{planned_ms}{RUN_SUFFIX}"


def _parse_run_name(name: str) -> tuple[str, int] | None:
    roll_id, _, planned = name.removesuffix(RUN_SUFFIX).rpartition(".")
    if not name.endswith(RUN_SUFFIX) or not roll_id or not planned.isdigit():
        return None
    return roll_id, int(planned)


class RecentRows:
    """The partition's window: hashes of rows published by recent rolls (the compacted store and the runs)."""

    def __init__(self, hashes: np.ndarray, rolls_of: np.ndarray, rolls: list[tuple[str, int]],
                 runs: Sequence[tuple[str, int, np.ndarray]] = ()):
        self.hashes = hashes  # sorted
        self.rolls_of = rolls_of  # index into rolls, per hash
        self.rolls = rolls  # (roll_id, planned_ms)
        self.runs = list(runs)  # (roll_id, planned_ms, sorted hashes) of rolls not compacted into the store yet
        self._store_sizes: dict[str, int] | None = None  # hashes per roll of the store, counted once

    @classmethod
    def load(cls, pdir: Path) -> RecentRows:
        try:
            with pa.memory_map(str(pdir / STORE_NAME)) as source:
                table = pa.ipc.open_file(source).read_all()
            rolls = [(str(r), int(t)) for r, t in json.loads(table.schema.metadata[b"rolls"])]
            hashes, rolls_of = np.asarray(table.column("hash")).copy(), np.asarray(table.column("roll")).copy()
        except FileNotFoundError:
            hashes, rolls_of, rolls = np.zeros(0, np.uint64), np.zeros(0, np.uint32), []
        covered = {r for r, _ in rolls}
        runs = []
        try:
            names = sorted(os.listdir(pdir / RUNS_DIR))
        except FileNotFoundError:
            names = []
        for name in names:
            parsed = _parse_run_name(name)
            if parsed is not None and parsed[0] not in covered:
                runs.append((*parsed, np.fromfile(pdir / RUNS_DIR / name, np.uint64)))
        return cls(hashes, rolls_of, rolls, runs)

    def _sizes(self) -> dict[str, int]:
        if self._store_sizes is None:  # a bincount of a full store's million roll numbers: once, not at every lookup
            counts = np.bincount(self.rolls_of, minlength=len(self.rolls)) if len(self.rolls) else np.zeros(0)
            self._store_sizes = {r: int(counts[i]) for i, (r, _) in enumerate(self.rolls)}
        sizes = dict(self._store_sizes)
        sizes.update((r, len(h)) for r, _, h in self.runs)
        return sizes

    def _selected(self, planned_ms: int, window_ms: int, max_rows: int, before: str | None = None) -> list[str]:
        """Rolls in the window of `planned_ms` (and before `before`), the newest first until max_rows."""
        planned = dict(self.rolls)
        planned.update((r, t) for r, t, _ in self.runs)
        rolls = sorted(r for r, t in planned.items() if t >= planned_ms - window_ms and (before is None or r < before))
        sizes = self._sizes()
        chosen: list[str] = []
        budget = max_rows
        for r in reversed(rolls):
            if sizes[r] > budget:
                break
            budget -= sizes[r]
            chosen.append(r)
        return chosen

    def known_before(self, roll_id: str, planned_ms: int, window_ms: int, max_rows: int) -> list[np.ndarray]:
        """Sorted runs of hashes of the rolls planned before `roll_id`, within the window (never its own), at most
        max_rows of them (the newest rolls')."""
        chosen = set(self._selected(planned_ms, window_ms, max_rows, before=roll_id))
        in_store = np.array([r in chosen for r, _ in self.rolls], bool)  # per roll of the store: looked up or not
        if in_store.all():
            found = [self.hashes]
        else:
            # a table lookup per hash (rolls_of indexes self.rolls): np.isin sorted the million roll numbers of a
            # full store at every roll, 8 ms of a 10,000-row batch_update's 50
            found = [self.hashes[in_store[self.rolls_of]]]
        return [h for h in found + [h for r, _, h in self.runs if r in chosen] if len(h)]

    def compacted(self, planned_ms: int, window_ms: int, max_rows: int) -> RecentRows:
        """The store with every run merged in: rolls out of the window of `planned_ms` dropped, at most max_rows."""
        planned = dict(self.rolls)
        planned.update((r, t) for r, t, _ in self.runs)
        keep_rolls = sorted((r, planned[r]) for r in self._selected(planned_ms, window_ms, max_rows))
        index = {r: i for i, (r, _) in enumerate(keep_rolls)}
        runs = {r: h for r, _, h in self.runs}
        # the store's hashes of the rolls kept, renumbered in one pass (still sorted); then the runs', merged in
        remap = np.full(len(self.rolls) + 1, -1, np.int64)
        for i, (r, _) in enumerate(self.rolls):
            if r in index and r not in runs:
                remap[i] = index[r]
        mapped = remap[self.rolls_of] if len(self.rolls_of) else np.zeros(0, np.int64)
        selected = mapped >= 0
        hashes, rolls_of = self.hashes[selected], mapped[selected].astype(np.uint32)
        added = [(np.asarray(h, np.uint64), index[r]) for r, h in runs.items() if r in index and len(h)]
        if added:
            new = np.concatenate([h for h, _ in added])
            new_rolls = np.concatenate([np.full(len(h), i, np.uint32) for h, i in added])
            order = np.argsort(new, kind="stable")
            new, new_rolls = new[order], new_rolls[order]
            at = np.searchsorted(hashes, new)
            hashes = np.insert(hashes, at, new)
            rolls_of = np.insert(rolls_of, at, new_rolls)
        return RecentRows(hashes, rolls_of, keep_rolls)

    def save(self, pdir: Path) -> None:
        """Write the compacted store (its runs are the caller's to remove once this is durable)."""
        table = pa.table({"hash": pa.array(self.hashes, pa.uint64()), "roll": pa.array(self.rolls_of, pa.uint32())})
        table = table.replace_schema_metadata({"rolls": json.dumps(self.rolls)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        atomic_write_bytes(pdir / STORE_NAME, sink.getvalue().to_pybytes())


def add_run(pdir: Path, kept: Path, roll_id: str, planned_ms: int) -> None:
    """Move a published roll's kept hashes (fsynced in its folder) into the partition's runs."""
    runs = pdir / RUNS_DIR
    if not runs.is_dir():
        runs.mkdir(exist_ok=True)
        fsync_dir(pdir)
    os.rename(kept, runs / _run_name(roll_id, planned_ms))
    fsync_dir(runs)


def compact_if_due(pdir: Path, planned_ms: int, window_ms: int, max_rows: int,
                   written: Callable[[], None] = lambda: None) -> bool:
    """Merge the runs into the store when too many wait; `written` runs once the store is durable."""
    try:  # counted from the folder: loading the store to count runs cost more than the rewrite it avoids
        with os.scandir(pdir / RUNS_DIR) as entries:
            waiting = [e.stat().st_size // 8 for e in entries if _parse_run_name(e.name) is not None]
    except FileNotFoundError:
        return False
    if len(waiting) <= MAX_RUNS and sum(waiting) <= max_rows:
        return False
    store = RecentRows.load(pdir)
    store.compacted(planned_ms, window_ms, max_rows).save(pdir)
    written()
    # every run is in the store now (or out of the window), also those a crash here left behind last time
    for name in os.listdir(pdir / RUNS_DIR):
        if _parse_run_name(name) is not None:
            (pdir / RUNS_DIR / name).unlink(missing_ok=True)
    fsync_dir(pdir / RUNS_DIR)
    return True


class _HashSet:
    """An open-addressing set of uint64 hashes, probed for a whole batch at once (linear probing).

    0 marks an empty slot: a real hash of 0 is stored as 1 (one more collision in 2**64). It starts small and
    doubles before its load passes 1/2, so probes stay short and a roll of 10,000 rows touches a table of 32 KB,
    not one sized for `capacity` (2 M slots, 32 MB of page faults a roll); past `capacity` members nothing more is
    added.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._allocate(1 << 10)

    def _allocate(self, slots: int) -> None:
        self.table = np.zeros(slots, np.uint64)
        self.claim = np.zeros(slots, np.int64)  # which row of the current batch claimed an empty slot
        self.mask = np.uint64(slots - 1)

    def _reserve(self, more: int) -> None:
        """Room for `more` members at a load of at most 1/2 (never beyond what `capacity` needs)."""
        wanted = min(self.size + more, self.capacity)
        if 2 * wanted <= len(self.table):
            return
        members = self.table[self.table != 0]
        slots = len(self.table)
        while 2 * wanted > slots:
            slots *= 2
        self._allocate(slots)
        self.size = 0
        if len(members):
            self.add_new(members)

    def add_new(self, h: np.ndarray) -> np.ndarray:
        """Add the hashes `h` (repeats allowed); True for exactly one row of each hash that was not a member."""
        h = np.where(h == 0, np.uint64(1), h)
        self._reserve(len(h))
        table, claim, mask = self.table, self.claim, self.mask
        pos = h & mask
        new = np.zeros(len(h), bool)
        todo = np.arange(len(h))
        while len(todo):
            p = pos[todo]
            slot = table[p]
            empty = slot == 0
            lost = np.zeros(len(todo), bool)
            if empty.any():
                at = np.flatnonzero(empty)
                # past `capacity`: not remembered, but seen nowhere before (and the table never fills up)
                room = max(self.capacity - self.size, 0)
                new[todo[at[room:]]] = True
                at = at[:room]
                cand, cp = todo[at], p[at]
                claim[cp[::-1]] = cand[::-1]  # one row wins each empty slot: the last write, the first row
                won = claim[cp] == cand
                table[cp[won]] = h[cand[won]]
                new[cand[won]] = True
                self.size += int(np.count_nonzero(won))
                lost[at[~won]] = True  # looks at the same slot again: maybe its twin won it
            done = (empty & ~lost) | (slot == h[todo])
            advance = ~done & ~lost
            pos[todo[advance]] = (pos[todo[advance]] + np.uint64(1)) & mask
            todo = todo[~done]
        return new


class RollDedup:
    """The filter one roll applies to its batches: drops rows seen earlier in the roll or in the store's window."""

    def __init__(self, known: Sequence[np.ndarray], max_rows: int):
        self.max_rows = max_rows
        # the window's runs are sorted already: looked up per batch (a binary search in each), never copied into a
        # hash set, which cost 200-400 ms a roll for a window of 0.2-1 M rows and grew with the history
        self.known = [np.ascontiguousarray(k, np.uint64) for k in known if len(k)]
        for i, k in enumerate(self.known):
            if len(k) > 1 and not (k[:-1] <= k[1:]).all():  # the store and the runs keep them sorted
                self.known[i] = np.sort(k)
        self.seen = _HashSet(max_rows)  # rows of this roll
        self.kept: list[np.ndarray] = []  # hashes this roll kept, in row order: the newest max_rows (and a batch)
        self._kept_rows = 0
        self.dropped = 0

    def _new_in_window(self, h: np.ndarray) -> np.ndarray:
        """True for hashes the window does not hold."""
        if not self.known:
            return np.ones(len(h), bool)
        # looked up in sorted order: each binary search starts where the last ended, so a batch walks the window
        # once instead of missing the cache at every level of every search (2-3x faster for a 400,000-row window)
        order = np.argsort(h)
        ordered = h[order]
        fresh = np.ones(len(h), bool)
        for known in self.known:
            pos = np.searchsorted(known, ordered)
            pos[pos == len(known)] = 0
            fresh &= known[pos] != ordered
        new = np.empty(len(h), bool)
        new[order] = fresh
        return new

    def _keep(self, h: np.ndarray) -> np.ndarray:
        """One row of each hash nothing before had, in the roll or the window."""
        keep = self._new_in_window(h)
        fresh = np.flatnonzero(keep)
        keep[fresh] = self.seen.add_new(h[fresh])
        return keep

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if not batch.num_rows:
            return batch
        h = row_hashes(batch)
        keep = self._keep(h)
        kept = int(np.count_nonzero(keep))
        self.dropped += len(h) - kept
        self.kept.append(h[keep])
        self._kept_rows += kept
        if self._kept_rows > 2 * self.max_rows:  # only the newest max_rows are saved: memory stays bounded by them
            newest = np.concatenate(self.kept)[-self.max_rows:]
            self.kept, self._kept_rows = [newest], len(newest)
        return batch if kept == len(h) else batch.filter(pa.array(keep))

    def kept_hashes(self) -> np.ndarray:
        """The newest `max_rows` hashes this roll kept, sorted."""
        if not self.kept:
            return np.zeros(0, np.uint64)
        return np.sort(np.concatenate(self.kept)[-self.max_rows:])


class ClaimingDedup(RollDedup):
    """With a shared database: drops rows seen earlier in the roll, then claims the rest for this roll there
    (pipeline.shared.rolls); rows a published roll of any replica delivered are dropped. No local window: the
    database's claims are the memory, for the ledger's retention."""

    def __init__(self, claim: Callable[[np.ndarray], np.ndarray], max_rows: int):
        super().__init__([], max_rows)
        self.claim = claim

    def _keep(self, h: np.ndarray) -> np.ndarray:
        keep = self.seen.add_new(h)
        first = np.flatnonzero(keep)
        keep[first[~self.claim(h[first])]] = False
        return keep


def save_kept(path: Path, hashes: np.ndarray) -> None:
    atomic_write_bytes(path, np.ascontiguousarray(hashes, np.uint64).tobytes())
