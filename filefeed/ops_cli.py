"""Operator commands on the staging folders and the ledger: status, inspect, flush, retry, verify.

All of them read the server's settings (FILEFEED_STAGING_DIR, FILEFEED_FEEDS or the platform variables) and are safe
while the server runs: reads take no lock, rolls take the partition's lease like the server's own rolls, and the
rows they publish are counted in the running server's /metrics.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from filefeed.cli_base import (
    EXIT_CONFIG,
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    OperatorError,
    app,
    err,
    out,
    plural,
    print_json,
)
from filefeed.cli_base import settings as checked_settings

if TYPE_CHECKING:  # the command line starts without pyarrow; the commands that need it import it
    from pipeline.model import Partition


@contextmanager
def _staging(settings) -> Iterator[Any]:  # read-side Staging: no recovery, no writer files until an append
    from pipeline.staging import Staging

    staging = Staging(settings.staging_dir)
    try:
        yield staging
    finally:
        staging.close()


def _props_by_feed(settings, feed_ids) -> tuple[dict, dict]:
    from filefeed.context import context_source
    from pipeline.scheduler import _props_by_feed as resolve

    if not feed_ids:
        return {}, {}
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


def _disk_free(root: Path) -> int | None:
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _label(error: dict[str, Any]) -> str:
    """One label per error, whichever record it comes from: `terminal not_found`, `transient network`."""
    return f"{error.get('severity') or 'error'} {error.get('kind') or 'unknown'}"


def error_line(where: str, error: dict[str, Any], fix: str) -> str:
    return f"{where}: {_label(error)}: {error.get('message')} -> {fix}"


def _when(iso: str | None) -> str:
    return "-" if not iso else iso[:16].replace("T", " ")


# The compact set fits 80 columns with 7-digit row counts and 20-character partitions; --wide has every column.
_COMPACT = ("partition", "staged rows", "oldest staged", "pending rolls", "failed rolls", "delivered rows",
            "last delivery")
_WIDE = ("partition", "staged rows", "staged bytes", "oldest staged", "pending rolls", "failed rolls",
         "delivered rows", "delivered files", "delivered bytes", "last delivery (UTC)", "rows in last delivery",
         "last file")
_NUMERIC = {"staged rows", "staged bytes", "pending rolls", "failed rolls", "delivered rows", "delivered files",
            "delivered bytes", "rows in last delivery"}


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso[:16]
    return _age(max(0.0, time.time() - then.timestamp())) + " ago"


def _cells(r: dict[str, Any]) -> dict[str, str]:
    last = r["last_delivery"]
    return {
        "partition": f"{r['feed_id']}/{r['segment_id']}/{r['operation']}",
        "staged rows": f"{r['staged_rows']:,}", "staged bytes": f"{r['staged_bytes']:,}",
        "oldest staged": _age(r["oldest_staged_age_seconds"]), "pending rolls": str(r["pending_rolls"]),
        "failed rolls": str(len(r["failed_rolls"])), "delivered rows": f"{r['delivered_rows']:,}",
        "delivered files": f"{r['delivered_files']:,}", "delivered bytes": f"{r.get('delivered_bytes', 0):,}",
        "last delivery": _ago(last and last["published_at"]),
        "last delivery (UTC)": _when(last and last["published_at"]),
        "rows in last delivery": "-" if not last else f"{last['rows']:,}",
        "last file": "-" if not last else (last["files"] or ["-"])[-1],
    }


def status_table(rows: list[dict[str, Any]], wide: bool) -> Table:
    """The partitions as a table whose cells are never cut: each column is at least as wide as its longest cell;
    headers take two lines instead."""
    columns = _WIDE if wide else _COMPACT
    cells = [_cells(r) for r in rows]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in columns:
        longest = max([len(c[col]) for c in cells] + [max(len(w) for w in col.split())])
        table.add_column(col.replace(" ", "\n", 1), justify="right" if col in _NUMERIC else "left",
                         min_width=longest, no_wrap=True)
    for c in cells:
        table.add_row(*(escape(c[col]) for col in columns))
    return table


@app.command()
def status(feed: str | None = typer.Option(None, help="only this feed"),
           wide: bool = typer.Option(False, "--wide", help="every column: bytes, files, the last file's name"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Feeds and partitions: rows staged and waiting, the oldest of them, rolls pending or failed, rows delivered
    (all time), the last delivery; then each error once, with the command that fixes it."""
    from pipeline.troubleshoot import partition_report

    settings = checked_settings()
    root = Path(settings.staging_dir)
    with _staging(settings) as staging:
        rows = [dict(feed_id=p.feed_id, **partition_report(staging, p, deliveries=1))
                for p in _all_partitions(settings, feed)]
    for r in rows:
        r.pop("recent_deliveries", None)
    disk_free = _disk_free(root)
    if as_json:
        print_json({"staging_dir": str(root), "disk_free_bytes": disk_free, "partitions": rows,
                    "totals": {k: sum(r[k] for r in rows) for k in ("staged_rows", "staged_bytes", "pending_rolls",
                                                                     "delivered_rows", "delivered_files")}
                    | {"failed_rolls": sum(len(r["failed_rolls"]) for r in rows)}})
        return
    free = "-" if disk_free is None else f"{disk_free / 2**30:,.1f} GiB"
    if not rows:
        out.print(f"nothing staged or delivered yet in {escape(str(root.resolve()))} (disk free {free})",
                  soft_wrap=True)
        return
    out.print(f"[bold]filefeed status[/bold]: {escape(str(root.resolve()))} (disk free {free})", soft_wrap=True)
    # --wide is every column whatever the terminal's width: the terminal wraps the lines, no cell is cut
    (Console(width=10_000, highlight=False, force_terminal=out.is_terminal) if wide else out).print(
        status_table(rows, wide))
    for r in rows:
        where, feed_id = f"{r['feed_id']}/{r['segment_id']}/{r['operation']}", r["feed_id"]
        for f in r["failed_rolls"]:
            line = error_line(f"failed roll {where} {f['roll_id']}", f,
                              f"fix the cause, then `filefeed retry --feed {feed_id}`")
            out.print(f"[red]{escape(line)}[/red]", soft_wrap=True)
        if r.get("rejected_rows"):
            out.print(f"[yellow]{escape(where)}: {r['rejected_rows']:,} rows set aside (they cannot be encoded), "
                      f"listed in {escape(', '.join(r['rejected_reports']))}[/yellow]", soft_wrap=True)
        e = r["last_error"]
        if e and not r["failed_rolls"]:  # a failed roll already says it
            line = error_line(f"last error {where} at {_when(e.get('time'))}", e,
                              f"the next roll retries it; `filefeed flush --feed {feed_id}` tries now")
            out.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True)


def _segment_rows(path: Path, limit: int, prefix: tuple = (), partition: Partition | None = None) -> Iterator[tuple]:
    """Rows of a segment (of a writer journal: `partition`'s, or all); one being written may end in a torn frame:
    stop there, quietly."""
    from pipeline.staging import CorruptSegment, iter_rows

    try:
        for r in iter_rows(path, partition):
            yield (*prefix, *r)
    except FileNotFoundError:
        return  # sealed or rolled while we read
    except CorruptSegment as e:
        if path.parent.name != "open":
            err.print(f"[red]{escape(str(e))}[/red]")


def _delivered_rows(open_stream: Any, shown: str, name: str, limit: int) -> tuple[list[str], list[tuple],
                                                                                  int | None]:
    from filefeed.remote import read_rows
    from sinks import SinkError

    try:
        with open_stream() as stream:
            return read_rows(stream, name, limit)
    except SinkError as e:
        raise OperatorError(f"filefeed inspect: {e} ({e.kind})", code=EXIT_ENVIRONMENT) from None
    except ValueError as e:
        raise OperatorError(f"filefeed inspect: {e}") from None
    except Exception as e:  # a damaged file: say so, no traceback
        raise OperatorError(f"filefeed inspect: cannot read {shown}: {type(e).__name__}: {e}",
                            code=EXIT_FAILED) from None


def _remote_delivered(settings: Any, url: str, feed: str | None) -> tuple[Any, str]:
    """(opener, object name) of a delivered object by URL, with the credentials of `feed` or of the feed whose
    destination_uri holds the URL."""
    from filefeed.remote import feed_for_url, name_in, open_delivered
    from pipeline.delivery import POOL

    feed_ids = {feed} if feed else {p.feed_id for p in _all_partitions(settings, None)} | _declared_feeds(settings)
    props, problems = _props_by_feed(settings, feed_ids)
    if feed:
        if feed not in props:
            raise OperatorError(f"filefeed inspect: feed {feed}: {problems.get(feed, 'no configuration')}")
        name = name_in(props[feed].destination, url)
        if name is None:
            raise OperatorError(f"filefeed inspect: {url} is not under feed {feed}'s destination_uri "
                                f"{props[feed].destination}")
        hit = (feed, name)
    else:
        found = feed_for_url(url, props)
        if found is None:
            raise OperatorError(f"filefeed inspect: no feed's destination_uri holds {url}",
                                "  (name the feed with --feed ID; feeds known here: "
                                + (", ".join(sorted(props)) or "none") + ")")
        hit = found
    fprops = props[hit[0]]

    @contextmanager
    def opener() -> Iterator[Any]:
        with POOL.sink(fprops) as sink, open_delivered(sink, hit[1]) as stream:
            yield stream

    return opener, hit[1]


def _declared_feeds(settings: Any) -> set[str]:
    if settings.feeds is None:
        return set()
    from filefeed.context import load_embedded_feeds

    return set(load_embedded_feeds(settings.feeds))


@app.command()
def inspect(target: str = typer.Argument(..., help="a staged .jnl segment (a path, or relative to the staging "
                                                     "folder), a delivered file (local path, s3://, gs://, sftp://), "
                                                     "or a feed id"),
            partition: str | None = typer.Option(None, help="SEGMENT_ID or SEGMENT_ID/OPERATION, with a feed id"),
            feed: str | None = typer.Option(None, help="the feed whose credentials read a remote URL (default: the "
                                                       "feed whose destination_uri holds it)"),
            limit: int = typer.Option(20, help="rows to print (0 = all)"),
            as_csv: bool = typer.Option(False, "--csv", help="print CSV instead of a table"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object per row")) -> None:
    """Print staged rows (of a segment file or a feed's partitions), or the rows of a delivered file, local or at
    its destination."""
    from pipeline.model import STAGED_FIELDS

    header: list[str]
    rows: list[tuple] = []
    total: int | None = None
    path = Path(target)
    if "://" in target:
        settings = checked_settings()
        opener, name = _remote_delivered(settings, target, feed)
        header, rows, total = _delivered_rows(opener, target, name, limit)
    else:
        if not path.is_file() and not path.is_absolute():
            settings = checked_settings()
            if (settings.staging_dir / target).is_file():  # as the README writes it: relative to the staging folder
                path = settings.staging_dir / target
        if path.is_file() and path.name.endswith(".jnl"):
            header = list(STAGED_FIELDS)
            for r in _segment_rows(path, limit):
                rows.append(r)
                if limit and len(rows) >= limit:
                    break
        elif path.is_file():
            from filefeed.remote import open_local

            header, rows, total = _delivered_rows(lambda: open_local(str(path)), str(path), path.name, limit)
        elif os.sep in target or target.endswith((".jnl", ".csv", ".gz", ".zst", ".parquet")):
            raise OperatorError(f"filefeed inspect: no such file: {target} (looked here and in the staging "
                                "folder, FILEFEED_STAGING_DIR)", code=EXIT_CONFIG)
        else:
            header, rows = _staged_rows(target, partition, limit)
    if total is not None and not (as_csv or as_json):
        err.print(f"{escape(target)}: {plural(total, 'row')}, columns {', '.join(header)}")
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(dict(zip(header, r, strict=False)), default=str) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    else:
        t = Table(*header, box=box.SIMPLE_HEAD, pad_edge=False)
        for r in rows:
            t.add_row(*(escape(str(v)) for v in r))
        out.print(t)


def _staged_rows(feed_id: str, partition: str | None, limit: int) -> tuple[list[str], list[tuple]]:
    from pipeline.model import STAGED_FIELDS

    settings = checked_settings()
    parts = _all_partitions(settings, feed_id)
    if partition:
        seg, _, op = partition.partition("/")
        parts = [p for p in parts if p.segment_id == seg and (not op or p.operation == op.upper())]
    if not parts:
        raise OperatorError(f"filefeed inspect: no partition for feed {feed_id} {partition or ''} in "
                            f"{settings.staging_dir} (FILEFEED_STAGING_DIR)", code=EXIT_FAILED)
    rows: list[tuple] = []
    with _staging(settings) as staging:
        for p in parts:
            for seg_path in staging.sealed_segments(p) + staging.open_segments(p):
                for r in _segment_rows(seg_path, limit, (p.segment_id, p.operation), p):
                    rows.append(r)
                    if limit and len(rows) >= limit:
                        return ["segment_id", "operation", *STAGED_FIELDS], rows
    return ["segment_id", "operation", *STAGED_FIELDS], rows


def _outcome(o: Any) -> dict[str, Any]:
    return {"status": o.status, "rows": o.rows, "files": list(o.files), "error": o.error, "error_kind": o.error_kind}


def _fix(status: str, feed_id: str) -> str:
    if status == "terminal":
        return f"fix the cause, then `filefeed retry --feed {feed_id}`"
    if status == "busy":
        return f"another roll holds the partition; `filefeed flush --feed {feed_id}` again in a moment"
    return f"the rows stay staged; `filefeed flush --feed {feed_id}` again once the destination answers"


def print_outcomes(results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    """One line per partition (and per published file); each failure once, with the command that fixes it."""
    for where, r in results.items():
        feed_id = where.split("/", 1)[0]
        if r["status"] in ("published", "nothing"):
            color = "green" if r["status"] == "published" else "dim"
            out.print(f"[{color}]{escape(where)}: {r['status']}[/{color}] {plural(r['rows'], 'row')}, "
                      f"{plural(len(r['files']), 'file')}")
            for f in r["files"]:
                out.print(f"  published {escape(f)}")
        else:
            line = error_line(where, {"severity": r["status"], "kind": r["error_kind"],
                                      "message": r["error"] or r["status"]}, _fix(r["status"], feed_id))
            out.print(f"[red]{escape(line)}[/red]")
    for f, why in skipped.items():
        out.print(f"[red]feed {escape(f)} skipped: {escape(why)}[/red] -> fix its properties (FILEFEED_FEEDS or the "
                  "platform's feed form)")


@app.command()
def flush(feed: str | None = typer.Option(None, help="only this feed"),
          dry_run: bool = typer.Option(False, "--dry-run", help="show what would be rolled, change nothing"),
          concurrency: int | None = typer.Option(None, "--concurrency", min=1, max=64,
                                                 help="partitions rolled at once (default FILEFEED_FLUSH_CONCURRENCY)"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Roll and publish everything staged now, whatever its age (safe while the server runs). Exit 1 if a roll
    failed or a feed has no valid configuration."""
    started = time.monotonic()
    settings = checked_settings(write=not dry_run, shared=not dry_run)
    concurrency = concurrency or settings.flush_concurrency
    parts = _partitions(settings, feed)
    if dry_run:
        from pipeline.rollover import failed_rolls, pending_rolls

        with _staging(settings) as staging:
            data = [{"partition": str(p), "staged_rows": staging.stats(p).rows,
                     "pending_rolls": len(pending_rolls(settings.staging_dir, p)),
                     "failed_rolls": len(failed_rolls(settings.staging_dir, p))} for p in parts]
        if as_json:
            print_json({"dry_run": True, "partitions": data, "rows": sum(d["staged_rows"] for d in data)})
        else:
            for d in data:
                out.print(f"would roll {d['partition']}: {plural(d['staged_rows'], 'staged row')}"
                          + (f", resume {plural(d['pending_rolls'], 'pending roll')}" if d["pending_rolls"] else "")
                          + (f" ({plural(d['failed_rolls'], 'failed roll')} wait for `filefeed retry`)"
                             if d["failed_rolls"] else ""))
            out.print(f"{plural(len(data), 'partition')}, {plural(sum(d['staged_rows'] for d in data), 'row')} "
                      "(dry run: nothing changed)")
        return
    from filefeed import metrics
    from pipeline.scheduler import flush as run_flush

    metrics.join_multiprocess_dir(settings.staging_dir)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    with _staging(settings) as staging, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, disable=as_json, transient=True) as progress:
        task = progress.add_task("flush", total=len(parts))

        def advance(p: Partition, o: Any) -> None:
            progress.update(task, advance=1, description=f"flush {p}")

        report = run_flush(staging, props, parts, progress=advance, concurrency=concurrency)
    seconds = round(time.monotonic() - started, 2)
    skipped = {**report.skipped, **problems}
    results = {str(p): _outcome(o) for p, o in report.outcomes.items()}
    if as_json:
        print_json({"partitions": results, "skipped_feeds": skipped, "rows": report.rows,
                    "files": len(report.files), "seconds": seconds, "concurrency": concurrency})
    else:
        print_outcomes(results, skipped)
        out.print(f"flushed {plural(report.rows, 'row')} into {plural(len(report.files), 'file')} from "
                  f"{plural(len(report.outcomes), 'partition')} in {seconds:.1f} s ({concurrency} at a time)")
    if report.failed or problems:
        raise typer.Exit(1)


@app.command()
def retry(feed: str | None = typer.Option(None, help="only this feed"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Move failed rolls back to pending and publish them. Exit 1 if one fails again (it goes back to failed/)."""
    from filefeed import metrics
    from pipeline import snapshot
    from pipeline.delivery import POOL, clear_error
    from pipeline.rollover import RollOutcome, failed_rolls, retry_failed
    from sinks import SinkError

    settings = checked_settings(write=True, shared=True)
    parts = [p for p in _all_partitions(settings, feed) if failed_rolls(settings.staging_dir, p)]
    snapshots = snapshot.failed_snapshots(settings.staging_dir, _all_partitions(settings, feed))
    parts += list(snapshots)
    metrics.join_multiprocess_dir(settings.staging_dir)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    results: dict[str, Any] = {}
    bad = bool(problems)
    for p in parts:
        if p.feed_id not in props:
            continue
        started = time.perf_counter()
        try:
            with POOL.sink(props[p.feed_id]) as sink:
                o = retry_failed(settings.staging_dir, p, sink, wait_seconds=30, props=props[p.feed_id],
                                 pdir=snapshots.get(p))
        except SinkError as e:
            o = RollOutcome(status=e.severity, error=str(e), error_kind=e.kind)
        metrics.observe_roll(props[p.feed_id].destination.scheme, o, time.perf_counter() - started, 0)
        if o.status == "published" and not failed_rolls(settings.staging_dir, p):
            clear_error(settings.staging_dir, p)
        results[str(p)] = _outcome(o)
        bad |= o.status not in ("published", "nothing")
    POOL.close()
    if as_json:
        print_json({"partitions": results, "skipped_feeds": problems})
    else:
        if not parts:
            out.print("no failed rolls")
        print_outcomes(results, problems)
    if bad:
        raise typer.Exit(1)
