"""Scheduled and on-demand flushes: the age timer in every worker, and `filefeed flush` from the command line.

Rows whose batch never came (platform batching off, a lost batch) are rolled once their oldest row is older than
the feed's `max_buffer_age_seconds`. Several workers run the timer; the partition lease makes one of them roll.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import delivery, schedule, snapshot
from pipeline.lanes import Lanes, submit_roll
from pipeline.ledger import partition_dir
from pipeline.model import OPERATIONS, Partition
from pipeline.rollover import (
    RollOutcome,
    due_partitions,
    failed_rolls,
    iter_partitions,
    oldest_staged_row_ms,
    pending_rolls,
)

if TYPE_CHECKING:
    from config.feed import FeedProperties
    from config.settings import ServiceSettings
    from filefeed.context import ContextSource
    from pipeline.staging import Staging

log = logging.getLogger("filefeed.scheduler")


@dataclass
class FlushReport:
    outcomes: dict[Partition, RollOutcome] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # feed_id -> why (no valid configuration)

    @property
    def rows(self) -> int:
        return sum(o.rows for o in self.outcomes.values())

    @property
    def files(self) -> list[str]:
        return [f for o in self.outcomes.values() for f in o.files]

    @property
    def failed(self) -> bool:
        return bool(self.skipped) or any(o.status in ("transient", "terminal", "busy")
                                         for o in self.outcomes.values())


def partitions_with_work(root: Path) -> list[Partition]:
    """Partitions with staged rows (sealed, or still in a writer journal), unfinished rolls or failed rolls."""
    from pipeline.staging.listing import JournalIndex, partitions

    staged = set(partitions(Path(root), JournalIndex(Path(root))))
    return [p for p in iter_partitions(root) if p in staged or pending_rolls(root, p) or failed_rolls(root, p)]


def flush(staging: Staging, props_by_feed: dict[str, FeedProperties], partitions: Iterable[Partition], *,
          wait_seconds: float = 30.0, progress: Callable[[Partition, RollOutcome], None] | None = None,
          concurrency: int = 1) -> FlushReport:
    """Seal this process's open segments, then roll each partition now, whatever its age, `concurrency` at a time.

    Thousands of small partitions are dominated by each roll's fsyncs and renames, not by CPU: rolling them in
    parallel threads overlaps those waits. Each partition's roll takes its own lease, as always.
    """
    staging.seal_all()
    report = FlushReport()
    todo: list[tuple[Partition, FeedProperties]] = []
    for partition in partitions:
        props = props_by_feed.get(partition.feed_id)
        if props is None:
            report.skipped.setdefault(partition.feed_id, "no valid configuration for this feed")
        else:
            todo.append((partition, props))

    def one(partition: Partition, props: FeedProperties) -> RollOutcome:
        # rows in another live writer's open segment are sealed by that writer within seal_after_seconds
        open_names = [p.stem for p in staging.open_segments(partition)]
        if open_names:
            staging.wait_sealed(partition, open_names, timeout=wait_seconds)
        slot = None
        if props.delivery_schedule is not None:  # a scheduled feed: the latest slot, if it was not delivered
            slot = _due_slot(staging.root, partition, props, datetime.now(UTC))
        return delivery.roll(staging.root, partition, props, wait_seconds=wait_seconds, slot=slot)

    outcomes: dict[Partition, RollOutcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="flush") as pool:
        futures = {pool.submit(one, partition, props): partition for partition, props in todo}
        for future in as_completed(futures):
            partition = futures[future]
            outcomes[partition] = outcome = future.result()
            if progress:
                progress(partition, outcome)
    report.outcomes = {p: outcomes[p] for p, _ in todo}  # in the order asked, whatever order they finished in
    return report


def _delivery_target(root: Path, partition: Partition, props: FeedProperties) -> tuple[Partition, list[Path]]:
    """The partition a scheduled delivery is rolled as, and the folders it takes from (the first holds the mark)."""
    if props.delivery_mode == "snapshot":
        sdir = snapshot.snapshot_dir(root, partition.feed_id, partition.segment_id)
        parts = [Partition(partition.feed_id, partition.segment_id, op) for op in OPERATIONS]
        return snapshot.snapshot_partition(partition), [sdir, *(partition_dir(root, p) for p in parts)]
    return partition, [partition_dir(root, partition)]


def _first_data(folders: list[Path]) -> datetime | None:
    """When the oldest data waiting in `folders` arrived: staged rows, or (snapshot) runs and state."""
    times: list[float] = []
    for folder in folders:
        oldest = oldest_staged_row_ms(folder)
        if oldest is not None:
            times.append(oldest / 1000)
        for sub in ("sealed", "state"):
            try:
                times.extend(e.stat().st_mtime for e in os.scandir(folder / sub) if e.name.endswith((".run", "CURRENT")))
            except FileNotFoundError:
                continue
    return datetime.fromtimestamp(min(times), UTC) if times else None


def _due_slot(root: Path, partition: Partition, props: FeedProperties, now: datetime) -> datetime | None:
    assert props.delivery_schedule is not None
    _, folders = _delivery_target(root, partition, props)
    return schedule.due_slot(props.delivery_schedule, folders[0], now, _first_data(folders))


def due_slots(root: Path, props_by_feed: dict[str, FeedProperties], now: datetime | None = None
              ) -> list[tuple[Partition, datetime]]:
    """The deliveries of scheduled feeds due now: (partition to roll, slot), one per delivery folder."""
    now = now or datetime.now(UTC)
    out: list[tuple[Partition, datetime]] = []
    seen: set[Partition] = set()
    for partition in iter_partitions(root):
        props = props_by_feed.get(partition.feed_id)
        if props is None or props.delivery_schedule is None:
            continue
        target, _ = _delivery_target(root, partition, props)
        if target in seen:
            continue
        seen.add(target)
        slot = _due_slot(root, partition, props, now)
        if slot is not None:
            out.append((target, slot))
    return out


def deliver_due_slots(root: Path, props_by_feed: dict[str, FeedProperties], now: datetime | None = None
                      ) -> dict[Partition, RollOutcome]:
    """Deliver every scheduled feed's due slot now (the worker loop does this every flush_check_seconds)."""
    return {partition: delivery.roll(root, partition, props_by_feed[partition.feed_id], slot=slot)
            for partition, slot in due_slots(root, props_by_feed, now)}


async def _props_by_feed(source: ContextSource, feed_ids: Iterable[str]) -> tuple[dict[str, FeedProperties],
                                                                                 dict[str, str]]:
    props: dict[str, FeedProperties] = {}
    problems: dict[str, str] = {}
    for feed_id in sorted(set(feed_ids)):
        try:
            ctx = await source.feed_context(feed_id)
        except Exception as e:  # a feed the gateway no longer knows, or a gateway outage: try again next time
            problems[feed_id] = f"{type(e).__name__}: {e}"
            continue
        if ctx.props is None:
            problems[feed_id] = str(ctx.error)
        else:
            props[feed_id] = ctx.props
    return props, problems


async def run_age_flushes(staging: Staging, source: ContextSource, settings: ServiceSettings,
                          destination_lanes: Lanes | None = None) -> None:
    """Every `flush_check_seconds`, roll the partitions whose oldest row passed the feed's max_buffer_age_seconds.

    Each roll runs on its destination's lane and is not waited for: a stuck partner delays neither the next round
    nor another feed's rolls; a partition whose roll is still in flight is left alone.
    """
    loop = asyncio.get_running_loop()
    destination_lanes = destination_lanes or Lanes(settings.destination_concurrency, settings.destination_queue)
    in_flight: set[Partition] = set()
    while True:
        await asyncio.sleep(settings.flush_check_seconds)
        try:
            feed_ids = {p.feed_id for p in iter_partitions(staging.root)}
            if not feed_ids:
                continue
            props, problems = await _props_by_feed(source, feed_ids)
            for feed_id, why in problems.items():
                log.warning("age flush skips feed %s: %s", feed_id, why, extra={"feed_id": feed_id})
            # scheduled feeds are delivered at their slots only; due_partitions still resumes their unfinished rolls
            ages = {f: float(p.max_buffer_age_seconds) for f, p in props.items() if p.delivery_schedule is None}
            due = await loop.run_in_executor(None, due_partitions, staging.root, ages)
            slots = await loop.run_in_executor(None, due_slots, staging.root, props)
            if due or slots:
                await staging.seal_all_async()  # a roll takes sealed segments; other writers seal theirs by age
            for partition, slot in slots:  # on the destination's lane too: a stuck partner holds only its own
                feed_props = props[partition.feed_id]
                submit_roll(destination_lanes, in_flight, partition, feed_props,
                            functools.partial(delivery.roll, slot=slot), staging.root, partition, feed_props)
            for partition in due:
                feed_props = props.get(partition.feed_id)
                if feed_props is None:
                    continue
                # wait_seconds=0: a partition another worker is rolling is simply skipped this round
                submit_roll(destination_lanes, in_flight, partition, feed_props, delivery.roll, staging.root,
                            partition, feed_props)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("age flush failed; trying again in %ss", settings.flush_check_seconds)
