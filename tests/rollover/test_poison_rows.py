"""No single row can fail a roll (issue 13, finding 3): rows whose ts cannot be encoded are set aside with a report.

Before the fix one staged row with ts = "1" + 25 zeros (or 2**63) sent the Parquet roll to failed/ as a
corrupt_segment forever, and on CSV feeds the value reached the file so readers inferred ts as a DOUBLE column.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from pipeline.identifiers import MAX_TS_MS
from pipeline.model import Partition
from pipeline.rollover import roll_partition
from sinks import open_sink
from tests.rollover.helpers import destination_files, destination_rows, make_rows, props_for, stage_segment

P = Partition("feed-1", "seg-1", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
POISON = [10**25, 2**63, -1, MAX_TS_MS + 1]


def _stage_with_poison(root: Path) -> None:
    rows = make_rows(50)
    for i, ts in enumerate(POISON):  # what an older version could stage
        r = rows[10 * i]
        rows.insert(10 * i, (r[0], f"poison-{i}", ts, r[3], r[4], r[5]))
    stage_segment(root, P, "w1-abc-00000001.jnl", rows, frame_rows=7)


@pytest.mark.parametrize("fmt", [{"file_format": "parquet", "compression": "zstd"},
                                 {"file_format": "csv", "compression": "gzip"},
                                 {"file_format": "csv", "compression": "none"}])
def test_a_poison_ts_is_set_aside_and_the_good_rows_are_delivered(root: Path, dest: Path, fmt: dict) -> None:
    props = props_for(dest, **fmt)
    _stage_with_poison(root)
    outcome = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert outcome.status == "published", outcome
    assert outcome.rows == 50
    got = destination_rows(dest)
    assert len(got) == 50 and not any(r["identifier"].startswith("poison") for r in got)
    (report_path,) = (root / P.relpath / "rejected").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["rejected_rows"] == len(POISON)
    assert sorted(r["identifier"] for r in report["rows"]) == [f"poison-{i}" for i in range(len(POISON))]
    assert report_path.stem == outcome.roll_ids[0]


def test_csv_ts_stays_an_integer_column_for_type_inferring_readers(root: Path, dest: Path) -> None:
    props = props_for(dest, file_format="csv", compression="none")
    _stage_with_poison(root)
    assert roll_partition(root, P, props, open_sink(props), now=NOW).status == "published"
    (name,) = [n for n in destination_files(dest) if n.endswith(".csv")]
    table = pacsv.read_csv(dest / name)  # pyarrow infers the types, as DuckDB's read_csv does
    assert table.schema.field("ts").type == pa.int64()


def test_status_lists_the_rows_set_aside(root: Path, dest: Path) -> None:
    from pipeline.staging import Staging
    from pipeline.troubleshoot import partition_report

    props = props_for(dest, file_format="parquet", compression="zstd")
    _stage_with_poison(root)
    roll_partition(root, P, props, open_sink(props), now=NOW)
    with Staging(root, min_free_bytes=0) as st:
        report = partition_report(st, P)
    assert report["rejected_rows"] == len(POISON)
    assert report["rejected_reports"][0].startswith(f"{P.relpath}/rejected/")
