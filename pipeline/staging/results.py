"""What staging answers and raises: append results, stats, recovery reports, and its errors."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

DISK_FULL_RETRY_MS = 5_000
STAGED_FULL_RETRY_MS = 2_000
FILES_FULL_RETRY_MS = 1_000
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_FILES = (errno.EMFILE, errno.ENFILE)


class StagingFull(Exception):
    """Staging refuses new rows for now (disk, staged bytes or descriptors); retry after `retry_after_ms`."""

    def __init__(self, reason: str, retry_after_ms: int):
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        super().__init__(reason)


class StagingClosed(RuntimeError):
    """append after close(), or a Staging used in a process other than the one that created it."""


class CorruptSegment(Exception):
    """A segment that fails its frame checks when read; `Staging.repair_segment` quarantines it."""

    def __init__(self, path: Path, offset: int, reason: str):
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"{path}: bad frame at byte {offset}: {reason}")


def full_error(err: BaseException) -> BaseException:
    """A full volume or descriptor table becomes StagingFull (the caller answers `retry`); other errors stay."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return StagingFull(f"no space left on the staging volume ({err.strerror})", DISK_FULL_RETRY_MS)
    if isinstance(err, OSError) and err.errno in NO_FILES:
        return StagingFull(f"too many open files ({err.strerror})", FILES_FULL_RETRY_MS)
    return err


class AppendResult(NamedTuple):
    segment: str  # "<writer_id>-<seq>": the journal holding these rows (or, for duplicates, the latest one)
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class PartitionStats:
    rows: int
    bytes: int
    oldest_ts_ms: int | None  # commit time of the oldest frame still staged
    open_segments: int  # writer journals (not split yet) holding rows of the partition
    sealed_segments: int


@dataclass
class RecoveryReport:
    sealed: list[str] = field(default_factory=list)  # orphaned journals (or old open segments) split / sealed
    truncated: list[tuple[str, int]] = field(default_factory=list)  # (segment, bytes cut from a torn tail)
    quarantined: list[str] = field(default_factory=list)  # damaged in the middle: good frames kept, original moved
    removed_empty: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # could not be split now (a full volume): kept whole, retried
    busy: int = 0  # journals or open segments whose live owner holds the lock
