"""`filefeed flush` of thousands of small partitions: this checkout (parallel) against a baseline, in one command.

    python bench/flush.py [--partitions 4800] [--rows 20] [--concurrency 8] [--old-repo PATH] [--rounds 1]

A staging folder with `--partitions` partitions (240 feeds x 10 segments x UPSERT/DELETE, one sealed segment of
`--rows` rows each), delivering to local folders. Each round copies it and runs `filefeed flush --json` on a copy:
this checkout with `--concurrency`, this checkout with `--concurrency 1` (the sequential flush, as the baseline),
and, with `--old-repo`, that checkout's `filefeed flush` (e.g. the previous release), in alternating order. Printed:
wall time of each command, partitions/s, the ratio to the baseline, and a check that every row reached the
destination exactly once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability.helpers import write_feeds  # noqa: E402

FEEDS = 240


def make(root: Path, partitions: int, rows: int) -> list[str]:
    from pipeline.model import Partition
    from tests.rollover.helpers import make_rows, stage_segment

    made = []
    for i in range(partitions):
        p = Partition(str(1000 + i % FEEDS), str(700000 + i // 2), "UPSERT" if i % 2 == 0 else "DELETE")
        stage_segment(root, p, "wbench-00000001.jnl", make_rows(rows, start=i * rows))
        made.append(str(p))
    return made


def delivered(dest: Path) -> Counter:
    out: Counter = Counter()
    for path in dest.rglob("*.csv.gz"):
        for line in gzip.decompress(path.read_bytes()).decode().splitlines()[1:]:
            out[line.split(",")[3]] += 1
    return out


def run_flush(repo: Path, staging: Path, feeds_file: Path, concurrency: int | None) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    env.update({"FILEFEED_FEEDS": str(feeds_file), "FILEFEED_STAGING_DIR": str(staging), "PYTHONPATH": str(repo),
                "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARNING"})
    cmd = [sys.executable, "-m", "filefeed", "flush", "--json"]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=str(repo), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"flush failed ({repo}): {p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return seconds, json.loads(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=4800)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--old-repo", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-flush-"))
    try:
        template = tmp / "template"
        make(template, args.partitions, args.rows)
        want = Counter({f"{i:064x}": 1 for i in range(args.partitions * args.rows)})
        sides = [(f"this, --concurrency {args.concurrency}", ROOT, args.concurrency),
                 ("this, --concurrency 1", ROOT, 1)]
        if args.old_repo:
            sides.append((f"{args.old_repo.name} (sequential)", args.old_repo, None))
        times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        checks: dict[str, bool] = {}
        print(f"flush of {args.partitions:,} partitions x {args.rows} rows, local destination; load average "
              f"{os.getloadavg()}", flush=True)
        for r in range(args.rounds):
            for name, repo, conc in (sides if r % 2 == 0 else list(reversed(sides))):
                run = tmp / f"run-{r}-{len(times[name])}-{conc}"
                shutil.copytree(template, run / "staging")
                dest = run / "dest"
                feeds_file = write_feeds(run / "feeds.toml", {str(1000 + f): {"destination_uri": (dest / str(f))
                                                                              .as_uri()} for f in range(FEEDS)})
                seconds, report = run_flush(repo, run / "staging", feeds_file, conc)
                times[name].append(seconds)
                got = delivered(dest)
                checks[name] = checks.get(name, True) and got == want and report["rows"] == len(want)
                print(f"  round {r + 1} {name:34} {seconds:8.1f} s  {args.partitions / seconds:8.1f} partitions/s"
                      f"  rows once: {got == want}", flush=True)
                shutil.rmtree(run, ignore_errors=True)
        base = min(times["this, --concurrency 1"])
        print(f"best of {args.rounds}:")
        for name, ts in times.items():
            print(f"  {name:34} {min(ts):8.1f} s   x{base / min(ts):.2f} against the sequential flush"
                  f"   every row once: {checks[name]}")
        print(f"load average at end {os.getloadavg()}")
        return 0 if all(checks.values()) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
