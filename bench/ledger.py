"""Ledger benchmark: batch_update latency and worker RSS with an empty ledger and with 1,000,000 published rolls.

    python bench/ledger.py [--rolls 1000000] [--rounds 40] [--updates 50] [--partitions 1000]
                           [--old-repo PATH --old-rolls 30000]

Two `filefeed serve` instances (1 worker each), one on a staging folder whose ledger is empty and one whose ledger
holds `--rolls` published rolls spread over `--partitions` partitions (the benchmarked one among them), written in
the ledger's own storage format (its SQLite schema, one transaction; each roll names two consumed segments, one
file and a manifest, as a real roll does). Each round, in alternating order: `--updates` user_segment_update calls
(2 identifiers each, not timed) then one batch_update with the returned items (timed). Printed: p50/p99 of both,
the ratio (target p50 <= 1.2), and the RSS of each worker after the warm-up and at the end (target: the full
ledger's worker within 20 MB of the empty one's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server import start_server, stop_server  # noqa: E402
from tests.reliability.helpers import batch_body, group_pids, rss_kb, update_body  # noqa: E402

FEED, SEGMENT = "42", "451256"


def fill_ledger(root: Path, rolls: int, partitions: int) -> float:
    """`rolls` published rolls in the ledger's storage format; seconds taken."""
    from pipeline import ledger

    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    conn = ledger._open(str(ledger.db_path(root)))
    conn.execute("PRAGMA synchronous=OFF")  # a fixture: nothing to keep if the bench dies
    conn.execute("PRAGMA cache_size=-262144")
    names = [f"{FEED}/{SEGMENT}/UPSERT"] + [f"{9000 + p}/{800000 + p}/UPSERT" for p in range(partitions - 1)]
    now = time.time()
    per = rolls // partitions
    conn.execute("BEGIN")
    for p, partition in enumerate(names):
        count = per + (rolls - per * partitions if p == 0 else 0)

        seg = partition.split("/")[1]
        # the JSON LedgerEntry.to_dict() gives, formatted directly (json.dumps per roll would dominate the fill)
        template = ('{"version":1,"roll_id":"%s","partition":"' + partition + '","planned_at":'
                    '"2026-11-01T00:00:00+00:00","published_at":"2026-11-01T00:00:01+00:00","files":[{"name":"'
                    + seg + '/20261101T000000Z_UPSERT_%s_part00001.csv.gz","rows":100,"bytes":4000,"sha256":"'
                    + "ab" * 32 + '"}],"manifest":{"name":"' + seg + '/%s.manifest.json","bytes":600,"sha256":"'
                    + "cd" * 32 + '"},"rows":100,"bytes":4000,"segments":["wold' + str(p) + 'a-%08d.jnl","wold'
                    + str(p) + 'b-%08d.jnl"]}')

        def entries(partition: str = partition, p: int = p, count: int = count, template: str = template):
            for k in range(count):
                roll_id = f"20261101T{k % 240000:06d}-{p:04x}{k:06x}"
                yield partition, roll_id, now, template % (roll_id, roll_id, roll_id, k, k)

        conn.executemany("INSERT INTO rolls (partition, roll_id, published_ts, entry) VALUES (?, ?, ?, ?)",
                         entries())
        conn.execute(
            "INSERT INTO segments (partition, name, roll) SELECT partition, 'wold' || ? || 'a-' || "
            "printf('%08d.jnl', id - (SELECT min(id) FROM rolls WHERE partition = ?)), id FROM rolls WHERE partition = ?",
            (p, partition, partition))
        conn.execute(
            "INSERT INTO segments (partition, name, roll) SELECT partition, 'wold' || ? || 'b-' || "
            "printf('%08d.jnl', id - (SELECT min(id) FROM rolls WHERE partition = ?)), id FROM rolls WHERE partition = ?",
            (p, partition, partition))
        conn.execute("INSERT INTO totals VALUES (?, ?, ?, ?, ?)", (partition, count, 100 * count, count, 4000 * count))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def worker_rss_mb(proc: subprocess.Popen) -> float:
    return max((rss_kb(p) for p in group_pids(proc.pid)), default=0) / 1024


def start(tmp: Path, name: str, dest: Path, repo: Path = ROOT) -> tuple[subprocess.Popen, str]:
    staging = tmp / name / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    feeds = {FEED: {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT"}}
    return start_server(tmp / name, staging, feeds, repo=repo, env={"FILEFEED_SEAL_AFTER_SECONDS": "0.2"})


def fill_old_layout(root: Path, rolls: int) -> float:
    """The previous release's ledger: one `published/<roll_id>.json` per roll in the benchmarked partition."""
    from pipeline.ledger import json_bytes

    started = time.perf_counter()
    folder = root / "feeds" / FEED / SEGMENT / "UPSERT" / "published"
    folder.mkdir(parents=True)
    for k in range(rolls):
        roll_id = f"20261101T{k % 240000:06d}-{k:010x}"
        folder.joinpath(f"{roll_id}.json").write_bytes(json_bytes({
            "version": 1, "roll_id": roll_id, "partition": f"{FEED}/{SEGMENT}/UPSERT",
            "planned_at": "2026-11-01T00:00:00+00:00", "published_at": "2026-11-01T00:00:01+00:00",
            "files": [{"name": f"{SEGMENT}/{roll_id}.csv.gz", "rows": 100, "bytes": 4000, "sha256": "ab" * 32}],
            "manifest": None, "rows": 100, "bytes": 4000, "segments": [f"wolda-{k:08d}.jnl", f"woldb-{k:08d}.jnl"]}))
    return time.perf_counter() - started


def one_round(c: httpx.Client, r: int, updates: int) -> tuple[float, dict]:
    items = []
    for u in range(updates):
        ans = c.post("/v1/user_segment_update", content=orjson.dumps(
            update_body([f"r{r}-u{u}-a", f"r{r}-u{u}-b"], feed=FEED, segment=SEGMENT)))
        assert ans.status_code == 200, ans.text
        items.extend(d["content"] for d in ans.json()["data"])
    body = orjson.dumps(batch_body(items, feed=FEED, segment=SEGMENT))
    t = time.perf_counter()
    answer = c.post("/v1/batch_update", content=body).json()
    return time.perf_counter() - t, answer


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rolls", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--updates", type=int, default=50, help="user_segment_update calls per batch (2 identifiers)")
    ap.add_argument("--old-repo", type=Path, default=None,
                    help="also measure that checkout (e.g. the previous release) with --old-rolls JSON ledger files")
    ap.add_argument("--old-rolls", type=int, default=30_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-ledger-"))
    procs: list[subprocess.Popen] = []
    try:
        fill_seconds = fill_ledger(tmp / "full" / "staging", args.rolls, args.partitions)
        size = os.path.getsize(tmp / "full" / "staging" / "ledger.sqlite3")
        print(f"ledger filled with {args.rolls:,} rolls over {args.partitions:,} partitions in {fill_seconds:.1f} s "
              f"({size / 2**20:,.0f} MiB)", flush=True)
        names = ["empty", "full"]
        if args.old_repo:
            names.append("old")
            print(f"old layout: {args.old_rolls:,} published/*.json written in "
                  f"{fill_old_layout(tmp / 'old' / 'staging', args.old_rolls):.1f} s", flush=True)
        sides = {}
        for name in names:
            dest = tmp / name / "dest"
            dest.mkdir(parents=True)
            proc, url = start(tmp, name, dest, args.old_repo if name == "old" else ROOT)
            procs.append(proc)
            sides[name] = {"proc": proc, "client": httpx.Client(base_url=url, timeout=120, trust_env=False),
                           "lat": [], "bad": []}
        for side in sides.values():  # warm-up round, not counted
            one_round(side["client"], -1, args.updates)
        rss_warm = {n: worker_rss_mb(s["proc"]) for n, s in sides.items()}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else list(reversed(names))):
                seconds, answer = one_round(sides[name]["client"], r, args.updates)
                sides[name]["lat"].append(seconds)
                if answer.get("status") != "OK" or answer.get("sent_items_in_success") != 2 * args.updates:
                    sides[name]["bad"].append(answer)
        rss_end = {n: worker_rss_mb(s["proc"]) for n, s in sides.items()}
    finally:
        for p in procs:
            stop_server(p)
    e, f = sides["empty"]["lat"], sides["full"]["lat"]
    p50e, p50f, p99e, p99f = pct(e, 0.5) * 1e3, pct(f, 0.5) * 1e3, pct(e, 0.99) * 1e3, pct(f, 0.99) * 1e3
    print(f"batch_update of {2 * args.updates} items, {args.rounds} interleaved rounds, 1 worker each; load average "
          f"{os.getloadavg()}")
    print(f"  {'':34}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'RSS warm MB':>14}{'RSS end MB':>12}")
    labels = {"empty": "empty ledger", "full": f"{args.rolls:,} rolls in the ledger",
              "old": f"{args.old_repo.name if args.old_repo else ''}, {args.old_rolls:,} JSON"}
    for key in names:
        name, lat = labels[key], sides[key]["lat"]
        print(f"  {name:34}{pct(lat, 0.5) * 1e3:>10.1f}{pct(lat, 0.99) * 1e3:>10.1f}"
              f"{statistics.mean(lat) * 1e3:>10.1f}{rss_warm[key]:>14.1f}{rss_end[key]:>12.1f}")
    growth = rss_end["full"] - rss_end["empty"]
    ratio = p50f / p50e
    print(f"  ratio full/empty: p50 {ratio:.2f} (target <= 1.2: {'ok' if ratio <= 1.2 else 'NOT MET'}), "
          f"p99 {p99f / p99e:.2f}; worker RSS full - empty: {growth:+.1f} MB (target <= 20: "
          f"{'ok' if growth <= 20 else 'NOT MET'})")
    if "old" in sides:
        o = sides["old"]["lat"]
        print(f"  previous layout: p50 {pct(o, 0.5) * 1e3:.1f} ms ({pct(o, 0.5) * 1e3 / p50e:.2f} x the empty ledger), "
              f"worker RSS {rss_end['old']:.1f} MB")
    bad = sides["empty"]["bad"] + sides["full"]["bad"]
    if bad:
        print(f"  {len(bad)} answers not OK with every item sent, first: {bad[:2]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ratio <= 1.2 and growth <= 20 and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
