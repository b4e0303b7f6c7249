"""Prometheus metrics, safe with several worker processes (prometheus-client multiprocess mode).

`filefeed serve` calls `prepare_multiprocess_dir`, which points PROMETHEUS_MULTIPROC_DIR at `<staging>/run/metrics`
before any worker starts; counters and histograms then live in per-process files that a scrape of any worker sums.
Operator commands that roll (`filefeed flush`, `filefeed retry`) call `join_multiprocess_dir`, so the rows they
publish are counted by the running server too. Staged-data gauges are read from disk at scrape time, so every worker
reports the same figures.

Labels never carry a value that came from a feed's properties: feed ids, identifier types (a bounded set), sink
schemes, route names, error classes and kinds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
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


class StagingCollector:
    """Gauges computed from the staging folders at scrape time (the same in every worker)."""

    def __init__(self, staging: Staging):
        self.staging = staging

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        from pipeline.rollover import failed_rolls, iter_partitions, pending_rolls

        rows = GaugeMetricFamily("filefeed_staged_rows", "Rows staged and not yet published", labels=["feed_id"])
        size = GaugeMetricFamily("filefeed_staged_bytes", "Bytes staged and not yet published", labels=["feed_id"])
        age = GaugeMetricFamily("filefeed_oldest_staged_age_seconds", "Age of the oldest staged row (0: none)",
                                labels=["feed_id"])
        pending = GaugeMetricFamily("filefeed_pending_rolls", "Rolls started and not finished (resumed by the next "
                                    "roll)", labels=["feed_id"])
        failed = GaugeMetricFamily("filefeed_failed_rolls", "Rolls in failed/ waiting for `filefeed retry`",
                                   labels=["feed_id"])
        per_feed: dict[str, list[float]] = {}
        now = time.time()
        root = self.staging.root
        # every partition folder, so a feed whose rows were all published reports 0 rather than vanishing
        for partition in iter_partitions(root):
            st = self.staging.stats(partition)
            agg = per_feed.setdefault(partition.feed_id, [0, 0, 0.0, 0, 0])
            agg[0] += st.rows
            agg[1] += st.bytes
            if st.oldest_ts_ms:
                agg[2] = max(agg[2], now - st.oldest_ts_ms / 1000)
            agg[3] += len(pending_rolls(root, partition))
            agg[4] += len(failed_rolls(root, partition))
        for feed_id, (r, b, a, p, f) in sorted(per_feed.items()):
            rows.add_metric([feed_id], r)
            size.add_metric([feed_id], b)
            age.add_metric([feed_id], max(a, 0.0))
            pending.add_metric([feed_id], p)
            failed.add_metric([feed_id], f)
        disk = GaugeMetricFamily("filefeed_staging_disk_free_bytes", "Free bytes on the staging volume")
        try:
            st = os.statvfs(root)
            disk.add_metric([], st.f_bavail * st.f_frsize)
        except OSError:
            pass
        yield from (rows, size, age, pending, failed, disk)


def render(staging: Staging) -> tuple[bytes, str]:
    """The exposition text: counters and histograms of every worker (multiprocess) + gauges read from disk.

    Each call builds its own registries, so concurrent scrapes never share state. Other workers' hot-path counts
    reach the shared files within a second (`run_flusher`).
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
    gauges = CollectorRegistry(auto_describe=False)
    gauges.register(StagingCollector(staging))
    payload = counters + generate_latest(gauges)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("metrics scraped (%d bytes)", len(payload), extra={"route": "metrics", "outcome": "ok"})
    return payload, CONTENT_TYPE_LATEST
