"""Prometheus metrics, safe with several worker processes (prometheus-client multiprocess mode).

`filefeed serve` points PROMETHEUS_MULTIPROC_DIR at `<staging>/run/metrics` before any worker starts; counters and
histograms then live in per-process files that a scrape of any worker aggregates. Staged-data gauges are read from
disk at scrape time, so every worker reports the same figures.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from pipeline.staging import Staging

REQUESTS = Counter("filefeed_requests", "HTTP answers by route and status code", ["route", "code"])
REQUEST_SECONDS = Histogram("filefeed_request_seconds", "Time to answer, by route", ["route"],
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30))
ROWS = Counter("filefeed_rows", "Identifier rows by outcome (accepted, rejected) and identifier type",
               ["outcome", "identifier_type"])
RETRIES = Counter("filefeed_retry_answers", "retry / RETRY answers sent to the platform", ["route"])
ROLLS = Counter("filefeed_rolls", "Rolls by sink scheme and outcome", ["scheme", "status"])
PUBLISHED_FILES = Counter("filefeed_published_files", "Files published (manifests excluded)", ["scheme"])
PUBLISHED_ROWS = Counter("filefeed_published_rows", "Rows published", ["scheme"])
PUBLISHED_BYTES = Counter("filefeed_published_bytes", "Bytes published", ["scheme"])
PUBLISH_SECONDS = Histogram("filefeed_publish_seconds", "Roll and publish latency by sink scheme", ["scheme"],
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
ERRORS = Counter("filefeed_errors", "Errors by class (transient, terminal) and kind", ["error_class", "kind"])


def prepare_multiprocess_dir(staging_dir: Path) -> Path:
    """Called once by `filefeed serve` before workers start: a fresh folder for this run's metric files."""
    path = Path(staging_dir) / "run" / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


# labelled children resolved once: `labels()` costs more than the increment itself on the hot path
_children: dict[tuple, Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_request(route: str, code: int, seconds: float) -> None:
    _child(REQUESTS, route, str(code)).inc()
    _child(REQUEST_SECONDS, route).observe(seconds)
    if code in (429, 503):
        _child(RETRIES, route).inc()


def observe_update(feed_id: str, result: dict[str, Any]) -> None:
    for stat in result.get("stats") or ():
        id_type = stat["tags"][0]["value"] if stat.get("tags") else "unknown"
        _child(ROWS, "accepted" if stat["sync_result"] == "PROCESSED" else "rejected", id_type).inc()


def observe_roll(scheme: str, outcome: Any, seconds: float, nbytes: int) -> None:
    ROLLS.labels(scheme, outcome.status).inc()
    if outcome.status == "published":
        PUBLISH_SECONDS.labels(scheme).observe(seconds)
        PUBLISHED_FILES.labels(scheme).inc(len(outcome.files))
        PUBLISHED_ROWS.labels(scheme).inc(outcome.rows)
        PUBLISHED_BYTES.labels(scheme).inc(nbytes)


def observe_error(error_class: str, kind: str) -> None:
    ERRORS.labels(error_class, kind).inc()


class StagingCollector:
    """Gauges computed from the staging folders at scrape time."""

    def __init__(self, staging: Staging):
        self.staging = staging

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        rows = GaugeMetricFamily("filefeed_staged_rows", "Rows staged and not yet published", labels=["feed_id"])
        size = GaugeMetricFamily("filefeed_staged_bytes", "Bytes staged and not yet published", labels=["feed_id"])
        age = GaugeMetricFamily("filefeed_oldest_staged_age_seconds", "Age of the oldest staged row",
                                labels=["feed_id"])
        per_feed: dict[str, list[float]] = {}
        now = time.time()
        for partition in self.staging.partitions():
            st = self.staging.stats(partition)
            agg = per_feed.setdefault(partition.feed_id, [0, 0, 0.0])
            agg[0] += st.rows
            agg[1] += st.bytes
            if st.oldest_ts_ms:
                agg[2] = max(agg[2], now - st.oldest_ts_ms / 1000)
        for feed_id, (r, b, a) in per_feed.items():
            rows.add_metric([feed_id], r)
            size.add_metric([feed_id], b)
            age.add_metric([feed_id], a)
        disk = GaugeMetricFamily("filefeed_staging_disk_free_bytes", "Free bytes on the staging volume")
        st = os.statvfs(self.staging.root)
        disk.add_metric([], st.f_bavail * st.f_frsize)
        yield from (rows, size, age, disk)


def render(staging: Staging) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    collector = StagingCollector(staging)
    registry.register(collector)
    try:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    finally:
        registry.unregister(collector)
