"""Operator commands on the staging folders and the ledger: status, inspect, flush, retry, verify."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from filefeed.cli import _print_json, _settings, app, console, err
from pipeline.model import Partition


def _staging(settings):  # read-side Staging: no recovery, no writer files until something is appended
    from pipeline.staging import Staging

    return Staging(settings.staging_dir)


def _props_by_feed(settings, feed_ids) -> tuple[dict, dict]:
    from filefeed.context import context_source
    from pipeline.scheduler import _props_by_feed as resolve

    source = context_source(settings)

    async def go():
        try:
            return await resolve(source, feed_ids)
        finally:
            await source.aclose()

    return asyncio.run(go())


def _partitions(settings, feed: str | None) -> list[Partition]:
    from pipeline.scheduler import partitions_with_work

    return [p for p in partitions_with_work(settings.staging_dir) if feed in (None, p.feed_id)]


def _all_partitions(settings, feed: str | None) -> list[Partition]:
    from pipeline.rollover import iter_partitions

    return [p for p in iter_partitions(settings.staging_dir) if feed in (None, p.feed_id)]


@app.command()
def status(feed: Optional[str] = typer.Option(None, help="only this feed"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Feeds and partitions: staged rows and bytes, oldest row, pending and failed rolls, last delivery, disk free."""
    from pipeline.troubleshoot import partition_report

    settings = _settings()
    staging = _staging(settings)
    rows = [dict(feed_id=p.feed_id, **partition_report(staging, p, deliveries=1))
            for p in _all_partitions(settings, feed)]
    root = Path(settings.staging_dir)
    disk_free = None
    if root.exists():
        st = os.statvfs(root)
        disk_free = st.f_bavail * st.f_frsize
    if as_json:
        _print_json({"staging_dir": str(root), "disk_free_bytes": disk_free, "partitions": rows})
        return
    table = Table(title=f"filefeed status: {root}  (disk free: "
                        f"{'-' if disk_free is None else f'{disk_free / 2**30:,.1f} GiB'})")
    for col in ("feed", "segment", "op", "staged rows", "staged bytes", "oldest", "pending", "failed",
                "delivered rows", "last delivery"):
        table.add_column(col, justify="right" if col in ("staged rows", "staged bytes", "delivered rows") else "left")
    for r in rows:
        last = r["last_delivery"]
        age = r["oldest_staged_age_seconds"]
        table.add_row(r["feed_id"], r["segment_id"], r["operation"], f"{r['staged_rows']:,}",
                      f"{r['staged_bytes']:,}", "-" if age is None else f"{age:,.0f}s", str(r["pending_rolls"]),
                      str(len(r["failed_rolls"])), f"{r['delivered_rows']:,}",
                      "-" if not last else f"{last['published_at'][:19]} {last['rows']:,} rows "
                                           f"{(last['files'] or ['-'])[-1]}")
    console.print(table)
    errors = [(r["feed_id"], r["segment_id"], r["operation"], r["last_error"]) for r in rows if r["last_error"]]
    for f, s, o, e in errors:
        console.print(f"[yellow]last error {f}/{s}/{o}: {e.get('error_class')} {e.get('kind')}: "
                      f"{e.get('message')}[/yellow]")


def _read_delivered(path: Path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    name = path.name
    if name.endswith(".parquet"):
        return pq.read_table(path)
    if name.endswith((".csv", ".csv.gz", ".csv.zst")):
        # every column as text: ids keep their leading zeros, hashes stay strings
        names = pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 16)).column_names
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={n: "string" for n in names}))
    raise typer.BadParameter(f"{path}: not a staged segment (.jnl) or a delivered file (.csv[.gz|.zst], .parquet)")


@app.command()
def inspect(target: str = typer.Argument(..., help="a staged .jnl segment, a delivered file, or a feed id"),
            partition: Optional[str] = typer.Option(None, help="SEGMENT_ID/OPERATION, with a feed id"),
            limit: int = typer.Option(20, help="rows to print (0 = all)"),
            as_csv: bool = typer.Option(False, "--csv", help="print CSV instead of a table"),
            as_json: bool = typer.Option(False, "--json", help="print JSON lines")) -> None:
    """Print staged rows (of a segment file or a feed's partitions), or the rows of a delivered local file."""
    from pipeline.model import STAGED_FIELDS
    from pipeline.staging import iter_rows

    path = Path(target)
    header: list[str]
    rows: list[tuple] = []
    if path.is_file():
        if path.suffix == ".jnl":
            header = list(STAGED_FIELDS)
            for r in iter_rows(path):
                rows.append(r)
                if limit and len(rows) >= limit:
                    break
        else:
            table = _read_delivered(path)
            if limit:
                table = table.slice(0, limit)
            header = table.column_names
            rows = [tuple(r.values()) for r in table.to_pylist()]
    else:
        settings = _settings()
        staging = _staging(settings)
        parts = _all_partitions(settings, target)
        if partition:
            seg, _, op = partition.partition("/")
            parts = [p for p in parts if p.segment_id == seg and (not op or p.operation == op.upper())]
        if not parts:
            err.print(f"no staged partition for {target} {partition or ''} in {settings.staging_dir}")
            raise typer.Exit(1)
        header = ["segment_id", "operation", *STAGED_FIELDS]
        for p in parts:
            for seg_path in staging.sealed_segments(p) + staging.open_segments(p):
                for r in iter_rows(seg_path):
                    rows.append((p.segment_id, p.operation, *r))
                    if limit and len(rows) >= limit:
                        break
                if limit and len(rows) >= limit:
                    break
    if as_json:
        for r in rows:
            _print_json(dict(zip(header, r)))
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    else:
        t = Table(*header)
        for r in rows:
            t.add_row(*(str(v) for v in r))
        console.print(t)


@app.command()
def flush(feed: Optional[str] = typer.Option(None, help="only this feed"),
          dry_run: bool = typer.Option(False, "--dry-run", help="show what would be rolled, change nothing"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Roll and publish everything staged now, whatever its age (safe while the server runs)."""
    from pipeline.scheduler import flush as run_flush

    settings = _settings()
    staging = _staging(settings)
    parts = _partitions(settings, feed)
    if dry_run:
        data = [{"partition": str(p), "staged_rows": staging.stats(p).rows} for p in parts]
        if as_json:
            _print_json(data)
        else:
            for d in data:
                console.print(f"would roll {d['partition']}: {d['staged_rows']:,} staged rows")
            console.print(f"{len(data)} partitions, {sum(d['staged_rows'] for d in data):,} rows (dry run)")
        return
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=as_json) as progress:
        task = progress.add_task("flush", total=len(parts))
        report = run_flush(staging, props, parts, progress=lambda p, o: progress.advance(task))
    staging.close()
    data = {"partitions": {str(p): {"status": o.status, "rows": o.rows, "files": list(o.files), "error": o.error}
                           for p, o in report.outcomes.items()},
            "skipped_feeds": {**report.skipped, **problems}, "rows": report.rows, "files": len(report.files)}
    if as_json:
        _print_json(data)
    else:
        for p, o in report.outcomes.items():
            color = {"published": "green", "nothing": "dim"}.get(o.status, "red")
            console.print(f"[{color}]{p}: {o.status}[/{color}] {o.rows:,} rows, {len(o.files)} files"
                          + (f" ({o.error})" if o.error else ""))
            for f in o.files:
                console.print(f"  published {f}")
        for f, why in data["skipped_feeds"].items():
            console.print(f"[red]feed {f} skipped: {why}[/red]")
        console.print(f"flushed {report.rows:,} rows into {len(report.files)} files")
    if report.failed or problems:
        raise typer.Exit(1)


@app.command()
def retry(feed: Optional[str] = typer.Option(None, help="only this feed"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Move failed rolls back to pending and publish them."""
    from pipeline.delivery import POOL
    from pipeline.rollover import failed_rolls, retry_failed

    settings = _settings()
    parts = [p for p in _all_partitions(settings, feed) if failed_rolls(settings.staging_dir, p)]
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    results: dict[str, Any] = {}
    bad = bool(problems)
    for p in parts:
        if p.feed_id not in props:
            continue
        with POOL.sink(props[p.feed_id]) as sink:
            o = retry_failed(settings.staging_dir, p, sink, wait_seconds=30)
        results[str(p)] = {"status": o.status, "rows": o.rows, "files": list(o.files), "error": o.error}
        bad |= o.status not in ("published", "nothing")
    if as_json:
        _print_json({"partitions": results, "skipped_feeds": problems})
    else:
        if not parts:
            console.print("no failed rolls")
        for p, r in results.items():
            console.print(f"{p}: {r['status']} {r['rows']:,} rows {r['files']}" + (f" ({r['error']})" if r["error"]
                                                                                  else ""))
        for f, why in problems.items():
            console.print(f"[red]feed {f} skipped: {why}[/red]")
    if bad:
        raise typer.Exit(1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@app.command()
def verify(feed: Optional[str] = typer.Option(None, help="only this feed"),
           deep: bool = typer.Option(True, help="download each file and compare its sha256 (--no-deep: sizes)"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Compare the ledger and manifests with the destination; exit 1 on any missing file or mismatch."""
    import json

    from pipeline.delivery import POOL
    from pipeline.ledger import Ledger, partition_dir

    settings = _settings()
    parts = _all_partitions(settings, feed)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    problems_out: list[dict[str, Any]] = [{"feed_id": f, "problem": "no configuration", "detail": why}
                                          for f, why in problems.items()]
    checked = 0
    started = time.monotonic()
    for p in parts:
        if p.feed_id not in props:
            continue
        entries = Ledger(partition_dir(settings.staging_dir, p)).entries()
        if not entries:
            continue
        with POOL.sink(props[p.feed_id]) as sink:
            for e in entries:
                files = list(e.files) + ([e.manifest] if e.manifest else [])
                for f in files:
                    checked += 1
                    obj = sink.stat(f["name"])
                    if obj is None:
                        problems_out.append({"partition": str(p), "roll_id": e.roll_id, "name": f["name"],
                                             "problem": "missing"})
                        continue
                    if f.get("bytes") is not None and obj.size != f["bytes"]:
                        problems_out.append({"partition": str(p), "roll_id": e.roll_id, "name": f["name"],
                                             "problem": "size mismatch", "expected": f["bytes"], "found": obj.size})
                        continue
                    if deep and f.get("sha256"):
                        data = sink.read(f["name"])
                        if _sha256(data) != f["sha256"]:
                            problems_out.append({"partition": str(p), "roll_id": e.roll_id, "name": f["name"],
                                                 "problem": "checksum mismatch"})
                        elif f is e.manifest:
                            listed = {x["name"]: x for x in json.loads(data).get("files", [])}
                            for df in e.files:
                                if listed.get(df["name"], {}).get("sha256") != df.get("sha256"):
                                    problems_out.append({"partition": str(p), "roll_id": e.roll_id,
                                                         "name": f["name"],
                                                         "problem": f"manifest disagrees on {df['name']}"})
    result = {"checked": checked, "problems": problems_out, "seconds": round(time.monotonic() - started, 2)}
    if as_json:
        _print_json(result)
    else:
        for pr in problems_out:
            console.print(f"[red]{pr}[/red]")
        console.print(f"verified {checked} files: {len(problems_out)} problems")
    if problems_out:
        raise typer.Exit(1)
