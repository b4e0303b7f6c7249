"""A snapshot feed's state over months of churn: with the tombstone horizon (FILEFEED_SNAPSHOT_TOMBSTONE_DAYS, 30)
against without it (0), the same days in one command.

    python bench/tombstones.py [--members 100000] [--churn 10000] [--days 90]

One segment of --members members (USER_EMAIL, 64-hex identifiers). Every simulated day, the --churn oldest members
leave (DELETE) and as many new identifiers join (UPSERT), each change dated that day, staged as a sealed journal of
each partition; then that day's delivery (`snapshot.roll_segment`: the apply rolls, then the snapshot roll's
streaming merge of base + runs into a new base and the CSV + gzip files of every member, to a local folder, planned
at that day's time). The two sides (each its own staging folder) take the days in turn, in one process, so they meet
the same machine load. Every 30 days and at the end it prints each side's state (`rows` of `state/CURRENT`, the
base's bytes) and the day's snapshot seconds, and the ratios without/with the horizon. Members are the same on both
sides every day (checked): the horizon changes what the state remembers, never what is delivered here, since every
change is dated the day it arrives.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as a script, the bench folder comes first on the path, and bench/sinks.py would shadow the sinks package
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from config.feed import FeedProperties  # noqa: E402 - after the path fix above
from pipeline import snapshot  # noqa: E402
from pipeline.journal import encode_rows  # noqa: E402
from pipeline.model import Partition  # noqa: E402
from sinks import open_sink  # noqa: E402

FEED, SEGMENT = "bench-feed", "seg-1"
START = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
FRAME_ROWS = 5000
SIDES = {"horizon": 30.0, "no horizon": 0.0}  # FILEFEED_SNAPSHOT_TOMBSTONE_DAYS of each side


def stage(root: Path, day: int, op: str, numbers: list[int], ts_ms: int) -> None:
    """`numbers` as one sealed journal of the partition of `op`, every row dated `ts_ms`."""
    rows = [("USER_EMAIL", f"{n:064x}", ts_ms, "s-1", "1509", f"up-{n}") for n in numbers]
    sealed = root / "feeds" / FEED / SEGMENT / op / "sealed"
    sealed.mkdir(parents=True, exist_ok=True)
    data = b"".join(encode_rows(rows[i:i + FRAME_ROWS], ts_ms) for i in range(0, len(rows), FRAME_ROWS))
    (sealed / f"w1-{day + 1:08d}.jnl").write_bytes(data)


def state_of(root: Path) -> tuple[int, int, int]:
    """(rows of the state, members, bytes of the base)."""
    sdir = snapshot.snapshot_dir(root, FEED, SEGMENT)
    current = snapshot.read_current(sdir)
    assert current is not None
    base = sdir / snapshot.STATE / f"base-{current['base']}.arrow"
    return int(current["rows"]), int(current["members"]), base.stat().st_size


def deliver(root: Path, dest: Path, day: int, days: float) -> float:
    """That day's snapshot delivery with the horizon of `days`; its seconds."""
    snapshot.configure(days)
    props = FeedProperties(destination_uri=dest.as_uri(), delivery_mode="snapshot", max_rows_per_file=10_000_000)
    when = START + timedelta(days=day)
    started = time.perf_counter()
    with open_sink(props) as sink:
        outcome = snapshot.roll_segment(root, Partition(FEED, SEGMENT, "UPSERT"), props, sink, slot=when,
                                        now=when + timedelta(hours=1))
    seconds = time.perf_counter() - started
    if outcome.status != "published":
        raise SystemExit(f"day {day}: the snapshot was {outcome.status}: {outcome}")
    shutil.rmtree(dest)  # the delivered files are not what this measures
    dest.mkdir()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--churn", type=int, default=10_000, help="members leaving (and joining) every day")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="filefeed-bench-tombstones-", dir=args.dir))
    try:
        roots = {side: work / side.replace(" ", "-") for side in SIDES}
        members = deque(range(args.members))
        following = args.members
        for root in roots.values():
            stage(root, 0, "UPSERT", list(members), int(START.timestamp() * 1000))
            (root / "dest").mkdir(parents=True)
        print(f"tombstones: one snapshot segment of {args.members:,} members, {args.churn:,} leaving and "
              f"{args.churn:,} joining every day, {args.days} days; horizon {SIDES['horizon']:g} days against none")
        for day in range(args.days + 1):
            if day:
                leaving = [members.popleft() for _ in range(args.churn)]
                joining = list(range(following, following + args.churn))
                following += args.churn
                members.extend(joining)
                ts_ms = int((START + timedelta(days=day)).timestamp() * 1000)
                for root in roots.values():
                    stage(root, day, "DELETE", leaving, ts_ms)
                    stage(root, day, "UPSERT", joining, ts_ms)
            order = list(SIDES) if day % 2 == 0 else list(SIDES)[::-1]
            seconds = {side: deliver(roots[side], roots[side] / "dest", day, SIDES[side]) for side in order}
            states = {side: state_of(roots[side]) for side in SIDES}
            if len({m for _, m, _ in states.values()}) != 1 or states["horizon"][1] != len(members):
                raise SystemExit(f"day {day}: members differ: {states}")
            if day % 30 == 0 or day == args.days:
                (on_rows, _, on_bytes), (off_rows, _, off_bytes) = states["horizon"], states["no horizon"]
                print(f"  day {day:3d}: state rows {on_rows:10,} vs {off_rows:10,} ({off_rows / on_rows:5.2f}x), "
                      f"base {on_bytes / 2**20:7.1f} vs {off_bytes / 2**20:7.1f} MiB, snapshot "
                      f"{seconds['horizon']:5.2f} vs {seconds['no horizon']:5.2f} s "
                      f"({seconds['no horizon'] / seconds['horizon']:4.2f}x); members {len(members):,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
