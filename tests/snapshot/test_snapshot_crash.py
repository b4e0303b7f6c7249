"""kill -9 (os._exit) at every step of a snapshot delivery, in the apply rolls and in the snapshot roll, then a
resume in a new process: exactly one snapshot per delivery, byte-identical to an uncrashed one, no change lost or
applied twice, no temp file visible."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline import snapshot
from pipeline.rollover import pending_rolls
from tests.rollover.helpers import destination_files
from tests.snapshot.helpers import DELETE, UPSERT, expected_members, iso, run_child, stage_changes
from tests.snapshot.test_snapshot import FIRST, SECOND, members_of

SLOT1 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
SLOT2 = SLOT1 + timedelta(days=1)
CHILD = "tests.snapshot.child"


def prepare(base: Path) -> tuple[Path, Path]:
    """A first delivery done cleanly, then the second day's changes staged."""
    root, dest = base / "var", base / "dest"
    dest.mkdir(parents=True)
    stage_changes(root, "a", FIRST)
    done = run_child(CHILD, [str(root), str(dest), "all", iso(SLOT1)])
    assert done.returncode == 0, done.stderr
    stage_changes(root, "b", SECOND)
    return root, dest


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root, dest = prepare(tmp_path_factory.mktemp("control"))
    done = run_child(CHILD, [str(root), str(dest), "all", iso(SLOT2)])
    assert done.returncode == 0, done.stderr
    files = destination_files(dest)
    assert members_of(files, SLOT2) == expected_members(FIRST + SECOND)
    return files


def check_resumed(root: Path, dest: Path, control: dict[str, bytes]) -> None:
    again = run_child(CHILD, [str(root), str(dest), "all", iso(SLOT2)])
    assert again.returncode == 0, again.stderr
    assert destination_files(dest) == control  # no temp file, no second snapshot, the same bytes
    sdir = snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id)
    assert not pending_rolls(root, UPSERT) and not pending_rolls(root, DELETE)
    assert not list((sdir / "rolling").iterdir()) and not list((sdir / "sealed").iterdir())
    current = snapshot.read_current(sdir)
    assert current is not None and current["members"] == 2600
    assert [p.name for p in (sdir / "state").iterdir() if p.name.startswith("base-")] == [f"base-{current['base']}.arrow"]
    # a third run for the same slot publishes nothing more
    third = run_child(CHILD, [str(root), str(dest), "all", iso(SLOT2)])
    assert third.returncode == 0 and destination_files(dest) == control


# The apply rolls run first in a delivery: the points they reach first are theirs.
APPLY_POINTS = ["lease", "plan", "move:1", "encode", "ledger"]
# With the changes applied beforehand, every point is the snapshot roll's own.
SNAPSHOT_POINTS = ["lease", "plan", "move:1", "snapshot_base", "snapshot_state", "encode_file:2", "encode",
                   "publish:1", "publish:3", "manifest", "ledger"]


@pytest.mark.parametrize("point", APPLY_POINTS)
def test_crash_in_apply_then_resume(tmp_path: Path, control: dict[str, bytes], point: str) -> None:
    root, dest = prepare(tmp_path)
    crashed = run_child(CHILD, [str(root), str(dest), "all", iso(SLOT2)], crash_at=point)
    assert crashed.returncode == 137, crashed.stderr
    check_resumed(root, dest, control)


@pytest.mark.parametrize("point", SNAPSHOT_POINTS)
def test_crash_in_snapshot_then_resume(tmp_path: Path, control: dict[str, bytes], point: str) -> None:
    root, dest = prepare(tmp_path)
    applied = run_child(CHILD, [str(root), str(dest), "apply", iso(SLOT2)])
    assert applied.returncode == 0, applied.stderr
    crashed = run_child(CHILD, [str(root), str(dest), "snapshot", iso(SLOT2)], crash_at=point)
    assert crashed.returncode == 137, crashed.stderr
    check_resumed(root, dest, control)


def test_every_snapshot_crash_point_is_exercised() -> None:
    from pipeline.rollover import CRASH_POINTS

    covered = {p.split(":")[0] + (":N" if ":" in p else "") for p in SNAPSHOT_POINTS}
    assert set(snapshot.CRASH_POINTS) <= covered
    assert covered <= set(CRASH_POINTS) | set(snapshot.CRASH_POINTS)


def test_a_merge_resumed_after_its_base_was_written_drops_the_same_tombstones(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The horizon comes from the previous CURRENT and the roll's plan, never the clock of the resume, and the roll
    records it: a resume under another FILEFEED_SNAPSHOT_TOMBSTONE_DAYS (here 0, off) writes the same base."""
    day = snapshot.DAY_MS
    states = []
    for name, crash_at in (("control", None), ("crashed", "snapshot_base")):
        root, dest = tmp_path / name / "var", tmp_path / name / "dest"
        dest.mkdir(parents=True)
        stage_changes(root, "a", [("UPSERT", i, 0) for i in range(300)] + [("DELETE", i, day) for i in range(100)]
                      + [("UPSERT", 1000, 40 * day)])
        assert run_child(CHILD, [str(root), str(dest), "all", iso(SLOT1)]).returncode == 0
        stage_changes(root, "b", [("UPSERT", 1001, 41 * day)])
        assert run_child(CHILD, [str(root), str(dest), "apply", iso(SLOT2)]).returncode == 0
        if crash_at:
            crashed = run_child(CHILD, [str(root), str(dest), "snapshot", iso(SLOT2)], crash_at=crash_at)
            assert crashed.returncode == 137, crashed.stderr
            monkeypatch.setenv("FILEFEED_SNAPSHOT_TOMBSTONE_DAYS", "0")
        done = run_child(CHILD, [str(root), str(dest), "snapshot", iso(SLOT2)])
        assert done.returncode == 0, done.stderr
        sdir = snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id)
        current = snapshot.read_current(sdir)
        assert current is not None
        base = (sdir / snapshot.STATE / f"base-{current['base']}.arrow").read_bytes()
        states.append((current["pruned"], current["members"], current["rows"], base))
    assert states[0][:3] == (100, 202, 202)  # the 100 removals of day 1 are older than day 41 - 30
    assert states[1] == states[0]
