"""Endurance soak: many feeds, batches every second, a short ledger retention, for many minutes.

    python bench/soak.py [--minutes 30] [--feeds 200] [--rate 100] [--batch-feeds 5] [--retention-seconds 600]

`filefeed serve` (2 workers) serves `--feeds` embedded feeds, one segment each, delivering to local folders. Clients
send `--rate` user_segment_update calls a second spread over every feed; every second a batcher sends batch_update
for the next `--batch-feeds` feeds (round robin) with the items returned meanwhile, so every feed gets a batch every
feeds / batch-feeds seconds and the server rolls batch-feeds partitions a second. The ledger keeps
`--retention-seconds` of history (FILEFEED_LEDGER_RETENTION_DAYS as a fraction of a day), longer than the batch lag,
so no batch comes after its rows' entries were pruned.

Sampled every `--sample-seconds`: RSS and open descriptors of the server's processes, ledger rolls and bytes on disk
(database + WAL), rolls published so far, oldest staged row. Printed: the samples, and the end against the first
sample after warm-up (the retention + 60 s, when the ledger reaches its steady size) as ratios. At the end every
acknowledged row is checked in the destination: delivered exactly once. Exit 1 when something is not flat or not
delivered once (bounds: RSS +20 MB, descriptors +16, ledger rolls and bytes x1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server import start_server, stop_server  # noqa: E402
from tests.reliability.helpers import batch_body, group_pids, read_local, rss_kb, update_body  # noqa: E402

RSS_GROWTH_KB = 20 * 1024
FD_GROWTH = 16
LEDGER_GROWTH = 1.5


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def ledger_figures(staging: Path) -> dict[str, int]:
    """Rolls held and bytes on disk, read with a plain read-only connection (no migration, no writes)."""
    import sqlite3

    path = staging / "ledger.sqlite3"
    if not path.exists():
        return {"rolls": 0, "bytes": 0, "published_rolls": 0}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rolls = conn.execute("SELECT count(*) FROM rolls").fetchone()[0]
        total = conn.execute("SELECT coalesce(sum(rolls), 0) FROM totals").fetchone()[0]
    finally:
        conn.close()
    size = sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    return {"rolls": rolls, "bytes": size, "published_rolls": total}


def oldest_staged_age(staging: Path) -> float:
    from pipeline.rollover import oldest_staged_row_ms

    ages = [time.time() - ms / 1000 for pdir in (staging / "feeds").glob("*/*/*")
            if (ms := oldest_staged_row_ms(pdir)) is not None]
    return round(max(ages), 1) if ages else 0.0


def run(seconds: float, *, feeds: int = 200, rate: int = 100, batch_feeds: int = 5, retention_seconds: float = 120,
        sample_seconds: float = 30, workers: int = 2, tmp: Path | None = None, verbose: bool = True,
        repo: Path = ROOT) -> dict[str, Any]:
    """Run the soak; return its figures (samples, ratios, delivery check). The server is stopped whatever happens."""
    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-soak-")) if tmp is None else tmp
    staging = tmp / "staging"
    dest = tmp / "dest"
    feed_ids = [str(1000 + i) for i in range(feeds)]
    segment = {f: str(500000 + i) for i, f in enumerate(feed_ids)}
    conf = {f: {"destination_uri": (dest / f).as_uri(), "identifier_types": "USER_ACCOUNT"} for f in feed_ids}
    for f in feed_ids:
        (dest / f).mkdir(parents=True)
    env = {"FILEFEED_SEAL_AFTER_SECONDS": "0.5", "FILEFEED_BATCH_WAIT_SECONDS": "5",
           "FILEFEED_LEDGER_RETENTION_DAYS": repr(retention_seconds / 86400), "FILEFEED_METRICS_REFRESH_SECONDS": "5"}
    stop = threading.Event()
    lock = threading.Lock()
    acked: set[tuple[str, str, str]] = set()
    pending: dict[str, list[dict]] = {f: [] for f in feed_ids}
    counts: dict[str, int] = {}
    errors: list[str] = []
    samples: list[dict[str, Any]] = []

    def count(key: str) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1

    def client(n: int, threads: int) -> None:
        period = threads / rate
        next_t = time.monotonic()
        i = 0
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
            while not stop.is_set():
                feed = feed_ids[(i * threads + n) % feeds]
                idents = [f"c{n}-{i}-a", f"c{n}-{i}-b"]
                i += 1
                try:
                    r = c.post("/v1/user_segment_update", json=update_body(idents, feed=feed, segment=segment[feed]))
                except httpx.HTTPError as e:
                    errors.append(f"update: {type(e).__name__}: {e}")
                    continue
                count(f"update {r.status_code}")
                if r.status_code == 200:
                    with lock:
                        acked.update((segment[feed], "UPSERT", x) for x in idents)
                        pending[feed].extend(d["content"] for d in r.json()["data"])
                elif r.status_code != 429:
                    errors.append(f"update {r.status_code}: {r.text[:200]}")
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                elif delay < -1:
                    next_t = time.monotonic()

    def send_batch(c: httpx.Client, feed: str) -> None:
        with lock:
            items, pending[feed] = pending[feed], []
        if not items:
            return
        for attempt in range(20):
            r = c.post("/v1/batch_update", json=batch_body(items, feed=feed, segment=segment[feed]))
            body = r.json()
            count(f"batch {body.get('status')}")
            if body.get("status") == "OK" and body.get("sent_items_in_success") == len(items):
                return
            if body.get("status") != "RETRY":
                break
            time.sleep(min(0.2 * (attempt + 1), 2))
        errors.append(f"batch of {feed}: {r.status_code} {r.text[:200]}")

    def batcher(n: int, threads: int) -> None:
        # the platform's batch jobs run in parallel: `threads` batchers share each second's feeds
        turn = 0
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
            while not stop.wait(1.0):
                for k in range(n, batch_feeds, threads):
                    send_batch(c, feed_ids[(turn + k) % feeds])
                turn = (turn + batch_feeds) % feeds

    def sample(t: float) -> None:
        pids = group_pids(proc.pid)
        s = {"t": round(t), "rss_mb": round(sum(rss_kb(p) for p in pids) / 1024, 1),
             "fds": sum(open_fds(p) for p in pids), "processes": len(pids), **ledger_figures(staging),
             "oldest_staged_s": oldest_staged_age(staging), "acked_rows": len(acked)}
        samples.append(s)
        if verbose:
            print(json.dumps(s), flush=True)

    proc, url = start_server(tmp, staging, conf, workers=workers, repo=repo, env=env)
    try:
        threads_n = 8
        threads = [threading.Thread(target=client, args=(n, threads_n), daemon=True) for n in range(threads_n)]
        threads += [threading.Thread(target=batcher, args=(n, 2), daemon=True) for n in range(2)]
        started = time.monotonic()
        sample(0)
        for th in threads:
            th.start()
        while (elapsed := time.monotonic() - started) < seconds:
            stop.wait(min(sample_seconds, seconds - elapsed))
            sample(time.monotonic() - started)
        stop.set()
        for th in threads:
            th.join(120)
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
            for feed in feed_ids:
                send_batch(c, feed)
        duration = time.monotonic() - started
        sample(duration)
        samples[-1]["after_final_batches"] = True
    finally:
        stop.set()
        stop_server(proc)
    delivered = read_local(dest)
    got = delivered.check(acked)
    warm_t = min(retention_seconds + 60, seconds / 2)
    warm = next((s for s in samples if s["t"] >= warm_t), samples[0])
    end = [s for s in samples if not s.get("after_final_batches")][-1]  # steady state, before the catch-up
    figures = {
        "seconds": round(duration), "feeds": feeds, "rate": rate, "batch_feeds_per_second": batch_feeds,
        "retention_seconds": retention_seconds, "answers": counts, "errors": len(errors), "first_errors": errors[:5],
        "rows_checked": len(acked), **got, "warm_sample": warm, "end_sample": end,
        "rss_growth_mb": round(end["rss_mb"] - warm["rss_mb"], 1),
        "fd_growth": end["fds"] - warm["fds"],
        "ledger_rolls_ratio": round(end["rolls"] / max(warm["rolls"], 1), 2),
        "ledger_bytes_ratio": round(end["bytes"] / max(warm["bytes"], 1), 2),
        "published_rolls": samples[-1]["published_rolls"], "final_sample": samples[-1], "samples": samples,
    }
    figures["flat"] = (figures["rss_growth_mb"] * 1024 <= RSS_GROWTH_KB and figures["fd_growth"] <= FD_GROWTH
                       and figures["ledger_rolls_ratio"] <= LEDGER_GROWTH
                       and figures["ledger_bytes_ratio"] <= LEDGER_GROWTH)
    figures["delivered_once"] = got["lost"] == 0 and got["duplicated"] == 0 and got["partial"] == 0
    if own_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--feeds", type=int, default=200)
    ap.add_argument("--rate", type=int, default=100, help="user_segment_update calls per second, all feeds")
    ap.add_argument("--batch-feeds", type=int, default=5, help="feeds batched each second (round robin)")
    ap.add_argument("--retention-seconds", type=float, default=600,
                    help="longer than a whole batch cycle of every feed on a loaded machine")
    ap.add_argument("--sample-seconds", type=float, default=30)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose `filefeed serve` runs (A/B runs)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    figures = run(args.minutes * 60, feeds=args.feeds, rate=args.rate, batch_feeds=args.batch_feeds,
                  retention_seconds=args.retention_seconds, sample_seconds=args.sample_seconds, repo=args.repo)
    summary = {k: v for k, v in figures.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    print(f"load average at end: {os.getloadavg()}")
    print(f"RSS {figures['warm_sample']['rss_mb']} -> {figures['end_sample']['rss_mb']} MB "
          f"(+{figures['rss_growth_mb']}), descriptors {figures['warm_sample']['fds']} -> "
          f"{figures['end_sample']['fds']}, ledger rolls x{figures['ledger_rolls_ratio']}, bytes "
          f"x{figures['ledger_bytes_ratio']} (warm-up sample at {figures['warm_sample']['t']} s against the end); "
          f"{figures['rows_checked']:,} rows: lost {figures['lost']}, duplicated {figures['duplicated']}")
    return 0 if figures["flat"] and figures["delivered_once"] and not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
