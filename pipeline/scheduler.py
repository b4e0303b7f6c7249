"""Scheduled and on-demand flushes: the age timer in every worker, and `filefeed flush` from the command line.

Rows whose batch never came (platform batching off, a lost batch) are rolled once their oldest row is older than
the feed's `max_buffer_age_seconds`. Several workers run the timer; the partition lease makes one of them roll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import delivery
from pipeline.model import Partition
from pipeline.rollover import RollOutcome, due_partitions, failed_rolls, iter_partitions, pending_rolls

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
    """Partitions with staged segments, unfinished rolls or failed rolls."""
    out = []
    for p in iter_partitions(root):
        pdir = Path(root) / p.relpath
        if any((pdir / "sealed").glob("*.jnl")) or any((pdir / "open").glob("*.jnl")) or pending_rolls(root, p) \
                or failed_rolls(root, p):
            out.append(p)
    return out


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
        return delivery.roll(staging.root, partition, props, wait_seconds=wait_seconds)

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


async def run_age_flushes(staging: Staging, source: ContextSource, settings: ServiceSettings) -> None:
    """Every `flush_check_seconds`, roll the partitions whose oldest row passed the feed's max_buffer_age_seconds."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.flush_check_seconds)
        try:
            feed_ids = {p.feed_id for p in iter_partitions(staging.root)}
            if not feed_ids:
                continue
            props, problems = await _props_by_feed(source, feed_ids)
            for feed_id, why in problems.items():
                log.warning("age flush skips feed %s: %s", feed_id, why, extra={"feed_id": feed_id})
            ages = {f: float(p.max_buffer_age_seconds) for f, p in props.items()}
            due = await loop.run_in_executor(None, due_partitions, staging.root, ages)
            if due:
                await staging.seal_all_async()  # a roll takes sealed segments; other writers seal theirs by age
            for partition in due:
                feed_props = props.get(partition.feed_id)
                if feed_props is None:
                    continue
                # wait_seconds=0: a partition another worker is rolling is simply skipped this round
                await loop.run_in_executor(None, delivery.roll, staging.root, partition, feed_props)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("age flush failed; trying again in %ss", settings.flush_check_seconds)
