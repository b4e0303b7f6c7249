"""Ingest dedup: drop rows this writer committed recently (a platform retry of the same update)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from pipeline.journal import encode_payload
from pipeline.layout import Row
from pipeline.model import Partition


class Pending(Protocol):
    rows: Sequence[Row]
    lines: list[str]
    payload: bytes
    accepted: int
    duplicates: int


class DedupWindow:
    """The last `size` row keys this writer committed (0 = off). Only the committing thread touches it.

    Per writer: a retry that lands on another worker process (or on this one after a restart) is not caught here;
    the roll/ledger side must tolerate it.
    """

    def __init__(self, size: int):
        self.size = size
        self._keys: set[int] = set()
        self._fifo: deque[int] = deque()

    def filter(self, partition: Partition, group: Sequence[Pending]) -> tuple[list[int], list[tuple[bytes, int]]]:
        """Drop rows already committed (or repeated in this commit); return new keys and (payload, rows) per entry.

        Keys only join the window after their fsync (`remember`): a failed commit must not make its retry look like
        a duplicate. The key hashes (partition, session_id, identifier_type, identifier, ts): a retried request
        repeats all of them, while a user re-added later in the same session has a new ts and must not be dropped.
        """
        keys: list[int] = []
        payloads: list[tuple[bytes, int]] = []
        window = self._keys
        prefix = partition.relpath
        seen: set[int] = set()
        for e in group:
            if not self.size:
                payloads.append((e.payload, len(e.lines)))
                e.accepted = len(e.lines)
                continue
            kept: list[str] | None = None
            dups = 0
            for i, r in enumerate(e.rows):
                k = hash((prefix, r[3], r[0], r[1], r[2]))
                if k in window or k in seen:
                    if kept is None:
                        kept = e.lines[:i]
                    dups += 1
                    continue
                seen.add(k)
                keys.append(k)
                if kept is not None:
                    kept.append(e.lines[i])
            if kept is None:
                payloads.append((e.payload, len(e.lines)))
            else:
                payloads.append((encode_payload(kept), len(kept)))
            e.accepted = len(e.lines) - dups
            e.duplicates = dups
        return keys, payloads

    def remember(self, keys: list[int]) -> None:
        if not keys:
            return
        self._keys.update(keys)
        self._fifo.extend(keys)
        fifo, window = self._fifo, self._keys
        for _ in range(len(fifo) - self.size):
            window.discard(fifo.popleft())
