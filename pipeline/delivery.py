"""Rolling a partition through the feed's sink: one entry point for batch_update, the age timer and the CLI.

Sinks are kept per feed configuration (a boto3 client or an SSH session is expensive to build); each is used by one
thread at a time, and threads rolling partitions of one feed at once take one each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from config.feed import FeedProperties
from pipeline.ledger import Ledger, atomic_write_json, partition_dir
from pipeline.model import Partition
from pipeline.rollover import RollOutcome, roll_partition
from sinks import Sink, SinkError, open_sink
from sinks.base import TransientError

log = logging.getLogger("filefeed.delivery")

MAX_SINKS_PER_CONFIG = 8  # connections one destination gets from one process at most (the flush concurrency's default)
SINK_WAIT_SECONDS = 60.0


class SinkPool:
    """Open sinks by feed configuration; a changed configuration gets a new sink.

    A sink is used by one thread at a time; threads rolling partitions of the same feed at once (batch_update in
    several threads, a parallel `filefeed flush`) each take an idle sink of that configuration or open one, so they do
    not queue behind each other, up to `per_config` at once per configuration (a roll waits `wait_seconds` for one,
    then gets a transient error). Idle sinks are kept for reuse.
    """

    def __init__(self, per_config: int = MAX_SINKS_PER_CONFIG, wait_seconds: float = SINK_WAIT_SECONDS) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[Sink]] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self.per_config = per_config
        self.wait_seconds = wait_seconds

    @contextmanager
    def sink(self, props: FeedProperties) -> Iterator[Sink]:
        key = props.model_dump_json()  # includes secrets, but only as a dict key in memory
        with self._lock:
            slots = self._slots.setdefault(key, threading.BoundedSemaphore(self.per_config))
        if not slots.acquire(timeout=self.wait_seconds):
            raise TransientError(f"all {self.per_config} connections to {props.destination} are busy",
                                 kind="busy")
        try:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                sink = idle.pop() if idle else None
            if sink is None:
                sink = open_sink(props)
            try:
                yield sink
            except SinkError:
                # a broken connection must not poison later rolls: reopen next time
                sink.close()
                raise
            except BaseException:
                self._give_back(key, sink)
                raise
            self._give_back(key, sink)
        finally:
            slots.release()

    def _give_back(self, key: str, sink: Sink) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(sink)

    def close(self) -> None:
        with self._lock:
            sinks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for sink in sinks:
            sink.close()


POOL = SinkPool()


LAST_ERROR = "last_error.json"


def record_error(root: Path, partition: Partition, outcome: RollOutcome) -> None:
    """Keep the partition's latest roll error on disk for troubleshoot and `filefeed status` (messages hold no
    secrets: sinks never put credentials in them)."""
    pdir = partition_dir(root, partition)
    try:
        if pdir.is_dir():
            atomic_write_json(pdir / LAST_ERROR, {"error_class": outcome.status, "kind": outcome.error_kind,
                                                  "message": outcome.error, "time": datetime.now(UTC).isoformat()})
    except OSError as e:  # e.g. the staging volume is full: the roll's own outcome still reaches the caller
        log.warning("could not record the last error of %s: %s", partition, e.strerror or e)


def clear_error(root: Path, partition: Partition) -> None:
    """The partition delivered again: its last error is history (status and troubleshoot stop showing it)."""
    try:
        (partition_dir(root, partition) / LAST_ERROR).unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not clear the last error of %s: %s", partition, e.strerror or e)


def roll(root: Path, partition: Partition, props: FeedProperties, *, wait_seconds: float = 0.0,
         pool: SinkPool = POOL) -> RollOutcome:
    """Resume unfinished rolls of the partition, then roll and publish everything sealed; metrics and a log line."""
    from filefeed import metrics  # the service's metrics; a no-op registry in CLI processes

    started = time.perf_counter()
    try:
        with pool.sink(props) as sink:
            outcome = roll_partition(root, partition, props, sink, wait_seconds=wait_seconds)
    except SinkError as e:  # opening the sink failed (missing dependency, unusable configuration)
        outcome = RollOutcome(status="transient" if e.transient else "terminal", error=str(e), error_kind=e.kind)
    seconds = time.perf_counter() - started
    scheme = props.destination.scheme
    nbytes = 0
    if outcome.roll_ids and outcome.status == "published":
        ledger = Ledger(partition_dir(root, partition))
        nbytes = sum(e.bytes for rid in outcome.roll_ids if (e := ledger.get(rid)) is not None)
    metrics.observe_roll(scheme, outcome, seconds, nbytes)
    if outcome.status in ("transient", "terminal"):
        metrics.observe_error(outcome.status, outcome.error_kind or "unknown")
        record_error(root, partition, outcome)
        log.warning("roll of %s: %s (%s): %s", partition, outcome.status, outcome.error_kind, outcome.error,
                    extra={"feed_id": partition.feed_id, "segment_id": partition.segment_id,
                           "outcome": outcome.status, "error_class": outcome.error_kind})
    elif outcome.status == "published":
        clear_error(root, partition)
        log.info("roll of %s: published %d rows in %d files in %.2fs", partition, outcome.rows, len(outcome.files),
                 seconds, extra={"feed_id": partition.feed_id, "segment_id": partition.segment_id,
                                 "outcome": "published", "rows": outcome.rows, "files": len(outcome.files)})
    return outcome
