"""What the feed card's Troubleshooting tab shows: identifiers received, staged and delivered, and recent errors.

Read-only and built from the staging folders and the ledger, so it tells the same in every worker; it names
destinations by URI (which never carries a secret) and never includes a property value that is a secret.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.delivery import LAST_ERROR
from pipeline.ledger import Ledger, partition_dir, read_json
from pipeline.model import Partition
from pipeline.rollover import failed_rolls, iter_partitions, pending_rolls

if TYPE_CHECKING:
    from filefeed.context import FeedContext
    from pipeline.staging import Staging


def partition_report(staging: Staging, partition: Partition, *, deliveries: int = 5) -> dict[str, Any]:
    st = staging.stats(partition)
    pdir = partition_dir(staging.root, partition)
    entries = Ledger(pdir).entries()
    failed = []
    for roll_id in failed_rolls(staging.root, partition):
        try:
            failed.append(read_json(pdir / "failed" / roll_id / "reason.json"))
        except (OSError, ValueError):
            failed.append({"roll_id": roll_id})
    last_error = None
    try:
        last_error = read_json(pdir / LAST_ERROR)
    except (OSError, ValueError):
        pass
    last = entries[-1] if entries else None
    return {
        "segment_id": partition.segment_id,
        "operation": partition.operation,
        "staged_rows": st.rows,
        "staged_bytes": st.bytes,
        "oldest_staged_age_seconds": round(time.time() - st.oldest_ts_ms / 1000, 1) if st.oldest_ts_ms else None,
        "open_segments": st.open_segments,
        "sealed_segments": st.sealed_segments,
        "pending_rolls": len(pending_rolls(staging.root, partition)),
        "failed_rolls": failed,
        "delivered_rows": sum(e.rows for e in entries),
        "delivered_files": sum(len(e.files) for e in entries),
        "last_delivery": None if last is None else {
            "published_at": last.published_at, "rows": last.rows, "files": [f["name"] for f in last.files]},
        "recent_deliveries": [
            {"roll_id": e.roll_id, "published_at": e.published_at, "rows": e.rows,
             "files": [f["name"] for f in e.files]} for e in reversed(entries[-deliveries:])],
        "last_error": last_error,
    }


def feed_partitions(root: Path, feed_id: str, segment_id: str | None = None) -> list[Partition]:
    return [p for p in iter_partitions(root) if p.feed_id == feed_id and (segment_id in (None, p.segment_id))]


def destination_audience(staging: Staging, ctx: FeedContext, segment_id: Any = None) -> dict[str, Any]:
    seg = str(segment_id) if isinstance(segment_id, (str, int)) else None
    parts = [partition_report(staging, p) for p in feed_partitions(staging.root, ctx.feed_id, seg)]
    by_op: dict[str, dict[str, int]] = {}
    for p in parts:
        agg = by_op.setdefault(p["operation"], {"staged_rows": 0, "delivered_rows": 0})
        agg["staged_rows"] += p["staged_rows"]
        agg["delivered_rows"] += p["delivered_rows"]
    data: dict[str, Any] = {
        "feed_id": ctx.feed_id,
        "destination": str(ctx.props.destination) if ctx.props else None,
        "file_format": ctx.props.file_format if ctx.props else None,
        "compression": ctx.props.compression if ctx.props else None,
        "configuration_problems": ctx.error.problems if ctx.error else [],
        "rows_by_operation": by_op,
        "partitions": parts,
    }
    return data
