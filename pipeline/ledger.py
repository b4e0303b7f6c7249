"""The roll ledger: what was published, under which names, from which staged segments; and the small on-disk
primitives every roll state change is made of.

State lives in folders whose names say the state (style.md, dlt's load packages), and the ledger in one SQLite
database beside them:

    <root>/ledger.sqlite3 (+ -wal, -shm)    the ledger of every partition: one row per published roll, one per
                                             segment it consumed, running totals per partition
    <root>/feeds/<feed>/<segment>/<op>/
        sealed/<writer>-<seq>.jnl        staged segments, complete (split from staging's writer journals)
        lease                            the roller holding the partition (pid, host, time)
        rolling/<roll_id>/               a roll in progress: plan.json, segments/, out/, encoded.json, sent/
        failed/<roll_id>/reason.json     a roll that failed terminally, with its segments and files, retryable

Each move between folder states is a rename after an fsync, followed by an fsync of the folder, so a crash leaves
every roll in exactly one state and an operator's `ls` tells which. A roll's ledger row is committed (WAL,
`synchronous=FULL`: on disk before `record` returns) before its `rolling/` folder is removed.

Why SQLite: the hot lookups of batch_update ("which of these segments were published?") are one indexed query
whatever the history, several worker processes and the CLI share the file with row-level transactions, and memory
stays flat (no per-process cache). The previous layout, one `published/<roll_id>.json` per roll, is migrated on
first open (`pipeline/ledger_migrate.py`). Entries older than the retention (`FILEFEED_LEDGER_RETENTION_DAYS`) are
pruned a few at a time by every `record` and by the server's housekeeping thread; the per-partition totals keep
counting what was pruned.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.durable import atomic_write_bytes, fsync_dir  # noqa: F401 - re-exported for rollover
from pipeline.layout import FAILED, OPEN, PUBLISHED, ROLLING, SEALED, partition_dir  # noqa: F401 - re-exported
from pipeline.model import Partition

LEDGER_VERSION = 1
DB_NAME = "ledger.sqlite3"

DEFAULT_RETENTION_DAYS = 14.0
BUSY_TIMEOUT_SECONDS = 10.0  # several workers and the CLI share the file: wait this long for a write lock, no more
PRUNE_PER_RECORD = 16  # expired rolls removed by each record: faster than any rate of new rolls, bounded per call
PRUNE_BATCH = 500  # expired rolls removed per housekeeping call
_IN_CHUNK = 500  # names per `IN (...)` query (SQLite's default limit on host parameters is 32,766)
MIGRATE_WAIT_SECONDS = 300.0
_MAX_CONNECTIONS = 8  # per thread: one per staging root; tests and benches open many roots in one thread

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rolls (
    id INTEGER PRIMARY KEY,
    partition TEXT NOT NULL,
    roll_id TEXT NOT NULL,
    published_ts REAL NOT NULL,
    entry TEXT NOT NULL,
    UNIQUE (partition, roll_id)
);
CREATE INDEX IF NOT EXISTS rolls_by_age ON rolls (published_ts);
CREATE INDEX IF NOT EXISTS rolls_by_publication ON rolls (partition, published_ts);  -- + rowid, implicitly
CREATE TABLE IF NOT EXISTS segments (
    partition TEXT NOT NULL,
    name TEXT NOT NULL,
    roll INTEGER NOT NULL,
    PRIMARY KEY (partition, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS segments_by_roll ON segments (roll);
CREATE TABLE IF NOT EXISTS totals (
    partition TEXT PRIMARY KEY,
    rolls INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
"""


class LedgerError(OSError):
    """The ledger database could not be read or written (locked beyond the timeout, disk full, damaged).

    An OSError, so a roll classifies it as local trouble (transient: the roll stays in rolling/ and resumes)."""


def json_bytes(obj: Any) -> bytes:
    """Stable JSON (sorted keys, fixed separators): the same state always gives the same bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


@dataclass(frozen=True)
class LedgerEntry:
    """One published roll."""

    roll_id: str
    partition: str
    planned_at: str
    published_at: str
    files: tuple[Mapping[str, Any], ...]  # name, rows, bytes, sha256 (remote names)
    manifest: Mapping[str, Any] | None
    rows: int
    bytes: int
    segments: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        return cls(
            roll_id=str(data["roll_id"]),
            partition=str(data["partition"]),
            planned_at=str(data["planned_at"]),
            published_at=str(data["published_at"]),
            files=tuple(data.get("files", ())),
            manifest=data.get("manifest"),
            rows=int(data.get("rows", 0)),
            bytes=int(data.get("bytes", 0)),
            segments=tuple(data.get("segments", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "roll_id": self.roll_id,
            "partition": self.partition,
            "planned_at": self.planned_at,
            "published_at": self.published_at,
            "files": [dict(f) for f in self.files],
            "manifest": dict(self.manifest) if self.manifest is not None else None,
            "rows": self.rows,
            "bytes": self.bytes,
            "segments": list(self.segments),
        }


@dataclass(frozen=True)
class DeliveryTotals:
    """Everything a partition ever published, pruned entries included."""

    rolls: int = 0
    rows: int = 0
    files: int = 0
    bytes: int = 0


# -- retention -----------------------------------------------------------------------------------------------------

_retention_seconds = DEFAULT_RETENTION_DAYS * 86400


def configure(retention_days: float) -> None:
    """Set the retention from the validated service settings (server start, every CLI command)."""
    global _retention_seconds
    _retention_seconds = float(retention_days) * 86400


def retention_seconds() -> float:
    return _retention_seconds


# -- connections ---------------------------------------------------------------------------------------------------

_local = threading.local()
_inherited: list[sqlite3.Connection] = []  # a forked child must neither use nor close its parent's connections
_migrated: set[str] = set()
_migrate_lock = threading.Lock()


def db_path(root: Path | str) -> Path:
    return Path(root) / DB_NAME


_SCHEMA_NAMES = ("rolls", "rolls_by_age", "rolls_by_publication", "segments", "segments_by_roll", "totals")


def _open(path: str) -> sqlite3.Connection:
    """A connection in WAL mode with the schema in place, retried while another process creates the same file.

    Switching a new database to WAL needs it alone, and SQLite answers "database is locked" at once, without its
    busy handler, when another connection is doing the same: the workers of a fresh staging folder start together,
    and one of them failed its start-up that way now and then (2 to 5 of 60 concurrent opens, measured). So the open
    is retried, each attempt waiting at most what is left of BUSY_TIMEOUT_SECONDS, and a schema still missing is
    created under a write lock taken up front (BEGIN IMMEDIATE waits on the busy handler; a read upgraded to a write
    would not). An existing schema takes no write lock: opening never queues behind a writer.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.005
    while True:
        left = max(deadline - time.monotonic(), 0.001)
        conn = sqlite3.connect(path, timeout=left, isolation_level=None, check_same_thread=True)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a recorded roll survives power loss before its folder is removed
            conn.execute("PRAGMA journal_size_limit=67108864")  # the WAL file is cut back to 64 MiB after a checkpoint
            # per connection, and there is one per thread: SQLite's default 2 MiB page cache each would add up to
            # the worker's RSS; the lookups touch a few index pages, which the OS page cache keeps anyway
            conn.execute("PRAGMA cache_size=-256")
            present = conn.execute(f"SELECT count(*) FROM sqlite_master WHERE name IN ({','.join('?' * len(_SCHEMA_NAMES))})",
                                   _SCHEMA_NAMES).fetchone()[0]
            if present < len(_SCHEMA_NAMES):
                conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")  # every later statement's wait
            return conn
        except BaseException as e:
            conn.close()
            locked = isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))
            if not locked or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.2)


def _connection(root: Path | str) -> sqlite3.Connection:
    """This thread's connection to the root's ledger (opened, and the old layout migrated, on first use)."""
    key = os.path.abspath(root)
    pid = os.getpid()
    conns: dict[str, sqlite3.Connection] | None = getattr(_local, "conns", None)
    if conns is None or _local.pid != pid:
        if conns:
            _inherited.extend(conns.values())
        conns = _local.conns = {}
        _local.pid = pid
    conn = conns.get(key)
    if conn is None:
        if not os.path.isdir(key):
            raise LedgerError(f"staging folder {key} does not exist")
        while len(conns) >= _MAX_CONNECTIONS:
            conns.pop(next(iter(conns))).close()
        try:
            conn = _open(os.path.join(key, DB_NAME))
        except sqlite3.Error as e:
            raise LedgerError(f"ledger {os.path.join(key, DB_NAME)}: {e}") from None
        conns[key] = conn
    if key not in _migrated and not getattr(_local, "migrating", False):
        if not _migrate_lock.acquire(timeout=MIGRATE_WAIT_SECONDS):
            raise LedgerError(f"ledger {key}: another thread is still migrating the old published/ folders")
        try:
            if key not in _migrated:
                from pipeline.ledger_migrate import migrate

                _local.migrating = True
                try:
                    migrate(Path(key))
                finally:
                    _local.migrating = False
                _migrated.add(key)
        finally:
            _migrate_lock.release()
    return conn


@contextmanager
def _db(root: Path | str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    conn = _connection(root)
    try:
        if write:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            yield conn
    except sqlite3.Error as e:
        raise LedgerError(f"ledger {db_path(root)}: {e}") from None


def close_connections() -> None:
    """Close this thread's connections (tests that delete a staging folder; a process about to exit)."""
    conns = getattr(_local, "conns", None) or {}
    if getattr(_local, "pid", None) == os.getpid():
        for conn in conns.values():
            conn.close()
    conns.clear()


# -- writing -------------------------------------------------------------------------------------------------------


def insert_entry(conn: sqlite3.Connection, entry: LedgerEntry, published_ts: float, key: str | None = None) -> bool:
    """Add one roll inside the caller's transaction; False when it was there already (nothing counted twice).

    `key`: the ledger's partition key, from the folder the roll ran in (`<feed>/<segment>/<op>`); a snapshot roll
    runs in `<feed>/<segment>/SNAPSHOT` while its entry names the UPSERT partition its files are of."""
    key = key or entry.partition
    cur = conn.execute(
        "INSERT OR IGNORE INTO rolls (partition, roll_id, published_ts, entry) VALUES (?, ?, ?, ?)",
        (key, entry.roll_id, published_ts, json.dumps(entry.to_dict(), separators=(",", ":"))),
    )
    if cur.rowcount != 1:
        return False
    roll = cur.lastrowid
    conn.executemany("INSERT OR IGNORE INTO segments (partition, name, roll) VALUES (?, ?, ?)",
                     [(key, name, roll) for name in entry.segments])
    conn.execute(
        "INSERT INTO totals (partition, rolls, rows, files, bytes) VALUES (?, 1, ?, ?, ?) "
        "ON CONFLICT (partition) DO UPDATE SET rolls = rolls + 1, rows = rows + excluded.rows, "
        "files = files + excluded.files, bytes = bytes + excluded.bytes",
        (key, entry.rows, len(entry.files), entry.bytes),
    )
    return True


def _prune_in(conn: sqlite3.Connection, now: float, limit: int) -> int:
    ids = [r[0] for r in conn.execute("SELECT id FROM rolls WHERE published_ts < ? ORDER BY published_ts LIMIT ?",
                                      (now - _retention_seconds, limit))]
    if ids:
        marks = ",".join("?" * len(ids))
        conn.execute(f"DELETE FROM segments WHERE roll IN ({marks})", ids)  # noqa: S608 - placeholders only
        conn.execute(f"DELETE FROM rolls WHERE id IN ({marks})", ids)  # noqa: S608
    return len(ids)


def prune(root: Path | str, limit: int = PRUNE_BATCH, *, now: float | None = None) -> int:
    """Remove up to `limit` rolls older than the retention (oldest first); the number removed."""
    with _db(root, write=True) as conn:
        return _prune_in(conn, time.time() if now is None else now, limit)


class Ledger:
    """The ledger of one partition, named by its folder (`<root>/feeds/<feed>/<segment>/<op>`)."""

    def __init__(self, pdir: Path):
        pdir = Path(pdir)
        self.root = pdir.parents[3]
        self.partition = "/".join(pdir.parts[-3:])

    def has(self, roll_id: str) -> bool:
        with _db(self.root) as conn:
            return conn.execute("SELECT 1 FROM rolls WHERE partition = ? AND roll_id = ?",
                                (self.partition, roll_id)).fetchone() is not None

    def get(self, roll_id: str) -> LedgerEntry | None:
        with _db(self.root) as conn:
            row = conn.execute("SELECT entry FROM rolls WHERE partition = ? AND roll_id = ?",
                               (self.partition, roll_id)).fetchone()
        return None if row is None else LedgerEntry.from_dict(json.loads(row[0]))

    def record(self, entry: LedgerEntry) -> None:
        """Durably add a published roll (idempotent), and prune a few expired ones in the same transaction."""
        now = time.time()
        with _db(self.root, write=True) as conn:
            insert_entry(conn, entry, now, self.partition)
            _prune_in(conn, now, PRUNE_PER_RECORD)

    def entries(self) -> list[LedgerEntry]:
        """Every entry within the retention, in the order they were published (never by roll id: two rolls planned in
        the same second once sorted by their hash)."""
        with _db(self.root) as conn:
            rows = conn.execute("SELECT entry FROM rolls WHERE partition = ? ORDER BY published_ts, id",
                                (self.partition,)).fetchall()
        return [LedgerEntry.from_dict(json.loads(r[0])) for r in rows]

    def last(self, n: int) -> list[LedgerEntry]:
        """The `n` most recently published entries, newest first."""
        if n <= 0:
            return []
        with _db(self.root) as conn:
            rows = conn.execute("SELECT entry FROM rolls WHERE partition = ? ORDER BY published_ts DESC, id DESC "
                                "LIMIT ?",
                                (self.partition, n)).fetchall()
        return [LedgerEntry.from_dict(json.loads(r[0])) for r in rows]

    def consumed(self, names: Iterable[str]) -> set[str]:
        """Which of these segment file names were published (within the retention)."""
        names = list(dict.fromkeys(names))
        out: set[str] = set()
        if not names:
            return out
        with _db(self.root) as conn:
            for i in range(0, len(names), _IN_CHUNK):
                chunk = names[i:i + _IN_CHUNK]
                out.update(r[0] for r in conn.execute(
                    f"SELECT name FROM segments WHERE partition = ? AND name IN ({','.join('?' * len(chunk))})",  # noqa: S608
                    (self.partition, *chunk)))
        return out

    def totals(self) -> DeliveryTotals:
        with _db(self.root) as conn:
            row = conn.execute("SELECT rolls, rows, files, bytes FROM totals WHERE partition = ?",
                               (self.partition,)).fetchone()
        return DeliveryTotals(*row) if row else DeliveryTotals()


def consumed_segments(root: Path | str, partition: Partition) -> set[str]:
    """Names of the staged segments whose rows were published, per the ledger (within the retention)."""
    with _db(root) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM segments WHERE partition = ?", (str(partition),))}


def consumed(root: Path | str, partition: Partition, names: Iterable[str]) -> set[str]:
    """Which of these segment file names (`<writer>-<seq>.jnl`) the ledger lists as published: one indexed query."""
    return Ledger(partition_dir(root, partition)).consumed(names)


def last_deliveries(root: Path | str, partition: Partition, n: int = 10) -> list[LedgerEntry]:
    """The `n` most recent published rolls of the partition, newest first."""
    return Ledger(partition_dir(root, partition)).last(n)


def delivery_totals(root: Path | str, partition: Partition) -> DeliveryTotals:
    return Ledger(partition_dir(root, partition)).totals()


def ledger_size(root: Path | str) -> dict[str, int]:
    """Rolls held and bytes on disk (database + WAL): what the soak watches stay flat."""
    with _db(root) as conn:
        rolls = conn.execute("SELECT count(*) FROM rolls").fetchone()[0]
    size = 0
    for suffix in ("", "-wal"):
        try:
            size += os.path.getsize(str(db_path(root)) + suffix)
        except FileNotFoundError:
            pass
    return {"rolls": rolls, "bytes": size}


def published_ts(entry: LedgerEntry) -> float:
    """An entry's publication time in seconds (for entries migrated from the old layout, and to order entries of
    several ledgers: their ISO strings do not sort, a whole second has no fraction)."""
    return instant(entry.published_at)


def instant(iso: str) -> float:
    """An ISO 8601 time in seconds; now when it is unreadable (an entry edited by hand)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return time.time()


def migrate_on_start(root: Path | str) -> None:
    """Open the ledger once, which migrates an old `published/` layout (server start, before any request)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    _connection(root)
