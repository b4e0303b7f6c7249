"""/metrics benchmark: scrape time with thousands of partitions, and user_segment_update latency while scraped.

    python bench/metrics.py [--partitions 5000] [--seconds 10] [--rounds 2] [--old-repo PATH]

A staging folder with `--partitions` partitions (one sealed segment each, 250 feeds) served by `filefeed serve`
(1 worker, so every scrape lands on the worker taking the updates). In interleaved rounds: `--seconds` of updates
(4 clients, 2 identifiers each, paced at 200 req/s) without scraping, then the same while a scraper GETs /metrics
every 0.5 s. Printed: scrape time p50/max (target < 100 ms), update p50/p99/max in both phases and their ratio
(scraping / not scraping), and the time the gauge thread takes for one pass over the disk (what a scrape cost on
the event loop before). `--old-repo` runs the same rounds against another checkout (e.g. the previous release) on
a copy of the same staging folder, in the same command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server import start_server, stop_server  # noqa: E402
from tests.reliability.helpers import update_body  # noqa: E402

FEEDS = 250
RATE = 200
CLIENTS = 4


def make_staging(root: Path, partitions: int) -> None:
    from pipeline.model import Partition
    from tests.rollover.helpers import make_rows, stage_segment

    rows = make_rows(20)
    for i in range(partitions):
        p = Partition(str(1000 + i % FEEDS), str(600000 + i // 2), "UPSERT" if i % 2 == 0 else "DELETE")
        stage_segment(root, p, "wbench-00000001.jnl", rows)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def start(repo: Path, staging: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    dest = tmp / "dest"
    dest.mkdir(exist_ok=True)
    feeds = {str(1000 + f): {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT"}
             for f in range(FEEDS)}
    return start_server(tmp, staging, feeds, repo=repo)


def phase(url: str, seconds: float, scrape: bool) -> tuple[list[float], list[float]]:
    """Paced updates for `seconds` (one segment: the update path, not the partition count, is what is timed);
    with `scrape`, a GET /metrics every 0.5 s. (update latencies, scrape durations)."""
    stop = threading.Event()
    lat: list[float] = []
    scrapes: list[float] = []

    def client(n: int) -> None:
        period = CLIENTS / RATE
        next_t = time.monotonic()
        i = 0
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
            while not stop.is_set():
                body = orjson.dumps(update_body([f"m{n}-{i}-{time.monotonic_ns()}", f"m{n}-{i}-b"], feed="1000",
                                                segment="600000"))
                i += 1
                t = time.perf_counter()
                r = c.post("/v1/user_segment_update", content=body)
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    stop.wait(delay)

    def scraper() -> None:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            while not stop.wait(0.5):
                t = time.perf_counter()
                r = c.get("/metrics")
                scrapes.append(time.perf_counter() - t)
                assert r.status_code == 200 and b"filefeed_staged_rows" in r.content

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    if scrape:
        threads.append(threading.Thread(target=scraper, daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return lat, scrapes


def measure(name: str, repo: Path, staging: Path, tmp: Path, args: argparse.Namespace) -> dict:
    proc, url = start(repo, staging, tmp)
    try:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:  # the first pass, not timed
            deadline = time.monotonic() + 120
            while b'feed_id="1249"' not in c.get("/metrics").content and time.monotonic() < deadline:
                time.sleep(0.5)
        out = {"quiet": [], "scraped": [], "scrapes": []}
        for _ in range(args.rounds):
            quiet, _ = phase(url, args.seconds, scrape=False)
            scraped, scrapes = phase(url, args.seconds, scrape=True)
            out["quiet"] += quiet
            out["scraped"] += scraped
            out["scrapes"] += scrapes
    finally:
        stop_server(proc)
    q, s, sc = out["quiet"], out["scraped"], out["scrapes"]
    print(f"  {name:14}{pct(sc, 0.5) * 1e3:>10.1f}{max(sc) * 1e3:>10.1f}{pct(q, 0.5) * 1e3:>10.1f}"
          f"{pct(q, 0.99) * 1e3:>10.1f}{max(q) * 1e3:>10.1f}{pct(s, 0.5) * 1e3:>10.1f}{pct(s, 0.99) * 1e3:>10.1f}"
          f"{max(s) * 1e3:>10.1f}{pct(s, 0.99) / pct(q, 0.99):>9.2f}", flush=True)
    return {"scrape_p50": pct(sc, 0.5), "scrape_max": max(sc), "p99_ratio": pct(s, 0.99) / pct(q, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old-repo", type=Path, default=None, help="another checkout measured the same way")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-metrics-"))
    try:
        staging = tmp / "staging"
        make_staging(staging, args.partitions)
        from filefeed.metrics import StagingGauges
        from pipeline.staging import Staging

        st = Staging(staging)
        walks = []
        for _ in range(3):
            g = StagingGauges(st)
            g.refresh()
            walks.append(g.last_pass_seconds)
        incremental = []
        for _ in range(3):
            g.refresh()
            incremental.append(g.last_pass_seconds)
        st.close()
        print(f"{args.partitions:,} partitions over {FEEDS} feeds; load average {os.getloadavg()}")
        print(f"gauge pass over the disk: full {min(walks) * 1e3:,.0f} ms (what each scrape cost on the event loop "
              f"before), incremental {min(incremental) * 1e3:,.0f} ms (in the gauge thread)")
        print(f"  {'':14}{'scrape':>10}{'scrape':>10}{'quiet':>10}{'quiet':>10}{'quiet':>10}{'scraped':>10}"
              f"{'scraped':>10}{'scraped':>10}{'p99':>9}")
        print(f"  {'':14}{'p50 ms':>10}{'max ms':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'p50 ms':>10}"
              f"{'p99 ms':>10}{'max ms':>10}{'ratio':>9}")
        results = {"this": measure("this checkout", ROOT, staging, tmp, args)}
        if args.old_repo:
            old = tmp / "staging-old"
            shutil.copytree(staging, old, ignore=shutil.ignore_patterns("ledger.sqlite3*", "run"))
            results["old"] = measure(args.old_repo.name[:14], args.old_repo, old, tmp, args)
        this = results["this"]
        print(f"  scrape p50 {this['scrape_p50'] * 1e3:.1f} ms (target < 100: "
              f"{'ok' if this['scrape_p50'] < 0.1 else 'NOT MET'}); update p99 scraped / quiet {this['p99_ratio']:.2f}")
        print(f"load average at end {os.getloadavg()}")
        return 0 if this["scrape_p50"] < 0.1 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
