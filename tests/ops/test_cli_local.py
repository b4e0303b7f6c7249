"""The operator commands on a real staging folder filled by a real server (2 workers), local destinations."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from tests.conftest import wait_for
from tests.ops.helpers import (
    FEED,
    SEGMENT,
    cli,
    cli_json,
    data_files,
    read_rows,
    scrape,
    send_batch,
    send_users,
    total,
    troubleshoot,
)


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under the roots (the server's run/ folder aside) with size and mtime."""
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if "run" in p.relative_to(root).parts[:1]:
                continue
            st = p.stat()
            out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _keys(rows, op_key="operation") -> Counter:
    return Counter((r["identifier_type"], str(r["identifier"]), r.get(op_key)) for r in rows)


def _partition(status: dict, feed: str, op: str) -> dict:
    return next(p for p in status["partitions"] if p["feed_id"] == feed and p["operation"] == op)


def test_status_inspect_flush_verify(tmp_path, filefeed_factory):
    csv_out, pq_out = tmp_path / "csv-out", tmp_path / "parquet-out"
    srv = filefeed_factory(workers=2, feeds={
        FEED: {"destination_uri": csv_out.as_uri()},
        "43": {"destination_uri": pq_out.as_uri(), "file_format": "parquet", "max_rows_per_file": 25}})
    upserts = send_users(srv, range(0, 20))
    deletes = send_users(srv, range(20, 30), op="DELETE")
    parquet_items = send_users(srv, range(40, 52), feed="43")
    staging = srv.staging

    # status while rows are staged: exactly what the server acknowledged
    st = cli_json(srv.env, "status")
    assert _partition(st, FEED, "UPSERT")["staged_rows"] == len(upserts)
    assert _partition(st, FEED, "DELETE")["staged_rows"] == len(deletes)
    assert _partition(st, "43", "UPSERT")["staged_rows"] == len(parquet_items)
    assert st["totals"]["staged_rows"] == len(upserts) + len(deletes) + len(parquet_items)
    assert st["disk_free_bytes"] > 0 and all(p["delivered_rows"] == 0 for p in st["partitions"])
    text = cli(srv.env, "status")
    assert text.returncode == 0 and "451256" in text.stdout and f"{len(upserts)}" in text.stdout

    # every writer seals its segments within a second: inspect the .jnl segments themselves
    upsert_dir = staging / "feeds" / FEED / SEGMENT / "UPSERT"
    wait_for(lambda: not any((upsert_dir / "open").glob("*.jnl")) and any((upsert_dir / "sealed").glob("*.jnl")),
             20, what="segments sealed")
    seen = Counter()
    for seg in sorted((upsert_dir / "sealed").glob("*.jnl")):
        p = cli(srv.env, "inspect", str(seg), "--json", "--limit", "0")
        assert p.returncode == 0, p.stderr
        for line in p.stdout.splitlines():
            row = json.loads(line)
            seen[(row["identifier_type"], row["identifier"], "UPSERT")] += 1
    assert seen == _keys([{**x, "operation": "UPSERT"} for x in upserts])
    p = cli(srv.env, "inspect", FEED, "--partition", f"{SEGMENT}/DELETE", "--csv", "--limit", "0")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert _keys(rows) == _keys(deletes)

    # flush --dry-run says what it would do and changes nothing, here or at the destinations
    wait_for(lambda: not any(staging.glob("feeds/*/*/*/open/*.jnl")), 20, what="every segment sealed")
    before = _tree(staging, csv_out.parent)
    p = cli(srv.env, "flush", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert f"would roll {FEED}/{SEGMENT}/UPSERT: {len(upserts)} staged rows" in p.stdout
    assert _tree(staging, csv_out.parent) == before
    assert not csv_out.exists() or not data_files(csv_out)

    # flush publishes everything and names every file
    p = cli(srv.env, "flush")
    assert p.returncode == 0, p.stdout + p.stderr
    csv_files, pq_files = data_files(csv_out), data_files(pq_out)
    assert csv_files and len(pq_files) == -(-len(parquet_items) // 25)  # max_rows_per_file = 25
    for f in csv_files + pq_files:
        root = csv_out if f.is_relative_to(csv_out) else pq_out
        assert f"published {f.relative_to(root).as_posix()}" in p.stdout
    delivered = [r for f in csv_files for r in read_rows(f)]
    assert _keys(delivered) == _keys([{**x, "operation": "UPSERT"} for x in upserts]) + _keys(deletes)
    assert f"flushed {len(upserts) + len(deletes) + len(parquet_items):,} rows" in p.stdout

    st = cli_json(srv.env, "status")
    assert st["totals"]["staged_rows"] == 0 and st["totals"]["failed_rolls"] == 0
    up = _partition(st, FEED, "UPSERT")
    assert up["delivered_rows"] == len(upserts)
    assert up["last_delivery"]["rows"] == len(upserts)
    assert all((csv_out / name).is_file() for name in up["last_delivery"]["files"])
    assert _partition(st, "43", "UPSERT")["delivered_files"] == len(pq_files)

    # inspect a delivered .csv.gz and a .parquet
    p = cli(srv.env, "inspect", str(csv_files[0]), "--csv", "--limit", "0")
    assert p.returncode == 0, p.stderr
    assert len(list(csv.DictReader(io.StringIO(p.stdout)))) == len(read_rows(csv_files[0]))
    pq_rows = []
    for f in pq_files:
        p = cli(srv.env, "inspect", str(f), "--json", "--limit", "0")
        assert p.returncode == 0, p.stderr
        pq_rows += [json.loads(line) for line in p.stdout.splitlines()]
    assert Counter(r["identifier"] for r in pq_rows) == Counter(x["identifier"] for x in parquet_items)
    p = cli(srv.env, "inspect", str(pq_files[0]))
    assert p.returncode == 0 and "identifier_type" in p.stdout

    # troubleshoot tells the same as the ledger
    data = troubleshoot(srv)["data"]
    assert data["rows_by_operation"]["UPSERT"]["delivered_rows"] == len(upserts)
    assert data["rows_by_operation"]["DELETE"]["delivered_rows"] == len(deletes)
    assert data["staged_rows"] == 0 and data["last_errors"] == []
    assert sum(d["rows"] for d in data["last_deliveries"]) == len(upserts) + len(deletes)
    assert all((csv_out / n).is_file() for d in data["last_deliveries"] for n in d["files"])

    # the server counted the rows the CLI published
    assert total(scrape(srv.url), "filefeed_published_rows_total") == len(upserts) + len(deletes) + len(
        parquet_items)

    # verify: OK, then a missing file and an extra object are named and fail the exit code
    p = cli(srv.env, "verify")
    assert p.returncode == 0, p.stdout + p.stderr
    gone = pq_files[0]
    gone.unlink()
    extra = csv_files[0].with_name(csv_files[0].name.replace("_part00001", "_part00009"))
    extra.write_bytes(csv_files[0].read_bytes())
    res = json.loads(cli(srv.env, "verify", "--json").stdout)
    problems = {(x["problem"], x.get("name")) for x in res["problems"]}
    assert problems == {("missing", gone.relative_to(pq_out).as_posix()),
                        ("extra", extra.relative_to(csv_out).as_posix())}
    p = cli(srv.env, "verify")
    assert p.returncode == 1 and gone.name in p.stdout and extra.name in p.stdout
    p = cli(srv.env, "verify", "--feed", FEED, "--allow-extra")
    assert p.returncode == 0 and extra.name in p.stdout
    assert cli(srv.env, "verify", "--feed", FEED).returncode == 1


def test_retry_after_terminal_failure(tmp_path, filefeed_factory):
    out = tmp_path / "out"
    out.mkdir()
    blocker = out / SEGMENT  # a file where the segment's folder must go: every publish fails terminally
    blocker.write_text("not a folder")
    srv = filefeed_factory(workers=2, feeds={FEED: {"destination_uri": out.as_uri()}})
    items = send_users(srv, range(8))
    answer = send_batch(srv, items)
    assert answer["status"] == "ERROR" and answer["sent_items_in_success"] == 0, answer

    st = cli_json(srv.env, "status")
    part = _partition(st, FEED, "UPSERT")
    assert len(part["failed_rolls"]) == 1 and part["delivered_rows"] == 0
    failed = part["failed_rolls"][0]
    assert failed["kind"] == "not_found" and failed["severity"] == "terminal" and failed["rows"] == len(items)
    p = cli(srv.env, "status")
    assert p.returncode == 0 and "failed roll" in p.stdout and failed["roll_id"] in p.stdout
    # one vocabulary: "terminal not_found" (the same words troubleshoot and metrics use), never a Python class
    assert "TerminalError" not in p.stdout and "terminal not_found" in p.stdout, p.stdout

    data = troubleshoot(srv)["data"]
    assert data["rows_by_operation"]["UPSERT"]["failed_rolls"] == 1
    kinds = {(e["severity"], e["kind"]) for e in data["last_errors"]}
    assert kinds == {("terminal", "not_found")}, data["last_errors"]  # last error and failed roll: one vocabulary
    assert any(e.get("failed_roll") == failed["roll_id"] for e in data["last_errors"])
    assert total(scrape(srv.url), "filefeed_errors_total", severity="terminal") >= 1

    # still broken: retry fails, exit 1, the roll is back in failed/
    p = cli(srv.env, "retry")
    assert p.returncode == 1 and "terminal" in p.stdout
    assert len(_partition(cli_json(srv.env, "status"), FEED, "UPSERT")["failed_rolls"]) == 1

    blocker.unlink()
    p = cli(srv.env, "retry")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "published" in p.stdout
    rows = [r for f in data_files(out) for r in read_rows(f)]
    assert Counter(r["identifier"] for r in rows) == Counter(x["identifier"] for x in items)
    part = _partition(cli_json(srv.env, "status"), FEED, "UPSERT")
    assert part["failed_rolls"] == [] and part["delivered_rows"] == len(items)
    assert cli(srv.env, "retry").stdout.strip() == "no failed rolls"
    assert cli(srv.env, "verify").returncode == 0
    data = troubleshoot(srv)["data"]
    assert data["last_deliveries"][0]["rows"] == len(items)
    assert data["rows_by_operation"]["UPSERT"]["failed_rolls"] == 0
