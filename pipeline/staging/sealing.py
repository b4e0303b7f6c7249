"""Seal requests and waits: where a segment ref stands, and waiting (bounded) until it is sealed and split.

A batch_update waiting for rows still in another live worker's journal asks that worker to seal it now (an empty
file in run/seal-requests/<writer>/) instead of waiting for its age. The owner's committer looks every
SEAL_REQUEST_POLL_SECONDS while it has a journal open; the asker removes its file when done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.layout import (
    OPEN,
    SEALED,
    SEGMENT_NAME_RE,
    SUFFIX,
    journal_dir,
    partition_dir,
    writer_of,
)
from pipeline.model import Partition
from pipeline.staging.recovery import recover_journal, recover_open_segment
from pipeline.staging.results import RecoveryReport

SEAL_REQUEST_POLL_SECONDS = 0.05


def seal_request_dir(root: Path, writer_id: str) -> Path:
    return root / "run" / "seal-requests" / writer_id


def _request_name(partition: Partition, name: str) -> str:
    # ids and segment names hold only [A-Za-z0-9_-]: '~' cannot occur in them
    return f"{partition.feed_id}~{partition.segment_id}~{partition.operation}~{name}"


def requested_names(root: Path, writer_id: str) -> set[str]:
    """Journal names other processes asked this writer to seal; the request files are consumed."""
    folder = seal_request_dir(root, writer_id)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set()
    for n in names:
        try:
            os.unlink(folder / n)
        except FileNotFoundError:
            pass
    return {parts[3] for parts in (n.split("~") for n in names) if len(parts) >= 4}


def remove_empty_seal_request_dirs(root: Path) -> None:
    """Writers come and go with their processes; their request folders, once empty, can go too."""
    base = root / "run" / "seal-requests"
    try:
        writers = os.listdir(base)
    except FileNotFoundError:
        return
    for writer in writers:
        try:
            os.rmdir(base / writer)
        except OSError:
            pass  # not empty (a request being served) or already gone


def ask_seals(root: Path, own_writer: str, partition: Partition, names: list[str]) -> list[Path]:
    """Ask the live writers of other processes to seal `names` now; returns the request files to remove."""
    asked: list[Path] = []
    for name in names:
        writer = writer_of(name)
        if writer == own_writer:
            continue
        folder = seal_request_dir(root, writer)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # one file per asker, so one asker's clean-up never withdraws another's request
            path = folder / f"{_request_name(partition, name)}~{os.getpid()}-{threading.get_ident()}"
            path.touch()  # a hint, not state: no fsync (a lost request only means waiting for the age seal)
        except OSError:
            continue  # e.g. a full volume: the journal is still sealed by age
        asked.append(path)
    return asked


def _remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def segment_state(root: Path, partition: Partition, name: str) -> str | None:
    """'open' (rows still in a writer journal, or an old-layout open segment), 'sealed' (in the partition's sealed/),
    or None: rolled, quarantined, unknown, not a segment name, or a journal that held no row of this partition."""
    name = name.removesuffix(SUFFIX)
    if not SEGMENT_NAME_RE.fullmatch(name):
        return None
    file = name + SUFFIX
    pdir = partition_dir(root, partition)
    # Look in the order a segment moves (journal -> sealed/ -> a roll's folder -> the ledger), so one that moves while
    # we look is always found further on: checking sealed/ first could miss one being split now.
    pending = (journal_dir(root) / file).exists() or (pdir / OPEN / file).exists()
    if (pdir / SEALED / file).exists():  # sealed wins: a split or a repair leaves both for a moment
        return SEALED
    return OPEN if pending else None


class SealWaits:
    """The waits of a Staging (mixed into it): bounded, own journals sealed at once, others asked or recovered."""

    root: Path
    writer_id: str

    def _request_own_seals(self, names: list[str]) -> concurrent.futures.Future[object] | None:
        raise NotImplementedError

    def segment_state(self, partition: Partition, name: str) -> str | None:
        return segment_state(self.root, partition, name)

    def wait_sealed(self, partition: Partition, names: Iterable[str], timeout: float) -> dict[str, str | None]:
        """Wait (bounded by `timeout`) until none of `names` is open; return each one's final state.

        Own journals are sealed at once; a dead writer's journals are recovered; a live writer is asked to seal its
        journal now (it looks every SEAL_REQUEST_POLL_SECONDS) and otherwise seals it by age.
        """
        wanted = sorted({n.removesuffix(SUFFIX) for n in names})
        deadline = time.monotonic() + timeout
        self._request_own_seals(wanted)
        asked = ask_seals(self.root, self.writer_id, partition,
                          [n for n, st in self._states(partition, wanted).items() if st == OPEN])
        delay = 0.005
        try:
            while True:
                states = self._states_after_recovery(partition, wanted)
                if OPEN not in states.values() or time.monotonic() >= deadline:
                    return states
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
        finally:
            _remove_all(asked)

    async def wait_sealed_async(
        self, partition: Partition, names: Iterable[str], timeout: float
    ) -> dict[str, str | None]:
        wanted = sorted({n.removesuffix(SUFFIX) for n in names})
        deadline = time.monotonic() + timeout
        fut = self._request_own_seals(wanted)
        asked = ask_seals(self.root, self.writer_id, partition,
                          [n for n, st in self._states(partition, wanted).items() if st == OPEN])
        if fut is not None:
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=timeout)
        delay = 0.005
        try:
            while True:
                states = await asyncio.to_thread(self._states_after_recovery, partition, wanted)
                if OPEN not in states.values() or time.monotonic() >= deadline:
                    return states
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.1)
        finally:
            _remove_all(asked)

    def _states(self, partition: Partition, names: list[str]) -> dict[str, str | None]:
        return {n: segment_state(self.root, partition, n) for n in names}

    def _states_after_recovery(self, partition: Partition, names: list[str]) -> dict[str, str | None]:
        states = self._states(partition, names)
        for n, st in states.items():
            if st == OPEN and writer_of(n) != self.writer_id:  # OPEN implies a checked name
                # its writer may be dead: an unlocked journal is split (an old open segment sealed) right here
                report = RecoveryReport()
                recover_journal(self.root, journal_dir(self.root) / (n + SUFFIX), report, self.writer_id)
                legacy = partition_dir(self.root, partition) / OPEN / (n + SUFFIX)
                if legacy.exists():
                    recover_open_segment(self.root, partition, legacy, report, self.writer_id)
                states[n] = segment_state(self.root, partition, n)
        return states
