"""Crash at every step of a roll (os._exit in a child process), resume in a new process: every row reaches the
destination exactly once, no partial or temp file is visible, and the files are byte-identical to an uncrashed roll."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ledger import consumed_segments, last_deliveries
from pipeline.rollover import CRASH_ENV, pending_rolls
from tests.rollover.crash_child import PARTITION
from tests.rollover.helpers import destination_files, destination_rows, make_rows, stage_segment

REPO = Path(__file__).resolve().parents[2]
NOW = "2024-06-01T12:00:00+00:00"
SEGMENTS = {"w1-000001.jnl": (0, 900), "w1-000002.jnl": (900, 800), "w2-000001.jnl": (1700, 800)}
TOTAL_ROWS = 2500


def stage(root: Path) -> None:
    for name, (start, count) in SEGMENTS.items():
        stage_segment(root, PARTITION, name, make_rows(count, start), frame_rows=300)


def run_child(root: Path, dest: Path, fmt: str, compression: str, crash_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "tests.rollover.crash_child", str(root), str(dest), NOW, fmt, compression, "1000"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, bytes]]:
    """Destination contents of uncrashed rolls of the same rows at the same planned time."""
    out = {}
    for fmt, compression in (("csv", "gzip"), ("parquet", "zstd")):
        base = tmp_path_factory.mktemp(f"control-{fmt}")
        (base / "dest").mkdir()
        stage(base / "root")
        done = run_child(base / "root", base / "dest", fmt, compression, None)
        assert done.returncode == 0, done.stderr
        out[(fmt, compression)] = destination_files(base / "dest")
    return out


CSV_POINTS = [
    "lease",
    "plan",
    "move:1",
    "move:2",
    "moves",
    "encode_file:1",
    "encode_file:2",
    "encode",
    "publish:1",
    "publish:2",
    "publish:3",
    "manifest",
    "recent_rows",
    "ledger",
]
PARQUET_POINTS = ["move:2", "encode_file:1", "publish:2", "manifest", "ledger"]


@pytest.mark.parametrize(
    ("fmt", "compression", "point"),
    [("csv", "gzip", p) for p in CSV_POINTS] + [("parquet", "zstd", p) for p in PARQUET_POINTS],
)
def test_crash_then_resume_publishes_every_row_exactly_once(
    tmp_path: Path, control: dict, fmt: str, compression: str, point: str
) -> None:
    root, dest = tmp_path / "root", tmp_path / "dest"
    dest.mkdir()
    stage(root)

    crashed = run_child(root, dest, fmt, compression, point)
    assert crashed.returncode == 137, f"did not crash at {point}: {crashed.returncode} {crashed.stderr}"
    # Whatever is visible mid-crash is complete: files are only ever renamed/linked into place.
    destination_files(dest)

    resumed = run_child(root, dest, fmt, compression, None)
    assert resumed.returncode == 0, resumed.stderr
    outcome = json.loads(resumed.stdout)
    assert outcome["status"] in ("published", "nothing")

    files = destination_files(dest)
    assert files == control[(fmt, compression)]  # same names, same bytes as a roll that never crashed
    rows = destination_rows(dest)
    assert len(rows) == TOTAL_ROWS
    assert sorted(r["identifier"] for r in rows) == sorted(f"{i:064x}" for i in range(TOTAL_ROWS))

    pdir = root / PARTITION.relpath
    assert os.listdir(pdir / "sealed") == []
    assert os.listdir(pdir / "rolling") == []  # no hidden leftovers either
    assert not (pdir / "lease").exists()
    assert pending_rolls(root, PARTITION) == []
    assert consumed_segments(root, PARTITION) == set(SEGMENTS)
    (entry,) = last_deliveries(root, PARTITION, 5)
    assert entry.rows == TOTAL_ROWS
    assert [f["name"] for f in entry.files] == sorted(n for n in files if not n.endswith(".manifest.json"))


def test_every_documented_crash_point_is_exercised() -> None:
    from pipeline.rollover import CRASH_POINTS

    covered = {p.split(":")[0] + (":N" if ":" in p else "") for p in CSV_POINTS}
    # a point only a roll with the shared database passes: killed there in tests/shared/test_volume_lost.py
    shared_only = {"publishing"}
    assert '"publishing"' in (Path(__file__).parents[1] / "shared" / "test_volume_lost.py").read_text()
    # a point only a roll that compacts the recent-rows window passes: killed there in test_recent_rows.py
    compaction_only = {"compact"}
    assert 'CRASH_ENV: "compact"' in (Path(__file__).parent / "test_recent_rows.py").read_text()
    assert covered | shared_only | compaction_only == set(CRASH_POINTS)
