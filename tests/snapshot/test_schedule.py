"""delivery_schedule with a controlled clock: deliveries only at slots, names from the slot, a missed slot once at
restart, a slot retried after a crash writes the same names, batch_update answers accepted-for-the-next-slot."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import ServiceSettings
from filefeed.context import FeedContext
from pipeline import delivery, schedule, scheduler
from pipeline.batch import deliver_batch
from pipeline.rollover import slot_roll_id
from pipeline.staging import Staging
from tests.rollover.helpers import destination_files, destination_rows, props_for, stage_segment
from tests.snapshot.helpers import UPSERT, iso, row, run_child, stage_changes

DAILY = "0 2 * * *"
DAY1 = datetime(2026, 12, 1, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return DAY1 + timedelta(days=day - 1, hours=hour, minutes=minute, seconds=second)


def ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def stage_at(root: Path, name: str, when: datetime, first: int = 0, count: int = 10) -> None:
    """Rows whose frame says they were staged at `when` (what the scheduler reads to know how old data is)."""
    stage_segment(root, UPSERT, name, [row(i, 0) for i in range(first, first + count)], ts_ms=ms(when))


def delta_props(dest: Path, **overrides: object):
    return props_for(dest, delivery_schedule=DAILY, **overrides)


def data_names(dest: Path) -> list[str]:
    return sorted(n for n in destination_files(dest) if not n.endswith(".manifest.json"))


def test_latest_and_next_slot() -> None:
    assert schedule.latest_slot(DAILY, at(1, 2)) == at(1, 2)  # a slot is due at its own second
    assert schedule.latest_slot(DAILY, at(1, 1, 59, 59)) == at(0, 2)
    assert schedule.next_slot("*/15 * * * *", at(1, 2, 7)) == at(1, 2, 15)


def test_deliveries_only_at_slots_named_after_the_slot(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = delta_props(dest)
    feeds = {UPSERT.feed_id: props}
    stage_at(root, "w1-00000001.jnl", at(1, 1))
    assert scheduler.deliver_due_slots(root, feeds, now=at(1, 1, 30)) == {}
    assert delivery.roll(root, UPSERT, props).status == "nothing"  # batch_update, the age timer: no delivery
    assert data_names(dest) == []
    outcomes = scheduler.deliver_due_slots(root, feeds, now=at(1, 2, 0, 10))
    assert [o.status for o in outcomes.values()] == ["published"]
    roll_id = slot_roll_id(UPSERT, "delta", at(1, 2))
    assert data_names(dest) == [f"seg-1/20261201T020000Z_UPSERT_{roll_id}_part00001.csv.gz"]
    assert scheduler.deliver_due_slots(root, feeds, now=at(1, 2, 0, 40)) == {}  # the slot is handled
    stage_at(root, "w1-00000002.jnl", at(1, 3), first=10)
    assert scheduler.deliver_due_slots(root, feeds, now=at(1, 23, 59)) == {}
    scheduler.deliver_due_slots(root, feeds, now=at(2, 2, 0, 5))
    assert len(data_names(dest)) == 2 and "20261202T020000Z" in data_names(dest)[1]
    assert len(destination_rows(dest)) == 20


def test_missed_slots_are_delivered_once_at_restart(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    feeds = {UPSERT.feed_id: delta_props(dest)}
    stage_at(root, "w1-00000001.jnl", at(1, 1))
    scheduler.deliver_due_slots(root, feeds, now=at(1, 2, 0, 5))
    stage_at(root, "w1-00000002.jnl", at(1, 5), first=10)
    # down from day 1 05:00 to day 3 09:00: the slots of day 2 and day 3 were missed
    outcomes = scheduler.deliver_due_slots(root, feeds, now=at(3, 9))
    assert [o.rows for o in outcomes.values()] == [10]
    assert scheduler.deliver_due_slots(root, feeds, now=at(3, 9, 0, 30)) == {}
    names = data_names(dest)
    assert len(names) == 2 and "20261203T020000Z" in names[1]  # one delivery, named after the latest missed slot


def test_first_rows_after_a_slot_wait_for_the_next_one(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    feeds = {UPSERT.feed_id: delta_props(dest)}
    stage_at(root, "w1-00000001.jnl", at(1, 10))
    assert scheduler.deliver_due_slots(root, feeds, now=at(1, 10, 0, 30)) == {}  # never "the 02:00 file" at 10:00
    assert scheduler.deliver_due_slots(root, feeds, now=at(2, 2, 0, 1)) != {}
    assert "20261202T020000Z" in data_names(dest)[0]


def test_scheduled_snapshot_delivers_every_slot_changed_or_not(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = props_for(dest, delivery_schedule=DAILY, delivery_mode="snapshot",
                      file_name_template="{mode}/{date}_{batch_id}_part{part}.{ext}")
    feeds = {UPSERT.feed_id: props}
    stage_changes(root, "a", [("UPSERT", i, 0) for i in range(5)])
    assert delivery.roll(root, UPSERT, props).status == "nothing"  # applied (counted by batch_update), not delivered
    # applied on day 1 of the test's clock: the state's files carry the wall clock's time, which is past day 2's
    # slot from 2026-12-02 02:00 UTC on (the first slot would then be day 3's)
    for path in root.rglob("*"):
        os.utime(path, (at(1, 1).timestamp(), at(1, 1).timestamp()), follow_symlinks=False)
    scheduler.deliver_due_slots(root, feeds, now=at(2, 2, 0, 1))
    scheduler.deliver_due_slots(root, feeds, now=at(3, 2, 0, 1))  # nothing changed: the full file all the same
    names = data_names(dest)
    assert [n.split("_")[0] for n in names] == ["full/20261202", "full/20261203"]
    files = destination_files(dest)
    assert files[names[0]] == files[names[1]]


@pytest.mark.parametrize("point", ["plan", "publish:1", "publish:2", "ledger"])
def test_a_slot_retried_after_a_crash_writes_the_same_names(tmp_path: Path, point: str) -> None:
    outputs = []
    for crash in (None, point):
        root, dest = tmp_path / f"var-{crash}", tmp_path / f"dest-{crash}"
        dest.mkdir()
        stage_at(root, "w1-00000001.jnl", at(1, 1), count=2500)
        args = [str(root), str(dest), "slots", iso(at(1, 2, 0, 5)), DAILY, "delta"]
        if crash:
            assert run_child("tests.snapshot.child", args, crash_at=crash).returncode == 137
            args[3] = iso(at(1, 2, 10))  # retried ten minutes later: the slot's names all the same
        done = run_child("tests.snapshot.child", args)
        assert done.returncode == 0, done.stderr
        outputs.append(destination_files(dest))
    assert outputs[0] == outputs[1]
    assert len([n for n in outputs[0] if not n.endswith(".json")]) == 3


def test_batch_update_counts_items_accepted_for_the_next_slot(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = delta_props(dest)
    ctx = FeedContext(feed_id=UPSERT.feed_id, feed={}, raw_properties={}, props=props, error=None, rules=None)
    items = [{"identifier_type": "USER_EMAIL", "identifier": f"{i:064x}", "ts": ms(at(1, 1)), "session_id": "s",
              "datamart_id": "1509", "user_point_id": f"up-{i}"} for i in range(7)]
    body = {"batch_content": items, "context": {"feed_id": UPSERT.feed_id, "segment_id": UPSERT.segment_id,
                                                "grouping_key": "UPSERT"}}
    settings = ServiceSettings(staging_dir=root, feeds=tmp_path / "feeds.toml")  # embedded mode: no gateway
    with Staging(root, min_free_bytes=0) as staging:
        answer = deliver_batch(staging, ctx, body, settings)
        assert (answer["status"], answer["sent_items_in_success"], answer["sent_items_in_error"]) == ("OK", 7, 0)
        assert data_names(dest) == []  # accepted, staged, not delivered before the slot
        again = deliver_batch(staging, ctx, body, settings)
        assert again["sent_items_in_success"] == 7  # a retried batch: the same segment, staged once
    # the batch staged its rows now (real time): they go with the next slot after now
    next_slot = schedule.next_slot(DAILY, datetime.now(UTC))
    assert scheduler.deliver_due_slots(root, {UPSERT.feed_id: props}, now=next_slot - timedelta(seconds=1)) == {}
    scheduler.deliver_due_slots(root, {UPSERT.feed_id: props}, now=next_slot + timedelta(seconds=5))
    assert len(destination_rows(dest)) == 7
