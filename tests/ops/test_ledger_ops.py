"""The ledger as operators and the platform meet it: a batch replayed after its retention, an old `published/` layout
met by `filefeed status` and by the server, and `filefeed flush` rolling many partitions in parallel."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import UTC, datetime

from pipeline.ledger import LedgerEntry, json_bytes
from tests.conftest import wait_for
from tests.ops.helpers import FEED, SEGMENT, cli, cli_json, delivered_rows, send_batch, send_users, troubleshoot


def _rolls_in_ledger(staging) -> int:
    conn = sqlite3.connect(f"file:{staging / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT count(*) FROM rolls").fetchone()[0]
    finally:
        conn.close()


def test_a_batch_replayed_after_its_retention_is_staged_and_delivered_again(tmp_path, filefeed_factory):
    """README, "Delivery": a ref the ledger no longer knows is unknown; the batch item's own row is staged again,
    published in a new file and counted in sent_items_in_success (a second copy at the destination)."""
    out = tmp_path / "out"
    srv = filefeed_factory(workers=1, feeds={FEED: {"destination_uri": out.as_uri()}},
                           env={"FILEFEED_LEDGER_RETENTION_DAYS": repr(2 / 86400),  # two seconds
                                "FILEFEED_DEDUP_SECONDS": "1",  # as in production: retention >> dedup window
                                "FILEFEED_METRICS_REFRESH_SECONDS": "0.2"})  # the housekeeping pass prunes
    items = send_users(srv, range(0, 10))
    first = send_batch(srv, items)
    assert first["status"] == "OK" and first["sent_items_in_success"] == len(items)
    assert Counter(r["identifier"] for r in delivered_rows(out)) == Counter(x["identifier"] for x in items)
    again = send_batch(srv, items)  # within the retention: nothing published twice
    assert again["status"] == "OK" and again["sent_items_in_success"] == len(items)
    assert len(delivered_rows(out)) == len(items)
    wait_for(lambda: _rolls_in_ledger(srv.staging) == 0, timeout=30, what="the entry pruned by the retention")
    replay = send_batch(srv, items)
    assert replay["status"] == "OK" and replay["sent_items_in_success"] == len(items)
    assert replay["sent_items_in_error"] == 0
    assert Counter(r["identifier"] for r in delivered_rows(out)) == Counter(
        {x["identifier"]: 2 for x in items})  # delivered again, once more
    # the delivered totals count every delivery, pruned or not
    data = troubleshoot(srv)["data"]
    assert data["delivered_rows"] == 2 * len(items)


def _old_entry(root, k: int) -> LedgerEntry:
    now = datetime.now(UTC).replace(microsecond=0)  # within the retention: migrated entries keep their own age
    return LedgerEntry(roll_id=f"{now:%Y%m%dT%H%M}{k:02d}-{k:010x}", partition=f"{FEED}/{SEGMENT}/UPSERT",
                       planned_at=now.isoformat(), published_at=now.isoformat(),
                       files=({"name": f"{SEGMENT}/old-{k}.csv.gz", "rows": 3, "bytes": 30, "sha256": "0" * 64},),
                       manifest=None, rows=3, bytes=30, segments=(f"w9-{k:08d}.jnl",))


def _old_layout(root, n: int) -> None:
    folder = root / "feeds" / FEED / SEGMENT / "UPSERT" / "published"
    folder.mkdir(parents=True)
    for k in range(n):
        e = _old_entry(root, k)
        (folder / f"{e.roll_id}.json").write_bytes(json_bytes(e.to_dict()))


def test_status_migrates_an_old_layout_then_the_server_reads_it(tmp_path, filefeed_factory):
    staging = tmp_path / "staging"
    _old_layout(staging, 12)
    env_feeds = {FEED: {"destination_uri": (tmp_path / "out").as_uri()}}
    srv = filefeed_factory(workers=1, feeds=env_feeds, staging=staging)  # migrates at start
    assert not (staging / "feeds" / FEED / SEGMENT / "UPSERT" / "published").exists()
    st = cli_json(srv.env, "status")
    (part,) = [p for p in st["partitions"] if p["operation"] == "UPSERT"]
    assert part["delivered_rows"] == 36 and part["last_delivery"]["files"] == [f"{SEGMENT}/old-11.csv.gz"]
    # a batch whose ref names a migrated segment counts it as delivered, without staging it again
    item = {"segment_id": SEGMENT, "operation": "UPSERT", "identifier_type": "USER_ACCOUNT", "identifier": "x",
            "ref": "w9-00000004", "ts": 1717494873000, "session_id": "1717494873", "datamart_id": "1023"}
    r = send_batch(srv, [item])
    assert r["status"] == "OK" and r["sent_items_in_success"] == 1
    assert not (tmp_path / "out").exists() or delivered_rows(tmp_path / "out") == []


def test_status_migrates_without_a_server(tmp_path, filefeed_factory):
    staging = tmp_path / "staging"
    _old_layout(staging, 5)
    srv = filefeed_factory(workers=1, feeds={FEED: {"destination_uri": (tmp_path / "out").as_uri()}},
                           staging=tmp_path / "other")
    env = {**srv.env, "FILEFEED_STAGING_DIR": str(staging)}
    p = cli(env, "status", "--json")
    assert p.returncode == 0, p.stderr
    (part,) = json.loads(p.stdout)["partitions"]
    assert part["delivered_rows"] == 15
    assert not (staging / "feeds" / FEED / SEGMENT / "UPSERT" / "published").exists()


def test_flush_in_parallel_delivers_every_row_once(tmp_path, filefeed_factory):
    out = tmp_path / "out"
    feeds = {str(100 + f): {"destination_uri": (out / str(f)).as_uri()} for f in range(6)}
    srv = filefeed_factory(workers=2, feeds=feeds)
    sent: Counter = Counter()
    for f in range(6):
        for seg in range(4):
            items = send_users(srv, range(f * 100 + seg * 10, f * 100 + seg * 10 + 3), feed=str(100 + f),
                               segment=str(7000 + seg))
            sent.update(x["identifier"] for x in items)
    p = cli(srv.env, "flush", "--concurrency", "8", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["concurrency"] == 8 and report["seconds"] > 0
    assert len(report["partitions"]) == 24 and {v["status"] for v in report["partitions"].values()} == {"published"}
    assert Counter(r["identifier"] for r in delivered_rows(out)) == sent  # every row, once
    text = cli(srv.env, "flush")
    assert text.returncode == 0 and " s (8 at a time)" in text.stdout


def test_verify_counts_objects_older_than_the_retention_apart_from_extras(tmp_path, filefeed_factory):
    out = tmp_path / "out"
    srv = filefeed_factory(workers=1, feeds={FEED: {"destination_uri": out.as_uri()}})
    assert send_batch(srv, send_users(srv, range(0, 3)))["status"] == "OK"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    old = out / SEGMENT / "20200101T000000Z_UPSERT_20200101T000000-0123456789_part00001.csv.gz"
    recent = out / SEGMENT / f"{stamp}Z_UPSERT_{stamp}-0123456789_part00001.csv.gz"
    for f in (old, recent):
        f.write_bytes(b"not listed")
    p = cli(srv.env, "verify", "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["beyond_retention"] == 1  # its ledger entry may have been pruned: nothing to compare with
    assert [x["name"] for x in report["problems"] if x["problem"] == "extra"] == [recent.relative_to(out).as_posix()]
