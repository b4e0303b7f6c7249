"""Snapshot delivery of a large segment: seconds and peak RSS, beside a plain pyarrow baseline in the same command.

    python bench/snapshot.py [--members 10000000] [--changes 1000000] [--rounds 2]

Builds once (not timed) a segment state of --members members, exactly as a snapshot roll leaves it (a base of
sorted runs, USER_EMAIL with 64-hex identifiers, even numbers only), and --changes staged changes in the journal
format: 80 % UPSERT (half of them new identifiers, half updates of members), 20 % DELETE of members. Then, in
interleaved rounds, each in a fresh child process on a hard-linked copy of that state:
  * filefeed: snapshot.roll_segment: the apply rolls (journal -> sorted runs) and the snapshot roll (streaming
    last-writer-wins merge of base + runs -> new base + CSV gzip files of every member -> local folder -> ledger);
  * baseline: plain pyarrow doing the same job in memory: read the whole base and the staged changes, sort all of
    them by (identifier, ts, operation), keep the last row of each identifier, drop the removed ones, write one
    CSV into isal igzip. No durability, no bound on memory: what a straightforward implementation costs.
Reports seconds, rows/s, peak RSS (VmHWM of the child), the ratio baseline/filefeed time and the load average.
Target: peak RSS < 500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as a script, the bench folder comes first on the path, and bench/sinks.py would shadow the sinks package
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from bench.rollover import peak_rss_mb  # noqa: E402 - after the path fix above

FEED, SEGMENT = "bench-feed", "seg-1"
TARGET_RSS_MB = 500
SLOT = datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
SEGMENT_ROWS = 200_000
BASE_MS = 1_700_000_000_000


def _identifiers(numbers) -> list[str]:
    return [f"{n:064x}" for n in numbers]


def build(master: Path, members: int, changes: int) -> None:
    """The state (base + CURRENT) and the staged changes, written once."""
    import numpy as np
    import pyarrow as pa

    from pipeline import membership, snapshot
    from pipeline.journal import encode_rows
    from pipeline.ledger import atomic_write_json

    sdir = snapshot.snapshot_dir(master, FEED, SEGMENT)
    state = sdir / snapshot.STATE
    state.mkdir(parents=True)
    roll_id = "20261201T020000-bench00000"
    writer = membership.RunWriter(state / f"base-{roll_id}.arrow")
    for start in range(0, members, membership.BATCH_ROWS):
        n = min(membership.BATCH_ROWS, members - start)
        numbers = range(2 * start, 2 * (start + n), 2)
        writer.write(pa.table({
            "identifier_type": pa.array(["USER_EMAIL"] * n),
            "identifier": pa.array(_identifiers(numbers)),
            "ts": pa.array([BASE_MS + i for i in numbers], pa.int64()),
            "op": pa.array([membership.UPSERT_RANK] * n, pa.int8()),
            "session_id": pa.array([f"s-{i // 1000}" for i in numbers]),
            "datamart_id": pa.array(["1509"] * n),
            "user_point_id": pa.array([f"up-{i}" for i in numbers]),
        }, schema=membership.SCHEMA))
    rows = writer.commit()
    atomic_write_json(state / snapshot.CURRENT, {"base": roll_id, "rows": rows, "members": rows})
    rng = np.random.default_rng(7)
    picks = rng.integers(0, members, size=changes)
    new = rng.random(changes) < 0.5
    delete = rng.random(changes) < 0.2
    by_op: dict[str, list[tuple]] = {"UPSERT": [], "DELETE": []}
    for pick, is_new, is_delete in zip(picks.tolist(), new.tolist(), delete.tolist(), strict=True):
        number = 2 * pick + (1 if is_new and not is_delete else 0)
        op = "DELETE" if is_delete else "UPSERT"
        by_op[op].append(("USER_EMAIL", f"{number:064x}", BASE_MS + 10**9, "s-new", "1509", f"up-{number}"))
    for op, staged in by_op.items():
        sealed = master / "feeds" / FEED / SEGMENT / op / "sealed"
        sealed.mkdir(parents=True)
        for n, start in enumerate(range(0, len(staged), SEGMENT_ROWS)):
            chunk = staged[start:start + SEGMENT_ROWS]
            data = b"".join(encode_rows(chunk[i:i + 5000], BASE_MS) for i in range(0, len(chunk), 5000))
            (sealed / f"w1-{n + 1:08d}.jnl").write_bytes(data)


def child_filefeed(root: Path, dest: Path) -> dict:
    from config.feed import FeedProperties
    from pipeline import snapshot
    from pipeline.model import Partition
    from sinks import open_sink

    props = FeedProperties(destination_uri=f"file://{dest}", delivery_mode="snapshot", max_rows_per_file=100_000_000)
    started = time.perf_counter()
    with open_sink(props) as sink:
        outcome = snapshot.roll_segment(root, Partition(FEED, SEGMENT, "UPSERT"), props, sink, slot=SLOT)
    seconds = time.perf_counter() - started
    assert outcome.status == "published", outcome
    return {"seconds": seconds, "rows": outcome.rows, "rss_mb": peak_rss_mb()}


def child_baseline(root: Path, dest: Path) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    from isal import igzip

    from pipeline import membership, snapshot, staging
    from pipeline.model import STAGED_SCHEMA

    started = time.perf_counter()
    sdir = snapshot.snapshot_dir(root, FEED, SEGMENT)
    base = next((sdir / snapshot.STATE).glob("base-*.arrow"))
    tables = list(membership.read_run(base))
    for op in ("UPSERT", "DELETE"):
        paths = sorted((root / "feeds" / FEED / SEGMENT / op / "sealed").glob("*.jnl"))
        tables += [membership.changes(b, op) for b in staging.iter_batches(paths, schema=STAGED_SCHEMA)]
    table = pa.concat_tables(tables)
    del tables
    table = table.sort_by([(name, "ascending") for name in membership.ORDER])
    ids = table.column("identifier")  # one identifier type here: the identifier is the key
    last = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1))
    keep = pa.chunked_array([*last.chunks, pa.array([True])])
    table = table.filter(keep)
    table = table.filter(pc.equal(table.column("op"), 0)).select(["identifier_type", "identifier", "ts"])
    with igzip.open(dest / "members.csv.gz", "wb", compresslevel=1) as out:
        pcsv.write_csv(table, out)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": table.num_rows, "rss_mb": peak_rss_mb()}


def run_round(master: Path, work: Path, side: str) -> dict:
    root, dest = work / "var", work / "dest"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(master), str(root)], check=True)  # hard links: the roll renames and unlinks
    dest.mkdir()
    done = subprocess.run([sys.executable, __file__, "--child", side, str(root), str(dest)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} round failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10_000_000)
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "ROOT", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, root, dest = args.child
        fn = child_filefeed if side == "filefeed" else child_baseline
        print(json.dumps(fn(Path(root), Path(dest))))
        return 0
    base = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.dir))
    try:
        master = base / "master"
        started = time.perf_counter()
        build(master, args.members, args.changes)
        print(f"built {args.members:,} members and {args.changes:,} staged changes in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        results: dict[str, list[dict]] = {"filefeed": [], "baseline": []}
        for n in range(args.rounds):
            order = ("filefeed", "baseline") if n % 2 == 0 else ("baseline", "filefeed")
            for side in order:
                result = run_round(master, base / "round", side)
                results[side].append(result)
                print(f"round {n + 1} {side:8s}: {result['seconds']:6.1f}s  {result['rows']:,} members  "
                      f"{result['rows'] / result['seconds'] / 1e6:.2f} M members/s  peak RSS {result['rss_mb']:.0f} MB",
                      flush=True)
        ff = min(r["seconds"] for r in results["filefeed"])
        bl = min(r["seconds"] for r in results["baseline"])
        ff_rss = max(r["rss_mb"] for r in results["filefeed"])
        bl_rss = max(r["rss_mb"] for r in results["baseline"])
        print(f"best: filefeed {ff:.1f}s, baseline {bl:.1f}s: time ratio baseline/filefeed {bl / ff:.2f}; "
              f"peak RSS filefeed {ff_rss:.0f} MB (target < {TARGET_RSS_MB}: "
              f"{'ok' if ff_rss < TARGET_RSS_MB else 'MISSED'}), baseline {bl_rss:.0f} MB "
              f"(ratio {ff_rss / bl_rss:.2f})")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
