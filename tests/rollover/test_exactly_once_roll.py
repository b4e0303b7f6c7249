"""A roll never publishes a segment the ledger lists or another roll folder holds (issue 13, finding 1).

A batch's loose rows are staged under a name derived from the rows; a racing or replayed batch may stage that
segment again after its first copy was published. Before the fix the next roll planned whatever was in sealed/ and
published those rows a second time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.ledger import consumed_segments
from pipeline.model import Partition
from pipeline.rollover import failed_rolls, retry_failed, roll_partition
from sinks import open_sink
from sinks.base import TerminalError
from tests.rollover.helpers import ScriptedSink, destination_rows, make_rows, props_for, stage_segment

P = Partition("feed-1", "seg-1", "UPSERT")
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
LOOSE = "batch_0123456789abcdef01234567-00000000.jnl"


def test_a_segment_the_ledger_lists_is_removed_not_published_again(root: Path, dest: Path) -> None:
    props = props_for(dest)
    stage_segment(root, P, LOOSE, make_rows(10))
    first = roll_partition(root, P, props, open_sink(props), now=NOW)
    assert first.rows == 10 and LOOSE in consumed_segments(root, P)
    stage_segment(root, P, LOOSE, make_rows(10))  # the same batch staged again after its publish
    stage_segment(root, P, "w1-abc-00000001.jnl", make_rows(3, 100))
    second = roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=1))
    assert second.rows == 3
    assert not (root / P.relpath / "sealed" / LOOSE).exists()
    assert len(destination_rows(dest)) == 13


def test_a_segment_held_by_a_failed_roll_is_not_planned_again(root: Path, dest: Path) -> None:
    props = props_for(dest)
    stage_segment(root, P, LOOSE, make_rows(10))
    broken = ScriptedSink(props, [TerminalError("permission denied", kind="permission")])
    assert roll_partition(root, P, props, broken, now=NOW).status == "terminal"
    assert failed_rolls(root, P)
    stage_segment(root, P, LOOSE, make_rows(10))  # a retried batch stages the rows the failed roll holds
    assert roll_partition(root, P, props, open_sink(props), now=NOW + timedelta(minutes=1)).status == "nothing"
    assert retry_failed(root, P, open_sink(props)).rows == 10
    assert len(destination_rows(dest)) == 10
