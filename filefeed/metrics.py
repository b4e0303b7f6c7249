"""Prometheus metrics, safe with several worker processes (prometheus-client multiprocess mode).

`filefeed serve` calls `prepare_multiprocess_dir`, which points PROMETHEUS_MULTIPROC_DIR at `<staging>/run/metrics`
before any worker starts; counters and histograms then live in per-process files that a scrape of any worker sums.
Operator commands that roll (`filefeed flush`, `filefeed retry`) call `join_multiprocess_dir`, so the rows they
publish are counted by the running server too. Staged-data gauges are read from disk by a background thread of each
worker (`StagingGauges`) and served from memory, so every worker reports the same figures and a scrape never walks
the disk on the event loop.

Labels never carry a value that came from a feed's properties: feed ids, identifier types (a bounded set), sink
schemes, route names, error classes and kinds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from pipeline.staging import Staging

log = logging.getLogger("filefeed.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter("filefeed_requests", "HTTP answers by route and status code", ["route", "code"])
REQUEST_SECONDS = Histogram("filefeed_request_seconds", "Time to answer, by route", ["route"],
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30))
ROWS = Counter("filefeed_rows", "Identifier rows by outcome (accepted, rejected) and identifier type",
               ["outcome", "identifier_type"])
RETRIES = Counter("filefeed_retry_answers", "retry / RETRY answers sent to the platform", ["route"])
ROLLS = Counter("filefeed_rolls", "Rolls by sink scheme and outcome", ["scheme", "status"])
PUBLISHED_FILES = Counter("filefeed_published_files", "Files published (manifests excluded)", ["scheme"])
PUBLISHED_ROWS = Counter("filefeed_published_rows", "Rows published", ["scheme"])
PUBLISHED_BYTES = Counter("filefeed_published_bytes", "Bytes published (data files)", ["scheme"])
PUBLISH_SECONDS = Histogram("filefeed_publish_seconds", "Roll and publish latency by sink scheme", ["scheme"],
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
ERRORS = Counter("filefeed_errors", "Errors by severity (transient, terminal) and kind", ["severity", "kind"])

# identifier types come from the request (technical identifier types are open-ended): bound the label set
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_:-]{1,64}")
_MAX_ID_TYPES = 64
_id_types: set[str] = set()


def _metrics_dir(staging_dir: Path | str) -> Path:
    return Path(staging_dir) / "run" / "metrics"


def _switch_to_files(path: Path) -> None:
    """Make metric values created from now on live in `path` (per-process files).

    prometheus-client picks its value class when it is imported; the metrics above are created before `serve` or a
    CLI command knows the staging folder, so the choice is made again here. Labelled children created later use it;
    children created before keep counting in memory (none are: they appear on the first observation).
    """
    from prometheus_client import values

    os.environ[ENV] = str(path)
    values.ValueClass = values.get_value_class()
    _children.clear()


def prepare_multiprocess_dir(staging_dir: Path) -> Path:
    """Called once by `filefeed serve` before workers start: a fresh folder for this run's metric files.

    Also forgets the previous run's run-time log level, so FILEFEED_LOG_LEVEL is the initial level of every run.
    """
    from filefeed import logs

    path = _metrics_dir(staging_dir)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    _switch_to_files(path)
    logs.start_run(staging_dir)
    return path


def join_multiprocess_dir(staging_dir: Path) -> bool:
    """For operator commands: count what this process does in the running server's metrics, when there is one."""
    path = _metrics_dir(staging_dir)
    if os.environ.get(ENV) or not path.is_dir():
        return False
    _switch_to_files(path)
    return True


# labelled children resolved once: `labels()` costs more than the increment itself on the hot path
_children: dict[tuple, Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def _id_type_label(value: Any) -> str:
    if type(value) is str and value in _id_types:  # the common case: a type already seen (and so already checked)
        return value
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
        return "invalid"
    if len(_id_types) >= _MAX_ID_TYPES:
        return "other"
    _id_types.add(value)
    return value


# Hot-path counts are added up in process memory and written to the shared metric files by `flush_local()`
# (every second from the server, and before this process renders a scrape): in multiprocess mode each increment is
# an mmap write plus a pid check, which on a 2-identifier request costs more than the rest of the bookkeeping.
_local: dict[Any, float] = {}


def _count(child: Any, n: float = 1) -> None:
    _local[child] = _local.get(child, 0) + n


def flush_local() -> None:
    global _local
    pending, _local = _local, {}
    for child, n in pending.items():
        child.inc(n)


async def run_flusher(interval: float = 1.0) -> None:
    import asyncio

    try:
        while True:
            await asyncio.sleep(interval)
            flush_local()
    finally:
        flush_local()


def observe_request(route: str, code: int, seconds: float) -> None:
    _count(_child(REQUESTS, route, str(code)))
    if route != "user_segment_update":  # the hot route's latency is measured by bench/ingest.py, not per request
        _child(REQUEST_SECONDS, route).observe(seconds)
    if code in (429, 503):
        _count(_child(RETRIES, route))


def observe_update(feed_id: str, result: dict[str, Any]) -> None:
    """Rows of one user_segment_update: accepted = staged (answer `ok`), rejected = malformed identifiers.

    An answer other than `ok` staged nothing, so its accepted identifiers are not counted (the platform sends them
    again after a `retry`).
    """
    staged = result.get("status") == "ok"
    for stat in result.get("stats") or ():
        tags = stat.get("tags") or ()
        id_type = _id_type_label(tags[0].get("value") if tags else None)
        if stat.get("sync_result") == "PROCESSED":
            if staged:
                _count(_child(ROWS, "accepted", id_type))
        else:
            _count(_child(ROWS, "rejected", id_type))


def observe_roll(scheme: str, outcome: Any, seconds: float, nbytes: int) -> None:
    _child(ROLLS, scheme, outcome.status).inc()
    if outcome.status == "published":
        _child(PUBLISH_SECONDS, scheme).observe(seconds)
        _child(PUBLISHED_FILES, scheme).inc(len(outcome.files))
        _child(PUBLISHED_ROWS, scheme).inc(outcome.rows)
        _child(PUBLISHED_BYTES, scheme).inc(nbytes)


def observe_error(severity: str, kind: str) -> None:
    _child(ERRORS, severity, kind or "unknown").inc()


_GAUGES = (
    ("filefeed_staged_rows", "Rows staged and not yet published"),
    ("filefeed_staged_bytes", "Bytes staged and not yet published"),
    ("filefeed_oldest_staged_age_seconds", "Age of the oldest staged row (0: none)"),
    ("filefeed_pending_rolls", "Rolls started and not finished (resumed by the next roll)"),
    ("filefeed_failed_rolls", "Rolls in failed/ waiting for `filefeed retry`"),
)
_WATCHED = ("open", "sealed", "rolling", "failed")


class StagingGauges:
    """The disk gauges, computed by a background thread and served from memory, so a scrape never walks the disk.

    With thousands of partitions a walk takes around a second: on the event loop it stalled every update for that
    long. The thread refreshes every `interval` seconds; a partition whose state folders did not change since the
    last pass (same mtimes, no open segment growing) reuses its previous figures, so a pass costs a few `stat` calls
    per idle partition. Each pass also prunes a bounded number of expired ledger entries.
    """

    def __init__(self, staging: Staging, interval: float = 5.0):
        self.staging = staging
        self.interval = interval
        self._payload: bytes | None = None
        self._previous: dict[Any, tuple[tuple, tuple]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last_pass_seconds = 0.0

    def start(self) -> StagingGauges:
        self._thread = threading.Thread(target=self._run, name="metrics-gauges", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def payload(self) -> bytes:
        """The last exposition computed; before the first pass completes, one is computed in the caller's thread."""
        payload = self._payload
        return payload if payload is not None else self.refresh()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a bad pass must not end the gauges; the next one tries again
                log.exception("metrics: computing the staging gauges failed")
            try:
                from pipeline import ledger

                ledger.prune(self.staging.root)
                from pipeline import shared

                state = shared.for_root(self.staging.root)
                if state is not None:
                    from pipeline.shared.rolls import prune

                    prune(state, ledger.retention_seconds())
            except OSError as e:  # the shared database unreachable: told once a pass, never a traceback
                log.warning("metrics: pruning the ledger failed: %s", e)
            except Exception:  # noqa: BLE001
                log.exception("metrics: pruning the ledger failed")
            self._stop.wait(self.interval)

    def _partition_figures(self, partition: Any) -> tuple:
        from pipeline.ledger import partition_dir
        from pipeline.rollover import failed_rolls, pending_rolls

        pdir = partition_dir(self.staging.root, partition)
        stamp = []
        for state in _WATCHED:
            try:
                stamp.append(os.stat(pdir / state).st_mtime_ns)
            except FileNotFoundError:
                stamp.append(0)
        key = tuple(stamp)
        previous = self._previous.get(partition)
        if previous is not None and previous[0] == key and not previous[1][5]:
            return previous[1]
        st = self.staging.stats(partition)
        figures = (st.rows, st.bytes, st.oldest_ts_ms, len(pending_rolls(self.staging.root, partition)),
                   len(failed_rolls(self.staging.root, partition)), st.open_segments)
        self._previous[partition] = (key, figures)
        return figures

    def refresh(self) -> bytes:
        from pipeline.rollover import iter_partitions

        started = time.perf_counter()
        families = [GaugeMetricFamily(name, text, labels=["feed_id"]) for name, text in _GAUGES]
        per_feed: dict[str, list[float]] = {}
        seen = set()
        now = time.time()
        # every partition folder, so a feed whose rows were all published reports 0 rather than vanishing
        for partition in iter_partitions(self.staging.root):
            seen.add(partition)
            rows, nbytes, oldest_ms, pending, failed, _ = self._partition_figures(partition)
            agg = per_feed.setdefault(partition.feed_id, [0, 0, 0.0, 0, 0])
            agg[0] += rows
            agg[1] += nbytes
            if oldest_ms:
                agg[2] = max(agg[2], now - oldest_ms / 1000)
            agg[3] += pending
            agg[4] += failed
        for gone in set(self._previous) - seen:
            del self._previous[gone]
        for feed_id, values in sorted(per_feed.items()):
            for family, value in zip(families, values, strict=True):
                family.add_metric([feed_id], max(value, 0))
        disk = GaugeMetricFamily("filefeed_staging_disk_free_bytes", "Free bytes on the staging volume")
        try:
            st = os.statvfs(self.staging.root)
            disk.add_metric([], st.f_bavail * st.f_frsize)
        except OSError:
            pass
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families([*families, disk]))
        self._payload = payload = generate_latest(registry)
        self.passes += 1
        self.last_pass_seconds = time.perf_counter() - started
        return payload


class _Families:
    def __init__(self, families: list[Any]):
        self.families = families

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        return self.families


_gauges: dict[int, StagingGauges] = {}  # by id(staging): the server's running gauge thread


def start_gauges(staging: Staging, interval: float) -> StagingGauges:
    """Called by the server at start: from now on scrapes of this staging read the gauges from memory."""
    gauges = _gauges[id(staging)] = StagingGauges(staging, interval).start()
    return gauges


def stop_gauges(staging: Staging) -> None:
    gauges = _gauges.pop(id(staging), None)
    if gauges is not None:
        gauges.stop()


def render(staging: Staging) -> tuple[bytes, str]:
    """The exposition text: counters and histograms of every worker (multiprocess) + the disk gauges.

    The gauges come from the server's background thread (`start_gauges`); without one (a command, a test) they are
    computed here. Each call builds its own registries, so concurrent scrapes never share state. Other workers'
    hot-path counts reach the shared files within a second (`run_flusher`). With the gauges cached this takes under
    a millisecond, so the server calls it on its event loop (the only thread that adds to the local counts).
    """
    flush_local()
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        counters = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        counters = generate_latest(REGISTRY)
    gauges = _gauges.get(id(staging))
    payload = counters + (gauges.payload() if gauges is not None else StagingGauges(staging).refresh())
    if log.isEnabledFor(logging.DEBUG):
        log.debug("metrics scraped (%d bytes)", len(payload), extra={"route": "metrics", "outcome": "ok"})
    return payload, CONTENT_TYPE_LATEST
