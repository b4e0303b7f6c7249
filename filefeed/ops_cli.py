"""Operator commands on the staging folders and the ledger: status, inspect, flush, retry, verify.

All of them read the server's settings (FILEFEED_STAGING_DIR, FILEFEED_FEEDS or the platform variables) and are safe
while the server runs: reads take no lock, rolls take the partition's lease like the server's own rolls, and the
rows they publish are counted in the running server's /metrics.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import re
import string
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from filefeed.cli import _print_json, _settings, app, console, err
from pipeline.model import Partition

# Tables and file names are not cut at 80 columns when the output goes to a file or a pipe.
out = console if console.is_terminal else Console(width=max(console.width, 200), soft_wrap=True)


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


@app.command()
def status(feed: str | None = typer.Option(None, help="only this feed"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Feeds and partitions: staged rows and bytes, oldest row, pending and failed rolls, last delivery, disk free."""
    from pipeline.troubleshoot import partition_report

    settings = _settings()
    root = Path(settings.staging_dir)
    with _staging(settings) as staging:
        rows = [dict(feed_id=p.feed_id, **partition_report(staging, p, deliveries=1))
                for p in _all_partitions(settings, feed)]
    for r in rows:
        r.pop("recent_deliveries", None)
    disk_free = _disk_free(root)
    if as_json:
        _print_json({"staging_dir": str(root), "disk_free_bytes": disk_free, "partitions": rows,
                     "totals": {k: sum(r[k] for r in rows) for k in ("staged_rows", "staged_bytes", "pending_rolls",
                                                                      "delivered_rows", "delivered_files")}
                     | {"failed_rolls": sum(len(r["failed_rolls"]) for r in rows)}})
        return
    free = "-" if disk_free is None else f"{disk_free / 2**30:,.1f} GiB"
    table = Table(title=f"filefeed status: {escape(str(root))}  (disk free: {free})")
    for col in ("feed", "segment", "op", "staged rows", "staged bytes", "oldest", "pending", "failed",
                "delivered rows", "last delivery (UTC)", "rows", "file"):
        table.add_column(col, justify="right" if col in ("staged rows", "staged bytes", "delivered rows", "rows",
                                                         "pending", "failed") else "left",
                         overflow="fold" if col == "file" else "ellipsis")
    for r in rows:
        last = r["last_delivery"]
        table.add_row(r["feed_id"], r["segment_id"], r["operation"], f"{r['staged_rows']:,}",
                      f"{r['staged_bytes']:,}", _age(r["oldest_staged_age_seconds"]), str(r["pending_rolls"]),
                      str(len(r["failed_rolls"])), f"{r['delivered_rows']:,}",
                      "-" if not last else last["published_at"][:19].replace("T", " "),
                      "-" if not last else f"{last['rows']:,}",
                      "-" if not last else escape((last["files"] or ["-"])[-1]))
    out.print(table)
    if not rows:
        out.print(f"nothing staged or delivered yet in {escape(str(root))}")
    for r in rows:
        where = f"{r['feed_id']}/{r['segment_id']}/{r['operation']}"
        for f in r["failed_rolls"]:
            out.print(f"[red]failed roll {where} {f['roll_id']}: {escape(str(f.get('error_class')))} "
                      f"{escape(str(f.get('kind')))}: {escape(str(f.get('message')))}[/red] (filefeed retry)")
        e = r["last_error"]
        if e:
            out.print(f"[yellow]last error {where} at {escape(str(e.get('time')))}: {escape(str(e.get('error_class')))}"
                      f" {escape(str(e.get('kind')))}: {escape(str(e.get('message')))}[/yellow]")


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


def _segment_rows(path: Path, limit: int, prefix: tuple = ()) -> Iterator[tuple]:
    """Rows of a segment; a segment still being written may end in a torn frame: stop there, quietly."""
    from pipeline.staging import CorruptSegment, iter_rows

    try:
        for r in iter_rows(path):
            yield (*prefix, *r)
    except FileNotFoundError:
        return  # sealed or rolled while we read
    except CorruptSegment as e:
        if path.parent.name != "open":
            err.print(f"[red]{escape(str(e))}[/red]")


@app.command()
def inspect(target: str = typer.Argument(..., help="a staged .jnl segment, a delivered local file, or a feed id"),
            partition: str | None = typer.Option(None, help="SEGMENT_ID or SEGMENT_ID/OPERATION, with a feed id"),
            limit: int = typer.Option(20, help="rows to print (0 = all)"),
            as_csv: bool = typer.Option(False, "--csv", help="print CSV instead of a table"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object per row")) -> None:
    """Print staged rows (of a segment file or a feed's partitions), or the rows of a delivered local file."""
    from pipeline.model import STAGED_FIELDS

    path = Path(target)
    header: list[str]
    rows: list[tuple] = []
    if path.is_file():
        if path.name.endswith(".jnl"):
            header = list(STAGED_FIELDS)
            for r in _segment_rows(path, limit):
                rows.append(r)
                if limit and len(rows) >= limit:
                    break
        else:
            try:
                table = _read_delivered(path)
            except typer.BadParameter:
                raise
            except Exception as e:  # a damaged file: say so, no traceback
                err.print(f"[red]cannot read {escape(str(path))}: {escape(type(e).__name__)}: {escape(str(e))}[/red]")
                raise typer.Exit(1) from None
            total = table.num_rows
            if limit:
                table = table.slice(0, limit)
            header = table.column_names
            rows = [tuple(r.values()) for r in table.to_pylist()]
            if not (as_csv or as_json):
                err.print(f"{escape(str(path))}: {total:,} rows, columns {', '.join(header)}")
    else:
        if os.sep in target or target.endswith((".jnl", ".csv", ".gz", ".zst", ".parquet")):
            err.print(f"[red]no such file: {escape(target)}[/red]")
            raise typer.Exit(1)
        settings = _settings()
        parts = _all_partitions(settings, target)
        if partition:
            seg, _, op = partition.partition("/")
            parts = [p for p in parts if p.segment_id == seg and (not op or p.operation == op.upper())]
        if not parts:
            err.print(f"[red]no partition for feed {escape(target)} {escape(partition or '')} in "
                      f"{escape(str(settings.staging_dir))}[/red]")
            raise typer.Exit(1)
        header = ["segment_id", "operation", *STAGED_FIELDS]
        with _staging(settings) as staging:
            for p in parts:
                for seg_path in staging.sealed_segments(p) + staging.open_segments(p):
                    for r in _segment_rows(seg_path, limit, (p.segment_id, p.operation)):
                        rows.append(r)
                        if limit and len(rows) >= limit:
                            break
                    if limit and len(rows) >= limit:
                        break
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(dict(zip(header, r, strict=False)), default=str) + "\n")
    elif as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    else:
        t = Table(*header)
        for r in rows:
            t.add_row(*(escape(str(v)) for v in r))
        out.print(t)


@app.command()
def flush(feed: str | None = typer.Option(None, help="only this feed"),
          dry_run: bool = typer.Option(False, "--dry-run", help="show what would be rolled, change nothing"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Roll and publish everything staged now, whatever its age (safe while the server runs). Exit 1 if a roll
    failed or a feed has no valid configuration."""
    settings = _settings()
    parts = _partitions(settings, feed)
    if dry_run:
        from pipeline.rollover import failed_rolls, pending_rolls

        with _staging(settings) as staging:
            data = [{"partition": str(p), "staged_rows": staging.stats(p).rows,
                     "pending_rolls": len(pending_rolls(settings.staging_dir, p)),
                     "failed_rolls": len(failed_rolls(settings.staging_dir, p))} for p in parts]
        if as_json:
            _print_json({"dry_run": True, "partitions": data, "rows": sum(d["staged_rows"] for d in data)})
        else:
            for d in data:
                out.print(f"would roll {d['partition']}: {d['staged_rows']:,} staged rows"
                          + (f", resume {d['pending_rolls']} pending rolls" if d["pending_rolls"] else "")
                          + (f" ({d['failed_rolls']} failed rolls wait for `filefeed retry`)" if d["failed_rolls"]
                             else ""))
            out.print(f"{len(data)} partitions, {sum(d['staged_rows'] for d in data):,} rows (dry run: nothing "
                      "changed)")
        return
    from filefeed import metrics
    from pipeline.scheduler import flush as run_flush

    metrics.join_multiprocess_dir(settings.staging_dir)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    with _staging(settings) as staging, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, disable=as_json) as progress:
        task = progress.add_task("flush", total=len(parts))

        def advance(p: Partition, o: Any) -> None:
            progress.update(task, advance=1, description=f"flush {p}")

        report = run_flush(staging, props, parts, progress=advance)
    skipped = {**report.skipped, **problems}
    data = {"partitions": {str(p): {"status": o.status, "rows": o.rows, "files": list(o.files), "error": o.error,
                                    "error_kind": o.error_kind}
                           for p, o in report.outcomes.items()},
            "skipped_feeds": skipped, "rows": report.rows, "files": len(report.files)}
    if as_json:
        _print_json(data)
    else:
        for p, o in report.outcomes.items():
            color = {"published": "green", "nothing": "dim"}.get(o.status, "red")
            out.print(f"[{color}]{p}: {o.status}[/{color}] {o.rows:,} rows, {len(o.files)} files"
                      + (f" ({escape(str(o.error_kind))}: {escape(o.error)})" if o.error else ""))
            for f in o.files:
                out.print(f"  published {escape(f)}")
        for f, why in skipped.items():
            out.print(f"[red]feed {escape(f)} skipped: {escape(why)}[/red]")
        out.print(f"flushed {report.rows:,} rows into {len(report.files)} files")
    if report.failed or problems:
        raise typer.Exit(1)


@app.command()
def retry(feed: str | None = typer.Option(None, help="only this feed"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Move failed rolls back to pending and publish them. Exit 1 if one fails again (it goes back to failed/)."""
    from filefeed import metrics
    from pipeline.delivery import POOL
    from pipeline.rollover import RollOutcome, failed_rolls, retry_failed
    from sinks import SinkError

    settings = _settings()
    parts = [p for p in _all_partitions(settings, feed) if failed_rolls(settings.staging_dir, p)]
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
                o = retry_failed(settings.staging_dir, p, sink, wait_seconds=30)
        except SinkError as e:
            o = RollOutcome(status="transient" if e.transient else "terminal", error=str(e), error_kind=e.kind)
        metrics.observe_roll(props[p.feed_id].destination.scheme, o, time.perf_counter() - started, 0)
        results[str(p)] = {"status": o.status, "rows": o.rows, "files": list(o.files), "error": o.error,
                           "error_kind": o.error_kind}
        bad |= o.status not in ("published", "nothing")
    POOL.close()
    if as_json:
        _print_json({"partitions": results, "skipped_feeds": problems})
    else:
        if not parts:
            out.print("no failed rolls")
        for p, r in results.items():
            color = "green" if r["status"] in ("published", "nothing") else "red"
            out.print(f"[{color}]{p}: {r['status']}[/{color}] {r['rows']:,} rows, {len(r['files'])} files"
                      + (f" ({escape(str(r['error_kind']))}: {escape(r['error'])})" if r["error"] else ""))
            for f in r["files"]:
                out.print(f"  published {escape(f)}")
        for f, why in problems.items():
            out.print(f"[red]feed {escape(f)} skipped: {escape(why)}[/red]")
    if bad:
        raise typer.Exit(1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- verify: the feed's naming, to find objects no ledger entry lists ------------------------------------------------

_BATCH_ID = r"\d{8}T\d{6}-[0-9a-f]{10}"
_PREFIX_MACROS = ("feed_id", "segment_id")  # fixed per partition: they may narrow the listing


def _macro_pattern(field: str, feed_id: str, segments: list[str]) -> str:
    return {
        "feed_id": re.escape(feed_id),
        "segment_id": "(?:" + "|".join(re.escape(s) for s in segments) + ")" if segments else r"[A-Za-z0-9_-]+",
        "operation": "(?:UPSERT|DELETE)",
        "datamart_id": r"[A-Za-z0-9_.-]+",
        "date": r"\d{8}",
        "time": r"\d{6}",
        "batch_id": _BATCH_ID,
        "part": r"\d+",
        "ext": r"[A-Za-z0-9.]+",
        "format": "(?:csv|parquet)",
    }.get(field, r"[^/]+")


def naming_pattern(template: str, feed_id: str, segments: list[str]) -> re.Pattern[str]:
    """A regex matching the data files and manifests this template renders for the feed's segments."""
    parts: list[str] = []
    for literal, field, spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"[^/]+?" if spec else _macro_pattern(field, feed_id, segments))
    data = "".join(parts)
    folder_t = template.rpartition("/")[0]
    folder = ""
    if folder_t:
        fparts = []
        for literal, field, spec, _conv in string.Formatter().parse(folder_t):
            fparts.append(re.escape(literal))
            if field is not None:
                fparts.append(r"[^/]+?" if spec else _macro_pattern(field, feed_id, segments))
        folder = "".join(fparts) + "/"
    return re.compile(f"(?:{data}|{folder}{_BATCH_ID}\\.manifest\\.json)")


def listing_prefixes(template: str, feed_id: str, segments: list[str]) -> list[str]:
    """Where to list: the template's leading literals and feed/segment macros, one prefix per segment."""
    out = set()
    for seg in segments or [""]:
        prefix = []
        for literal, field, spec, _conv in string.Formatter().parse(template):
            prefix.append(literal)
            if field is None:
                continue
            if field in _PREFIX_MACROS and not spec and (field != "segment_id" or seg):
                prefix.append(feed_id if field == "feed_id" else seg)
                continue
            break
        out.add("".join(prefix))
    # a prefix inside another is listed with it
    return sorted(p for p in out if not any(q != p and p.startswith(q) for q in out))


def _known_names(root: Path, partitions: list[Partition]) -> tuple[set[str], set[str]]:
    """(names the ledgers list, names of rolls in flight: rolling/ or failed/). In-flight first: a roll moves from
    rolling/ to the ledger, never back, so reading in this order never misses one that moves meanwhile."""
    from pipeline.ledger import FAILED, ROLLING, Ledger, partition_dir, read_json

    in_flight: set[str] = set()
    listed: set[str] = set()
    for p in partitions:
        pdir = partition_dir(root, p)
        for state in (ROLLING, FAILED):
            try:
                rolls = os.listdir(pdir / state)
            except FileNotFoundError:
                continue
            for roll in rolls:
                try:
                    enc = read_json(pdir / state / roll / "encoded.json")
                except (OSError, ValueError):
                    continue
                in_flight.update(f["name"] for f in enc.get("files", []))
                if enc.get("manifest"):
                    in_flight.add(enc["manifest"]["name"])
    for p in partitions:
        for e in Ledger(partition_dir(root, p)).entries():
            listed.update(f["name"] for f in e.files)
            if e.manifest:
                listed.add(e.manifest["name"])
    return listed, in_flight


@app.command()
def verify(feed: str | None = typer.Option(None, help="only this feed"),
           deep: bool = typer.Option(True, help="download each file and compare its sha256 (--no-deep: sizes)"),
           allow_extra: bool = typer.Option(False, "--allow-extra",
                                            help="report extra objects without failing the exit code"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Compare the ledger and manifests with the destination.

    Problems: missing (a file the ledger lists is not at the destination), size mismatch, checksum mismatch, manifest disagreement, extra (an object named like this feed's files, by its file_name_template and segments or as a batch manifest, that no ledger entry lists and no roll in progress or in failed/ holds), unreachable destination, feed without configuration.

    Exit code 0: no problem. Exit code 1: any problem, extra objects included, because under the feed's own naming an unlisted object is a duplicate publish or a lost (or pruned) ledger entry that an operator must look at. With --allow-extra, extras are reported but do not fail (a destination shared with another feed with the same template and segments, or ledger entries pruned on purpose).
    """
    from pipeline.delivery import POOL
    from pipeline.ledger import Ledger, partition_dir
    from sinks import SinkError

    settings = _settings()
    root = Path(settings.staging_dir)
    parts = _all_partitions(settings, feed)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    found: list[dict[str, Any]] = [{"feed_id": f, "problem": "no configuration", "detail": why}
                                   for f, why in problems.items()]
    checked = 0
    listed_objects = 0
    started = time.monotonic()
    by_feed: dict[str, list[Partition]] = {}
    for p in parts:
        by_feed.setdefault(p.feed_id, []).append(p)
    for feed_id, fparts in sorted(by_feed.items()):
        if feed_id not in props:
            continue
        fprops = props[feed_id]
        try:
            with POOL.sink(fprops) as sink:
                for p in fparts:
                    for e in Ledger(partition_dir(root, p)).entries():
                        files = list(e.files) + ([e.manifest] if e.manifest else [])
                        for f in files:
                            checked += 1
                            where = {"feed_id": feed_id, "partition": str(p), "roll_id": e.roll_id,
                                     "name": f["name"]}
                            obj = sink.stat(f["name"])
                            if obj is None:
                                found.append({**where, "problem": "missing"})
                                continue
                            if f.get("bytes") is not None and obj.size != f["bytes"]:
                                found.append({**where, "problem": "size mismatch", "expected": f["bytes"],
                                              "found": obj.size})
                                continue
                            if not (deep and f.get("sha256")):
                                continue
                            data = sink.read(f["name"])
                            if _sha256(data) != f["sha256"]:
                                found.append({**where, "problem": "checksum mismatch"})
                            elif f is e.manifest:
                                try:
                                    listed = {x["name"]: x for x in json.loads(data).get("files", [])}
                                except (ValueError, AttributeError, KeyError, TypeError):
                                    listed = {}
                                for df in e.files:
                                    if listed.get(df["name"], {}).get("sha256") != df.get("sha256"):
                                        found.append({**where, "problem": f"manifest disagrees on {df['name']}"})
                # extra: objects under the feed's naming that no ledger entry lists
                segments = sorted({p.segment_id for p in fparts})
                pattern = naming_pattern(fprops.file_name_template, feed_id, segments)
                known, in_flight = _known_names(root, fparts)
                candidates: dict[str, int] = {}
                for prefix in listing_prefixes(fprops.file_name_template, feed_id, segments):
                    for obj in sink.list(prefix):
                        listed_objects += 1
                        if obj.name not in known and obj.name not in in_flight and pattern.fullmatch(obj.name):
                            candidates[obj.name] = obj.size
                if candidates:  # rolls may have finished while we listed: look at the ledger again
                    known, in_flight = _known_names(root, fparts)
                for name, size in sorted(candidates.items()):
                    if name not in known and name not in in_flight:
                        found.append({"feed_id": feed_id, "name": name, "problem": "extra", "found": size})
        except SinkError as e:
            found.append({"feed_id": feed_id, "problem": "destination unreachable", "detail": str(e),
                          "kind": e.kind})
    POOL.close()
    failing = [f for f in found if not (allow_extra and f["problem"] == "extra")]
    result = {"checked": checked, "listed": listed_objects, "problems": found, "ok": not failing,
              "seconds": round(time.monotonic() - started, 2)}
    if as_json:
        _print_json(result)
    else:
        for pr in found:
            color = "red" if pr in failing else "yellow"
            name = pr.get("name") or pr.get("feed_id")
            detail = {k: v for k, v in pr.items() if k not in ("problem", "name")}
            out.print(f"[{color}]{escape(pr['problem'])}: {escape(str(name))}[/{color}] {escape(str(detail))}")
        out.print(f"verified {checked} files ({listed_objects} objects listed): {len(found)} problems"
                  + (" (extras allowed)" if allow_extra and len(failing) != len(found) else ""))
    if failing:
        raise typer.Exit(1)
