"""The roll ledger of a partition, and the small on-disk primitives every roll state change is made of.

State lives in folders whose names say the state (style.md, dlt's load packages):

    <root>/feeds/<feed>/<segment>/<op>/
        sealed/<writer>-<seq>.jnl        staged segments, complete (staging owns open/)
        lease                            the roller holding the partition (pid, host, time)
        rolling/<roll_id>/               a roll in progress: plan.json, segments/, out/, encoded.json, sent/
        published/<roll_id>.json         the ledger: what was published, under which names, from which segments
        failed/<roll_id>/reason.json     a roll that failed terminally, with its segments and files, retryable

Each move between states is a rename after an fsync, followed by an fsync of the folder, so a crash leaves every
roll in exactly one state and an operator's `ls` tells which.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.durable import atomic_write_bytes, fsync_dir  # noqa: F401 - re-exported for rollover
from pipeline.model import Partition

SEALED = "sealed"
OPEN = "open"
ROLLING = "rolling"
PUBLISHED = "published"
FAILED = "failed"
LEDGER_VERSION = 1


def partition_dir(root: Path | str, partition: Partition) -> Path:
    return Path(root) / partition.relpath


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
    """One published roll, as recorded in `published/<roll_id>.json`."""

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


# Ledger entries never change once written: cache them per published/ folder and read only names not seen yet.
_CACHE: dict[Path, dict[str, LedgerEntry]] = {}
_CACHE_LOCK = threading.Lock()


class Ledger:
    """The `published/` folder of one partition."""

    def __init__(self, pdir: Path):
        self.dir = pdir / PUBLISHED

    def path(self, roll_id: str) -> Path:
        return self.dir / f"{roll_id}.json"

    def has(self, roll_id: str) -> bool:
        return self.path(roll_id).exists()

    def get(self, roll_id: str) -> LedgerEntry | None:
        return self._load().get(roll_id)

    def record(self, entry: LedgerEntry) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(entry.roll_id), entry.to_dict())

    def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest roll first (roll ids start with their UTC planned time)."""
        loaded = self._load()
        return [loaded[k] for k in sorted(loaded)]

    def consumed(self, names: Iterable[str]) -> set[str]:
        """Which of these segment file names were published."""
        wanted = set(names)
        out: set[str] = set()
        if wanted:
            for entry in self._load().values():
                out.update(wanted.intersection(entry.segments))
        return out

    def _load(self) -> dict[str, LedgerEntry]:
        try:
            names = {n[: -len(".json")] for n in os.listdir(self.dir) if n.endswith(".json") and not n.startswith(".")}
        except FileNotFoundError:
            names = set()
        key = self.dir.resolve()
        with _CACHE_LOCK:
            cached = _CACHE.setdefault(key, {})
            for gone in set(cached) - names:
                del cached[gone]  # an operator pruned old entries
            for roll_id in sorted(names - set(cached)):
                try:
                    cached[roll_id] = LedgerEntry.from_dict(read_json(self.dir / f"{roll_id}.json"))
                except FileNotFoundError:
                    continue
            return dict(cached)


def consumed_segments(root: Path | str, partition: Partition) -> set[str]:
    """Names of the staged segments whose rows were published, per the ledger."""
    out: set[str] = set()
    for entry in Ledger(partition_dir(root, partition)).entries():
        out.update(entry.segments)
    return out


def consumed(root: Path | str, partition: Partition, names: Iterable[str]) -> set[str]:
    """Which of these segment file names (`<writer>-<seq>.jnl`) the ledger lists as published."""
    return Ledger(partition_dir(root, partition)).consumed(names)


def last_deliveries(root: Path | str, partition: Partition, n: int = 10) -> list[LedgerEntry]:
    """The `n` most recent published rolls of the partition, newest first."""
    entries = Ledger(partition_dir(root, partition)).entries()
    return list(reversed(entries[-n:])) if n > 0 else []
