"""Roll-time dedup (issue 13, finding 9): a platform retry staged by another writer is delivered once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import recent_rows
from pipeline.model import Partition
from pipeline.recent_rows import RecentRows, RollDedup, row_hashes
from pipeline.rollover import CRASH_ENV, roll_partition
from sinks import open_sink
from tests.rollover.helpers import destination_rows, make_rows, props_for, stage_segment

P = Partition("feed-1", "seg-1", "UPSERT")


def known(store: RecentRows, roll_id: str, planned_ms: int, max_rows: int = 1_000_000) -> list[int]:
    """The hashes a roll looks up, sorted."""
    return sorted(int(h) for run in store.known_before(roll_id, planned_ms, 600_000, max_rows) for h in run)
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def window():
    recent_rows.configure(600, 1_000_000)
    yield
    recent_rows.configure(600, 1_000_000)


def test_copies_from_two_writers_in_one_roll_are_published_once(root: Path, dest: Path) -> None:
    props = props_for(dest)
    stage_segment(root, P, "w1-aaa-00000001.jnl", make_rows(100))
    stage_segment(root, P, "w2-bbb-00000001.jnl", make_rows(100, 50))  # rows 50-99 retried on another worker
    outcome = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert outcome.rows == 150
    assert len(destination_rows(dest)) == 150


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_retry_rolled_later_within_the_window_is_dropped_and_after_it_is_kept(root: Path, dest: Path,
                                                                                fmt: str) -> None:
    props = props_for(dest, file_format=fmt, compression="zstd")
    stage_segment(root, P, "w1-aaa-00000001.jnl", make_rows(100))
    assert roll_partition(root, P, props, open_sink(props), now=NOW).rows == 100
    stage_segment(root, P, "w2-bbb-00000001.jnl", make_rows(20, 90))  # 10 retried rows, 10 new
    assert roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=5)).rows == 10
    stage_segment(root, P, "w3-ccc-00000001.jnl", make_rows(5))  # the same rows, 11 minutes after their roll
    assert roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=11)).rows == 5
    assert len(destination_rows(dest)) == 115


def test_dedup_off_keeps_every_copy(root: Path, dest: Path) -> None:
    recent_rows.configure(0, 1_000_000)
    props = props_for(dest)
    stage_segment(root, P, "w1-aaa-00000001.jnl", make_rows(10))
    stage_segment(root, P, "w2-bbb-00000001.jnl", make_rows(10))
    assert roll_partition(root, P, props, open_sink(props), now=NOW).rows == 20


def test_rows_differing_in_any_key_value_are_kept() -> None:
    base = {"identifier_type": ["USER_EMAIL"], "identifier": ["a"], "ts": [1], "session_id": ["s"]}
    variants = [base, {**base, "identifier_type": ["USER_ACCOUNT"]}, {**base, "identifier": ["b"]},
                {**base, "ts": [2]}, {**base, "session_id": ["t"]}, {**base, "identifier": ["a\0"]}]
    hashes = {int(row_hashes(pa.record_batch(v))[0]) for v in variants}
    assert len(hashes) == len(variants)


def test_a_resumed_roll_ignores_its_own_hashes_and_later_rolls(tmp_path: Path) -> None:
    store = RecentRows(np.zeros(0, np.uint64), np.zeros(0, np.uint32), [],
                       [("20240601T120000-a", 1000, np.array([5, 7], np.uint64)),
                        ("20240601T120100-b", 2000, np.array([6], np.uint64))]).compacted(2000, 600_000, 100)
    store.save(tmp_path)
    loaded = RecentRows.load(tmp_path)
    assert known(loaded, "20240601T120100-b", 2000) == [5, 7]
    assert known(loaded, "20240601T120000-a", 1000) == []
    assert known(loaded, "20240601T120200-c", 3000, max_rows=1) == [6]  # the newest roll's, within the budget
    assert known(loaded, "20240601T120200-c", 3000) == [5, 6, 7]
    # bounded: the oldest roll's hashes go first
    loaded.runs = [("20240601T120200-c", 3000, np.array([1, 2], np.uint64))]
    assert loaded.compacted(3000, 600_000, 3).rolls == [("20240601T120100-b", 2000), ("20240601T120200-c", 3000)]


def test_roll_dedup_drops_repeats_within_and_across_batches() -> None:
    batch = pa.record_batch({"identifier_type": ["T"] * 4, "identifier": ["a", "b", "a", "c"], "ts": [1] * 4,
                             "session_id": ["s"] * 4})
    d = RollDedup([], 100)
    assert d(batch)["identifier"].to_pylist() == ["a", "b", "c"]
    assert d(batch).num_rows == 0
    assert d.dropped == 5 and len(d.kept_hashes()) == 3


def test_a_long_roll_keeps_only_the_newest_hashes_it_saves() -> None:
    """A roll of many rows used to keep every kept hash (80 MB for 10 M rows) to save the newest max_rows of them."""
    d = RollDedup([], 50)
    every = []
    for start in range(0, 2000, 40):
        batch = pa.record_batch({"identifier_type": ["T"] * 40, "identifier": [f"i{k}" for k in range(start, start + 40)],
                                 "ts": [1] * 40, "session_id": ["s"] * 40})
        every.append(row_hashes(batch))
        d(batch)
        assert sum(len(k) for k in d.kept) <= 2 * 50 + 40
    assert np.array_equal(d.kept_hashes(), np.sort(np.concatenate(every)[-50:]))
    assert d.dropped == 0


def roll_rows(root: Path, dest: Path, n: int, start: int, minute: int) -> int:
    """Stage rows start..start+n-1 as their own segment and roll them `minute` minutes after NOW: rows published."""
    props = props_for(dest)
    stage_segment(root, P, f"w1-r{start}n{n}m{minute}-00000001.jnl", make_rows(n, start))
    return roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=minute)).rows


def rows_batch(rows: list) -> pa.RecordBatch:
    return pa.record_batch({"identifier_type": [r[0] for r in rows], "identifier": [r[1] for r in rows],
                            "ts": [r[2] for r in rows], "session_id": [r[3] for r in rows]})


def test_each_roll_adds_a_run_and_compaction_keeps_the_window(root: Path, dest: Path) -> None:
    pdir = root / P.relpath
    for k in range(recent_rows.MAX_RUNS):
        assert roll_rows(root, dest, 10, 10 * k, k % 8) == 10
        assert len(os.listdir(pdir / recent_rows.RUNS_DIR)) == k + 1  # no rewrite of the window per roll
        assert not (pdir / recent_rows.STORE_NAME).exists()
    assert roll_rows(root, dest, 10, 10 * recent_rows.MAX_RUNS, 8) == 10  # one run too many: compacted
    assert os.listdir(pdir / recent_rows.RUNS_DIR) == []
    store = RecentRows.load(pdir)
    assert len(store.rolls) == recent_rows.MAX_RUNS + 1 and len(store.hashes) == 10 * (recent_rows.MAX_RUNS + 1)
    # a retry of rows from the store and from a run after it: dropped; new rows kept
    assert roll_rows(root, dest, 10, 10 * recent_rows.MAX_RUNS, 9) == 0
    assert roll_rows(root, dest, 30, 0, 9) == 0
    assert roll_rows(root, dest, 20, 10 * recent_rows.MAX_RUNS + 5, 9) == 15
    assert len(destination_rows(dest)) == 10 * (recent_rows.MAX_RUNS + 1) + 15


def test_compaction_drops_rolls_out_of_the_window(root: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recent_rows, "MAX_RUNS", 1)
    assert roll_rows(root, dest, 10, 0, 0) == 10
    assert roll_rows(root, dest, 10, 10, 5) == 10
    assert roll_rows(root, dest, 10, 20, 11) == 10
    assert roll_rows(root, dest, 30, 0, 12) == 10  # rows 0-9 again: out of the window, delivered again
    store = RecentRows.load(root / P.relpath)  # compacted by the last roll: the first one (12 minutes old) left
    assert [t for _, t in store.rolls] == [int((NOW + timedelta(minutes=m)).timestamp() * 1000) for m in (5, 11, 12)]
    assert store.runs == []


def test_a_store_of_the_previous_release_is_read(root: Path, dest: Path) -> None:
    """Before runs, the window was only `recent-rows.arrow` (hash, roll) with its rolls in the metadata."""
    hashes = np.sort(row_hashes(rows_batch(make_rows(10))))
    table = pa.table({"hash": pa.array(hashes, pa.uint64()), "roll": pa.array(np.zeros(10, np.uint32))})
    planned = int((NOW - timedelta(minutes=1)).timestamp() * 1000)
    table = table.replace_schema_metadata({"rolls": json.dumps([["20240601T115900-0123456789", planned]])})
    pdir = root / P.relpath
    pdir.mkdir(parents=True)
    with pa.ipc.new_file(str(pdir / recent_rows.STORE_NAME), table.schema) as writer:
        writer.write_table(table)
    assert roll_rows(root, dest, 15, 0, 0) == 5  # rows 0-9 were published by the old release's roll
    assert len(RecentRows.load(pdir).runs) == 1


def test_a_crash_mid_compaction_leaves_a_store_that_decides_the_same(root: Path, dest: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the compacted store is written, before its runs are removed (both hold the same rolls)."""
    assert roll_rows(root, dest, 10, 0, 0) == 10
    stage_segment(root, P, "w1-r001-00000001.jnl", make_rows(10, 10))
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update({CRASH_ENV: "compact", "PYTHONPATH": str(REPO)})
    child = ("import sys; from pipeline import recent_rows; recent_rows.MAX_RUNS = 1; "
             "from tests.rollover.crash_child import main; sys.exit(main(sys.argv[1:]))")
    now = (NOW + timedelta(minutes=1)).isoformat()
    done = subprocess.run([sys.executable, "-c", child, str(root), str(dest), now, "csv", "gzip", "1000"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 137, done.stderr
    pdir = root / P.relpath
    assert len(os.listdir(pdir / recent_rows.RUNS_DIR)) == 2  # not removed yet
    store = RecentRows.load(pdir)
    assert len(store.rolls) == 2 and store.runs == []  # the runs the store covers are ignored
    assert known(store, "99999999T000000-z", store.rolls[-1][1]) == sorted(int(h) for h in store.hashes)
    done = subprocess.run([sys.executable, "-m", "tests.rollover.crash_child", str(root), str(dest), now, "csv", "gzip",
                           "1000"], cwd=REPO, env={**env, CRASH_ENV: ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # resumes: only the ledger entry was left
    assert roll_rows(root, dest, 30, 0, 2) == 10  # rows 0-19 are in the window
    assert len(destination_rows(dest)) == 30
    monkeypatch.setattr(recent_rows, "MAX_RUNS", 1)
    assert roll_rows(root, dest, 5, 30, 3) == 5  # compacts: the runs left by the crash go too
    assert os.listdir(pdir / recent_rows.RUNS_DIR) == []
    assert known(RecentRows.load(pdir), "99999999T000000-z", store.rolls[-1][1] + 180_000) == sorted(
        int(h) for h in row_hashes(rows_batch(make_rows(35))))
