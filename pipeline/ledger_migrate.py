"""Migration of the previous ledger layout (one `published/<roll_id>.json` per roll, per partition) into SQLite.

Runs on the first ledger access of each process (server start, every CLI command). Per partition:

1. every readable `published/*.json` is inserted in one transaction (`INSERT OR IGNORE`: a roll already there is
   neither duplicated nor counted twice in the totals) and committed durably;
2. then the folder is renamed to a hidden `.published.migrated` (fsync of the partition folder) and deleted, so an
   operator's `ls` no longer shows a ledger that is not read any more.

A kill -9 before the commit leaves the JSON files as they were (the transaction is rolled back by SQLite); after it,
the next run inserts nothing new and finishes the rename and the delete. A file that cannot be read as a ledger entry
stays in `published/` (with a warning), alone, for an operator to look at; it is never silently dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.durable import fsync_dir
from pipeline.ledger import PUBLISHED, LedgerEntry, _db, insert_entry, published_ts, read_json
from pipeline.model import Partition

log = logging.getLogger("filefeed.ledger")

CRASH_ENV = "FILEFEED_CRASH_AT"  # the rollover crash tests' variable: die like a kill -9 at a named point
MIGRATED = ".published.migrated"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


def _old_layout_partitions(root: Path) -> list[tuple[Path, str]]:
    """(partition folder, partition name) of every partition holding a `published/` or a leftover of a migration."""
    found = []
    feeds = root / "feeds"
    try:
        feed_dirs = [e for e in os.scandir(feeds) if e.is_dir()]
    except FileNotFoundError:
        return found
    for feed in feed_dirs:
        for segment in (e for e in os.scandir(feed.path) if e.is_dir()):
            for op in (e for e in os.scandir(segment.path) if e.is_dir()):
                pdir = Path(op.path)
                if (pdir / PUBLISHED).is_dir() or (pdir / MIGRATED).exists():
                    try:
                        name = str(Partition(feed.name, segment.name, op.name))
                    except ValueError:
                        continue
                    found.append((pdir, name))
    return sorted(found)


def migrate(root: Path) -> int:
    """Move every old-layout ledger entry under `root` into the database; the number of rolls inserted."""
    inserted = 0
    for pdir, partition in _old_layout_partitions(root):
        shutil.rmtree(pdir / MIGRATED, ignore_errors=True)  # a previous run committed, renamed, then died
        inserted += _migrate_partition(root, pdir, partition)
    if inserted:
        log.info("ledger: migrated %d rolls from published/ folders into %s", inserted, root / "ledger.sqlite3")
    return inserted


def _migrate_partition(root: Path, pdir: Path, partition: str) -> int:
    folder = pdir / PUBLISHED
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return 0  # another process finished this partition meanwhile
    entries: list[LedgerEntry] = []
    unreadable: list[str] = []
    for name in names:
        try:
            entry = LedgerEntry.from_dict(read_json(folder / name))
        except FileNotFoundError:
            return 0  # another process renamed the folder away after committing it
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            unreadable.append(name)
            continue
        if entry.partition != partition or f"{entry.roll_id}.json" != name:
            unreadable.append(name)
            continue
        entries.append(entry)
    inserted = 0
    with _db(root, write=True) as conn:
        for i, entry in enumerate(entries):
            inserted += insert_entry(conn, entry, published_ts(entry))
            if i == len(entries) // 2:
                _crash_point("migrate:half")  # mid-transaction: nothing of this partition is committed
    _crash_point("migrate:committed")
    if unreadable:
        for name in names:
            if name not in unreadable:
                (folder / name).unlink(missing_ok=True)
        fsync_dir(folder)
        log.warning("ledger: %d files in %s are not ledger entries and were left there: %s", len(unreadable),
                    folder, ", ".join(unreadable[:5]))
        return inserted
    try:
        os.rename(folder, pdir / MIGRATED)
    except FileNotFoundError:
        return inserted
    fsync_dir(pdir)
    _crash_point("migrate:renamed")
    shutil.rmtree(pdir / MIGRATED, ignore_errors=True)
    return inserted
