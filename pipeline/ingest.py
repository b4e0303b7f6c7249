"""user_segment_update: request -> identifier rows -> durable staging -> the protocol's answer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pipeline.identifiers import RequestError
from pipeline.model import OPERATIONS, Partition, check_id
from pipeline.staging import StagingFull
from pipeline.staging.results import AppendResult, full_error

if TYPE_CHECKING:
    from filefeed.context import FeedContext
    from pipeline.staging import Staging


def _ts(body: dict[str, Any]) -> int:
    ts = body.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
        raise RequestError("ts must be epoch milliseconds")
    try:
        return int(ts)
    except ValueError:
        raise RequestError("ts must be epoch milliseconds") from None


# Envelopes already checked, by their raw string values: one feed sends millions of updates with the same ids.
_ENVELOPES: dict[tuple[str, str, str, str, str], Partition] = {}
_MAX_ENVELOPES = 4096


def update_partition(body: dict[str, Any]) -> tuple[Partition, str, str, int]:
    """Check the envelope of a user_segment_update; return (partition, session_id, datamart_id, ts)."""
    key = (feed_id, segment_id, session_id, datamart_id, operation) = (
        body.get("feed_id"), body.get("segment_id"), body.get("session_id"), body.get("datamart_id"),
        body.get("operation"))
    # Only all-string keys are cached: 1 == True == 1.0 as dict keys, and a bool is never a valid id.
    if (type(feed_id) is str and type(segment_id) is str and type(session_id) is str and type(datamart_id) is str
            and type(operation) is str):
        partition = _ENVELOPES.get(key)  # type: ignore[arg-type]
        if partition is None:
            partition = _check_envelope(body)
            if len(_ENVELOPES) >= _MAX_ENVELOPES:
                _ENVELOPES.clear()
            _ENVELOPES[key] = partition  # type: ignore[index]
        return partition, session_id, datamart_id, _ts(body)
    return _check_envelope(body), str(body["session_id"]), str(body["datamart_id"]), _ts(body)


def _check_envelope(body: dict[str, Any]) -> Partition:
    problems = []
    for name in ("feed_id", "segment_id", "session_id", "datamart_id"):
        try:
            check_id(name, body.get(name))
        except ValueError as e:
            problems.append(str(e))
    op = body.get("operation")
    if op not in OPERATIONS:
        problems.append("operation must be UPSERT or DELETE")
    if problems:
        raise RequestError("; ".join(problems))
    _ts(body)  # a bad ts is reported before anything is cached
    return Partition(str(body["feed_id"]), str(body["segment_id"]), op)


class StagedUpdate:
    """The rows of one update, handed to staging: once `future` is done, `answer()` is the protocol's answer.

    The hot path waits for the future with a callback (filefeed/hotpath.py), the Starlette route with `await`; both
    answer with the same `answer()`.
    """

    __slots__ = ("future", "feed_id", "partition", "rows", "stats", "retry_delay_ms")

    def __init__(self, future: asyncio.Future[AppendResult], feed_id: str, partition: Partition, rows: list,
                 stats: list, retry_delay_ms: int):
        self.future = future
        self.feed_id = feed_id
        self.partition = partition
        self.rows = rows
        self.stats = stats
        self.retry_delay_ms = retry_delay_ms

    def answer(self) -> dict:
        """`ok` with one BATCH_DELIVERY item per row, or `retry` when the commit hit a full volume; any other failure
        of the commit is raised (the route answers it as an internal error)."""
        err = self.future.exception()
        if err is not None:
            return _full_retry(err, self.retry_delay_ms)
        partition = self.partition
        op = partition.operation
        ref = self.future.result().segment
        segment_id = partition.segment_id
        items = [
            {
                "type": "BATCH_DELIVERY",
                "content": {
                    "ref": ref,
                    "segment_id": segment_id,
                    "operation": op,
                    "identifier_type": t,
                    "identifier": v,
                    "ts": ts_,
                    "session_id": sid,
                    "datamart_id": dm,
                    "user_point_id": up,
                },
                "grouping_key": op,
            }
            for t, v, ts_, sid, dm, up in self.rows
        ]
        return {"status": "ok", "data": items, "stats": self.stats}


def _full_retry(err: BaseException, retry_delay_ms: int) -> dict:
    """EMFILE, ENFILE, ENOSPC anywhere on the way, or a full staging: retry later. Anything else is raised."""
    e = full_error(err) if isinstance(err, (StagingFull, OSError)) else err
    if not isinstance(e, StagingFull):
        raise err
    delay = max(int(getattr(e, "retry_after_ms", 0) or 0), retry_delay_ms)
    return {"status": "retry", "message": f"staging is full: {e}", "next_msg_delay_in_ms": delay}


def stage_update(staging: Staging, ctx: FeedContext, feed_id: str, body: dict[str, Any],
                 retry_delay_ms: int) -> dict | StagedUpdate:
    """Check the update, extract its eligible identifiers and hand their rows to staging, without waiting.

    Returns the answer when there is nothing to stage (or staging refuses at once), else the StagedUpdate to wait for.
    """
    partition, session_id, datamart_id, ts = update_partition(body)
    assert ctx.rules is not None
    ex = ctx.rules.extract(body.get("user_identifiers"), ts, session_id, datamart_id)
    if not ex.rows:
        return {"status": "no_eligible_identifier", "message": "no eligible identifier for this feed",
                "stats": ex.stats or None}
    try:
        future = staging.submit(partition, ex.rows)
    except (StagingFull, OSError) as err:
        return _full_retry(err, retry_delay_ms)
    return StagedUpdate(future, feed_id, partition, ex.rows, ex.stats, retry_delay_ms)

