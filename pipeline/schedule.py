"""`delivery_schedule`: deliveries at the slots of a cron expression in UTC, named after the slot.

A slot is a time the expression matches (`0 2 * * *`: every day at 02:00 UTC). A scheduled feed is delivered by
the scheduler pass (pipeline/scheduler.py, every FILEFEED_FLUSH_CHECK_SECONDS in each worker) and by `filefeed
flush`, for the latest slot that has come and was not handled yet; batch_update and the age timer only stage (and
resume unfinished rolls). A slot's roll takes its time and its id from the slot, never from the clock
(rollover.slot_roll_id), so a slot retried after a crash publishes the same names: exactly once holds, unlike a
wall-clock rotation. Slots missed while the service was down collapse into one delivery, of the latest of them.

What was handled is a small file per delivery folder, `schedule.json` (`last_slot`), written under the roll's
lease after the slot's roll was planned (or found nothing to deliver); a crash before it is written is recognised
by the slot's roll id in the ledger, so the mark is only a shortcut.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cronsim import CronSim

from pipeline.durable import atomic_write_bytes

MARK_NAME = "schedule.json"


def latest_slot(expression: str, now: datetime) -> datetime:
    """The latest slot at or before `now` (UTC, whole seconds)."""
    start = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)  # cronsim's reverse walk is exclusive
    return next(iter(CronSim(expression, start, reverse=True))).astimezone(UTC)


def next_slot(expression: str, now: datetime) -> datetime:
    """The first slot after `now`: when items accepted now will be delivered."""
    return next(iter(CronSim(expression, now.astimezone(UTC)))).astimezone(UTC)


def last_marked(pdir: Path) -> datetime | None:
    try:
        text = (pdir / MARK_NAME).read_text("utf-8")
    except FileNotFoundError:
        return None
    try:
        return datetime.fromisoformat(json.loads(text)["last_slot"]).astimezone(UTC)
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the ledger check (the slot's roll id) still stops a second delivery


def slot_marked(pdir: Path, slot: datetime) -> bool:
    last = last_marked(pdir)
    return last is not None and last >= slot.astimezone(UTC)


def mark_slot(pdir: Path, slot: datetime) -> None:
    """Record `slot` as handled (never moves the mark backwards)."""
    if slot_marked(pdir, slot):
        return
    pdir.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"last_slot": slot.astimezone(UTC).replace(microsecond=0).isoformat()}) + "\n"
    atomic_write_bytes(pdir / MARK_NAME, body.encode("utf-8"))


def due_slot(expression: str, pdir: Path, now: datetime, first_row: datetime | None) -> datetime | None:
    """The slot to deliver for the folder `pdir` now, or None.

    A folder never marked starts at the slot before its first staged row, so a segment whose first rows come at
    10:00 waits for the next 02:00 (no delivery at 10:00 named 02:00), while rows staged at 01:00 by a service
    that was down at 02:00 are delivered at restart.
    """
    slot = latest_slot(expression, now)
    last = last_marked(pdir)
    if last is None:
        if first_row is None:
            return None
        last = latest_slot(expression, first_row) if first_row < slot else slot
        mark_slot(pdir, last)
    return slot if slot > last else None
