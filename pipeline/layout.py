"""The on-disk vocabulary of the staging volume: folder names, suffixes, name patterns, the staged row, the walker.

    <root>/journal/open/<writer>-<seq>.jnl            one per live writer: its rows of every partition, tagged
    <root>/feeds/<feed>/<segment>/<op>/
        sealed/<writer>-<seq>.jnl                    one partition's rows of one writer journal, ready for a roll
        open/<writer>-<seq>.jnl                      (before 1.x: per-partition open segments, recovered on start)
        lease, rolling/, published/, failed/         the roll state machine (pipeline/rollover.py)
    <root>/quarantine/...                            damaged segments and journals with their report
    <root>/run/seal-requests/<writer>/               "seal this journal now" hints between workers

Every module that names a folder or a segment imports it from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.model import Partition

FEEDS = "feeds"
JOURNAL = "journal"
OPEN = "open"
SEALED = "sealed"
ROLLING = "rolling"
PUBLISHED = "published"
FAILED = "failed"
QUARANTINE = "quarantine"
SUFFIX = ".jnl"

WRITER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")
# Refs come back from the platform in batch_update: only this shape may ever become a path.
SEGMENT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,48}-[0-9]{8,12}")

# Characters that would break a TSV line. CR counts because pyarrow (like most CSV readers) ends a line on it.
FORBIDDEN_CHARS = "\t\n\r\0"
FORBIDDEN_RE = re.compile("[\t\n\r\0]")

# A staged row: (identifier_type, identifier, ts, session_id, datamart_id, user_point_id), STAGED_FIELDS order.
Row = tuple[str, str, int, str, str, str]


def segment_name(writer_id: str, seq: int) -> str:
    return f"{writer_id}-{seq:08d}"


def writer_of(name: str) -> str:
    return name.removesuffix(SUFFIX).rpartition("-")[0]


def sort_key(path: Path) -> tuple[str, int]:
    writer, _, seq = path.stem.rpartition("-")
    return (writer, int(seq) if seq.isdigit() else -1)


def partition_dir(root: Path | str, partition: Partition) -> Path:
    return Path(root) / partition.relpath


def journal_dir(root: Path | str) -> Path:
    return Path(root) / JOURNAL / OPEN


def quarantine_dir(root: Path | str, partition: Partition | None) -> Path:
    if partition is None:
        return Path(root) / QUARANTINE / JOURNAL
    return Path(root) / QUARANTINE / partition.feed_id / partition.segment_id / partition.operation


def subdirs(path: Path | str) -> list[str]:
    """Names of the visible sub-folders of `path`, sorted; none when it is missing."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def segment_files(folder: Path) -> list[Path]:
    """`*.jnl` files of a folder (temp files start with a dot and are left out); none when it is missing."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def iter_partition_dirs(root: Path | str) -> Iterator[tuple[Partition, Path]]:
    """Every partition folder under feeds/, sorted, with its path. Folders that are not partitions are skipped."""
    feeds = Path(root) / FEEDS
    for feed in subdirs(feeds):
        for segment in subdirs(feeds / feed):
            for operation in subdirs(feeds / feed / segment):
                try:
                    p = Partition(feed, segment, operation)
                except ValueError:
                    continue  # an operator's file, a stray name: ignore rather than fail a listing
                yield p, feeds / feed / segment / operation


def iter_partitions(root: Path | str) -> Iterator[Partition]:
    for p, _ in iter_partition_dirs(root):
        yield p


def roll_folder_holding(pdir: Path, name: str) -> str | None:
    """ROLLING or FAILED when a roll folder of the partition holds segment file `name`."""
    for state in (ROLLING, FAILED):
        for roll in subdirs(pdir / state):
            if (pdir / state / roll / "segments" / name).exists():
                return state
    return None
