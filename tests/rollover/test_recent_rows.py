"""Roll-time dedup (issue 13, finding 9): a platform retry staged by another writer is delivered once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import recent_rows
from pipeline.model import Partition
from pipeline.recent_rows import RecentRows, RollDedup, row_hashes
from pipeline.rollover import roll_partition
from sinks import open_sink
from tests.rollover.helpers import destination_rows, make_rows, props_for, stage_segment

P = Partition("feed-1", "seg-1", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


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
    store = RecentRows(np.zeros(0, np.uint64), np.zeros(0, np.uint32), [])
    store = store.merged("20240601T120000-a", 1000, np.array([5, 7], np.uint64), 600_000, 100)
    store = store.merged("20240601T120100-b", 2000, np.array([6], np.uint64), 600_000, 100)
    store.save(tmp_path)
    loaded = RecentRows.load(tmp_path)
    assert sorted(loaded.known_before("20240601T120100-b", 2000, 600_000).tolist()) == [5, 7]
    assert loaded.known_before("20240601T120000-a", 1000, 600_000).tolist() == []
    # bounded: the oldest roll's hashes go first
    assert loaded.merged("20240601T120200-c", 3000, np.array([1, 2], np.uint64), 600_000, 3).rolls == [
        ("20240601T120100-b", 2000), ("20240601T120200-c", 3000)]


def test_roll_dedup_drops_repeats_within_and_across_batches() -> None:
    batch = pa.record_batch({"identifier_type": ["T"] * 4, "identifier": ["a", "b", "a", "c"], "ts": [1] * 4,
                             "session_id": ["s"] * 4})
    d = RollDedup(np.zeros(0, np.uint64), 100)
    assert d(batch)["identifier"].to_pylist() == ["a", "b", "c"]
    assert d(batch).num_rows == 0
    assert d.dropped == 5 and len(d.kept_hashes()) == 3
