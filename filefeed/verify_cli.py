"""`filefeed verify`: compare the ledger and manifests with what the destination holds.

Each ledger entry's files are looked up (size), and with --deep (the default) their bytes hashed as they stream
from the destination through smart-open (`filefeed/remote.py`); objects named by the feed's file_name_template
(the grammar of `pipeline/naming.py`) that no ledger entry lists are extras.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from filefeed.cli_base import app, out, plural, print_json
from filefeed.cli_base import settings as checked_settings
from filefeed.ops_cli import _all_partitions, _props_by_feed

if TYPE_CHECKING:  # the command line starts without pyarrow; the commands that need it import it
    from pipeline.model import Partition


_ROLL_TIME = re.compile(r"(\d{8})T(\d{6})")  # {batch_id} starts with the roll's time, as does the default {date}T{time}


def _beyond_retention(name: str, horizon: float) -> bool:
    """The name carries a roll time older than the ledger retention: its entry may have been pruned."""
    m = _ROLL_TIME.search(name.rsplit("/", 1)[-1])
    if m is None:
        return False
    try:
        planned = datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return False
    return planned.timestamp() < horizon


def _prefixes(template: str, feed_id: str, segments: list[str]) -> list[str]:
    """Where to list: one prefix per segment; a prefix inside another is listed with it."""
    from pipeline.naming import listing_prefixes

    found = {p for seg in segments or [""] for p in listing_prefixes(template, {"feed_id": feed_id,
                                                                               "segment_id": seg})}
    return sorted(p for p in found if not any(q != p and p.startswith(q) for q in found))


def problem_line(pr: dict[str, Any]) -> str:
    """One readable line per problem: what, which object (feed, partition, roll), the figures."""
    where = ", ".join(f"{k} {pr[k]}" for k in ("feed_id", "partition", "roll_id") if pr.get(k))
    where = where.replace("feed_id", "feed").replace("roll_id", "roll")
    name = pr.get("name")
    head = f"{pr['problem']}: {name} ({where})" if name else f"{pr['problem']}: {where}"
    if pr["problem"] == "size mismatch":
        return f"{head}: the ledger says {pr['expected']:,} bytes, the destination holds {pr['found']:,}"
    if pr["problem"] == "extra":
        return (f"{head}: {pr['found']:,} bytes that no ledger entry lists (a duplicate publish or a lost ledger "
                "entry: look at it; --allow-extra if another writer shares the destination)")
    if pr["problem"] == "leftover":
        return (f"{head}: an unfinished upload {pr['age_seconds']:,} s old (a crash mid-publish); the next roll to "
                "this destination removes it")
    if pr["problem"] == "destination unreachable":
        return f"{head}: {pr.get('detail')} ({pr.get('kind')})"
    if pr.get("detail"):
        return f"{head}: {pr['detail']}"
    return head


def _known_names(root: Path, partitions: list[Partition]) -> tuple[set[str], set[str]]:
    """(names the ledgers list, names of rolls in flight: rolling/ or failed/). In-flight first: a roll moves from
    rolling/ to the ledger, never back, so reading in this order never misses one that moves meanwhile."""
    from pipeline.ledger import FAILED, ROLLING, Ledger, read_json
    from pipeline.snapshot import delivery_dirs

    in_flight: set[str] = set()
    listed: set[str] = set()
    for pdir in (d for p in partitions for d in delivery_dirs(root, p)):
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
    for pdir in (d for p in partitions for d in delivery_dirs(root, p)):
        for e in Ledger(pdir).entries():
            listed.update(f["name"] for f in e.files)
            if e.manifest:
                listed.add(e.manifest["name"])
    return listed, in_flight


def _segments_published_twice(entries: list) -> dict[str, list[str]]:
    """Segments two ledger entries list: their rows reached the destination twice (cheap: ledger metadata only)."""
    by_segment: dict[str, list[str]] = {}
    for e in entries:
        for seg in e.segments:
            by_segment.setdefault(seg, []).append(e.roll_id)
    return {seg: rolls for seg, rolls in by_segment.items() if len(rolls) > 1}


@app.command()
def verify(feed: str | None = typer.Option(None, help="only this feed"),
           deep: bool = typer.Option(True, help="download each file and compare its sha256 (--no-deep: sizes)"),
           allow_extra: bool = typer.Option(False, "--allow-extra",
                                            help="report extra objects without failing the exit code"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Compare the ledger and manifests with the destination.

    Problems: duplicate publish (two ledger entries list the same staged segment: its rows were delivered twice), missing (a file the ledger lists is not at the destination), size mismatch, checksum mismatch, manifest disagreement, extra (an object named like this feed's files, by its file_name_template and segments or as a batch manifest, that no ledger entry lists and no roll in progress or in failed/ holds), leftover (a temp file or incomplete multipart upload of the feed's naming older than FILEFEED_LEFTOVER_AGE_SECONDS: a crash mid-upload; the next roll to the destination removes it), unreachable destination, feed without configuration.

    Exit code 0: no problem. Exit code 1: any problem, extra objects included, because under the feed's own naming an unlisted object is a duplicate publish or a lost ledger entry that an operator must look at. An unlisted object whose name carries a roll time older than the ledger retention (FILEFEED_LEDGER_RETENTION_DAYS) is counted as "beyond retention", not as extra: its entry was pruned. With --allow-extra, extras are reported but do not fail (a destination shared with another feed with the same template and segments).
    """
    from filefeed.remote import sha256_of
    from pipeline import ledger
    from pipeline.delivery import POOL, find_leftovers
    from pipeline.ledger import Ledger
    from pipeline.naming import name_pattern
    from pipeline.snapshot import delivery_dirs
    from sinks import SinkError

    settings = checked_settings()
    root = Path(settings.staging_dir)
    parts = _all_partitions(settings, feed)
    props, problems = _props_by_feed(settings, {p.feed_id for p in parts})
    found: list[dict[str, Any]] = [{"feed_id": f, "problem": "no configuration", "detail": why}
                                   for f, why in problems.items()]
    checked = 0
    listed_objects = 0
    beyond_retention = 0
    horizon = time.time() - ledger.retention_seconds()
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
                for p, pdir in ((part, d) for part in fparts for d in delivery_dirs(root, part)):
                    entries = Ledger(pdir).entries()
                    found.extend({"feed_id": feed_id, "partition": str(p), "name": seg, "problem": "duplicate publish",
                                  "detail": f"rows of segment {seg} were published by rolls {', '.join(rolls)}"}
                                 for seg, rolls in _segments_published_twice(entries).items())
                    for e in entries:
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
                            if f is e.manifest:  # small: read whole, its listing is checked too
                                data = sink.read(f["name"])
                                digest = hashlib.sha256(data).hexdigest()
                            else:  # streamed through smart-open, never whole in memory
                                digest = sha256_of(sink, f["name"])
                            if digest != f["sha256"]:
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
                template = fprops.file_name_template
                pattern = name_pattern(template, {"feed_id": [feed_id], "segment_id": segments})
                known, in_flight = _known_names(root, fparts)
                candidates: dict[str, int] = {}
                for prefix in _prefixes(template, feed_id, segments):
                    for obj in sink.list(prefix):
                        listed_objects += 1
                        if obj.name not in known and obj.name not in in_flight and pattern.fullmatch(obj.name):
                            candidates[obj.name] = obj.size
                if candidates:  # rolls may have finished while we listed: look at the ledger again
                    known, in_flight = _known_names(root, fparts)
                for name, size in sorted(candidates.items()):
                    if name in known or name in in_flight:
                        continue
                    if _beyond_retention(name, horizon):
                        beyond_retention += 1  # its ledger entry may have been pruned: nothing to compare with
                        continue
                    found.append({"feed_id": feed_id, "name": name, "problem": "extra", "found": size})
                # leftovers: temp files and incomplete uploads of the feed's naming that a crash left behind
                for lo in find_leftovers(sink, root, feed_id, fprops, settings.leftover_age_seconds):
                    found.append({"feed_id": feed_id, "name": lo.name, "problem": "leftover",
                                  "age_seconds": round(lo.age_seconds)})
        except SinkError as e:
            found.append({"feed_id": feed_id, "problem": "destination unreachable", "detail": str(e),
                          "kind": e.kind})
    POOL.close()
    failing = [f for f in found if not (allow_extra and f["problem"] == "extra")]
    result = {"checked": checked, "listed": listed_objects, "beyond_retention": beyond_retention,
              "problems": found, "ok": not failing,
              "seconds": round(time.monotonic() - started, 2)}
    if as_json:
        print_json(result)
    else:
        for pr in found:
            color = "red" if pr in failing else "yellow"
            out.print(f"[{color}]{escape(problem_line(pr))}[/{color}]")
        out.print(f"verified {plural(checked, 'file')} ({plural(listed_objects, 'object')} listed"
                  + (f", {beyond_retention} older than the ledger retention not compared" if beyond_retention else "")
                  + "): "
                  f"{plural(len(found), 'problem')}"
                  + (" (extras allowed)" if allow_extra and len(failing) != len(found) else ""))
    if failing:
        raise typer.Exit(1)
