"""delivery_mode = snapshot: every delivery is the complete membership, last writer wins by ts, replays change
nothing; through the local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from config.feed import FeedConfigError, parse_feed_properties
from pipeline import delivery, membership, snapshot
from pipeline.ledger import consumed_segments
from pipeline.rollover import RollMode, retry_failed, roll_partition, slot_roll_id
from sinks import open_sink
from tests.rollover.helpers import BASE_MS, decode_file, destination_files, stage_segment
from tests.servers import sink_props
from tests.snapshot.helpers import DELETE, UPSERT, expected_members, snapshot_props, stage_changes

SLOT = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)

FIRST = [("UPSERT", i, i) for i in range(2000)]
SECOND = (
    [("UPSERT", i, 10_000) for i in range(1500, 3000)]  # updates of 1500-1999, adds 2000-2999
    + [("DELETE", i, 20_000) for i in range(500)]  # removes 0-499
    + [("DELETE", i, 0) for i in range(2500, 2600)]  # a removal older than the add: ignored
    + [("UPSERT", i, 30_000) for i in range(100)]  # re-adds 0-99 after their removal
    + [("UPSERT", i, 1) for i in range(200, 300)]  # an add older than the removal, arriving late: stays removed
)


def deliver(root: Path, props, slot: datetime):
    with open_sink(props) as sink:
        return snapshot.roll_segment(root, UPSERT, props, sink, slot=slot)


def members_of(files: dict[str, bytes], slot: datetime) -> dict[str, int]:
    """Rows of the snapshot of `slot` (the data files whose name carries its time): identifier -> ts."""
    stamp = f"{slot:%Y%m%dT%H%M%S}Z_"
    rows = [r for name, data in files.items() if stamp in name and not name.endswith(".json")
            for r in decode_file(name, data)]
    out = {r["identifier"]: int(r["ts"]) for r in rows}
    assert len(out) == len(rows), "an identifier appears twice in one snapshot"
    assert {r["operation"] for r in rows} <= {"UPSERT"}
    return out


def test_add_remove_readd_out_of_order(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest)
    stage_changes(root, "a", FIRST)
    first = deliver(root, props, SLOT)
    assert first.status == "published" and first.rows == 2000
    stage_changes(root, "b", SECOND)
    second = deliver(root, props, SLOT + timedelta(days=1))
    files = destination_files(dest)
    assert members_of(files, SLOT) == expected_members(FIRST)
    want = expected_members(FIRST + SECOND)
    assert len(want) == 2600  # 0-99 re-added, 100-499 removed (200-299 despite their late add), 500-2999
    assert members_of(files, SLOT + timedelta(days=1)) == want
    assert second.rows == 2600
    # names come from the {mode} macro and the slot; the manifest says it is a full file
    names = sorted(files)
    assert all(n.startswith("seg-1/full/") for n in names), names
    manifests = [json.loads(files[n]) for n in names if n.endswith(".manifest.json")]
    assert len(manifests) == 2 and {m["mode"] for m in manifests} == {"full"}
    assert [m["counts"]["rows"] for m in sorted(manifests, key=lambda m: m["created_at"])] == [2000, 2600]
    # the apply rolls consumed every staged segment: batch_update counts them as sent
    assert consumed_segments(root, UPSERT) == {"a-upsert.jnl", "b-upsert.jnl"}
    assert consumed_segments(root, DELETE) == {"b-delete.jnl"}


def test_same_changes_in_any_order_and_grouping_give_the_same_bytes(tmp_path: Path) -> None:
    changes = FIRST + SECOND + [("DELETE", 7, 30_000), ("UPSERT", 8, 40_000), ("DELETE", 8, 40_000)]
    outputs = []
    for attempt in range(3):
        shuffled = list(changes)
        random.Random(attempt).shuffle(shuffled)
        root, dest = tmp_path / f"var{attempt}", tmp_path / f"dest{attempt}"
        size = len(shuffled) // (attempt + 1) + 1
        for n, start in enumerate(range(0, len(shuffled), size)):
            stage_changes(root, f"g{n}", shuffled[start:start + size])
            if attempt == 2:  # this one applies each group on its own
                with open_sink(snapshot_props(dest)) as sink:
                    for partition in (UPSERT, DELETE):
                        roll_partition(root, partition, snapshot_props(dest), sink,
                                                kind=RollMode(mode="apply"))
        assert deliver(root, snapshot_props(dest), SLOT).status == "published"
        outputs.append(destination_files(dest))
    assert outputs[0] == outputs[1] == outputs[2]
    members = members_of(outputs[0], SLOT)
    assert "0" * 63 + "7" not in members and "0" * 63 + "8" not in members  # DELETE wins a tie at equal ts
    assert members == expected_members(changes)


def test_replayed_and_restaged_rows_change_nothing(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest)
    stage_changes(root, "a", FIRST + SECOND)
    deliver(root, props, SLOT)
    stage_changes(root, "replay", FIRST + SECOND)  # the same rows staged again (a replayed batch, a retry)
    stage_changes(root, "part", SECOND[:300])
    deliver(root, props, SLOT + timedelta(days=1))
    files = destination_files(dest)
    day1 = {n.split("_part")[1]: b for n, b in files.items() if "20261201T020000Z" in n}
    day2 = {n.split("_part")[1]: b for n, b in files.items() if "20261202T020000Z" in n}
    assert day1 and day1 == day2  # byte-identical data files


def test_unscheduled_snapshot_only_when_something_changed(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest)
    stage_changes(root, "a", FIRST[:10])
    assert delivery.roll(root, UPSERT, props).status == "published"
    assert delivery.roll(root, DELETE, props).status == "nothing"  # nothing new: no second snapshot
    assert len(destination_files(dest)) == 2  # one file and its manifest
    stage_changes(root, "b", [("DELETE", 3, 50)])
    outcome = delivery.roll(root, DELETE, props)  # either operation's partition delivers the segment
    assert outcome.status == "published" and outcome.rows == 9


def test_bounded_merge_over_many_small_runs_matches_the_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(membership, "RUN_ROWS", 257)
    monkeypatch.setattr(membership, "BATCH_ROWS", 61)
    monkeypatch.setattr(membership, "MAX_FAN_IN", 3)
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest)
    stage_changes(root, "a", FIRST)
    deliver(root, props, SLOT)
    stage_changes(root, "b", SECOND)
    deliver(root, props, SLOT + timedelta(days=1))
    assert members_of(destination_files(dest), SLOT + timedelta(days=1)) == expected_members(FIRST + SECOND)
    current = snapshot.read_current(snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id))
    assert current is not None and current["members"] == 2600 and current["rows"] == 3000  # 400 tombstones


def installed_base(root: Path) -> tuple[dict[str, int], dict]:
    """The segment's installed state: identifier -> op rank (0 member, 1 tombstone), and its CURRENT."""
    sdir = snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id)
    current = snapshot.read_current(sdir)
    assert current is not None
    out: dict[str, int] = {}
    for table in membership.read_run(sdir / snapshot.STATE / f"base-{current['base']}.arrow"):
        out.update(zip(table.column("identifier").to_pylist(), table.column("op").to_pylist(), strict=True))
    return out, current


@pytest.mark.parametrize("days", [30.0, 0.0])
def test_tombstones_older_than_the_horizon_are_dropped(tmp_path: Path, monkeypatch, days: float) -> None:
    """Without a horizon a segment's state grows by every identifier ever removed, for as long as the feed lives."""
    monkeypatch.setattr(snapshot.TOMBSTONES, "days", days)
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest)
    day = snapshot.DAY_MS
    ident = "{:064x}".format
    stage_changes(root, "a", [("UPSERT", i, 0) for i in range(1000)] + [("DELETE", i, day) for i in range(500)])
    deliver(root, props, SLOT)  # the first state: no horizon yet
    base, current = installed_base(root)
    assert (len(base), current["members"], current["pruned"], current["max_ts"]) == (1000, 500, 0, BASE_MS + day)
    stage_changes(root, "b", [("UPSERT", 5000, 40 * day), ("DELETE", 600, 35 * day)])
    deliver(root, props, SLOT + timedelta(days=1))  # horizon: day 1 - 30 days, nothing older
    base, current = installed_base(root)
    assert (len(base), current["pruned"], current["max_ts"]) == (1001, 0, BASE_MS + 40 * day)
    # late adds older than the removals they meet in the merge stay removed, whether or not the removal is dropped
    stage_changes(root, "c", [("UPSERT", 0, day // 2), ("UPSERT", 600, 34 * day), ("UPSERT", 5001, 41 * day)])
    deliver(root, props, SLOT + timedelta(days=2))  # horizon: day 40 - 30 = day 10
    base, current = installed_base(root)
    want = {ident(i) for i in [*range(500, 1000), 5000, 5001] if i != 600}  # 600 left on day 35
    assert set(members_of(destination_files(dest), SLOT + timedelta(days=2))) == want
    if days:
        # the 500 removals of day 1 are gone from the state; the one of day 35 is within the horizon and stays
        assert current["pruned"] == 500 and {k for k, op in base.items() if op} == {ident(600)}
    else:
        assert current["pruned"] == 0 and sum(base.values()) == 501
    assert current["members"] == len(want) and current["rows"] == len(base)
    # the trade-off: an add older than a removal already dropped comes back; one older than a kept removal does not
    stage_changes(root, "d", [("UPSERT", 1, day // 2), ("UPSERT", 600, 33 * day)])
    deliver(root, props, SLOT + timedelta(days=3))
    members = set(members_of(destination_files(dest), SLOT + timedelta(days=3)))
    assert members == (want | {ident(1)} if days else want)


def test_creation_validates_mode_and_schedule_together() -> None:
    with pytest.raises(FeedConfigError) as e:
        parse_feed_properties({"destination_uri": "file:///tmp/x", "delivery_mode": "full",
                               "delivery_schedule": "0 2 * *", "file_name_template": "{mode}_{nope}_{part}"})
    text = str(e.value)
    assert "delivery_mode" in text and "delivery_schedule" in text and "file_name_template" in text
    with pytest.raises(FeedConfigError, match="delivery_schedule: is not a valid cron"):
        parse_feed_properties({"destination_uri": "file:///tmp/x", "delivery_schedule": "61 2 * * *"})
    props = parse_feed_properties({"destination_uri": "file:///tmp/x", "delivery_mode": "SNAPSHOT",
                                   "delivery_schedule": " 0  2 * * * "})
    assert (props.delivery_mode, props.delivery_schedule) == ("snapshot", "0 2 * * *")


def test_snapshot_through_s3(tmp_path: Path, servers: dict[str, str], unique_prefix: str) -> None:
    root = tmp_path / "var"
    props = sink_props("s3", servers, unique_prefix, delivery_mode="snapshot", file_name_template=
                       "{segment_id}/{mode}_{date}T{time}Z_{batch_id}_part{part}.{ext}", max_rows_per_file=1000)
    stage_changes(root, "a", FIRST)
    assert deliver(root, props, SLOT).status == "published"
    stage_changes(root, "b", SECOND)
    assert deliver(root, props, SLOT + timedelta(days=1)).status == "published"
    s3 = boto3.client("s3", endpoint_url=servers["S3_ENDPOINT"], aws_access_key_id=servers["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=servers["AWS_SECRET_ACCESS_KEY"],
                      region_name=servers.get("AWS_DEFAULT_REGION", "us-east-1"))
    listed = s3.list_objects_v2(Bucket=servers["S3_BUCKET"], Prefix=unique_prefix + "/")["Contents"]
    files = {o["Key"][len(unique_prefix) + 1:]: s3.get_object(Bucket=servers["S3_BUCKET"], Key=o["Key"])["Body"].read()
             for o in listed}
    assert members_of(files, SLOT + timedelta(days=1)) == expected_members(FIRST + SECOND)
    assert all(n.startswith("seg-1/full_") for n in files if not n.endswith(".manifest.json"))


def test_failed_snapshot_keeps_its_changes_and_retries(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest, file_name_template="{mode}/{batch_id}_part{part}.{ext}")
    taken = dest / "full" / f"{slot_roll_id(UPSERT, 'snapshot', SLOT)}_part00001.csv.gz"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's file")  # the name is taken by other bytes: a terminal conflict
    stage_changes(root, "a", FIRST[:10])
    assert deliver(root, props, SLOT).status == "terminal"
    sdir = snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id)
    assert snapshot.failed_snapshots(root, [UPSERT, DELETE]) == {UPSERT: sdir}
    assert snapshot.read_current(sdir)["members"] == 10  # the state change was committed before the publish
    taken.unlink()
    with open_sink(props) as sink:
        outcome = retry_failed(root, UPSERT, sink, pdir=sdir)  # what `filefeed retry` does for a SNAPSHOT folder
    assert outcome.status == "published" and outcome.rows == 10
    assert snapshot.failed_snapshots(root, [UPSERT]) == {}


def test_members_are_identifier_type_and_identifier(tmp_path: Path) -> None:
    root, dest = tmp_path / "var", tmp_path / "dest"
    props = snapshot_props(dest, columns="identifier_type,identifier,ts")
    same = "abc"
    stage_segment(root, UPSERT, "a.jnl", [("USER_EMAIL", same, 10, "s", "1", "u"), ("USER_POINT", same, 10, "s", "1", "u"),
                                          ("USER_ACCOUNT", "zz", 10, "s", "1", "u")])
    stage_segment(root, DELETE, "b.jnl", [("USER_POINT", same, 20, "s", "1", "u")])
    assert deliver(root, props, SLOT).status == "published"
    rows = [r for n, b in destination_files(dest).items() if not n.endswith(".json") for r in decode_file(n, b)]
    # one type's removal leaves the other's member; rows sorted by identifier, then type
    assert [(r["identifier_type"], r["identifier"]) for r in rows] == [("USER_EMAIL", same), ("USER_ACCOUNT", "zz")]
