"""One bounded lane per destination, so a stuck partner only ever delays its own work.

Every roll a worker starts for a destination (batch_update, the age timer) runs on that destination's own threads:
at most `destination_concurrency` at once, at most `destination_queue` more waiting. A full lane answers RETRY at
once (backpressure) instead of taking a thread the routes share, so another feed's batch, troubleshoot, status,
metrics and every update keep their own capacity whatever one partner does.

batch_update waits for its lane's job at most `batch_deadline_seconds`, then answers RETRY while the job goes on: the
retried batch finds its rows in the ledger (counted as sent) or the partition's lease still held (RETRY again). The
lease, not this module, is what makes a second roll of the same rows impossible.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.feed import FeedProperties
    from config.settings import ServiceSettings
    from filefeed.context import FeedContext
    from pipeline.staging import Staging

log = logging.getLogger("filefeed.lanes")


class LaneFull(Exception):
    """The destination's lane has `concurrency + queue` jobs already."""


def destination_key(props: FeedProperties) -> str:
    """What one partner is: its scheme and endpoint (two feeds on one S3 endpoint share its lane)."""
    d = props.destination
    endpoint = props.s3_endpoint_url or props.gcs_endpoint_url or ""
    if d.scheme == "file":
        return f"file://{d.path}"
    return f"{d.scheme}://{endpoint or d.host}:{d.port or ''}"


class _Lane:
    def __init__(self, name: str, concurrency: int, queue: int):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                              thread_name_prefix=f"lane-{name}")
        self.limit = concurrency + queue
        self.jobs = 0  # queued + running, under Lanes._lock


class Lanes:
    """Per-destination executors, created on first use."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency = concurrency
        self.queue = queue
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(*args)` on `key`'s lane; LaneFull when it already holds its bound of jobs."""
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(str(len(self._lanes)), self.concurrency, self.queue)
            if lane.jobs >= lane.limit:
                raise LaneFull(key)
            lane.jobs += 1
        try:
            fut = lane.executor.submit(fn, *args)
        except BaseException:
            self._done(lane)
            raise
        fut.add_done_callback(lambda f: self._finished(lane, f))
        return fut

    def _done(self, lane: _Lane) -> None:
        with self._lock:
            lane.jobs -= 1

    def _finished(self, lane: _Lane, fut: concurrent.futures.Future) -> None:
        self._done(lane)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("a destination job failed: %s: %s", type(fut.exception()).__name__, fut.exception())

    async def run(self, key: str, seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on `key`'s lane, waited for at most `seconds` (TimeoutError; the job goes on), or LaneFull."""
        fut = self.submit(key, fn, *args)
        # shield: the deadline ends our wait, never the job
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), seconds)

    def jobs(self, key: str) -> int:
        with self._lock:
            lane = self._lanes.get(key)
            return lane.jobs if lane else 0

    def shutdown(self) -> None:
        with self._lock:
            lanes = list(self._lanes.values())
            self._lanes.clear()
        for lane in lanes:  # never wait for a stuck partner at shutdown; the lease and rolling/ resume the work
            lane.executor.shutdown(wait=False, cancel_futures=True)


def retry_answer(message: str, settings: ServiceSettings) -> dict[str, Any]:
    return {"status": "RETRY", "message": message, "next_msg_delay_in_ms": settings.retry_delay_ms,
            "sent_items_in_success": 0, "sent_items_in_error": 0}


async def deliver_within_deadline(lanes: Lanes, staging: Staging, ctx: FeedContext, body: dict[str, Any],
                                  settings: ServiceSettings) -> dict[str, Any]:
    """batch_update on its destination's lane, answered within `batch_deadline_seconds` whatever the partner does."""
    from pipeline.batch import deliver_batch

    assert ctx.props is not None
    try:
        # the deadline ends our wait, never the job: its roll goes on and the retried batch finds it
        return await lanes.run(destination_key(ctx.props), settings.batch_deadline_seconds, deliver_batch, staging,
                               ctx, body, settings)
    except LaneFull:
        return retry_answer(f"destination {ctx.props.destination.scheme}:// is busy: "
                            f"{lanes.concurrency + lanes.queue} batches already wait for it", settings)
    except TimeoutError:
        return retry_answer(f"the destination is slow: the roll goes on in the background (no answer within "
                            f"{settings.batch_deadline_seconds:g} s)", settings)


def submit_roll(lanes: Lanes, in_flight: set, partition: Any, props: FeedProperties,
                roll: Callable[..., Any], *args: Any) -> concurrent.futures.Future | None:
    """The age timer's roll of `partition` on its lane, unless one is in flight already or the lane is full."""
    if partition in in_flight:
        return None
    try:
        fut = lanes.submit(destination_key(props), roll, *args)
    except LaneFull:
        return None
    in_flight.add(partition)
    fut.add_done_callback(lambda _: in_flight.discard(partition))
    return fut
