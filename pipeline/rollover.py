"""The roll state machine of one partition: sealed segments -> files published through a sink -> ledger.

A roll moves through states on disk, each entered by a rename after an fsync (layout in pipeline/ledger.py):

    1. lease      `lease` created exclusively; a stale one (dead pid on this host, or no heartbeat) is broken safely
    2. plan       `rolling/<roll_id>/plan.json` appears whole (the folder is renamed into place), then the listed
                  segments move `sealed/ -> rolling/<roll_id>/segments/`
    3. encode     files into `rolling/<roll_id>/out/`, then `encoded.json` (names, rows, bytes, sha256)
    4. publish    each file through the sink (atomic, idempotent by name), a `sent/` marker after each, then the
                  manifest last
    5. ledger     the roll's row in `ledger.sqlite3` (committed, synchronous=FULL), then `rolling/<roll_id>/` is removed
    6. errors     transient: `rolling/<roll_id>/` stays and the next roll of the partition resumes it first;
                  terminal: it moves to `failed/<roll_id>/` with `reason.json`; `retry_failed` moves it back

Why a crash anywhere loses no row and publishes none twice: the rows of a roll are exactly its segments (moved out
of sealed/ before encoding, so no other roll can take them); names depend only on plan.json (roll id, planned time,
props snapshot) and the segment contents, so a resumed roll renders the same names with the same bytes; the sink
publishes atomically and idempotently by name; the ledger is written before the roll folder is removed, and a roll
folder whose ledger entry exists is only cleaned up.

Test hook: `FILEFEED_CRASH_AT=<point>` makes the process `os._exit(137)` at that point (see `CRASH_POINTS`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from config.feed import FeedProperties
from pipeline import recent_rows, schedule
from pipeline.durable import remove_stale_temps
from pipeline.encode import EncodedFile, EncodeSpec, encode_batches
from pipeline.finishing import build_markers, encrypt_files
from pipeline.layout import SUFFIX as SEGMENT_SUFFIX
from pipeline.layout import iter_partitions
from pipeline.ledger import (
    FAILED,
    OPEN,
    ROLLING,
    SEALED,
    Ledger,
    LedgerEntry,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    json_bytes,
    partition_dir,
    read_json,
)
from pipeline.model import STAGED_FIELDS, Partition
from pipeline.naming import NameContext, UnsafeNameError, manifest_name, render_name
from pipeline.pgp import PgpError
from pipeline.rejects import encode_screened, write_report
from pipeline.shared import SharedLeaseLost, SharedStateError, for_root
from pipeline.shared.leases import SharedLease
from pipeline.shared.rolls import RowsHeld, SharedRoll
from sinks.base import Sink, SinkError, TerminalError
from sinks.errors import Classified, Terminal, Transient

log = logging.getLogger(__name__)

LEASE_NAME = "lease"
# A holder refreshes its lease at least this often while it works; a lease older than LEASE_STALE_SECONDS belongs
# to a holder that is gone (another host, a frozen process) and may be broken.
LEASE_HEARTBEAT_SECONDS = 2.0
LEASE_STALE_SECONDS = 600.0
# Errors nobody classified (bugs, corrupt data, surprises in a client library) are retried this many runs of the
# roll, then the roll goes to failed/ where `filefeed retry` finds it.
MAX_UNKNOWN_ATTEMPTS = 5
MAX_ERROR_MESSAGE = 500
# Journal bytes parsed per batch: 2 MiB reads as fast as 8 MiB and keeps about 80 MB less resident (bench).
READ_CHUNK_BYTES = 2 * 1024 * 1024
PLAN_VERSION = 1

CRASH_ENV = "FILEFEED_CRASH_AT"
# Named points where FILEFEED_CRASH_AT kills the process; `move:N`, `encode_file:N`, `publish:N` count from 1.
CRASH_POINTS = (
    "lease",
    "plan",
    "move:N",
    "moves",
    "encode_file:N",
    "encode",
    "publishing",
    "publish:N",
    "manifest",
    "recent_rows",
    "compact",
    "ledger",
)

STATUSES = ("published", "nothing", "transient", "terminal", "busy")

PAUSE_ENV = "FILEFEED_PAUSE_AT"  # test hook, "<point>:<file>": at that point, wait while <file> exists (<= 120 s)


def crash_point(name: str) -> None:
    """Die like a kill -9 at `name` when the crash tests ask for it (or pause there: the shared-database tests cut a
    replica off mid-roll); free when the variables are unset."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)
    pause = os.environ.get(PAUSE_ENV)
    if pause and pause.partition(":")[0] == name:
        flag = Path(pause.partition(":")[2])
        deadline = time.monotonic() + 120
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


@dataclass(frozen=True)
class RollOutcome:
    """What a call to roll_partition / retry_failed did.

    status: "published" (at least one file published), "nothing" (no rows to publish), "transient" (a roll waits in
    rolling/ for the next call), "terminal" (a roll moved to failed/), "busy" (another roller holds the lease).
    """

    status: str
    roll_ids: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # remote names of the data files published by this call (manifests not included)
    rows: int = 0
    error: str | None = None
    error_kind: str | None = None


class RollError(Classified):
    """A roll failure, already classified (sinks/errors.py); `exception` names the class it was classified from."""

    def __init__(self, message: str, *, kind: str, exception: str):
        super().__init__(message, kind=kind)
        self.exception = exception


class TransientRollError(Transient, RollError):
    pass


class TerminalRollError(Terminal, RollError):
    pass


def roll_error(message: str, *, transient: bool, kind: str, exception: str) -> RollError:
    return (TransientRollError if transient else TerminalRollError)(message, kind=kind, exception=exception)


class LeaseLost(Exception):
    """Our lease was broken by another roller (we looked dead or stalled): stop before publishing anything else."""


# -- lease ---------------------------------------------------------------------------------------------------------


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot: tells a live holder from a new process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from the closing parenthesis.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is not None:
        current = _proc_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False
    return True


class Lease:
    """Exclusive right to roll one partition, held by one process on one host.

    The lease file is made whole in a private temp file, then linked to `lease`: link(2) fails with EEXIST exactly
    like open(O_CREAT|O_EXCL), but nobody can ever see a lease without its holder's pid, host and time in it.
    """

    def __init__(self, path: Path, token: str):
        self.path = path
        self.token = token
        self._last_beat = time.monotonic()
        # with FILEFEED_DATABASE_URL: the partition's lease across replicas, taken after this one (pipeline.shared)
        self.shared: SharedLease | None = None

    @classmethod
    def acquire(
        cls, pdir: Path, *, wait_seconds: float = 0.0, stale_after: float = LEASE_STALE_SECONDS
    ) -> Lease | None:
        """The lease, or None when another live roller still holds it after `wait_seconds`."""
        pdir.mkdir(parents=True, exist_ok=True)
        path = pdir / LEASE_NAME
        token = uuid.uuid4().hex
        body = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_ticks": _proc_start_ticks(os.getpid()),
            "acquired_at": datetime.now(UTC).isoformat(),
            "token": token,
        }
        temp = pdir / f".lease.{token}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json_bytes(body))
            os.fsync(fd)
        finally:
            os.close(fd)
        deadline = time.monotonic() + wait_seconds
        delay = 0.002  # rolls of small batches take a few ms: start polling fast, back off to 50 ms
        try:
            while True:
                try:
                    # No folder fsync: the lease only excludes live processes, which see the link at once; after a
                    # power loss its holder is dead either way (the content was fsynced first, so it is never torn).
                    os.link(temp, path)
                    return cls(path, token)
                except FileExistsError:
                    pass
                if _break_if_stale(pdir, path, stale_after):
                    continue
                if time.monotonic() >= deadline:
                    return None
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.05)
        finally:
            temp.unlink(missing_ok=True)

    def heartbeat(self, force: bool = False) -> None:
        """Show we are alive (mtime), at most every LEASE_HEARTBEAT_SECONDS; raise LeaseLost if it is not ours."""
        if self.shared is not None:
            # before each file published (force): a zombie stops within one lease period of losing the database
            self.shared.renew_before_publishing() if force else self.shared.renew_if_due()
        now = time.monotonic()
        if not force and now - self._last_beat < LEASE_HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        if _lease_token(self.path) != self.token:
            raise LeaseLost(f"lease {self.path} was taken over by another roller")
        os.utime(self.path)

    def release(self) -> None:
        if self.shared is not None:
            self.shared.release()
            self.shared = None
        if _lease_token(self.path) == self.token:
            self.path.unlink(missing_ok=True)

    def take_shared(self, root: Path | str, partition: Partition, wait_seconds: float) -> RollOutcome | None:
        """With a shared database: also take the partition's lease there. None when this lease may roll; else the
        outcome to answer ("busy": another replica holds it; "transient": the database could not be reached)."""
        state = for_root(root)
        if state is None:
            return None
        try:
            self.shared = SharedLease.acquire(state, partition, wait_seconds=wait_seconds)
        except SharedStateError as e:
            return RollOutcome(status="transient", error=str(e), error_kind="database")
        return None if self.shared is not None else RollOutcome(status="busy")


def _lease_token(path: Path) -> str | None:
    try:
        return str(read_json(path).get("token"))
    except (OSError, ValueError, AttributeError):
        return None


def _lease_is_stale(path: Path, stale_after: float) -> tuple[bool, str | None]:
    try:
        data = read_json(path)
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError):
        return False, None  # half-visible cannot happen (link), so unreadable means "try again"
    if not isinstance(data, dict):
        return age > stale_after, None
    token = data.get("token")
    if data.get("host") == socket.gethostname():
        try:
            pid = int(data.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid, data.get("start_ticks")):
            return True, token
    return age > stale_after, token


def _break_if_stale(pdir: Path, path: Path, stale_after: float) -> bool:
    """Remove a stale lease. Breakers take turns under flock and re-check, so two of them never remove a fresh one."""
    stale, token = _lease_is_stale(path, stale_after)
    if not stale:
        return False
    with open(pdir / ".lease-break", "a+b") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale_again, token_again = _lease_is_stale(path, stale_after)
        if not stale_again or token_again != token:
            return not path.exists()
        log.warning("breaking stale lease %s", path)
        path.unlink(missing_ok=True)
        fsync_dir(pdir)
        return True


# -- planning --------------------------------------------------------------------------------------------------------


def make_roll_id(partition: Partition, segments: list[str], planned_at: datetime, replica: str | None = None) -> str:
    """`<UTC yyyymmddTHHMMSSmmm>-<hash>`: sorts by time to the millisecond (two rolls in one second, a snapshot
    taken twice, sort in the order they were planned); the hash covers the partition so ids never repeat across
    partitions that share a destination folder, and the replica (shared database) so two replicas rolling the same
    loose rows at the same time never render the same names. Ids of earlier releases (no milliseconds) sort before
    every id of their second, and are still recognised."""
    extra = [f"replica:{replica}"] if replica else []
    digest = hashlib.sha256("\n".join([partition.relpath, *segments, *extra]).encode()).hexdigest()[:10]
    planned = planned_at.astimezone(UTC)
    return f"{planned:%Y%m%dT%H%M%S}{planned.microsecond // 1000:03d}-{digest}"


def sealed_segments(pdir: Path, suffix: str = SEGMENT_SUFFIX) -> list[str]:
    try:
        names = os.listdir(pdir / SEALED)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))


def pending_rolls(root: Path | str, partition: Partition) -> list[str]:
    """Rolls started but not finished (waiting for a resume), oldest first."""
    return _roll_names(partition_dir(root, partition) / ROLLING)


def failed_rolls(root: Path | str, partition: Partition) -> list[str]:
    return _roll_names(partition_dir(root, partition) / FAILED)


def _roll_names(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if not n.startswith(".") and (folder / n).is_dir())
    except FileNotFoundError:
        return []


@dataclass
class _Plan:
    roll_id: str
    partition: Partition
    planned_at: datetime
    segments: list[str]
    spec: EncodeSpec
    template: str
    write_manifest: bool
    datamart_id: str | None
    done_marker: str = "manifest"
    manifest_prefix: str | None = None
    pgp_public_key: str | None = None
    # "delta": files of the staged rows; "apply" / "snapshot": pipeline/snapshot.py (membership state, full files)
    mode: str = "delta"
    # roll-time dedup (pipeline.recent_rows), fixed at plan time so a resumed roll decides the same; 0 = off
    dedup_seconds: float = 0.0
    dedup_max_rows: int = 0
    # rows claimed in the shared database (FILEFEED_DATABASE_URL) while encoding: exactly once across replicas
    shared: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "mode": self.mode,
            "roll_id": self.roll_id,
            "partition": str(self.partition),
            "planned_at": self.planned_at.isoformat(),
            "segments": self.segments,
            "spec": self.spec.to_dict(),
            "file_name_template": self.template,
            "write_manifest": self.write_manifest,
            "datamart_id": self.datamart_id,
            "done_marker": self.done_marker,
            "manifest_prefix": self.manifest_prefix,
            "pgp_public_key": self.pgp_public_key,
            "dedup_seconds": self.dedup_seconds,
            "dedup_max_rows": self.dedup_max_rows,
            **({"shared": True} if self.shared else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], partition: Partition) -> _Plan:
        return cls(
            roll_id=str(data["roll_id"]),
            partition=partition,
            planned_at=datetime.fromisoformat(str(data["planned_at"])),
            segments=[str(s) for s in data["segments"]],
            spec=EncodeSpec.from_dict(data["spec"]),
            template=str(data["file_name_template"]),
            write_manifest=bool(data["write_manifest"]),
            datamart_id=data.get("datamart_id"),
            # plans written before done markers existed: the manifest when write_manifest was on
            done_marker=str(data.get("done_marker") or ("manifest" if data["write_manifest"] else "none")),
            manifest_prefix=data.get("manifest_prefix"),
            pgp_public_key=data.get("pgp_public_key"),
            mode=str(data.get("mode", "delta")),
            dedup_seconds=float(data.get("dedup_seconds", 0.0)),
            dedup_max_rows=int(data.get("dedup_max_rows", 0)),
            shared=bool(data.get("shared", False)),
        )


@dataclass(frozen=True)
class RollMode:
    """What a roll makes of its inputs (pipeline/snapshot.py adds the two membership modes).

    mode: "delta" (files of the staged rows), "apply" (staged rows -> runs of the segment's membership state, no
    file) or "snapshot" (the runs merged into the state -> files of every member). suffix: the input files it takes
    from sealed/. slot: a delivery_schedule slot: the roll's time and id come from it, so a slot retried after a
    crash renders the same names, and a slot already handled is not planned again.
    """

    mode: str = "delta"
    suffix: str = SEGMENT_SUFFIX
    slot: datetime | None = None
    resume_only: bool = False


DELTA = RollMode()


def slot_roll_id(partition: Partition, mode: str, slot: datetime, replica: str | None = None) -> str:
    """The roll id of a schedule slot: the slot's time and a hash of the partition (and replica, with a shared
    database: each replica delivers its own rows of the slot), never of what it holds."""
    tail = f"\n{replica}" if replica else ""
    digest = hashlib.sha256(f"{partition.relpath}\n{mode}\nslot{tail}".encode()).hexdigest()[:10]
    return f"{slot.astimezone(UTC):%Y%m%dT%H%M%S}-{digest}"


def _segments_in_rolls(pdir: Path) -> set[str]:
    """Segment names held by roll folders (rolling/ and failed/) of the partition."""
    held: set[str] = set()
    for state in (ROLLING, FAILED):
        for roll_id in _roll_names(pdir / state):
            try:
                held.update(os.listdir(pdir / state / roll_id / "segments"))
            except FileNotFoundError:
                continue
    return held


def _drop_copies(pdir: Path, partition: Partition, segments: list[str]) -> list[str]:
    """Segments that may be planned: not listed by the ledger, not held by another roll folder.

    A batch's loose rows are staged under a name derived from the rows; a copy staged again after the first one was
    taken by a roll (a racing or replayed batch) must never be published a second time: it is removed here.
    """
    copies = Ledger(pdir).consumed(segments) | (set(segments) & _segments_in_rolls(pdir))
    if not copies:
        return segments
    for name in sorted(copies):
        log.warning("%s: segment %s was already published or is held by a roll: removed, not published again",
                    partition, name)
        (pdir / SEALED / name).unlink(missing_ok=True)
    fsync_dir(pdir / SEALED)
    return [n for n in segments if n not in copies]


def _plan_roll(
    pdir: Path,
    partition: Partition,
    props: FeedProperties,
    now: datetime,
    datamart_id: str | None,
    kind: RollMode = DELTA,
    replica: str | None = None,
) -> _Plan | None:
    segments = _drop_copies(pdir, partition, sealed_segments(pdir, kind.suffix))
    # a scheduled snapshot is delivered at every slot, changed or not: the partner wants a full file each time
    if not segments and not (kind.slot is not None and kind.mode == "snapshot"):
        return None
    # to the millisecond (the roll id's resolution); a slot's time is its schedule's, a whole second
    planned_at = (kind.slot or now).astimezone(UTC)
    planned_at = planned_at.replace(microsecond=planned_at.microsecond // 1000 * 1000)
    if kind.slot is not None:
        roll_id = slot_roll_id(partition, kind.mode, planned_at, replica)
    else:
        roll_id = make_roll_id(partition, segments, planned_at, replica)
    rolling = pdir / ROLLING
    if (rolling / roll_id).exists() or (pdir / FAILED / roll_id).exists() or Ledger(pdir).has(roll_id):
        raise TerminalRollError(
            f"roll id {roll_id} already exists: segment names were reused",
            kind="state",
            exception="RollIdCollision",
        )
    plan = _Plan(
        roll_id=roll_id,
        partition=partition,
        planned_at=planned_at,
        segments=segments,
        spec=EncodeSpec.from_props(props),
        template=props.file_name_template,
        write_manifest=props.write_manifest,
        datamart_id=datamart_id,
        done_marker=props.done_marker or "manifest",
        manifest_prefix=props.manifest_prefix,
        pgp_public_key=props.pgp_public_key.strip() if props.encryption == "pgp" and props.pgp_public_key else None,
        mode=kind.mode,
        dedup_seconds=recent_rows.SETTINGS.seconds,
        dedup_max_rows=recent_rows.SETTINGS.max_rows,
        shared=replica is not None and kind.mode == "delta",
    )
    # The roll folder is built under a hidden name and renamed into place, so rolling/<roll_id>/ never exists
    # without its plan; a hidden leftover of a crash holds no segment and is simply removed.
    rolling.mkdir(parents=True, exist_ok=True)
    staging_dir = rolling / f".{roll_id}.new"
    shutil.rmtree(staging_dir, ignore_errors=True)
    (staging_dir / "segments").mkdir(parents=True)
    atomic_write_json(staging_dir / "plan.json", plan.to_dict())  # its folder fsync also covers segments/
    os.rename(staging_dir, rolling / roll_id)
    fsync_dir(rolling)
    crash_point("plan")
    return plan


def _finish_moves(pdir: Path, rdir: Path, plan: _Plan) -> None:
    """Move every planned segment into the roll (again after a crash: the ones already moved are skipped)."""
    sealed = pdir / SEALED
    target = rdir / "segments"
    target.mkdir(exist_ok=True)
    moved_any = False
    for index, name in enumerate(plan.segments, 1):
        if (target / name).exists():
            continue
        try:
            os.rename(sealed / name, target / name)
        except FileNotFoundError:
            raise TerminalRollError(
                f"planned segment {name} is neither in sealed/ nor in the roll",
                kind="missing_segment",
                exception="MissingSegment",
            ) from None
        moved_any = True
        crash_point(f"move:{index}")
    if moved_any:
        fsync_dir(target)
        fsync_dir(sealed)
    crash_point("moves")


# -- one roll --------------------------------------------------------------------------------------------------------


@dataclass
class _RollDone:
    roll_id: str
    files: list[str] = field(default_factory=list)
    rows: int = 0


def _publishing_record(rdir: Path, encoded: Mapping[str, Any]) -> dict[str, Any]:
    """What the shared ledger keeps of a roll about to publish: its files, and the bytes of its manifest and
    markers (small), so a replica resolving it after its own replica is gone can publish what it did not."""
    finishing = [*([encoded["manifest"]] if encoded.get("manifest") else []), *encoded.get("markers", [])]
    bodies = {f["name"]: (rdir / "out" / f["local"]).read_text("utf-8") for f in finishing}
    return {"files": encoded["files"], "manifest": encoded.get("manifest"), "markers": encoded.get("markers", []),
            "bodies": bodies}


def _encoded_from(recorded: Mapping[str, Any] | None, roll_id: str) -> dict[str, Any]:
    """encoded.json's content from a shared ledger entry (this replica's roll folder lost its own)."""
    recorded = recorded or {}
    files = recorded.get("files") or []
    if isinstance(files, Mapping):  # adopted: the files record of a publishing roll
        files = files.get("files") or []
    files = [{"local": "", **f} for f in files]
    return {"roll_id": roll_id, "files": files, "rows": sum(int(f.get("rows", 0)) for f in files),
            "bytes": sum(int(f.get("bytes", 0)) for f in files), "manifest": recorded.get("manifest")}


def _encode(rdir: Path, plan: _Plan, lease: Lease, shared: SharedRoll | None = None) -> dict[str, Any]:
    from pipeline import snapshot, staging  # imported late: staging is optional for encoding-only users and tests

    if plan.mode == "apply":
        encoded = snapshot.apply_roll(rdir, plan.partition, plan.roll_id, plan.segments)
        atomic_write_json(rdir / "encoded.json", encoded)
        crash_point("encode")
        return encoded
    out = rdir / "out"
    shutil.rmtree(out, ignore_errors=True)  # a half-encoded output from a crash: encoding again gives the same files
    out.mkdir()
    paths = [rdir / "segments" / name for name in plan.segments]
    # Only the columns the files show are parsed; the {datamart_id} macro and the manifest take the first row's.
    def read(schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        return staging.iter_batches(paths, chunk_bytes=READ_CHUNK_BYTES, schema=schema)

    datamart_id = plan.datamart_id
    if plan.mode == "snapshot":
        batches, first_datamart = snapshot.member_batches(rdir, plan.roll_id, paths, plan.planned_at)
        datamart_id = first_datamart if datamart_id is None else datamart_id
    else:
        if datamart_id is None:
            first = staging.first_row(paths)
            datamart_id = first[STAGED_FIELDS.index("datamart_id")] if first else ""
    constants = {
        "feed_id": plan.partition.feed_id,
        "segment_id": plan.partition.segment_id,
        "operation": plan.partition.operation,
    }

    def on_file(encoded: EncodedFile) -> None:
        lease.heartbeat()
        crash_point(f"encode_file:{int(encoded.name.split('-')[1].split('.')[0])}")

    pdir = rdir.parent.parent
    rejects = dedup = None
    if plan.mode == "snapshot":  # members of the membership state: checked when applied, one row per identifier
        files = encode_batches(batches, plan.spec, constants, out, on_file=on_file)
    else:
        make_dedup = None
        if plan.shared:
            if shared is None:
                raise SharedStateError(f"{plan.partition}: roll {plan.roll_id} was planned with the shared database "
                                       "(FILEFEED_DATABASE_URL), which is not configured now")
            claimer = shared

            def make_dedup() -> recent_rows.RollDedup:
                return recent_rows.ClaimingDedup(claimer.claim, max(plan.dedup_max_rows, 1))
        elif plan.dedup_seconds > 0 and plan.dedup_max_rows > 0:
            known = recent_rows.RecentRows.load(pdir).known_before(plan.roll_id, _ms(plan.planned_at),
                                                                   int(plan.dedup_seconds * 1000), plan.dedup_max_rows)

            def make_dedup() -> recent_rows.RollDedup:
                return recent_rows.RollDedup(known, plan.dedup_max_rows)

        # rows that cannot be encoded are set aside with a report, never failing the roll (pipeline.rejects)
        files, rejects, dedup = encode_screened(read, plan.spec, constants, out, on_file=on_file,
                                                extra=recent_rows.KEY_SCHEMA if make_dedup else None,
                                                make_filter=make_dedup)
        write_report(pdir, rejects, plan.roll_id, str(plan.partition))
        if isinstance(dedup, recent_rows.RollDedup) and not plan.shared:
            recent_rows.save_kept(rdir / recent_rows.KEPT_NAME, dedup.kept_hashes())
    extension = plan.spec.extension
    if plan.pgp_public_key:
        files, extension = encrypt_files(out, files, plan.pgp_public_key, plan.spec, lease.heartbeat)
    context = NameContext(
        partition=plan.partition,
        batch_id=plan.roll_id,
        planned_at=plan.planned_at,
        extension=extension,
        file_format=plan.spec.file_format,
        datamart_id=datamart_id,
        mode="full" if plan.mode == "snapshot" else "delta",
    )
    entries = [
        {
            "local": f.name,
            "name": render_name(plan.template, context, i),
            "rows": f.rows,
            "bytes": f.bytes,
            "sha256": f.sha256,
        }
        for i, f in enumerate(files, 1)
    ]
    if len({e["name"] for e in entries}) != len(entries):
        raise UnsafeNameError("file_name_template renders the same name for two parts")
    manifest: dict[str, Any] | None = None
    if plan.done_marker == "manifest" and entries:
        name = manifest_name([e["name"] for e in entries], plan.roll_id, plan.manifest_prefix)
        body = json_bytes(_manifest_body(plan, entries, datamart_id))
        atomic_write_bytes(out / "manifest.json", body)
        manifest = {
            "local": "manifest.json",
            "name": name,
            "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    encoded = {
        "roll_id": plan.roll_id,
        "datamart_id": datamart_id,
        "files": entries,
        "rows": sum(e["rows"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
        "manifest": manifest,
        "markers": build_markers(out, entries) if plan.done_marker == "success_file" else [],
        "rejected": rejects.count if rejects is not None else 0,
        "duplicates_dropped": dedup.dropped if isinstance(dedup, recent_rows.RollDedup) else 0,
    }
    atomic_write_json(rdir / "encoded.json", encoded)
    crash_point("encode")
    return encoded


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _manifest_body(plan: _Plan, entries: list[dict[str, Any]], datamart_id: str) -> dict[str, Any]:
    """The manifest a partner reads: deterministic (planned time, not publish time) so a re-publish is identical."""
    return {
        "manifest_version": 1,
        "batch_id": plan.roll_id,
        "feed_id": plan.partition.feed_id,
        "segment_id": plan.partition.segment_id,
        "operation": plan.partition.operation,
        "datamart_id": datamart_id,
        "created_at": plan.planned_at.replace(microsecond=0).isoformat().replace("+00:00", "Z"),  # as ever: seconds
        "format": plan.spec.file_format,
        "compression": plan.spec.compression,
        "columns": [{"source": c.source, "header": c.header} for c in plan.spec.columns],
        **_shape(plan),
        **({"mode": "full"} if plan.mode == "snapshot" else {}),
        "files": [{k: e[k] for k in ("name", "rows", "bytes", "sha256")} for e in entries],
        "counts": {
            "files": len(entries),
            "rows": sum(e["rows"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
        },
    }


def _shape(plan: _Plan) -> dict[str, Any]:
    """Manifest keys for the newer file-shape properties, present only when they differ from the defaults, so the
    manifests of feeds that use none of them stay byte-identical to earlier releases'."""
    out: dict[str, Any] = {}
    spec = plan.spec
    if spec.file_format == "csv" and (spec.csv_delimiter != "," or not spec.csv_header):
        out["csv"] = {"delimiter": spec.csv_delimiter, "header": spec.csv_header}
    if plan.pgp_public_key:
        from pipeline.pgp import inspect_keys

        # bytes and sha256 of each file are those of the encrypted file, as published
        out["encryption"] = {"type": "pgp", "recipients": list(inspect_keys(plan.pgp_public_key).fingerprints)}
    return out


def _load_encoded(rdir: Path) -> dict[str, Any] | None:
    """encoded.json when its files are all there with the recorded sizes; None means encode (again)."""
    try:
        encoded = read_json(rdir / "encoded.json")
    except FileNotFoundError:
        return None
    out = rdir / "out"
    listed = [*encoded["files"], *([encoded["manifest"]] if encoded.get("manifest") else []),
              *encoded.get("markers", [])]
    for entry in listed:
        try:
            if (out / entry["local"]).stat().st_size != entry["bytes"]:
                return None
        except FileNotFoundError:
            return None
    return encoded


def _publish_one(sink: Sink, local: Path, name: str, size: int, marker: Path) -> None:
    if marker.exists():
        return  # published before a crash; the sink would accept it again, this just saves the upload
    result = sink.publish(local, name)
    if result.size != size:
        raise TerminalError(f"published {name} has {result.size} bytes, expected {size}", kind="mismatch")
    # Not fsynced: the marker is written after the sink made the object durable, so its existence always means
    # "published"; a marker lost in a crash only costs an idempotent re-publish.
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json_bytes({"name": name, "url": result.url, "already_present": result.already_present}))
    finally:
        os.close(fd)


def _publish(rdir: Path, encoded: Mapping[str, Any], sink: Sink, lease: Lease) -> None:
    sent = rdir / "sent"
    sent.mkdir(exist_ok=True)
    out = rdir / "out"
    fence = lease.shared is not None  # renew the shared lease before every file (see Lease.heartbeat)
    for index, entry in enumerate(encoded["files"], 1):
        lease.heartbeat(force=fence)
        _publish_one(sink, out / entry["local"], entry["name"], entry["bytes"], sent / f"{index:05d}.json")
        crash_point(f"publish:{index}")
    manifest = encoded.get("manifest")
    if manifest:
        lease.heartbeat(force=fence)
        _publish_one(sink, out / manifest["local"], manifest["name"], manifest["bytes"], sent / "manifest.json")
        crash_point("manifest")
    # _SUCCESS markers: only once every data file of the roll is published (the loop above)
    for index, marker in enumerate(encoded.get("markers", []), 1):
        lease.heartbeat(force=fence)
        _publish_one(sink, out / marker["local"], marker["name"], marker["bytes"], sent / f"marker-{index:05d}.json")
        crash_point("manifest")


def _record_and_clean(pdir: Path, rdir: Path, plan: _Plan, encoded: Mapping[str, Any],
                      shared: SharedRoll | None = None) -> None:
    manifest = encoded.get("manifest")
    entry = LedgerEntry(
        roll_id=plan.roll_id,
        partition=str(plan.partition),
        planned_at=plan.planned_at.isoformat(),
        published_at=datetime.now(UTC).isoformat(),
        files=tuple({k: f[k] for k in ("name", "rows", "bytes", "sha256")} for f in encoded["files"]),
        manifest={k: manifest[k] for k in ("name", "bytes", "sha256")} if manifest else None,
        rows=int(encoded["rows"]),
        bytes=int(encoded["bytes"]),
        segments=tuple(plan.segments),
    )
    if shared is not None:  # the shared ledger first: from then on no replica delivers these rows again
        shared.published(entry.to_dict(), entry.rows)
    kept = rdir / recent_rows.KEPT_NAME
    if kept.exists():  # before the ledger entry: once it exists the roll folder (and `kept`) may be gone
        recent_rows.add_run(pdir, kept, plan.roll_id, _ms(plan.planned_at))
        crash_point("recent_rows")
        recent_rows.compact_if_due(pdir, _ms(plan.planned_at), int(plan.dedup_seconds * 1000), plan.dedup_max_rows,
                                   lambda: crash_point("compact"))
    Ledger(pdir).record(entry)
    crash_point("ledger")
    _remove_roll_dir(rdir)


def _remove_roll_dir(rdir: Path) -> None:
    # Renamed out of the way first: `ls rolling/` stops listing it at once; a crash mid-delete leaves a hidden
    # folder that the next roll removes.
    trash = rdir.with_name(f".{rdir.name}.done")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(rdir, trash)
    fsync_dir(rdir.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _bump_attempts(rdir: Path, fresh: bool = False) -> int:
    """The attempt about to run, counted durably first (a roll that kills its process each time still ends failed).

    A roll folder appears with its plan, and the plan counts as its first attempt started: the first attempt, run
    right after planning (`fresh`), writes nothing (two fsyncs of every roll), and `attempts.json` holds the count
    from the second attempt on (`filefeed retry` sets it back to none started)."""
    if fresh:
        return 1
    path = rdir / "attempts.json"
    try:
        attempts = int(read_json(path).get("attempts", 1))
    except (FileNotFoundError, ValueError, AttributeError):
        attempts = 1
    attempts += 1
    atomic_write_json(path, {"attempts": attempts})
    return attempts


def _is_corrupt_segment(error: BaseException) -> bool:
    try:
        from pipeline.staging import CorruptSegment
    except ImportError:  # pragma: no cover - staging is part of the package; only a broken install lacks it
        return False
    return isinstance(error, CorruptSegment)


def _classify(error: BaseException, attempts: int) -> RollError:
    if isinstance(error, RollError):
        return error
    message = str(error)[:MAX_ERROR_MESSAGE]
    name = type(error).__name__
    if isinstance(error, LeaseLost | SharedLeaseLost):
        return roll_error(message, transient=True, kind="lease_lost", exception=name)
    if isinstance(error, RowsHeld):
        return roll_error(message, transient=True, kind="rows_held", exception=name)
    if isinstance(error, SharedStateError):
        return roll_error(message, transient=True, kind="database", exception=name)
    if isinstance(error, SinkError):
        return roll_error(message, transient=error.transient, kind=error.kind, exception=name)
    if isinstance(error, UnsafeNameError):
        return roll_error(message, transient=False, kind="config", exception=name)
    if isinstance(error, PgpError):
        return roll_error(message, transient=error.transient, kind="encryption", exception=name)
    if _is_corrupt_segment(error):
        # A checksum mismatch does not heal by retrying: keep the roll in failed/ for `filefeed inspect`/repair.
        return roll_error(message, transient=False, kind="corrupt_segment", exception=name)
    if isinstance(error, OSError):
        # Local disk trouble (full, I/O): the data is intact in the roll folder, a later run can succeed.
        return roll_error(f"{name}: {error.strerror or message}", transient=True, kind="local_io", exception=name)
    transient = attempts < MAX_UNKNOWN_ATTEMPTS
    return roll_error(f"{name}: {message}", transient=transient, kind="unknown", exception=name)


def _fail(pdir: Path, rdir: Path, error: RollError, attempts: int) -> None:
    reason = {
        "roll_id": rdir.name,
        "severity": error.severity,
        "kind": error.kind,
        "exception": error.exception,
        "message": str(error)[:MAX_ERROR_MESSAGE],
        "failed_at": datetime.now(UTC).isoformat(),
        "attempts": attempts,
    }
    atomic_write_json(rdir / "reason.json", reason)
    failed = pdir / FAILED
    failed.mkdir(exist_ok=True)
    os.rename(rdir, failed / rdir.name)
    fsync_dir(failed)
    fsync_dir(rdir.parent)


def _run_roll(
    pdir: Path, partition: Partition, roll_id: str, sink: Sink, lease: Lease, fresh: bool = False
) -> _RollDone:
    """Drive one roll folder from whatever state it is in to the ledger (`fresh`: just planned by this call). Raises
    RollError (already handled on disk)."""
    rdir = pdir / ROLLING / roll_id
    ledger = Ledger(pdir)
    done = ledger.get(roll_id)
    if done is not None:
        _remove_roll_dir(rdir)  # crashed after the ledger entry: only the clean-up was left
        return _RollDone(roll_id)
    attempts = _bump_attempts(rdir, fresh)
    try:
        plan = _Plan.from_dict(read_json(rdir / "plan.json"), partition)
        _finish_moves(pdir, rdir, plan)
        shared = None
        if lease.shared is not None:
            shared = SharedRoll(lease.shared, roll_id, sink)
            state, recorded = shared.begin()
            if state == "published":  # recorded there before a crash, or adopted by another replica
                _record_and_clean(pdir, rdir, plan, _load_encoded(rdir) or _encoded_from(recorded, roll_id))
                return _RollDone(roll_id)
            if state == "released":  # taken back while it was not running: its rows are claimed again
                (rdir / "encoded.json").unlink(missing_ok=True)
        encoded = _load_encoded(rdir)
        if encoded is None:
            encoded = _encode(rdir, plan, lease, shared)
        if shared is not None:
            shared.publishing(_publishing_record(rdir, encoded))
            crash_point("publishing")
        _publish(rdir, encoded, sink, lease)
        _record_and_clean(pdir, rdir, plan, encoded, shared)
    except Exception as e:  # noqa: BLE001 - classified once, here
        error = _classify(e, attempts)
        if error.transient:
            log.warning("roll %s of %s: transient %s: %s", roll_id, partition, error.kind, error)
        else:
            log.error("roll %s of %s failed: %s: %s", roll_id, partition, error.kind, error)
            _fail(pdir, rdir, error, attempts)
        raise error from e
    return _RollDone(roll_id, [f["name"] for f in encoded["files"]], int(encoded["rows"]))


def _rekey(rdir: Path, props: FeedProperties) -> None:
    """Give a failed encrypted roll the feed's current keys, when it never recorded its encoded files."""
    if (rdir / "encoded.json").exists() or props.encryption != "pgp" or not props.pgp_public_key:
        return
    plan = read_json(rdir / "plan.json")
    if plan.get("pgp_public_key") and plan["pgp_public_key"] != props.pgp_public_key.strip():
        plan["pgp_public_key"] = props.pgp_public_key.strip()
        atomic_write_json(rdir / "plan.json", plan)


def _clean_hidden_leftovers(pdir: Path) -> None:
    remove_stale_temps(pdir / SEALED)
    remove_stale_temps(pdir)
    rolling = pdir / ROLLING
    try:
        names = os.listdir(rolling)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".") and (name.endswith(".new") or name.endswith(".done")):
            shutil.rmtree(rolling / name, ignore_errors=True)


def _roll_locked(
    pdir: Path,
    partition: Partition,
    props: FeedProperties | None,
    sink: Sink,
    lease: Lease,
    now: datetime,
    datamart_id: str | None,
    kind: RollMode = DELTA,
) -> RollOutcome:
    crash_point("lease")
    _clean_hidden_leftovers(pdir)
    replica = lease.shared.state.replica if lease.shared is not None else None
    roll_ids: list[str] = []
    files: list[str] = []
    rows = 0

    def outcome(status: str, error: RollError | None = None) -> RollOutcome:
        return RollOutcome(
            status=status,
            roll_ids=tuple(roll_ids),
            files=tuple(files),
            rows=rows,
            error=str(error) if error else None,
            error_kind=error.kind if error else None,
        )

    # Unfinished rolls first: their rows are older than anything still in sealed/.
    pending = _roll_names(pdir / ROLLING)
    try:
        for roll_id in pending:
            roll_ids.append(roll_id)
            done = _run_roll(pdir, partition, roll_id, sink, lease)
            files.extend(done.files)
            rows += done.rows
        if props is not None and not kind.resume_only and not _slot_handled(pdir, partition, kind, replica):
            plan = _plan_roll(pdir, partition, props, now, datamart_id, kind, replica)
            if plan is not None:
                roll_ids.append(plan.roll_id)
                done = _run_roll(pdir, partition, plan.roll_id, sink, lease, fresh=True)
                files.extend(done.files)
                rows += done.rows
            if kind.slot is not None:
                schedule.mark_slot(pdir, kind.slot)
    except RollError as e:
        return outcome("transient" if e.transient else "terminal", e)
    return outcome("published" if files else "nothing")


def _slot_handled(pdir: Path, partition: Partition, kind: RollMode, replica: str | None = None) -> bool:
    """A slot's roll was planned before (a crash may have come before its mark): only resuming is left."""
    if kind.slot is None:
        return False
    if schedule.slot_marked(pdir, kind.slot):
        return True
    roll_id = slot_roll_id(partition, kind.mode, kind.slot.astimezone(UTC).replace(microsecond=0), replica)
    if Ledger(pdir).has(roll_id) or (pdir / FAILED / roll_id).exists():
        schedule.mark_slot(pdir, kind.slot)
        return True
    return False


def roll_partition(
    root: Path | str,
    partition: Partition,
    props: FeedProperties,
    sink: Sink,
    *,
    now: datetime | None = None,
    wait_seconds: float = 0.0,
    datamart_id: str | None = None,
    lease_stale_after: float = LEASE_STALE_SECONDS,
    kind: RollMode = DELTA,
    pdir: Path | None = None,
) -> RollOutcome:
    """Resume the partition's unfinished rolls, then roll everything in sealed/ and publish it through `sink`.

    Args:
        root: the staging root (FILEFEED_STAGING_DIR).
        partition: feed, segment and operation.
        props: the feed's properties; a new roll snapshots what names and bytes depend on into its plan.
        sink: where files go; it publishes atomically and idempotently by name.
        now: the roll's planned time (UTC), for names and the roll id; defaults to the clock.
        wait_seconds: how long to wait for a lease held by another live roller before answering "busy".
        datamart_id: value of the {datamart_id} name macro; defaults to the first datamart_id in the rows.
        lease_stale_after: seconds without a heartbeat after which another host's lease counts as abandoned.
        kind: the roll's mode, inputs and schedule slot (RollMode); the default is a delta roll of staged rows.
        pdir: the folder holding the roll's inputs and states, when it is not the partition's (a segment's
            SNAPSHOT folder, pipeline/snapshot.py).
    """
    pdir = pdir or partition_dir(root, partition)
    started = time.monotonic()
    lease = Lease.acquire(pdir, wait_seconds=wait_seconds, stale_after=lease_stale_after)
    if lease is None:
        return RollOutcome(status="busy")
    try:
        refused = lease.take_shared(root, partition, max(0.0, wait_seconds - (time.monotonic() - started)))
        if refused is not None:
            return refused
        return _roll_locked(pdir, partition, props, sink, lease, now or datetime.now(UTC), datamart_id, kind)
    finally:
        lease.release()


def retry_failed(
    root: Path | str,
    partition: Partition,
    sink: Sink,
    *,
    roll_ids: Iterable[str] | None = None,
    wait_seconds: float = 0.0,
    props: FeedProperties | None = None,
    pdir: Path | None = None,
) -> RollOutcome:
    """Move failed rolls (all, or `roll_ids`) back to rolling/ and resume them with their own plans.

    The old reason.json is kept as `last_failure.json` in the roll folder for the operator; the attempt count
    starts again so unknown errors get their retries back. With `props`, an encrypted roll that has not finished
    encoding takes the feed's current `pgp_public_key` (the fix for a key that expired or was revoked since the
    plan): keys decide no name, and nothing of such a roll was published.
    """
    pdir = pdir or partition_dir(root, partition)  # a segment's SNAPSHOT folder (pipeline/snapshot.py)
    lease = Lease.acquire(pdir, wait_seconds=wait_seconds)
    if lease is None:
        return RollOutcome(status="busy")
    try:
        refused = lease.take_shared(root, partition, wait_seconds)
        if refused is not None:
            return refused
        wanted = set(roll_ids) if roll_ids is not None else None
        rolling = pdir / ROLLING
        rolling.mkdir(exist_ok=True)
        for roll_id in _roll_names(pdir / FAILED):
            if wanted is not None and roll_id not in wanted:
                continue
            fdir = pdir / FAILED / roll_id
            if (fdir / "reason.json").exists():
                os.replace(fdir / "reason.json", fdir / "last_failure.json")
            atomic_write_json(fdir / "attempts.json", {"attempts": 0})  # none started: the next one is the first
            if props is not None:
                _rekey(fdir, props)
            os.rename(fdir, rolling / roll_id)
            fsync_dir(rolling)
            fsync_dir(pdir / FAILED)
        # props=None: only resume; new segments wait for the next regular roll.
        return _roll_locked(pdir, partition, None, sink, lease, datetime.now(UTC), None)
    finally:
        lease.release()


# -- age timer -------------------------------------------------------------------------------------------------------


def segment_first_row_ms(path: Path) -> int | None:
    """Epoch ms of the first frame of a segment (its oldest row), from the frame header; file mtime as fallback.

    None for an empty segment: no rows, nothing can be overdue.
    """
    try:
        with open(path, "rb") as f:
            header = f.readline(256)
            size_hint = os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    if not header:
        return None
    parts = header.split()
    if header.startswith(b"#") and len(parts) == 4:
        try:
            return int(parts[3])
        except ValueError:
            pass
    return int(size_hint.st_mtime * 1000)


def oldest_staged_row_ms(pdir: Path) -> int | None:
    oldest: int | None = None
    for state in (SEALED, OPEN):
        try:
            names = os.listdir(pdir / state)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            first = segment_first_row_ms(pdir / state / name)
            if first is not None and (oldest is None or first < oldest):
                oldest = first
    return oldest


def due_partitions(
    root: Path | str,
    max_age_by_feed: Mapping[str, float],
    *,
    now: datetime | None = None,
    default_max_age: float | None = None,
) -> list[Partition]:
    """Partitions the age timer must roll now.

    Due: an unfinished roll waits in rolling/ (to resume it), or the oldest staged row (sealed/ or open/) is at least
    `max_age_by_feed[feed_id]` seconds old (`default_max_age` for feeds not in the mapping; None skips them). Rows
    still in open/ need staging to seal their segment before a roll can take them.
    """
    now_ms = int((now or datetime.now(UTC)).timestamp() * 1000)
    due: list[Partition] = []
    for partition in iter_partitions(root):
        max_age = max_age_by_feed.get(partition.feed_id, default_max_age)
        pdir = partition_dir(root, partition)
        if _roll_names(pdir / ROLLING):
            due.append(partition)
            continue
        if max_age is None:
            continue
        oldest = oldest_staged_row_ms(pdir)
        if oldest is not None and now_ms - oldest >= max_age * 1000:
            due.append(partition)
    return due
