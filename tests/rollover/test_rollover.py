"""The roll state machine in one process: publish, ledger, lease, transient/terminal failures, retry, age timer."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.ledger import consumed_segments, last_deliveries
from pipeline.model import Partition
from pipeline.rollover import (
    MAX_UNKNOWN_ATTEMPTS,
    Lease,
    due_partitions,
    failed_rolls,
    pending_rolls,
    retry_failed,
    roll_partition,
)
from sinks import open_sink
from sinks.base import TerminalError, TransientError
from tests.rollover.helpers import (
    BASE_MS,
    ScriptedSink,
    destination_files,
    destination_rows,
    make_rows,
    props_for,
    stage_segment,
)

P = Partition("feed-1", "seg-1", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


def ids(rows: list[dict[str, str]]) -> list[str]:
    return sorted(r["identifier"] for r in rows)


def expected_ids(*ranges: tuple[int, int]) -> list[str]:
    return sorted(f"{i:064x}" for start, n in ranges for i in range(start, start + n))


def test_roll_publishes_files_manifest_and_ledger(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(1200))
    stage_segment(root, P, "w2-000001.jnl", make_rows(1300, 1200), frame_rows=250)
    props = props_for(dest, max_rows_per_file=1000)
    out = roll_partition(root, P, props, open_sink(props), now=NOW)

    assert out.status == "published" and out.error is None
    assert out.rows == 2500 and len(out.files) == 3 and len(out.roll_ids) == 1
    roll_id = out.roll_ids[0]
    assert roll_id.startswith("20240601T120000000-")
    files = destination_files(dest)
    assert ids(destination_rows(dest)) == expected_ids((0, 2500))

    manifest_name = f"seg-1/{roll_id}.manifest.json"
    manifest = json.loads(files[manifest_name])
    assert [f["name"] for f in manifest["files"]] == list(out.files)
    assert [f["rows"] for f in manifest["files"]] == [1000, 1000, 500]
    for f in manifest["files"]:
        assert f["sha256"] == hashlib.sha256(files[f["name"]]).hexdigest()
        assert f["bytes"] == len(files[f["name"]])
    assert manifest["counts"] == {"files": 3, "rows": 2500, "bytes": sum(f["bytes"] for f in manifest["files"])}
    assert manifest["format"] == "csv" and manifest["compression"] == "gzip"
    assert [c["header"] for c in manifest["columns"]] == [
        "segment_id",
        "operation",
        "identifier_type",
        "identifier",
        "ts",
    ]
    assert manifest["batch_id"] == roll_id and manifest["created_at"] == "2024-06-01T12:00:00Z"
    assert out.files[0] == f"seg-1/20240601T120000Z_UPSERT_{roll_id}_part00001.csv.gz"

    pdir = root / P.relpath
    assert os.listdir(pdir / "sealed") == [] and os.listdir(pdir / "rolling") == []
    assert not (pdir / "lease").exists()
    assert consumed_segments(root, P) == {"w1-000001.jnl", "w2-000001.jnl"}
    (entry,) = last_deliveries(root, P)
    assert entry.roll_id == roll_id and entry.rows == 2500
    assert entry.manifest is not None and entry.manifest["name"] == manifest_name


def test_empty_partition_publishes_nothing(root: Path, dest: Path) -> None:
    props = props_for(dest)
    assert roll_partition(root, P, props, open_sink(props), now=NOW).status == "nothing"
    stage_segment(root, P, "w1-000001.jnl", [])  # a sealed segment without a row
    out = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert out.status == "nothing" and out.files == () and out.rows == 0
    assert destination_files(dest) == {}
    assert consumed_segments(root, P) == {"w1-000001.jnl"}  # consumed, so it is not rolled again


def test_no_manifest_when_disabled_and_parquet_output(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(10))
    props = props_for(
        dest,
        write_manifest=False,
        file_format="parquet",
        compression="zstd",
        columns="identifier=Email,ts=Time,datamart_id",
    )
    out = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert out.status == "published"
    assert list(destination_files(dest)) == list(out.files)
    assert out.files[0].endswith(".parquet")
    rows = destination_rows(dest)
    assert rows[0] == {"Email": f"{0:064x}", "Time": str(BASE_MS), "datamart_id": "1509"}


def test_second_roll_takes_only_new_segments(root: Path, dest: Path) -> None:
    props = props_for(dest)
    stage_segment(root, P, "w1-000001.jnl", make_rows(5))
    first = roll_partition(root, P, props, open_sink(props), now=NOW)
    stage_segment(root, P, "w1-000002.jnl", make_rows(7, 5))
    second = roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=1))
    assert first.rows == 5 and second.rows == 7 and first.roll_ids != second.roll_ids
    assert ids(destination_rows(dest)) == expected_ids((0, 12))
    assert [e.roll_id for e in last_deliveries(root, P, 1)] == list(second.roll_ids)
    assert [e.roll_id for e in last_deliveries(root, P, 10)] == [*second.roll_ids, *first.roll_ids]


# -- lease -------------------------------------------------------------------------------------------------------


def test_live_lease_makes_a_second_roller_busy(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(5))
    props = props_for(dest)
    held = Lease.acquire(root / P.relpath)
    assert held is not None
    try:
        out = roll_partition(root, P, props, open_sink(props), now=NOW, wait_seconds=0.2)
        assert out.status == "busy"
        assert os.listdir(root / P.relpath / "sealed") == ["w1-000001.jnl"]
    finally:
        held.release()
    assert roll_partition(root, P, props, open_sink(props), now=NOW).status == "published"


def write_lease(root: Path, body: dict, age_seconds: float = 0.0) -> Path:
    path = root / P.relpath / "lease"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    past = time.time() - age_seconds
    os.utime(path, (past, past))
    return path


def test_lease_of_a_dead_process_is_broken(root: Path, dest: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    write_lease(root, {"pid": dead_pid, "host": socket.gethostname(), "token": "old", "start_ticks": 1})
    stage_segment(root, P, "w1-000001.jnl", make_rows(5))
    props = props_for(dest)
    assert roll_partition(root, P, props, open_sink(props), now=NOW).status == "published"
    assert not (root / P.relpath / "lease").exists()


def test_lease_of_another_host_is_broken_only_when_stale(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(5))
    props = props_for(dest)
    body = {"pid": 1, "host": "some-other-host", "token": "theirs"}
    write_lease(root, body, age_seconds=5)
    assert roll_partition(root, P, props, open_sink(props), now=NOW, lease_stale_after=60).status == "busy"
    write_lease(root, body, age_seconds=120)
    assert roll_partition(root, P, props, open_sink(props), now=NOW, lease_stale_after=60).status == "published"


def test_heartbeat_notices_a_lost_lease(root: Path) -> None:
    from pipeline.rollover import LeaseLost

    lease = Lease.acquire(root / P.relpath)
    assert lease is not None
    write_lease(root, {"pid": 1, "host": "elsewhere", "token": "stolen"})
    with pytest.raises(LeaseLost):
        lease.heartbeat(force=True)
    lease.release()
    assert (root / P.relpath / "lease").exists()  # release never removes someone else's lease


# -- failures ------------------------------------------------------------------------------------------------------


def test_transient_failure_keeps_the_roll_and_the_next_roll_resumes_it_first(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(30))
    csv_props = props_for(dest, max_rows_per_file=10)
    failing = ScriptedSink(csv_props, [TransientError("connection reset", kind="network")])
    out = roll_partition(root, P, csv_props, failing, now=NOW)
    assert out.status == "transient" and out.error_kind == "network" and "connection reset" in (out.error or "")
    (roll_id,) = pending_rolls(root, P)
    assert out.roll_ids == (roll_id,)
    assert os.listdir(root / P.relpath / "rolling" / roll_id / "segments") == ["w1-000001.jnl"]
    assert not (root / P.relpath / "lease").exists()
    assert destination_files(dest) == {}

    # New rows arrive and the feed switches to Parquet: the pending roll keeps its own plan (names, format).
    stage_segment(root, P, "w1-000002.jnl", make_rows(5, 30))
    parquet_props = props_for(dest, max_rows_per_file=10, file_format="parquet")
    later = NOW + timedelta(minutes=5)
    out = roll_partition(root, P, parquet_props, open_sink(parquet_props), now=later)
    assert out.status == "published" and out.roll_ids[0] == roll_id and len(out.roll_ids) == 2
    assert [n for n in out.files if n.endswith(".csv.gz")] == [
        f"seg-1/20240601T120000Z_UPSERT_{roll_id}_part0000{i}.csv.gz" for i in (1, 2, 3)
    ]
    assert out.files[-1].endswith(".parquet")
    assert ids(destination_rows(dest)) == expected_ids((0, 35))
    assert pending_rolls(root, P) == []


def test_failure_after_a_file_was_published_does_not_duplicate_it(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(30))
    props = props_for(dest, max_rows_per_file=10)
    flaky = ScriptedSink(props, [TransientError("timeout after upload", kind="network")], fail_after_publish=True)
    assert roll_partition(root, P, props, flaky, now=NOW).status == "transient"
    assert len(destination_files(dest)) == 1  # the file made it, the answer did not
    retry = ScriptedSink(props)
    out = roll_partition(root, P, props, retry, now=NOW)
    assert out.status == "published"
    assert retry.calls[0] == out.files[0]  # re-published under the same name: idempotent, not a second file
    assert ids(destination_rows(dest)) == expected_ids((0, 30))
    assert len(destination_files(dest)) == 4  # 3 files + manifest


def test_terminal_failure_moves_the_roll_to_failed_and_retry_publishes_it(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(20))
    props = props_for(dest)
    broken = ScriptedSink(props, [TerminalError("access denied to bucket", kind="permission")])
    out = roll_partition(root, P, props, broken, now=NOW)
    assert out.status == "terminal" and out.error_kind == "permission"
    (roll_id,) = failed_rolls(root, P)
    assert pending_rolls(root, P) == []
    fdir = root / P.relpath / "failed" / roll_id
    reason = json.loads((fdir / "reason.json").read_text())
    assert reason["severity"] == "terminal" and reason["kind"] == "permission"
    assert reason["exception"] == "TerminalError"
    assert reason["message"] == "access denied to bucket" and reason["attempts"] == 1
    assert datetime.fromisoformat(reason["failed_at"]).tzinfo is not None
    assert os.listdir(fdir / "segments") == ["w1-000001.jnl"]  # rows kept, not dropped

    out = retry_failed(root, P, open_sink(props))
    assert out.status == "published" and out.roll_ids == (roll_id,) and out.rows == 20
    assert failed_rolls(root, P) == [] and pending_rolls(root, P) == []
    assert ids(destination_rows(dest)) == expected_ids((0, 20))
    assert consumed_segments(root, P) == {"w1-000001.jnl"}


def test_unknown_errors_are_retried_a_bounded_number_of_times(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", make_rows(3))
    props = props_for(dest)
    statuses = []
    for _ in range(MAX_UNKNOWN_ATTEMPTS):
        sink = ScriptedSink(props, [RuntimeError("surprise from a client library")])
        statuses.append(roll_partition(root, P, props, sink, now=NOW).status)
    assert statuses == ["transient"] * (MAX_UNKNOWN_ATTEMPTS - 1) + ["terminal"]
    (roll_id,) = failed_rolls(root, P)
    reason = json.loads((root / P.relpath / "failed" / roll_id / "reason.json").read_text())
    assert reason["kind"] == "unknown" and reason["attempts"] == MAX_UNKNOWN_ATTEMPTS
    assert reason["exception"] == "RuntimeError"
    # `filefeed retry` counts again from the first attempt: the same surprise is transient again, then published
    surprise = ScriptedSink(props, [RuntimeError("surprise from a client library")])
    assert retry_failed(root, P, surprise).status == "transient"
    rdir = root / P.relpath / "rolling" / roll_id
    assert json.loads((rdir / "attempts.json").read_text()) == {"attempts": 1}
    assert roll_partition(root, P, props, open_sink(props), now=NOW).status == "published"
    assert ids(destination_rows(dest)) == expected_ids((0, 3))


def test_attempts_killed_mid_roll_are_counted(root: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A roll that kills its process is counted like one that raises: the first attempt by its plan alone."""
    from pipeline import rollover

    class Killed(BaseException):
        pass

    def killed_after_the_moves(name: str) -> None:  # a point every attempt passes
        if name == "moves":
            raise Killed

    stage_segment(root, P, "w1-000001.jnl", make_rows(3))
    props = props_for(dest)
    monkeypatch.setattr(rollover, "crash_point", killed_after_the_moves)
    for _ in range(3):
        with pytest.raises(Killed):
            roll_partition(root, P, props, open_sink(props), now=NOW)
    monkeypatch.undo()
    broken = ScriptedSink(props, [TerminalError("access denied to bucket", kind="permission")])
    assert roll_partition(root, P, props, broken, now=NOW).status == "terminal"
    (roll_id,) = failed_rolls(root, P)
    reason = json.loads((root / P.relpath / "failed" / roll_id / "reason.json").read_text())
    assert reason["attempts"] == 4
    assert not destination_files(dest)


def test_corrupt_segment_goes_to_failed_not_published(root: Path, dest: Path) -> None:
    path = stage_segment(root, P, "w1-000001.jnl", make_rows(50))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # flip a bit in the last frame's payload: its checksum no longer matches
    path.write_bytes(bytes(data))
    props = props_for(dest)
    out = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert out.status == "terminal" and out.error_kind == "corrupt_segment"
    assert destination_files(dest) == {}
    assert len(failed_rolls(root, P)) == 1


# -- age timer -------------------------------------------------------------------------------------------------------


def test_due_partitions_by_oldest_row_and_pending_rolls(root: Path, dest: Path) -> None:
    old, fresh, other_feed = P, Partition("feed-1", "seg-2", "DELETE"), Partition("feed-2", "seg-1", "UPSERT")
    stage_segment(root, old, "w1-000001.jnl", make_rows(3), ts_ms=BASE_MS)
    stage_segment(root, fresh, "w1-000001.jnl", make_rows(3), ts_ms=BASE_MS + 3_500_000)
    stage_segment(root, other_feed, "w1-000001.jnl", make_rows(3), ts_ms=BASE_MS)
    now = datetime.fromtimestamp((BASE_MS + 3_600_000) / 1000, UTC)

    assert due_partitions(root, {"feed-1": 3600}, now=now) == [old]
    assert due_partitions(root, {"feed-1": 3600}, now=now, default_max_age=60) == [old, other_feed]
    assert due_partitions(root, {"feed-1": 60}, now=now) == [old, fresh]

    # Rows still in an open segment count too (staging seals them before the roll).
    open_dir = root / fresh.relpath / "open"
    open_dir.mkdir()
    (root / fresh.relpath / "sealed" / "w1-000001.jnl").rename(open_dir / "w1-000001.jnl")
    assert due_partitions(root, {"feed-1": 60}, now=now) == [old, fresh]

    # A roll waiting in rolling/ is due whatever its age, so the timer resumes it.
    props = props_for(dest)
    roll_partition(root, other_feed, props, ScriptedSink(props, [TransientError("down", kind="network")]), now=now)
    assert due_partitions(root, {}, now=now) == [other_feed]


def test_datamart_macro_comes_from_the_first_row_when_the_files_do_not_show_it(root: Path, dest: Path) -> None:
    stage_segment(root, P, "w1-000001.jnl", [])
    stage_segment(root, P, "w1-000002.jnl", make_rows(3, datamart_id="2077"))
    props = props_for(dest, file_name_template="{datamart_id}/{segment_id}-{batch_id}-{part}.{ext}")
    out = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert out.status == "published" and out.files[0].startswith("2077/seg-1-")
    manifest = json.loads(destination_files(dest)[next(n for n in destination_files(dest) if n.endswith(".json"))])
    assert manifest["datamart_id"] == "2077"
    assert list(destination_rows(dest)[0]) == ["segment_id", "operation", "identifier_type", "identifier", "ts"]


def test_two_rolls_in_one_second_are_named_and_listed_in_the_order_they_were_made(root: Path, dest: Path) -> None:
    """Two `batch_update` calls within a second: the later roll's files sort after the earlier's and `status` shows
    it as the last delivery, whatever their hashes (they once sorted by hash: the second roll's is chosen lower)."""
    from pipeline.rollover import make_roll_id
    from pipeline.staging import Staging
    from pipeline.troubleshoot import partition_report

    first = "w1-000001.jnl"
    digest = make_roll_id(P, [first], NOW).split("-")[1]
    second = next(n for n in (f"w1-{i:06d}.jnl" for i in range(2, 200)) if make_roll_id(P, [n], NOW).split("-")[1] < digest)
    props = props_for(dest)
    stage_segment(root, P, first, make_rows(10))
    one = roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(milliseconds=100))
    stage_segment(root, P, second, make_rows(10, 10))
    two = roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(milliseconds=900))
    assert one.status == two.status == "published"

    assert one.roll_ids[0] < two.roll_ids[0]
    assert sorted(n for n in destination_files(dest) if not n.endswith(".json")) == [*one.files, *two.files]
    assert [e.roll_id for e in last_deliveries(root, P)] == [two.roll_ids[0], one.roll_ids[0]]
    with Staging(root, min_free_bytes=0) as st:
        report = partition_report(st, P)
    assert report["last_delivery"]["roll_id"] == two.roll_ids[0]
    assert [d["roll_id"] for d in report["recent_deliveries"]] == [two.roll_ids[0], one.roll_ids[0]]
