"""What the feed card's Troubleshooting tab shows: identifiers staged and delivered, last deliveries, recent errors.

Read-only and built from the staging folders and the ledger, so it tells the same in every worker. It names the
destination by URI (which never carries a secret), reports configuration problems by property name (never a value),
and, as a last guard, removes every secret property value of the feed from the whole answer before returning it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.delivery import LAST_ERROR
from pipeline.ledger import DeliveryTotals, Ledger, instant, partition_dir, published_ts, read_json
from pipeline.model import Partition
from pipeline.rejects import REJECTED, rejected_rows
from pipeline.rollover import failed_rolls, iter_partitions, pending_rolls
from pipeline.snapshot import delivery_dirs
from sinks.errors import error_fields

if TYPE_CHECKING:
    from filefeed.context import FeedContext
    from pipeline.staging import Staging

SECRET_PROPERTIES = ("aws_secret_access_key", "sftp_password", "sftp_private_key", "gcs_service_account_json")
REDACTED = "<redacted>"
MAX_DELIVERIES = 10
MAX_ERRORS = 10


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_error(pdir: Path) -> dict[str, Any] | None:
    record = _read(pdir / LAST_ERROR)
    if record is None:
        return None
    fields = error_fields(record)
    return {"severity": fields["severity"], "kind": fields["kind"], "message": record.get("message"),
            "time": record.get("time")}


def partition_report(staging: Staging, partition: Partition, *, deliveries: int = 5) -> dict[str, Any]:
    """One partition: staged rows and bytes, oldest row, pending and failed rolls, deliveries, last error."""
    st = staging.stats(partition)
    pdir = partition_dir(staging.root, partition)
    # deliveries: rolls that published files, including a snapshot feed's (listed under its UPSERT partition);
    # a snapshot feed's apply rolls publish nothing. One indexed query per folder whatever the history.
    ledgers = [Ledger(d) for d in delivery_dirs(staging.root, partition)]
    want = max(deliveries, 1)
    recent = sorted((e for lg in ledgers for e in lg.last(want) if e.files), key=published_ts, reverse=True)[:want]
    sums = [lg.totals() for lg in ledgers]  # everything ever published, entries pruned by the retention included
    totals = DeliveryTotals(*(sum(getattr(x, f) for x in sums) for f in ("rolls", "rows", "files", "bytes")))
    failed = []
    for roll_id in failed_rolls(staging.root, partition):
        reason = _read(pdir / "failed" / roll_id / "reason.json") or {}
        encoded = _read(pdir / "failed" / roll_id / "encoded.json") or {}
        failed.append({"roll_id": roll_id, **error_fields(reason),
                       "message": reason.get("message"), "failed_at": reason.get("failed_at"),
                       "attempts": reason.get("attempts"), "rows": encoded.get("rows")})
    last = recent[0] if recent else None
    rejected, reports = rejected_rows(pdir)
    return {
        "segment_id": partition.segment_id,
        "operation": partition.operation,
        "staged_rows": st.rows,
        "staged_bytes": st.bytes,
        "oldest_staged_age_seconds": round(max(0.0, time.time() - st.oldest_ts_ms / 1000), 1)
        if st.oldest_ts_ms else None,
        "open_segments": st.open_segments,
        "sealed_segments": st.sealed_segments,
        "pending_rolls": len(pending_rolls(staging.root, partition)),
        "failed_rolls": failed,
        "delivered_rows": totals.rows,
        "delivered_files": totals.files,
        "delivered_bytes": totals.bytes,
        "last_delivery": None if last is None else _delivery(last),
        "recent_deliveries": [_delivery(e) for e in recent[:deliveries]] if deliveries > 0 else [],
        "last_error": _last_error(pdir),
        # rows rolls set aside because they could not be encoded, and the reports listing them
        "rejected_rows": rejected,
        "rejected_reports": [f"{partition.relpath}/{REJECTED}/{n}" for n in reports],
    }


def _delivery(e: Any) -> dict[str, Any]:
    return {"roll_id": e.roll_id, "published_at": e.published_at, "rows": e.rows, "bytes": e.bytes,
            "files": [f["name"] for f in e.files], "manifest": e.manifest["name"] if e.manifest else None}


def feed_partitions(root: Path, feed_id: str, segment_id: str | None = None) -> list[Partition]:
    return [p for p in iter_partitions(root) if p.feed_id == feed_id and (segment_id in (None, p.segment_id))]


def secret_values(ctx: FeedContext) -> list[str]:
    """Every secret property value of the feed (validated or raw), and its long lines / JSON string members."""
    values: list[str] = []
    for name in SECRET_PROPERTIES:
        for source in (getattr(ctx.props, name, None) if ctx.props else None, (ctx.raw_properties or {}).get(name)):
            if source is None:
                continue
            raw = source.get_secret_value() if hasattr(source, "get_secret_value") else source
            if isinstance(raw, dict):  # a property given as a table (embedded TOML)
                raw = json.dumps(raw)
            if not isinstance(raw, str) or not raw.strip():
                continue
            values.append(raw)
            values.extend(line.strip() for line in raw.splitlines() if len(line.strip()) >= 12)
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                values.extend(v for v in doc.values() if isinstance(v, str) and len(v) >= 12)
    # longest first, so a whole value is replaced before one of its lines
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def redact(data: Any, secrets: Iterable[str]) -> Any:
    secrets = list(secrets)
    if not secrets:
        return data

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            for s in secrets:
                if s in v:
                    v = v.replace(s, REDACTED)
            return v
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(data)


def destination_audience(staging: Staging, ctx: FeedContext, segment_id: Any = None) -> dict[str, Any]:
    """FETCH_DESTINATION_AUDIENCE: the feed's staged rows per partition, its last deliveries (file names, rows,
    time), rows delivered by operation, and its last errors with their class."""
    seg = str(segment_id) if isinstance(segment_id, (str, int)) and not isinstance(segment_id, bool) else None
    reports = [(p, partition_report(staging, p, deliveries=MAX_DELIVERIES))
               for p in feed_partitions(staging.root, ctx.feed_id, seg)]
    by_op: dict[str, dict[str, int]] = {}
    deliveries: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for p, r in reports:
        agg = by_op.setdefault(p.operation, {"staged_rows": 0, "delivered_rows": 0, "delivered_files": 0,
                                             "failed_rolls": 0})
        agg["staged_rows"] += r["staged_rows"]
        agg["delivered_rows"] += r["delivered_rows"]
        agg["delivered_files"] += r["delivered_files"]
        agg["failed_rolls"] += len(r["failed_rolls"])
        where = {"segment_id": p.segment_id, "operation": p.operation}
        deliveries.extend({**where, **d} for d in r["recent_deliveries"])
        if r["last_error"]:
            e = r["last_error"]
            errors.append({**where, "severity": e.get("severity"), "kind": e.get("kind"),
                           "message": e.get("message"), "time": e.get("time")})
        for f in r["failed_rolls"]:
            errors.append({**where, "severity": f.get("severity"), "kind": f.get("kind"),
                           "message": f.get("message"), "time": f.get("failed_at"), "failed_roll": f["roll_id"]})
    deliveries.sort(key=lambda d: instant(d["published_at"]), reverse=True)
    errors.sort(key=lambda e: e.get("time") or "", reverse=True)
    props = ctx.props
    data: dict[str, Any] = {
        "feed_id": ctx.feed_id,
        "destination": str(props.destination) if props else None,
        "file_format": props.file_format if props else None,
        "compression": props.compression if props else None,
        "configuration_problems": list(ctx.error.problems) if ctx.error else [],
        "configuration_warnings": list(ctx.warnings),
        "staged_rows": sum(r["staged_rows"] for _, r in reports),
        "delivered_rows": sum(r["delivered_rows"] for _, r in reports),
        "rows_by_operation": by_op,
        "last_deliveries": deliveries[:MAX_DELIVERIES],
        "last_errors": errors[:MAX_ERRORS],
        "partitions": [{k: v for k, v in r.items() if k != "recent_deliveries"} for _, r in reports],
    }
    return redact(data, secret_values(ctx))
