"""Shared by the snapshot and schedule tests: a reference model of membership, staged changes, a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from config.feed import FeedProperties
from pipeline.model import Partition
from pipeline.rollover import CRASH_ENV
from tests.rollover.helpers import BASE_MS, props_for, stage_segment

REPO = Path(__file__).resolve().parents[2]
FEED, SEGMENT = "feed-1", "seg-1"
UPSERT = Partition(FEED, SEGMENT, "UPSERT")
DELETE = Partition(FEED, SEGMENT, "DELETE")
TEMPLATE = "{segment_id}/{mode}/{date}T{time}Z_{batch_id}_part{part}.{ext}"

Change = tuple[str, int, int]  # (operation, identifier number, ts offset from BASE_MS)


def row(i: int, ts: int, session: str = "s") -> tuple:
    return ("USER_EMAIL", f"{i:064x}", BASE_MS + ts, session, "1509", f"up-{i}")


def stage_changes(root: Path, name: str, changes: Iterable[Change]) -> None:
    """Stage changes as sealed segments `<name>.jnl` in the partition of their operation."""
    by_op: dict[str, list[tuple]] = {"UPSERT": [], "DELETE": []}
    for op, i, ts in changes:
        by_op[op].append(row(i, ts))
    for op, rows in by_op.items():
        if rows:
            stage_segment(root, UPSERT if op == "UPSERT" else DELETE, f"{name}-{op.lower()}.jnl", rows,
                          frame_rows=700)


def expected_members(changes: Iterable[Change]) -> dict[str, int]:
    """Last writer wins by ts, DELETE wins a tie: identifier -> ts of the members."""
    state: dict[int, tuple[int, int]] = {}
    for op, i, ts in changes:
        rank = (ts, 1 if op == "DELETE" else 0)
        if i not in state or rank > state[i]:
            state[i] = rank
    return {f"{i:064x}": BASE_MS + ts for i, (ts, deleted) in state.items() if not deleted}


def snapshot_props(dest: Path, **overrides: object) -> FeedProperties:
    values: dict[str, object] = {"delivery_mode": "snapshot", "file_name_template": TEMPLATE, "max_rows_per_file": 1000}
    values.update(overrides)
    return props_for(dest, **values)


def run_child(module: str, args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def iso(value: datetime) -> str:
    return value.isoformat()
