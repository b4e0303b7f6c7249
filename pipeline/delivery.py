"""Rolling a partition through the feed's sink: one entry point for batch_update, the age timer and the CLI.

Sinks are kept per feed configuration (a boto3 client or an SSH session is expensive to build), one roll at a time
each (see SinkPool).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from config.feed import FeedProperties
from pipeline import snapshot
from pipeline.ledger import Ledger, atomic_write_json, partition_dir
from pipeline.model import Partition
from pipeline.naming import listing_prefixes, name_pattern
from pipeline.rollover import RollMode, RollOutcome, iter_partitions, roll_partition
from sinks import Sink, SinkError, TransientError, open_sink, sink_class
from sinks.base import Leftover, set_deadlines

if TYPE_CHECKING:
    from config.settings import ServiceSettings

log = logging.getLogger("filefeed.delivery")

class SinkPool:
    """Open sinks by feed configuration; a changed configuration gets new sinks.

    A sink whose class is `shareable` (S3: a boto3 client is thread-safe and costly to build, ~0.1-0.8 s of CPU
    holding the GIL; the local folder) is one object for all concurrent rolls of a configuration. Any other (an SSH
    session, GCS's requests session) is used by one roll at a time: each configuration keeps up to `per_config` of
    them, a roll takes an idle one or opens another, and waits for one to come back at most `checkout_seconds` (then
    TransientError "busy"). Never a lock without a timeout; a roll stuck at one partner never makes a roll of another
    partition wait on it.
    """

    def __init__(self, per_config: int = 8, checkout_seconds: float = 30.0) -> None:
        self.per_config = per_config
        self.checkout_seconds = checkout_seconds
        self._cond = threading.Condition()
        self._idle: dict[str, list[Sink]] = {}
        self._open: dict[str, int] = {}
        self._shared: dict[str, Sink] = {}

    def _take(self, key: str, props: FeedProperties) -> Sink:
        if sink_class(props.destination.scheme).shareable:
            with self._cond:
                shared = self._shared.get(key)
                if shared is None:
                    shared = self._shared[key] = open_sink(props)  # cheap: connections are opened on first use
                return shared
        deadline = time.monotonic() + self.checkout_seconds
        with self._cond:
            while True:
                idle = self._idle.get(key)
                if idle:
                    return idle.pop()
                if self._open.get(key, 0) < self.per_config:
                    self._open[key] = self._open.get(key, 0) + 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientError(f"{props.destination.scheme}:// destination busy: {self.per_config} rolls "
                                         f"use it already", kind="busy")
                self._cond.wait(left)
        try:
            return open_sink(props)
        except BaseException:
            self._give_back(key, None)
            raise

    def _give_back(self, key: str, sink: Sink | None) -> None:
        with self._cond:
            if self._shared.get(key) is not None:
                return
            if sink is None:
                self._open[key] -= 1
            else:
                self._idle.setdefault(key, []).append(sink)
            self._cond.notify()

    @contextmanager
    def sink(self, props: FeedProperties) -> Iterator[Sink]:
        key = props.model_dump_json()  # includes secrets, but only as a dict key in memory
        sink = self._take(key, props)
        try:
            yield sink
        except BaseException:
            # a broken connection must not poison later rolls: the next roll opens a fresh one
            if sink.shareable:  # other rolls may be using it: replaced, closed when they are done with it
                with self._cond:
                    if self._shared.get(key) is sink:
                        del self._shared[key]
                raise
            self._give_back(key, None)
            sink.close()
            raise
        self._give_back(key, sink)

    def close(self) -> None:
        with self._cond:
            sinks = [s for idle in self._idle.values() for s in idle] + list(self._shared.values())
            self._shared.clear()
            for key, idle in self._idle.items():
                self._open[key] -= len(idle)
            self._idle.clear()
        for sink in sinks:
            sink.close()


POOL = SinkPool()


LEFTOVERS = {"older_than": 3600.0}
SWEEP_EVERY_SECONDS = 600.0
_last_sweep: dict[tuple[str, str], float] = {}  # (feed id, sink configuration) -> when this process last swept
_sweep_lock = threading.Lock()


def configure(settings: ServiceSettings) -> None:
    """The process's sink deadlines, pool size and leftover age, from the service settings (server and CLI alike)."""
    set_deadlines(settings.sink_connect_timeout_seconds, settings.sink_read_timeout_seconds)
    POOL.per_config = max(POOL.per_config, settings.destination_concurrency + 1)
    LEFTOVERS["older_than"] = settings.leftover_age_seconds


def own_names(root: Path, feed_id: str, props: FeedProperties) -> tuple[list[str], Callable[[str], bool]]:
    """Where this feed's files are and which names are its own: the feed's naming over the segments staged here."""
    segments = sorted({p.segment_id for p in iter_partitions(root) if p.feed_id == feed_id})
    template = props.file_name_template
    pattern = name_pattern(template, {"feed_id": [feed_id], "segment_id": segments})
    found = {p for seg in segments or [""] for p in listing_prefixes(template, {"feed_id": feed_id, "segment_id": seg})}
    prefixes = sorted(p for p in found if not any(q != p and p.startswith(q) for q in found))
    return prefixes, lambda name: bool(pattern.fullmatch(name))


def find_leftovers(sink: Sink, root: Path, feed_id: str, props: FeedProperties, older_than: float) -> list[Leftover]:
    prefixes, own = own_names(root, feed_id, props)
    return list(sink.leftovers(prefixes, older_than, own))


def sweep_leftovers(sink: Sink, root: Path, partition: Partition, props: FeedProperties) -> int:
    """Remove temp files and incomplete uploads of this feed's own naming older than the setting (a process killed
    mid-upload leaves them). Once per SWEEP_EVERY_SECONDS per feed and process; never fails the roll."""
    key = (partition.feed_id, props.model_dump_json())
    now = time.monotonic()
    with _sweep_lock:
        if now - _last_sweep.get(key, -SWEEP_EVERY_SECONDS) < SWEEP_EVERY_SECONDS:
            return 0
        _last_sweep[key] = now
    removed = 0
    try:
        for lo in find_leftovers(sink, root, partition.feed_id, props, LEFTOVERS["older_than"]):
            sink.remove_leftover(lo)
            removed += 1
            log.info("removed leftover %s (%.0f s old) at %s", lo.name, lo.age_seconds, props.destination.scheme,
                     extra={"feed_id": partition.feed_id})
    except SinkError as e:
        log.warning("leftover sweep of feed %s stopped: %s", partition.feed_id, e, extra={"feed_id": partition.feed_id})
    return removed


LAST_ERROR = "last_error.json"


def record_error(root: Path, partition: Partition, outcome: RollOutcome) -> None:
    """Keep the partition's latest roll error on disk for troubleshoot and `filefeed status` (messages hold no
    secrets: sinks never put credentials in them)."""
    pdir = partition_dir(root, partition)
    try:
        if pdir.is_dir():
            atomic_write_json(pdir / LAST_ERROR, {"severity": outcome.status, "kind": outcome.error_kind,
                                                  "message": outcome.error, "time": datetime.now(UTC).isoformat()})
    except OSError as e:  # e.g. the staging volume is full: the roll's own outcome still reaches the caller
        log.warning("could not record the last error of %s: %s", partition, e.strerror or e)


def clear_error(root: Path, partition: Partition) -> None:
    """The partition delivered again: its last error is history (status and troubleshoot stop showing it)."""
    try:
        (partition_dir(root, partition) / LAST_ERROR).unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not clear the last error of %s: %s", partition, e.strerror or e)


def _roll_with(root: Path, partition: Partition, props: FeedProperties, sink: Sink, wait_seconds: float,
               slot: datetime | None) -> RollOutcome:
    # A scheduled feed delivers only at its slots (pipeline/schedule.py); any other call only resumes.
    resume_only = props.delivery_schedule is not None and slot is None
    if props.delivery_mode == "snapshot":
        return snapshot.roll_segment(root, partition, props, sink, wait_seconds=wait_seconds, slot=slot,
                                     resume_only=resume_only)
    return roll_partition(root, partition, props, sink, wait_seconds=wait_seconds,
                          kind=RollMode(slot=slot, resume_only=resume_only))


def roll(root: Path, partition: Partition, props: FeedProperties, *, wait_seconds: float = 0.0,
         pool: SinkPool = POOL, slot: datetime | None = None) -> RollOutcome:
    """Resume unfinished rolls of the partition, then roll and publish everything sealed; metrics and a log line.

    `slot`: the delivery_schedule slot being delivered (scheduled feeds are only delivered at their slots). In
    snapshot mode the partition stands for its segment (pipeline/snapshot.py).
    """
    from filefeed import metrics  # the service's metrics; a no-op registry in CLI processes

    started = time.perf_counter()
    try:
        with pool.sink(props) as sink:
            outcome = _roll_with(root, partition, props, sink, wait_seconds, slot)
            if outcome.status in ("published", "nothing"):  # the partner answers: clean what crashes left there
                sweep_leftovers(sink, root, partition, props)
    except SinkError as e:  # opening the sink failed (missing dependency, unusable configuration)
        outcome = RollOutcome(status=e.severity, error=str(e), error_kind=e.kind)
    seconds = time.perf_counter() - started
    scheme = props.destination.scheme
    nbytes = 0
    if outcome.roll_ids and outcome.status == "published":
        ledger = Ledger(partition_dir(root, partition) if props.delivery_mode == "delta"
                        else snapshot.snapshot_dir(root, partition.feed_id, partition.segment_id))
        nbytes = sum(e.bytes for rid in outcome.roll_ids if (e := ledger.get(rid)) is not None)
    metrics.observe_roll(scheme, outcome, seconds, nbytes)
    if outcome.status in ("transient", "terminal"):
        metrics.observe_error(outcome.status, outcome.error_kind or "unknown")
        record_error(root, partition, outcome)
        log.warning("roll of %s: %s (%s): %s", partition, outcome.status, outcome.error_kind, outcome.error,
                    extra={"feed_id": partition.feed_id, "segment_id": partition.segment_id,
                           "outcome": outcome.status, "severity": outcome.status,
                           "kind": outcome.error_kind})
    elif outcome.status == "published":
        clear_error(root, partition)
        log.info("roll of %s: published %d rows in %d files in %.2fs", partition, outcome.rows, len(outcome.files),
                 seconds, extra={"feed_id": partition.feed_id, "segment_id": partition.segment_id,
                                 "outcome": "published", "rows": outcome.rows, "files": len(outcome.files)})
    return outcome
