"""The few file-system moves every state change is made of: write whole, fsync, rename, fsync the folder."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

# Temp files are `.<name>.<pid>-<thread>-<n>.tmp`: unique per call, so two threads (or two processes) writing the
# same target never share one (one's rename would take the other's file away mid-write).
TEMP_SUFFIX = ".tmp"
_COUNTER = itertools.count()
# A temp file older than this was left by a crash: a live write lasts milliseconds.
STALE_TEMP_SECONDS = 3600.0


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_zeros(fd: int, size: int) -> None:
    """Write `size` zero bytes at the file position, 1 MiB at a time (pre-written journals, and the bench's)."""
    zeros = memoryview(bytes(min(size, 1 << 20)))
    done = 0
    while done < size:
        n = min(len(zeros), size - done)
        write_all(fd, zeros[:n])
        done += n


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path` no other call uses (pid, thread and a per-process counter)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_COUNTER)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _write_temp(path: Path, data: bytes) -> Path:
    temp = temp_path(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old content or the whole new one: temp file, fsync, rename, fsync the folder."""
    temp = _write_temp(path, data)
    os.replace(temp, path)
    fsync_dir(path.parent)


def create_only_bytes(path: Path, data: bytes) -> bool:
    """Make `path` appear whole with `data` unless it exists already: True when this call created it.

    link(2) fails with EEXIST like open(O_CREAT|O_EXCL), so of two concurrent callers exactly one creates the file,
    and nobody ever sees it partly written.
    """
    temp = _write_temp(path, data)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def remove_stale_temps(folder: Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Remove temp files a crash left in `folder` (not its subfolders); returns how many."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for e in entries:
        if is_temp_name(e.name):
            try:
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(e.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
