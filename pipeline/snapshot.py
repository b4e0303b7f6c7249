"""`delivery_mode = snapshot`: each delivery is a complete file of the segment's current members.

Two kinds of roll, both run by the roll state machine of pipeline/rollover.py (lease, plan, moves, ledger,
failed/, resume after a crash), feed the durable membership state of pipeline/membership.py:

- **apply** (one per partition, UPSERT and DELETE): takes the partition's sealed journal segments like a delta
  roll, but publishes no file: its "encode" step writes the staged rows as sorted runs of changes into the
  segment's `SNAPSHOT/sealed/` folder. Its ledger entry lists the segments consumed, so batch_update counts them
  as every other roll's. Each run is named after the apply roll and moved into `SNAPSHOT/sealed/` only if no
  snapshot already has it, so a resumed apply never applies a change twice (nor would it matter: last-writer-wins
  makes a second application a no-op).
- **snapshot** (one per segment, in `SNAPSHOT/`): takes the runs from `SNAPSHOT/sealed/` (moved into its roll
  folder at plan time: consumed exactly once), merges them with the base into a new base, and encodes the members
  into files while merging. The new base is installed by renaming it into `state/` and then rewriting
  `state/CURRENT` (temp + fsync + rename): that rename is the one commit point of the state change. A roll
  resumed after it finds CURRENT naming itself and encodes from the installed base: same rows, same bytes, same
  names. The rest (publish, manifest, ledger) is the ordinary roll.

Tombstones (removed identifiers) are kept so that an add older than a removal, arriving later, stays removed; a
snapshot drops those older than FILEFEED_SNAPSHOT_TOMBSTONE_DAYS before the newest change the previous state held
(capped by the roll's plan time, so one row with a ts in the future cannot drop them all). The horizon comes from
the previous CURRENT and the plan, and the roll records it in its folder before merging, so a merge resumed after a
crash writes the same base. Without the horizon a segment's state would grow by every identifier ever removed, for
as long as the feed lives. The price: an add as old as or older than a removal already dropped, arriving after it,
makes the identifier a member again.

    feeds/<feed>/<segment>/SNAPSHOT/
        sealed/<apply roll id>-<n>.run       changes waiting for the next snapshot (sorted Arrow IPC runs)
        lease, rolling/, published/, failed/ snapshot rolls, as in a partition folder
        state/CURRENT                        {"base": <snapshot roll id>, "rows", "members", "max_ts", "pruned"}
        state/base-<roll id>.arrow           members and tombstones, sorted by identifier
        schedule.json                        the last delivery_schedule slot handled
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline import membership
from pipeline.ledger import FAILED, ROLLING, SEALED, Ledger, atomic_write_json, fsync_dir, partition_dir, read_json
from pipeline.model import OPERATIONS, STAGED_SCHEMA, Partition

if TYPE_CHECKING:
    from config.feed import FeedProperties
    from pipeline.rollover import RollOutcome
    from sinks.base import Sink

SNAPSHOT_FOLDER = "SNAPSHOT"
# FILEFEED_CRASH_AT points of the snapshot roll's own, besides rollover.CRASH_POINTS: the merged base written but
# CURRENT not switched yet; CURRENT switched (the state change committed), the old base not removed yet.
CRASH_POINTS = ("snapshot_base", "snapshot_state")
RUN_SUFFIX = ".run"
STATE = "state"
CURRENT = "CURRENT"
DAY_MS = 86_400_000
HORIZON = "tombstone-horizon.json"  # in a snapshot roll's folder: the horizon its merge uses


@dataclass
class TombstoneSettings:
    days: float = 30.0  # FILEFEED_SNAPSHOT_TOMBSTONE_DAYS; 0 = kept forever


# What snapshot rolls use; the service and the CLI set it from their settings at start-up (configure).
TOMBSTONES = TombstoneSettings()


def configure(tombstone_days: float) -> None:
    TOMBSTONES.days = tombstone_days


def tombstone_horizon_ms(current: dict[str, Any] | None, planned_at: datetime) -> int | None:
    """Removals with a ts before this are dropped from the next base; None: none are (the horizon is off, or the
    previous state does not say its newest change: the first snapshot, or a base of the previous release)."""
    if TOMBSTONES.days <= 0 or current is None or not isinstance(current.get("max_ts"), int):
        return None
    newest = min(int(current["max_ts"]), int(planned_at.timestamp() * 1000))
    return newest - int(TOMBSTONES.days * DAY_MS)


def _roll_horizon_ms(rdir: Path, current: dict[str, Any] | None, planned_at: datetime) -> int | None:
    """The roll's horizon, recorded in its folder at its first merge: a merge resumed after a crash uses the same,
    even if FILEFEED_SNAPSHOT_TOMBSTONE_DAYS changed meanwhile."""
    path = rdir / HORIZON
    try:
        return read_json(path)["horizon_ms"]
    except FileNotFoundError:
        pass
    horizon = tombstone_horizon_ms(current, planned_at)
    atomic_write_json(path, {"horizon_ms": horizon})
    return horizon


def snapshot_dir(root: Path | str, feed_id: str, segment_id: str) -> Path:
    return Path(root) / "feeds" / feed_id / segment_id / SNAPSHOT_FOLDER


def snapshot_partition(partition: Partition) -> Partition:
    """The partition a segment's snapshot rolls are named after: members are what UPSERT left in."""
    return Partition(partition.feed_id, partition.segment_id, "UPSERT")


def delivery_dirs(root: Path | str, partition: Partition) -> list[Path]:
    """Folders whose ledgers list what was published for `partition`: its own, and for UPSERT the segment's
    SNAPSHOT folder when it has one (status, verify)."""
    out = [partition_dir(root, partition)]
    sdir = snapshot_dir(root, partition.feed_id, partition.segment_id)
    if partition.operation == "UPSERT" and sdir.is_dir():
        out.append(sdir)
    return out


def failed_snapshots(root: Path | str, partitions: list[Partition]) -> dict[Partition, Path]:
    """Segments of `partitions` with failed snapshot rolls: their snapshot partition -> SNAPSHOT folder."""
    out: dict[Partition, Path] = {}
    for partition in partitions:
        sdir = snapshot_dir(root, partition.feed_id, partition.segment_id)
        if _listdir(sdir / FAILED):
            out[snapshot_partition(partition)] = sdir
    return out


def _base_name(roll_id: str) -> str:
    return f"base-{roll_id}.arrow"


def read_current(sdir: Path) -> dict[str, Any] | None:
    try:
        return dict(read_json(sdir / STATE / CURRENT))
    except FileNotFoundError:
        return None


# -- apply: staged rows -> runs ------------------------------------------------------------------------------------


def _known_runs(sdir: Path) -> set[str]:
    """Runs some snapshot already has: waiting in sealed/, in a snapshot roll, or consumed per the ledger."""
    known = {n for n in _listdir(sdir / SEALED) if n.endswith(RUN_SUFFIX)}
    for state in (ROLLING, FAILED):
        for roll in _listdir(sdir / state):
            known.update(_listdir(sdir / state / roll / "segments"))
    for entry in Ledger(sdir).entries():
        known.update(entry.segments)
    return known


def _listdir(path: Path) -> list[str]:
    try:
        return [n for n in os.listdir(path) if not n.startswith(".")]
    except FileNotFoundError:
        return []


def apply_roll(rdir: Path, partition: Partition, roll_id: str, segments: list[str]) -> dict[str, Any]:
    """The encode step of an apply roll: its segments -> runs in SNAPSHOT/sealed/; the roll's encoded.json body."""
    from pipeline import staging

    pdir = rdir.parent.parent
    sdir = pdir.parent / SNAPSHOT_FOLDER
    work = rdir / "runs"
    shutil.rmtree(work, ignore_errors=True)  # a crash mid-write: the same segments give the same runs again
    work.mkdir()
    paths = [rdir / "segments" / name for name in segments]
    tables = (
        membership.changes(batch, partition.operation)
        for batch in staging.iter_batches(paths, schema=STAGED_SCHEMA)
    )
    runs = membership.write_runs(tables, work, roll_id)
    sealed = sdir / SEALED
    sealed.mkdir(parents=True, exist_ok=True)
    known = _known_runs(sdir)
    for name, _ in runs:
        if name not in known:
            os.rename(work / name, sealed / name)
    fsync_dir(sealed)
    shutil.rmtree(work, ignore_errors=True)
    rows = sum(r for _, r in runs)
    return {"roll_id": roll_id, "datamart_id": "", "files": [], "rows": rows, "bytes": 0, "manifest": None,
            "runs": [n for n, _ in runs]}


# -- snapshot: base + runs -> new base and the members' files ---------------------------------------------------


def member_batches(rdir: Path, roll_id: str, runs: list[Path], planned_at: datetime,
                   ) -> tuple[Iterator[pa.RecordBatch], str]:
    """The members after this snapshot roll, in identifier order, and the datamart_id of the first of them.

    Merging installs the new state when the last batch has been taken (see the module's docstring).
    """
    sdir = rdir.parent.parent
    state = sdir / STATE
    state.mkdir(exist_ok=True)
    current = read_current(sdir)
    _remove_stale_bases(state, current)
    if current is not None and current.get("base") == roll_id:
        tables: Iterator[pa.Table] = (membership.members(t) for t in membership.read_run(state / _base_name(roll_id)))
    else:
        base = [state / _base_name(str(current["base"]))] if current else []
        tables = _merge_and_install(sdir, rdir, roll_id, base + runs, _roll_horizon_ms(rdir, current, planned_at))
    batches = (b for table in tables for b in table.to_batches() if b.num_rows)
    first = next(batches, None)
    if first is None:
        return iter(()), ""
    datamart_id = first.column("datamart_id")[0].as_py() or ""

    def chained() -> Iterator[pa.RecordBatch]:
        yield first
        yield from batches

    return chained(), datamart_id


def _merge_and_install(sdir: Path, rdir: Path, roll_id: str, inputs: list[Path], horizon_ms: int | None,
                       ) -> Iterator[pa.Table]:
    from pipeline.rollover import crash_point

    state = sdir / STATE
    work = rdir / "merge"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    streams, _ = membership.merge_files(inputs, work)
    writer = membership.RunWriter(state / _base_name(roll_id))
    members = pruned = 0
    max_ts: int | None = None
    try:
        for table in membership.merge(streams):
            newest = membership.newest_ts(table)
            if newest is not None:
                max_ts = newest if max_ts is None else max(max_ts, newest)
            kept = membership.members(table)
            members += kept.num_rows
            if horizon_ms is not None:
                before = table.num_rows
                table = membership.without_tombstones_before(table, horizon_ms)
                pruned += before - table.num_rows
            writer.write(table)
            yield kept
        rows = writer.commit()
    except BaseException:
        writer.abort()
        raise
    crash_point("snapshot_base")
    atomic_write_json(state / CURRENT, {"base": roll_id, "rows": rows, "members": members, "max_ts": max_ts,
                                        "pruned": pruned})
    crash_point("snapshot_state")
    _remove_stale_bases(state, {"base": roll_id})
    shutil.rmtree(work, ignore_errors=True)


def _remove_stale_bases(state: Path, current: dict[str, Any] | None) -> None:
    """Bases other than CURRENT's: the one it replaced, or a merge's output that a crash left uninstalled."""
    keep = _base_name(str(current["base"])) if current else None
    for name in os.listdir(state):
        if (name.startswith("base-") or name.startswith(".base-")) and name != keep:
            (state / name).unlink(missing_ok=True)


# -- one entry point per delivery --------------------------------------------------------------------------------


def roll_segment(root: Path | str, partition: Partition, props: FeedProperties, sink: Sink, *,
                 wait_seconds: float = 0.0, slot: datetime | None = None, resume_only: bool = False,
                 now: datetime | None = None) -> RollOutcome:
    """Apply both partitions' staged rows to the segment's state, then deliver a snapshot of its members.

    Scheduled feeds apply on every call (their batch counts come from the apply rolls' ledger) but snapshot only at
    a slot (`slot`); `resume_only` only resumes an unfinished snapshot roll. Returns the snapshot roll's outcome,
    or the first apply roll's outcome that is not clean (the snapshot waits for every change to be applied).
    """
    from pipeline.rollover import RollMode, RollOutcome, roll_partition

    for operation in OPERATIONS:
        part = Partition(partition.feed_id, partition.segment_id, operation)
        if not partition_dir(root, part).is_dir():
            continue
        applied = roll_partition(root, part, props, sink, wait_seconds=wait_seconds, now=now,
                                 kind=RollMode(mode="apply"))
        if applied.status not in ("published", "nothing"):
            return applied
    sdir = snapshot_dir(root, partition.feed_id, partition.segment_id)
    if not sdir.is_dir() and slot is None:
        return RollOutcome(status="nothing")
    kind = RollMode(mode="snapshot", suffix=RUN_SUFFIX, slot=slot, resume_only=resume_only)
    return roll_partition(root, snapshot_partition(partition), props, sink, wait_seconds=wait_seconds, now=now,
                          kind=kind, pdir=sdir)
