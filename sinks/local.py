"""`file:///absolute/path`: publish into a local (or mounted) folder.

Publish = when the source lies on the same filesystem, fsync it and `os.link` it straight onto the final name (no
second copy of the bytes: a roll's output files are complete, fsynced and never modified); otherwise copy to a
dot-prefixed temp file in the destination folder, fsync it, then `os.link` it onto the final name. Either way the
folder is fsynced after. `link` fails when the name exists, so publishing is create-only even against a concurrent
publisher: an existing name with identical bytes is `already_present`, with different bytes a TerminalError
(kind "conflict"). On filesystems without hard links (some FUSE/SMB mounts) it falls back to a checked `os.replace`,
which is atomic but could let a concurrent publisher of the same name win; deterministic names make that harmless.
"""

from __future__ import annotations

import errno
import filecmp
import io
import os
import shutil
import stat as stat_mod
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from sinks import register
from sinks.base import (
    Leftover,
    RemoteObject,
    Sink,
    TerminalError,
    TransientError,
    check_name,
    classify_os_error,
    temp_leftover,
    temp_name,
)

COPY_BUFFER = 1 << 20
# errors meaning "this filesystem cannot hard-link", not "the link is forbidden/there"
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    """Kernel-side copy (sendfile) for a plain file, else a buffered copy (any file-like source)."""
    if isinstance(src, io.BufferedReader) and src.tell() == 0:
        offset = 0
        try:
            while sent := os.sendfile(dst.fileno(), src.fileno(), offset, 64 * COPY_BUFFER):
                offset += sent
            return
        except OSError as e:
            if offset or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
    shutil.copyfileobj(src, dst, COPY_BUFFER)


@register
class LocalSink(Sink):
    scheme = "file"
    shareable = True
    # Publish by hard link when source and destination share a filesystem; tests of the copy path turn it off.
    link_sources = True

    @property
    def root(self) -> Path:
        return Path(self.destination.path)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    def _inside_root(self, folder: Path) -> None:
        """Refuse a folder that resolves outside the root (a symlink planted in the tree)."""
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(folder)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise TerminalError(f"{folder} resolves outside the destination folder", kind="invalid_name")

    def _makedirs(self, folder: Path) -> None:
        """mkdir -p, fsyncing the parent of every folder created so the new entries survive a crash."""
        missing: list[Path] = []
        p = folder
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    # -- Sink --------------------------------------------------------------------------------------------------
    def check(self) -> None:
        probe = self.root / f".filefeed-probe-{uuid.uuid4().hex}"
        try:
            self._makedirs(self.root)
            with open(probe, "xb") as f:
                f.write(b"filefeed probe\n")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise classify_os_error(e, f"checking {self.destination.uri}") from None

    def _link_source(self, local_path: Path, final: Path) -> bool:
        """Hard-link the source onto `final` (create-only); False when this filesystem pair cannot link."""
        fd = os.open(local_path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the published name must never point at bytes still only in the page cache
        finally:
            os.close(fd)
        try:
            os.link(local_path, final)
        except OSError as e:
            if e.errno in _NO_LINK:
                return False
            raise
        return True

    # -- publish: the hooks of Sink.publish ----------------------------------------------------------------------
    def _lookup(self, name: str) -> os.stat_result | None:
        final = self._path(name)
        self._makedirs(final.parent)
        self._inside_root(final.parent)  # before reading anything there
        try:
            return final.stat()
        except FileNotFoundError:
            return None

    def _size_of(self, found: os.stat_result) -> int:
        return found.st_size if stat_mod.S_ISREG(found.st_mode) else -1

    def _same_content(self, local_path: Path, name: str, found: os.stat_result) -> bool:
        return filecmp.cmp(local_path, self._path(name), shallow=False)

    def _create(self, local_path: Path, name: str, size: int) -> bool:
        final = self._path(name)
        if self.link_sources:
            try:
                linked = self._link_source(local_path, final)
            except FileExistsError:
                return False  # lost a race with another publisher
            if linked:
                _fsync_dir(final.parent)
                return True
        tmp: Path | None = final.parent / temp_name(final.name)
        try:
            with self.open_source(local_path) as src, open(tmp, "xb") as dst:
                _copy(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            written = tmp.stat().st_size
            if written != size:
                raise TransientError(f"{name}: wrote {written} bytes, source has {size} (changed while copying?)",
                                     kind="io")
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False  # lost a race with another publisher
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                if final.exists():
                    return False
                os.replace(tmp, final)
                tmp = None
            _fsync_dir(final.parent)
            return True
        finally:
            if tmp is not None:
                try:
                    tmp.unlink()
                except OSError:
                    pass  # best effort: a dot-prefixed leftover is never mistaken for a published file

    # -- leftovers ---------------------------------------------------------------------------------------------
    def leftovers(self, prefixes: Iterable[str], older_than: float,
                  own: Callable[[str], bool]) -> Iterator[Leftover]:
        """Our dot-prefixed temp copies (a process killed mid-copy leaves one) in the folders under `prefixes`."""
        now = time.time()
        for prefix in prefixes:
            folder = prefix.rpartition("/")[0]
            if folder:
                check_name(folder)
            start = self.root / folder if folder else self.root
            try:
                for dirpath, _dirs, filenames in os.walk(start):
                    for fn in filenames:
                        if fn.startswith("."):
                            full = Path(dirpath) / fn
                            rel = full.relative_to(self.root).as_posix()
                            if lo := temp_leftover(rel, full.lstat().st_mtime, now, older_than, own):
                                yield lo
            except FileNotFoundError:
                continue
            except OSError as e:
                raise classify_os_error(e, f"listing {self.destination.uri}") from None

    def remove_leftover(self, leftover: Leftover) -> None:
        self.remove(leftover.name)

    def stat(self, name: str) -> RemoteObject | None:
        path = self._path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise classify_os_error(e, f"stat {self.url(name)}") from None
        if not path.is_file():
            return None
        return RemoteObject(name, st.st_size)

    def list(self, prefix: str = "") -> Iterator[RemoteObject]:
        # start the walk at the deepest folder the prefix names completely
        folder, _, _ = prefix.rpartition("/")
        start = self.root / folder if folder else self.root
        if folder:
            check_name(folder)
        if not start.is_dir():
            return
        try:
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames.sort()
                for fn in sorted(filenames):
                    full = Path(dirpath) / fn
                    rel = full.relative_to(self.root).as_posix()
                    if rel.startswith(prefix) and full.is_file() and not full.is_symlink():
                        yield RemoteObject(rel, full.stat().st_size)
        except OSError as e:
            raise classify_os_error(e, f"listing {self.destination.uri}") from None

    def read(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except OSError as e:
            raise classify_os_error(e, f"reading {self.url(name)}") from None

    def remove(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise classify_os_error(e, f"removing {self.url(name)}") from None
