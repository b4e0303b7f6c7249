"""The SQLite ledger: the lookups batch_update uses, retention, and the migration of the old `published/` layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import ledger
from pipeline.ledger import (
    LedgerEntry,
    consumed,
    consumed_segments,
    delivery_totals,
    json_bytes,
    last_deliveries,
    partition_dir,
)
from pipeline.model import Partition
from tests.conftest import ROOT

P = Partition("feed-1", "seg-1", "UPSERT")
Q = Partition("feed-1", "seg-1", "DELETE")


def entry(partition: Partition, k: int, *, rows: int = 10, segments: tuple[str, ...] | None = None) -> LedgerEntry:
    return LedgerEntry(
        roll_id=f"20240601T12{k:04d}-{k:010x}", partition=str(partition), planned_at="2024-06-01T12:00:00+00:00",
        published_at="2024-06-01T12:00:01+00:00",
        files=({"name": f"seg-1/f{k}.csv.gz", "rows": rows, "bytes": 100 + k, "sha256": "0" * 64},),
        manifest={"name": f"seg-1/{k}.manifest.json", "bytes": 50, "sha256": "1" * 64}, rows=rows, bytes=100 + k,
        segments=segments if segments is not None else (f"w1-{k:06d}.jnl", f"w2-{k:06d}.jnl"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "staging"
    (r / P.relpath).mkdir(parents=True)
    (r / Q.relpath).mkdir(parents=True)
    return r


@pytest.fixture(autouse=True)
def _retention():
    yield
    ledger.configure(ledger.DEFAULT_RETENTION_DAYS)
    ledger.close_connections()


def test_lookups_batch_update_uses(root: Path) -> None:
    book = ledger.Ledger(partition_dir(root, P))
    for k in range(1, 6):
        book.record(entry(P, k))
    ledger.Ledger(partition_dir(root, Q)).record(entry(Q, 9))
    book.record(entry(P, 3))  # recorded again (a resumed roll): neither duplicated nor counted twice
    asked = ["w1-000002.jnl", "w2-000004.jnl", "w1-000009.jnl", "w3-000001.jnl"]
    assert consumed(root, P, asked) == {"w1-000002.jnl", "w2-000004.jnl"}  # w1-000009 is the other partition's
    assert consumed(root, P, []) == set()
    many = [f"w1-{k:06d}.jnl" for k in range(2000)]  # more names than one IN (...) query holds
    assert consumed(root, P, many) == {f"w1-{k:06d}.jnl" for k in range(1, 6)}
    assert consumed_segments(root, P) == {f"w{w}-{k:06d}.jnl" for w in (1, 2) for k in range(1, 6)}
    assert [e.roll_id for e in last_deliveries(root, P, 2)] == [entry(P, 5).roll_id, entry(P, 4).roll_id]
    assert book.get(entry(P, 2).roll_id) == entry(P, 2)
    assert book.has(entry(P, 2).roll_id) and not book.has("nope")
    assert [e.roll_id for e in book.entries()] == [entry(P, k).roll_id for k in range(1, 6)]
    assert delivery_totals(root, P) == ledger.DeliveryTotals(rolls=5, rows=50, files=5, bytes=515)


def test_retention_prunes_a_bounded_number_per_record_and_keeps_totals(root: Path) -> None:
    book = ledger.Ledger(partition_dir(root, P))
    for k in range(1, 41):
        book.record(entry(P, k))
    assert ledger.ledger_size(root)["rolls"] == 40
    ledger.configure(1 / 86400)  # one second
    time.sleep(1.1)
    book.record(entry(P, 100))  # prunes PRUNE_PER_RECORD expired rolls, oldest first, in its own transaction
    left = [e.roll_id for e in book.entries()]
    assert len(left) == 41 - ledger.PRUNE_PER_RECORD
    assert entry(P, 1).roll_id not in left and entry(P, 40).roll_id in left and entry(P, 100).roll_id in left
    assert ledger.prune(root, limit=10) == 10
    assert ledger.prune(root) == 40 - ledger.PRUNE_PER_RECORD - 10
    assert [e.roll_id for e in book.entries()] == [entry(P, 100).roll_id]
    assert consumed(root, P, ["w1-000001.jnl", "w1-000100.jnl"]) == {"w1-000100.jnl"}
    # what the partition ever delivered still counts the pruned rolls (troubleshoot, status)
    assert delivery_totals(root, P) == ledger.DeliveryTotals(rolls=41, rows=410, files=41,
                                                             bytes=sum(100 + k for k in range(1, 41)) + 200)


# -- migration of the previous layout: published/<roll_id>.json, written as the old code wrote them ---------------


def old_layout(root: Path, partition: Partition, entries: list[LedgerEntry]) -> Path:
    """The previous release's ledger: one JSON file per roll (`atomic_write_json(path, entry.to_dict())`)."""
    folder = partition_dir(root, partition) / "published"
    folder.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (folder / f"{e.roll_id}.json").write_bytes(json_bytes(e.to_dict()))
    return folder


def test_migration_of_an_old_published_folder(root: Path) -> None:
    p_entries = [entry(P, k) for k in range(1, 31)]
    old_layout(root, P, p_entries)
    old_layout(root, Q, [entry(Q, 7)])
    # the old code's own format, byte for byte: version 1, sorted keys, indent 1
    sample = json.loads((partition_dir(root, P) / "published" / f"{p_entries[0].roll_id}.json").read_text())
    assert sample["version"] == 1 and sample["segments"] == ["w1-000001.jnl", "w2-000001.jnl"]
    assert [e.roll_id for e in last_deliveries(root, P, 100)] == [e.roll_id for e in reversed(p_entries)]
    assert ledger.Ledger(partition_dir(root, P)).entries() == p_entries
    assert consumed(root, Q, ["w1-000007.jnl"]) == {"w1-000007.jnl"}
    assert delivery_totals(root, P).rows == 300
    for p in (P, Q):  # `ls` shows no ledger that is no longer read
        assert sorted(os.listdir(partition_dir(root, p))) == []
    from pipeline.ledger_migrate import migrate

    assert migrate(root) == 0  # idempotent


def test_migration_leaves_unreadable_files_for_an_operator(root: Path) -> None:
    folder = old_layout(root, P, [entry(P, 1), entry(P, 2)])
    (folder / "garbage.json").write_text("{not json")
    assert len(ledger.Ledger(partition_dir(root, P)).entries()) == 2
    assert os.listdir(folder) == ["garbage.json"]


def _migrate_in_child(root: Path, crash_at: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FILEFEED_CRASH_AT", None)
    if crash_at:
        env["FILEFEED_CRASH_AT"] = crash_at
    code = "import sys; from pipeline import ledger; ledger.migrate_on_start(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(root)], env=env, cwd=str(ROOT), timeout=60).returncode


@pytest.mark.parametrize("crash_at", ["migrate:half", "migrate:committed", "migrate:renamed"])
def test_migration_killed_midway_loses_nothing_and_reruns_cleanly(root: Path, crash_at: str) -> None:
    p_entries = [entry(P, k) for k in range(1, 201)]
    old_layout(root, P, p_entries)
    assert _migrate_in_child(root, crash_at) == 137  # died like a kill -9 at that point
    on_disk = sorted(os.listdir(partition_dir(root, P)))
    if crash_at == "migrate:renamed":
        assert on_disk == [".published.migrated"]  # committed and renamed: only the delete was left
    else:
        assert on_disk == ["published"] and len(os.listdir(partition_dir(root, P) / "published")) == 200
    assert _migrate_in_child(root, None) == 0
    assert ledger.Ledger(partition_dir(root, P)).entries() == p_entries
    assert delivery_totals(root, P) == ledger.DeliveryTotals(rolls=200, rows=2000, files=200,
                                                             bytes=sum(100 + k for k in range(1, 201)))
    assert os.listdir(partition_dir(root, P)) == []


def test_the_ledger_settings_are_validated_with_the_others() -> None:
    from config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as e:
        load_settings(feeds=Path("feeds.toml"), ledger_retention_days=0, flush_concurrency=0,
                      metrics_refresh_seconds=-1)
    assert {p.split(":")[0].strip() for p in e.value.problems} == {
        "FILEFEED_LEDGER_RETENTION_DAYS", "FILEFEED_FLUSH_CONCURRENCY", "FILEFEED_METRICS_REFRESH_SECONDS"}
    ok = load_settings(feeds=Path("feeds.toml"), ledger_retention_days=0.5)
    assert ok.ledger_retention_days == 0.5 and ok.flush_concurrency == 8


def _open_when_released(root: str, barrier, answers) -> None:  # in a spawned process, as uvicorn's workers are
    from pipeline import ledger as child_ledger

    barrier.wait(timeout=60)
    try:
        child_ledger._connection(root)
        answers.put("ok")
    except Exception as e:  # noqa: BLE001 - the answer is the test's
        answers.put(f"{type(e).__name__}: {e}")


def test_workers_opening_a_new_ledger_together_all_start(tmp_path: Path) -> None:
    """The workers of a fresh staging folder open its ledger at the same moment. Switching the new file to WAL needs
    it alone, and SQLite answered the others "database is locked" at once (no busy wait): a worker failed its start
    and took the server down (2 to 5 of 60 opens on this machine before the fix)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    failures: list[str] = []
    for round_ in range(20):
        root = tmp_path / f"staging-{round_}"
        root.mkdir()
        barrier, answers = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_when_released, args=(str(root), barrier, answers)) for _ in range(4)]
        for proc in procs:
            proc.start()
        failures += [a for a in (answers.get(timeout=60) for _ in procs) if a != "ok"]
        for proc in procs:
            proc.join(30)
    assert failures == []


def test_opening_an_existing_ledger_does_not_wait_for_a_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread's first connection (a CLI command, a flush thread) must not queue behind a roll recording its entry:
    the schema is created under a write lock only when it is missing (review of the retried open)."""
    import sqlite3

    path = str(tmp_path / ledger.DB_NAME)
    ledger._open(path).close()  # the file and its schema exist
    monkeypatch.setattr(ledger, "BUSY_TIMEOUT_SECONDS", 0.5)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a writer holds the lock past the (shortened) busy timeout
    try:
        conn = ledger._open(path)
        assert conn.execute("SELECT count(*) FROM rolls").fetchone() == (0,)
        conn.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
