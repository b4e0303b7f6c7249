"""Roll throughput and peak memory, each case beside its raw pyarrow baseline measured in the same command.

    python bench/rollover.py [--rows 10000000] [--frame-rows 5000] [--cases csv-gzip,csv-zstd,parquet-zstd]

Stages realistic rows once (USER_EMAIL, 64-hex sha256 identifiers, ts, session ids; frames of --frame-rows rows, 64 MB
segments of several writers), then for each case:
  * roll: a fresh child process hard-links the staged segments into its own staging root and runs roll_partition
    (read journal -> encode -> publish to a local folder -> ledger); rows/s over the roll, peak RSS from VmHWM;
  * raw: a child process loads the same rows into a pyarrow Table first (not timed), then times only the write, as
    the machine's reference baselines: CSVWriter into isal igzip level 1 (one core) / CSVWriter into Arrow's zstd stream
    / pq.write_table zstd. The ratio roll/raw is what the targets are about.
  * raw-mt (CSV only, for information): the same direct write with the roll's own codec threads (isal's threaded
    igzip, zstandard with 2 threads). A roll compresses on both cores; this shows what its journal read still costs.
The ratios are what to compare across runs (on a shared machine absolute figures vary by about +-30 %).
  * roll-nodedup: the same roll with roll-time dedup off (FILEFEED_DEDUP_SECONDS=0), alternating with `roll` for
    --dedup-rounds rounds (the fastest of each counts); "dedup cost" is the rate ratio roll/roll-nodedup and the
    ratio of their CPU seconds.
Targets: CSV+gzip >= 1.5 M rows/s, Parquet+zstd >= 1.2 M rows/s, each >= 70 % of raw, peak RSS < 300 MB.
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CASES = {
    "csv-gzip": ("csv", "gzip"),
    "csv-zstd": ("csv", "zstd"),
    "parquet-zstd": ("parquet", "zstd"),
}
TARGET_ROWS_PER_S = {"csv-gzip": 1_500_000, "parquet-zstd": 1_200_000}
TARGET_RATIO = 0.70
TARGET_RSS_MB = 300
SEGMENT_BYTES = 64 * 1024 * 1024
WRITERS = 2
FEED, SEGMENT, OPERATION = "bench-feed", "seg-1", "UPSERT"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stage(master: Path, rows: int, frame_rows: int) -> list[Path]:
    """Write sealed segments in the journal format; returns their paths."""
    from pipeline.journal import encode_frame

    base_ms = 1_700_000_000_000
    sealed = master / "sealed"
    sealed.mkdir(parents=True)
    paths: list[Path] = []
    seq = [0] * WRITERS
    current = None
    size = 0
    writer = 0
    for start in range(0, rows, frame_rows):
        n = min(frame_rows, rows - start)
        hexes = os.urandom(32 * n).hex()
        lines = [
            f"USER_EMAIL\t{hexes[k * 64 : k * 64 + 64]}\t{base_ms + start + k}\tsess-{(start + k) // 40}\t1509\t\n"
            for k in range(n)
        ]
        frame = encode_frame("".join(lines).encode(), n, base_ms + start)
        if current is None or size + len(frame) > SEGMENT_BYTES:
            if current is not None:
                current.close()
            writer = (writer + 1) % WRITERS
            seq[writer] += 1
            path = sealed / f"w{writer}-{seq[writer]:06d}.jnl"
            paths.append(path)
            current = open(path, "wb")
            size = 0
        current.write(frame)
        size += len(frame)
    if current is not None:
        current.close()
    return paths


def link_staged(master: Path, work: Path) -> tuple[Any, Path, Path]:
    """A staging root under `work` holding links to the master segments, and an empty destination folder."""
    from pipeline.model import Partition

    partition = Partition(FEED, SEGMENT, OPERATION)
    root, dest = work / "root", work / "dest"
    sealed = root / partition.relpath / "sealed"
    sealed.mkdir(parents=True)
    dest.mkdir()
    for segment in sorted((master / "sealed").iterdir()):
        os.link(segment, sealed / segment.name)  # the roll renames and deletes: give it its own links
    return partition, root, dest


def child_roll(master: Path, work: Path, fmt: str, compression: str, dedup: bool = True) -> dict:
    from config.feed import FeedProperties
    from pipeline import recent_rows
    from pipeline.rollover import roll_partition
    from sinks import open_sink

    # the service's default (FILEFEED_DEDUP_SECONDS=600), or off for the dedup-cost baseline
    recent_rows.configure(600.0 if dedup else 0.0, recent_rows.DEFAULT_MAX_ROWS)
    partition, root, dest = link_staged(master, work)
    props = FeedProperties(
        destination_uri=f"file://{dest}", file_format=fmt, compression=compression, max_rows_per_file=5_000_000
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    with open_sink(props) as sink:
        outcome = roll_partition(root, partition, props, sink, now=datetime.now(UTC))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    if outcome.status != "published":
        raise SystemExit(f"roll failed: {outcome}")
    out_bytes = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {
        "rows": outcome.rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "files": len(outcome.files),
        "bytes": out_bytes,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_raw(master: Path, work: Path, fmt: str, compression: str, threaded: bool = False) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import zstandard
    from isal import igzip, igzip_threaded

    from pipeline.encode import GZIP_BLOCK_BYTES, GZIP_LEVEL, GZIP_THREADS, ZSTD_LEVEL, ZSTD_THREADS
    from pipeline.staging import iter_batches

    # The same rows and columns a roll writes (default columns), already in memory: only the write is timed.
    parts = []
    for batch in iter_batches(sorted((master / "sealed").iterdir())):
        n = batch.num_rows
        parts.append(
            pa.RecordBatch.from_arrays(
                [
                    pa.array([SEGMENT] * n),
                    pa.array([OPERATION] * n),
                    batch.column("identifier_type"),
                    batch.column("identifier"),
                    batch.column("ts"),
                ],
                names=["segment_id", "operation", "identifier_type", "identifier", "ts"],
            )
        )
    table = pa.Table.from_batches(parts)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "raw.out"
    started = time.perf_counter()
    if fmt == "parquet":
        pq.write_table(table, path, compression=compression)
    elif threaded and compression == "gzip":
        with open(path, "wb") as f:
            gz = igzip_threaded.open(f, "wb", compresslevel=GZIP_LEVEL, threads=GZIP_THREADS,
                                     block_size=GZIP_BLOCK_BYTES)
            with gz, pcsv.CSVWriter(gz, table.schema) as writer:
                writer.write_table(table)
    elif threaded:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS)
        with open(path, "wb") as f, cctx.stream_writer(f, closefd=False) as zf, pcsv.CSVWriter(zf, table.schema) as w:
            w.write_table(table)
    elif compression == "gzip":
        with open(path, "wb") as f, igzip.IGzipFile(fileobj=f, mode="wb", compresslevel=1, mtime=0) as gz:
            with pcsv.CSVWriter(gz, table.schema) as writer:
                writer.write_table(table)
    else:
        with pa.CompressedOutputStream(str(path), compression) as stream, pcsv.CSVWriter(stream, table.schema) as w:
            w.write_table(table)
    seconds = time.perf_counter() - started
    return {"rows": table.num_rows, "seconds": seconds, "bytes": path.stat().st_size}


def child_raw_mt(master: Path, work: Path, fmt: str, compression: str) -> dict:
    return child_raw(master, work, fmt, compression, threaded=True)


def child_roll_nodedup(master: Path, work: Path, fmt: str, compression: str) -> dict:
    return child_roll(master, work, fmt, compression, dedup=False)


CHILDREN = {"roll": child_roll, "roll-nodedup": child_roll_nodedup, "raw": child_raw, "raw-mt": child_raw_mt}


def run_json_child(args: list[str], what: str) -> dict:
    """Run `python <args>` from the repo; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(mode: str, master: Path, work: Path, case: str) -> dict:
    fmt, compression = CASES[case]
    return run_json_child([__file__, f"--child-{mode}", str(master), str(work), fmt, compression],
                          f"{mode} child for {case}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--frame-rows", type=int, default=5_000)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder, removed at the end")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--dedup-rounds", type=int, default=2, help="interleaved rounds of roll / roll-nodedup")
    for mode in CHILDREN:
        parser.add_argument(f"--child-{mode}", nargs=4, metavar=("MASTER", "WORK", "FORMAT", "COMPRESSION"))
    args = parser.parse_args()

    for mode, fn in CHILDREN.items():
        child_args = getattr(args, f"child_{mode.replace('-', '_')}")
        if child_args:
            master, work, fmt, compression = child_args
            print(json.dumps(fn(Path(master), Path(work), fmt, compression)))
            return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="filefeed-bench-"))
    try:
        started = time.perf_counter()
        segments = stage(workdir / "master", args.rows, args.frame_rows)
        os.sync()  # the staged GBs reach the disk now, not as writeback competing with the first case
        staged_mb = sum(p.stat().st_size for p in segments) / 1e6
        print(
            f"staged {args.rows:,} rows in {len(segments)} segments ({staged_mb:,.0f} MB) "
            f"in {time.perf_counter() - started:.1f}s; {os.cpu_count()} cores"
        )
        print(
            f"{'case':<14}{'roll rows/s':>14}{'raw rows/s':>14}{'ratio':>8}{'peak RSS':>11}{'out MB':>9}"
            f"{'raw-mt rows/s':>16}{'ratio':>7}{'dedup cost':>12}  verdict"
        )
        results = []
        failed = False
        for case in cases:
            runs: dict[str, dict] = {}
            modes = list(CHILDREN if CASES[case][0] == "csv" else ("roll", "roll-nodedup", "raw"))
            # roll and roll-nodedup alternate for --dedup-rounds rounds; the fastest run of each counts
            schedule = ["roll", "roll-nodedup"] * args.dedup_rounds + [m for m in modes if not m.startswith("roll")]
            for mode in schedule:
                run = run_child(mode, workdir / "master", workdir / f"{mode}-{case}", case)
                if mode not in runs or run["seconds"] < runs[mode]["seconds"]:
                    runs[mode] = run
                shutil.rmtree(workdir / f"{mode}-{case}", ignore_errors=True)
                os.sync()  # each child starts without the previous one's writeback
            roll, raw, raw_mt = runs["roll"], runs["raw"], runs.get("raw-mt")
            # roll-time dedup (pipeline.recent_rows): the same roll with FILEFEED_DEDUP_SECONDS=0, same command
            nodedup_rate = runs["roll-nodedup"]["rows"] / runs["roll-nodedup"]["seconds"]
            cpu_cost = runs["roll"]["cpu_seconds"] / runs["roll-nodedup"]["cpu_seconds"]
            roll_rate = roll["rows"] / roll["seconds"]
            raw_rate = raw["rows"] / raw["seconds"]
            ratio = roll_rate / raw_rate
            mt = f"{'-':>16}{'-':>7}"
            if raw_mt:
                mt_rate = raw_mt["rows"] / raw_mt["seconds"]
                mt = f"{mt_rate / 1e6:>14.2f} M{roll_rate / mt_rate:>7.0%}"
            problems = []
            if roll["rows"] != args.rows:
                problems.append(f"rolled {roll['rows']} rows")
            if case in TARGET_ROWS_PER_S and roll_rate < TARGET_ROWS_PER_S[case]:
                problems.append(f"< {TARGET_ROWS_PER_S[case] / 1e6:.1f} M rows/s")
            if ratio < TARGET_RATIO:
                problems.append(f"< {TARGET_RATIO:.0%} of raw")
            if roll["peak_rss_mb"] >= TARGET_RSS_MB:
                problems.append(f"RSS >= {TARGET_RSS_MB} MB")
            failed = failed or bool(problems)
            print(
                f"{case:<14}{roll_rate / 1e6:>12.2f} M{raw_rate / 1e6:>12.2f} M{ratio:>8.0%}"
                f"{roll['peak_rss_mb']:>8.0f} MB{roll['bytes'] / 1e6:>9.0f}{mt}"
                f"{roll_rate / nodedup_rate:>12.0%} (cpu x{cpu_cost:.2f})  {'; '.join(problems) or 'ok'}"
            )
            results.append({"case": case, **runs, "ratio": ratio, "problems": problems})
        if args.json:
            print(json.dumps(results, indent=1))
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
