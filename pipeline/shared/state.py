"""Which staging roots share state in a database, and with what settings (one per server process; tests may hold
several roots in one process, each a replica of its own)."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.model import Partition
from pipeline.shared.db import Database

if TYPE_CHECKING:
    from config.settings import ServiceSettings


@dataclass
class SharedState:
    db: Database
    replica: str
    lease_seconds: float = 60.0
    orphan_seconds: float = 600.0
    _partitions: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def holder(self) -> str:
        """A name for one lease tenure: replica, process and a random part (never reused)."""
        return f"{self.replica}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def partition_id(self, partition: Partition) -> int:
        name = str(partition)
        with self._lock:
            found = self._partitions.get(name)
        if found is not None:
            return found
        with self.db.transaction("registering a partition") as conn:
            conn.execute("INSERT INTO partitions (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,))
            row = conn.execute("SELECT id FROM partitions WHERE name = %s", (name,)).fetchone()
        assert row is not None
        with self._lock:
            if len(self._partitions) > 100_000:  # bounded: a process rolling more partitions looks them up again
                self._partitions.clear()
            self._partitions[name] = int(row[0])
        return int(row[0])


_by_root: dict[str, SharedState] = {}


def _key(root: Path | str) -> str:
    return os.path.abspath(root)


def configure(root: Path | str, settings: ServiceSettings, *, upgrade: bool = True) -> SharedState | None:
    """Share `root`'s exactly-once state in FILEFEED_DATABASE_URL (schema upgraded first); None when unset."""
    if settings.database_url is None:
        _by_root.pop(_key(root), None)
        return None
    from pipeline.shared import schema

    db = Database(settings.database_url.get_secret_value(), pool_size=settings.database_pool_size,
                  timeout=settings.database_timeout_seconds)
    if upgrade:
        schema.upgrade(db)
    state = SharedState(db, settings.replica_id or socket.gethostname(),
                        lease_seconds=settings.database_lease_seconds, orphan_seconds=settings.database_orphan_seconds)
    old = _by_root.get(_key(root))
    _by_root[_key(root)] = state
    if old is not None:
        old.db.close()
    return state


def for_root(root: Path | str) -> SharedState | None:
    return _by_root.get(_key(root)) if _by_root else None


def forget(root: Path | str) -> None:
    state = _by_root.pop(_key(root), None)
    if state is not None:
        state.db.close()
