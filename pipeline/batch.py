"""batch_update: items -> (already staged | staged now) -> roll -> honest counts.

Each BATCH_DELIVERY item filefeed answered carries `ref`, the staging segment its row was written to. A batch is
published by whoever receives it:
- refs whose segment is open are waited for (sealed at once when this process owns them; another live worker is
  asked to seal them now);
- refs whose segment is sealed, rolling or failed are already staged here;
- refs the ledger lists as consumed were published already (by an earlier batch or the age timer);
- items with no ref, or a ref this staging volume never saw (another host, a lost disk), are staged now into a
  sealed segment named after a hash of their rows, so a retried batch finds that segment instead of doubling rows.
Then the partition is rolled (its unfinished rolls resumed first) and an item counts as sent when its segment is in
the ledger. Items that cannot be rows count in `sent_items_in_error`.

Exactly once for loose rows rests on three things, each enough for the races the others miss:
- where a segment is, is looked up after every wait and in the order a segment moves (open -> sealed -> a roll's
  folder -> the ledger), so a segment published while this batch waited is seen as published;
- the loose segment is created with link(2) (create-only): of concurrent identical batches, one stages it;
- a roll never plans a segment the ledger lists or another roll folder holds (pipeline.rollover), so a copy staged
  again after its first copy was published is dropped, not published twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import orjson

from pipeline import delivery
from pipeline.durable import create_only_bytes
from pipeline.identifiers import MAX_TS_MS, MAX_VALUE_LENGTH, MIN_TS_MS
from pipeline.journal import encode_frame, lines_payload
from pipeline.layout import FAILED, SEALED, SUFFIX
from pipeline.layout import FORBIDDEN_RE as _FORBIDDEN
from pipeline.layout import SEGMENT_NAME_RE as _REF
from pipeline.layout import roll_folder_holding as _roll_folder_holding
from pipeline.ledger import consumed, partition_dir
from pipeline.model import OPERATIONS, Partition

if TYPE_CHECKING:
    from config.settings import ServiceSettings
    from filefeed.context import FeedContext
    from pipeline.staging import Staging

log = logging.getLogger("filefeed.batch")


def batch_answer(status: str, *, sent: int = 0, errors: int = 0, message: str | None = None,
                 delay_ms: int | None = None) -> dict[str, Any]:
    """The one shape of every batch_update answer (the route maps `status` to its code, `delay_ms` to the header)."""
    answer: dict[str, Any] = {"status": status, "sent_items_in_success": sent, "sent_items_in_error": errors}
    if message:
        answer["message"] = message[:1000]
    if delay_ms is not None:
        answer["next_msg_delay_in_ms"] = delay_ms
    return answer


@dataclass
class _PartitionWork:
    refs: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # segment name -> items
    # (the row as its staged TSV line, ref or None): the line is all a loose row needs, built once while parsing
    rows: list[tuple[str, str | None]] = field(default_factory=list)


# The fields of a row item, read in one C call when all are present (the platform sends them all).
_FIELDS = ("segment_id", "operation", "identifier_type", "identifier", "ts", "session_id", "datamart_id",
           "user_point_id")
_ALL_FIELDS = itemgetter(*_FIELDS)


def _text(v: Any) -> str | None:
    """Ids may be numbers in some SDK typings; anything else is not an id."""
    if type(v) is str:
        return v
    if type(v) is int:
        return str(v)
    return None


_Value = Annotated[str, msgspec.Meta(max_length=MAX_VALUE_LENGTH)]
_Present = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_VALUE_LENGTH)]


class _Item(msgspec.Struct, gc=False):
    """An item as the platform sends it (ids as strings, `ts` an int), decoded with no dict, its bounds checked in C.

    An item of any other shape, or outside a bound, fails to decode and takes the general path (_general_fields),
    which answers it as it always did: every bound here is one the general path checks too (a value within the
    general path's limits but past one of these, such as a long session id beside short values, is simply judged
    there)."""

    segment_id: str | None = None
    operation: str | None = None
    identifier_type: _Present | None = None
    identifier: _Present | None = None
    ts: Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)] | None = None
    session_id: _Value | None = None
    datamart_id: _Value | None = None
    user_point_id: _Value | None = None
    ref: str | None = None


_decode_item = msgspec.json.Decoder(_Item).decode
_NOT_ITEM = (msgspec.ValidationError, msgspec.DecodeError)


def _general_fields(raw: Any) -> tuple | None:
    """An item's fields, ref and whether its values need the forbidden-character search; None when it is no object.

    Items sent as objects, with escapes, or with values of other types (ids as numbers, a bad `ts`) come here."""
    kind = type(raw)
    if kind is str or kind is bytes:
        check = (b"\\" if kind is bytes else "\\") in raw
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(raw) is not dict:
            return None
    elif kind is dict:
        check = True
    else:
        return None
    try:
        values = _ALL_FIELDS(raw)
    except KeyError:
        values = tuple(raw.get(k) for k in _FIELDS)
    return (*values, raw.get("ref"), check)


def _work_for(work: dict[Partition, _PartitionWork], feed_id: str, segment_id: Any, op: Any) -> _PartitionWork | None:
    """The work of partition (segment_id, op), new; None when those are no partition of this feed."""
    if op not in OPERATIONS:
        return None
    try:
        partition = Partition(feed_id, segment_id, op)
    except ValueError:
        return None
    w = work[partition] = _PartitionWork()
    return w


def _known_ref(refs: dict[str, str | None], ref: str) -> str | None:
    """`ref` when it is a well-formed segment name, else None; remembered in `refs` for the batch's other items."""
    try:
        return refs[ref]
    except KeyError:
        known = refs[ref] = ref if _REF.fullmatch(ref) else None
        return known


def parse_items(context: dict[str, Any], items: list[Any]) -> tuple[dict[Partition, _PartitionWork], int]:
    """Batch items -> rows grouped by partition (with their refs), and the number of items that cannot be rows.

    Hot: 10,000 items a call, so one flat loop with cached partitions and refs. An item in the platform's shape (JSON
    text without escapes, every value within its bound) is decoded by msgspec into a slotted struct that checks the
    bounds in C, and takes the short branch; any other item takes the general one. Values must not hold a tab,
    newline, CR or NUL (the journal's separators). JSON forbids those characters raw inside strings, so an item sent
    as JSON text without a backslash cannot hold one: only items with escapes, or sent as objects, are searched.
    `ts` must be an int in [MIN_TS_MS, MAX_TS_MS]: every value checked here can be staged, encoded and answered.
    """
    feed_id = str(context["feed_id"])
    default_op = context.get("grouping_key")
    default_segment = context.get("segment_id")
    default_session = context.get("feed_session_id") or ""
    default_datamart = context.get("datamart_id") or ""
    text = _text
    # The defaults as the general branch turns them into text (`value or default`, then _text when not a str).
    segment_or = default_segment if type(default_segment) is str else text(default_segment)
    session_or = default_session if type(default_session) is str else text(default_session)
    datamart_or = default_datamart if type(default_datamart) is str else text(default_datamart)
    max_len = MAX_VALUE_LENGTH
    # The short branch's values are within max_len each; only longer defaults can pass the general sum bound.
    sum_check = any(v is not None and len(v) > max_len for v in (session_or, datamart_or))
    short = type(default_op) is str or default_op is None  # else every item takes the general branch
    partitions: dict[tuple[Any, Any], _PartitionWork | None] = {}  # (segment_id, operation) -> its work
    refs: dict[str, str | None] = {}  # ref -> itself when it is a well-formed segment name, else None
    work: dict[Partition, _PartitionWork] = {}
    invalid = 0
    decode_item, not_item, forbidden = _decode_item, _NOT_ITEM, _FORBIDDEN.search
    last_segment: Any = None
    last_op: Any = None
    last_w: _PartitionWork | None = None
    for raw in items:
        if short and type(raw) is str and "\\" not in raw:
            try:
                it = decode_item(raw)
            except not_item:
                pass
            else:
                segment_id = it.segment_id or segment_or
                op = it.operation or default_op
                if segment_id != last_segment or op != last_op or last_w is None:
                    try:
                        w = partitions[segment_id, op]
                    except KeyError:
                        w = None
                        if segment_id is not None and op is not None:
                            w = _work_for(work, feed_id, segment_id, op)
                            partitions[segment_id, op] = w
                    last_segment, last_op, last_w = segment_id, op, w
                else:
                    w = last_w
                id_type, ident, ts = it.identifier_type, it.identifier, it.ts
                session_id = it.session_id or session_or
                datamart_id = it.datamart_id or datamart_or
                user_point_id = it.user_point_id or ""
                if (w is None or id_type is None or ident is None or ts is None or session_id is None
                        or datamart_id is None or (sum_check and len(id_type) + len(ident) + len(session_id)
                                                   + len(datamart_id) + len(user_point_id) > 5 * max_len)):
                    invalid += 1
                    continue
                ref = it.ref
                if ref is not None and (ref := _known_ref(refs, ref)) is not None:
                    w.refs[ref] += 1
                w.rows.append((f"{id_type}\t{ident}\t{ts}\t{session_id}\t{datamart_id}\t{user_point_id}\n", ref))
                continue
        fields = _general_fields(raw)
        if fields is None:
            invalid += 1
            continue
        segment_id, op, id_type, ident, ts, session_id, datamart_id, user_point_id, ref, check = fields
        segment_id = segment_id or default_segment
        op = op or default_op
        session_id = session_id or default_session
        datamart_id = datamart_id or default_datamart
        user_point_id = user_point_id or ""
        if type(segment_id) is not str:
            segment_id = text(segment_id)
        if type(session_id) is not str:
            session_id = text(session_id)
        if type(datamart_id) is not str:
            datamart_id = text(datamart_id)
        if type(user_point_id) is not str:
            user_point_id = text(user_point_id)
        try:
            w = partitions[segment_id, op]
        except KeyError:
            if segment_id is None or type(op) is not str:
                invalid += 1
                continue
            w = partitions[segment_id, op] = _work_for(work, feed_id, segment_id, op)
        except TypeError:  # an unhashable operation
            invalid += 1
            continue
        if (w is None or type(id_type) is not str or type(ident) is not str or type(ts) is not int
                or ts < MIN_TS_MS or ts > MAX_TS_MS or not id_type or not ident or session_id is None
                or datamart_id is None or user_point_id is None or len(ident) > max_len
                or len(id_type) + len(ident) + len(session_id) + len(datamart_id) + len(user_point_id) > 5 * max_len
                or (check and forbidden(id_type + ident + session_id + datamart_id + user_point_id))):
            invalid += 1
            continue
        if ref is not None and (ref := _known_ref(refs, ref) if type(ref) is str else None) is not None:
            w.refs[ref] += 1
        w.rows.append((f"{id_type}\t{ident}\t{ts}\t{session_id}\t{datamart_id}\t{user_point_id}\n", ref))
    return {p: w for p, w in work.items() if w.rows}, invalid


def locate_segment(staging: Staging, partition: Partition, name: str) -> str | None:
    """Where a segment is: "open", "sealed", "rolling", "failed", "published", or None when this volume never had it.

    Looks in the order a segment moves (open -> sealed -> a roll's folder -> the ledger; a roll writes its ledger entry
    before removing its folder), so a segment that moves while we look is found further on, never missed.
    """
    state = staging.segment_state(partition, name)
    if state is not None:
        return state
    folder = _roll_folder_holding(partition_dir(staging.root, partition), name + SUFFIX)
    if folder is not None:
        return folder
    if consumed(staging.root, partition, [name + SUFFIX]):
        return "published"
    return None


def loose_segment_name(lines: list[str]) -> str:
    """The same rows in any order give the same name, so a retried batch finds the segment it staged before."""
    digest = hashlib.sha256("".join(sorted(lines)).encode("utf-8"))
    return f"batch_{digest.hexdigest()[:24]}-00000000"


def _stage_loose(staging: Staging, partition: Partition, lines: list[str]) -> str:
    """Write rows staged by nobody here (their TSV lines) into a sealed segment whose name is a hash of the rows
    (create-only)."""
    payload = lines_payload(lines)
    name = loose_segment_name(lines)
    pdir = partition_dir(staging.root, partition)
    path = pdir / SEALED / (name + SUFFIX)
    # In the order a segment moves, so one moving while we look is found further on (see locate_segment).
    if path.exists() or _roll_folder_holding(pdir, name + SUFFIX) is not None:
        return name
    if consumed(staging.root, partition, [name + SUFFIX]):
        return name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not create_only_bytes(path, encode_frame(payload, len(lines), int(time.time() * 1000))):
        log.debug("loose segment %s of %s was staged by a concurrent batch", name, partition)
    return name


def deliver_batch(staging: Staging, ctx: FeedContext, body: dict[str, Any], settings: ServiceSettings) -> dict:
    """Stage what is missing, roll the batch's partitions, count. Runs in a worker thread (blocking I/O)."""
    items = body.get("batch_content")
    context = body["context"]
    if not isinstance(items, list):
        return batch_answer("ERROR", message="batch_content must be a list")
    assert ctx.props is not None
    # each row is kept with its ref, in case the ref is unknown on this staging volume
    work, invalid = parse_items(context, items)
    not_rows = f"{invalid} items are not rows of this feed" if invalid else None
    if not work:
        return batch_answer("ERROR" if invalid else "OK", errors=invalid, message=not_rows)

    sent = 0
    transient: list[str] = []
    terminal: list[str] = []
    for partition, w in sorted(work.items()):
        pdir = partition_dir(staging.root, partition)
        published = consumed(staging.root, partition, [n + SUFFIX for n in w.refs])
        names = [n for n in w.refs if n + SUFFIX not in published]
        states = staging.wait_sealed(partition, names, timeout=settings.batch_wait_seconds) if names else {}
        if any(s == "open" for s in states.values()):
            transient.append(f"{partition}: staged rows still being written")
            continue
        # Looked up again after the wait: a segment published meanwhile must read as published, never as unknown.
        unknown = {n for n, st in states.items() if st is None and locate_segment(staging, partition, n) is None}
        counted: dict[str, int] = {n: c for n, c in w.refs.items() if n not in unknown}
        # rows to stage now: items without ref, and items whose ref this staging volume does not know
        loose = [line for (line, ref) in w.rows if ref is None or ref in unknown]
        if loose:
            name = _stage_loose(staging, partition, loose)
            counted[name] = counted.get(name, 0) + len(loose)
        outcome = delivery.roll(staging.root, partition, ctx.props, wait_seconds=settings.batch_wait_seconds)
        if outcome.status == "busy":
            transient.append(f"{partition}: another roll of this partition is running")
        elif outcome.status == "transient":
            transient.append(f"{partition}: {outcome.error}")
        elif outcome.status == "terminal":
            terminal.append(f"{partition}: {outcome.error}")
        published = consumed(staging.root, partition, [n + SUFFIX for n in counted])
        if ctx.props.delivery_schedule is not None and ctx.props.delivery_mode == "delta":
            # scheduled: durably staged is accepted for the next slot (pipeline/schedule.py), not yet published
            sent += sum(c for n, c in counted.items() if _roll_folder_holding(pdir, n + SUFFIX) != FAILED)
        else:
            sent += sum(c for n, c in counted.items() if n + SUFFIX in published)
        if outcome.status in ("published", "nothing") and any(
                n + SUFFIX not in published and _roll_folder_holding(pdir, n + SUFFIX) is not None for n in counted):
            terminal.append(f"{partition}: some rows are in failed rolls (see `filefeed status`, `filefeed retry`)")
    if transient:
        return batch_answer("RETRY", sent=sent, errors=invalid, message="; ".join(transient),
                            delay_ms=settings.retry_delay_ms)
    if terminal:
        return batch_answer("ERROR", sent=sent, errors=invalid, message="; ".join(terminal))
    return batch_answer("OK", sent=sent, errors=invalid, message=not_rows)
