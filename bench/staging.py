"""Staging benchmarks: group-commit append throughput, and iter_batches beside a raw pyarrow TSV baseline.

    python bench/staging.py                      # both parts, defaults
    python bench/staging.py --rows 5000000 --producers 1,16,64,256 --seconds 3

Figures move about ±30 % between runs on the project machines: compare the ratios printed by one run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402

from pipeline.journal import encode_frame  # noqa: E402
from pipeline.model import STAGED_FIELDS, Partition  # noqa: E402
from pipeline.staging import Staging, iter_batches  # noqa: E402
from pipeline.staging.reading import _CONVERT_OPTIONS, _PARSE_OPTIONS  # noqa: E402

PARTITION = Partition("bench", "seg1", "UPSERT")


def row(i: int) -> tuple[str, str, int, str, str, str]:
    digest = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
    return ("email_sha256", digest, 1_700_000_000_000 + i, "sess-20240601", "1234", f"up-{i:012d}")


async def _producers(staging: Staging, n: int, seconds: float) -> int:
    stop = time.monotonic() + seconds
    counter = 0

    async def produce(k: int) -> None:
        nonlocal counter
        i = k * 10_000_000
        while time.monotonic() < stop:
            await staging.append(PARTITION, [row(i), row(i + 1)])
            i += 2
            counter += 2

    await asyncio.gather(*(produce(k) for k in range(n)))
    return counter


def bench_append(base: Path, producers: list[int], seconds: float) -> None:
    print(f"(a) append: 2-row appends from N asyncio producers, {seconds:.0f} s each, fsync before every ack")
    print(f"{'N':>5} {'rows/s':>10} {'fsyncs/s':>9} {'rows/fsync':>10} {'appends/s':>10}")
    for n in producers:
        root = base / f"append-{n}"
        staging = Staging(root, dedup_window=200_000, min_free_bytes=0)
        t0 = time.perf_counter()
        rows = asyncio.run(_producers(staging, n, seconds))
        dt = time.perf_counter() - t0
        syncs = staging.syncs
        staging.close()
        print(f"{n:>5} {rows / dt:>10,.0f} {syncs / dt:>9,.0f} {rows / max(syncs, 1):>10.1f} {rows / 2 / dt:>10,.0f}")
        shutil.rmtree(root)


def bench_read(base: Path, nrows: int, frame_rows: int, chunk_mib: int) -> None:
    root = base / "read"
    seg_dir = root / PARTITION.relpath / "sealed"
    seg_dir.mkdir(parents=True)
    raw_path = base / "raw.tsv"
    # Rows are built once and reused with distinct ids: the generator is not what is being measured.
    template = [row(i) for i in range(frame_rows)]
    paths = []
    seg_rows = 400 * frame_rows  # about 56 MB segments, near the 64 MiB default seal size
    with open(raw_path, "wb") as raw:
        written = 0
        seq = 0
        while written < nrows:
            seq += 1
            path = seg_dir / f"wbench-{seq:08d}.jnl"
            with open(path, "wb") as f:
                in_seg = 0
                while in_seg < seg_rows and written < nrows:
                    n = min(frame_rows, nrows - written)
                    payload = "".join(
                        f"{r[0]}\t{r[1]}\t{r[2] + written}\t{r[3]}\t{r[4]}\t{r[5]}\n" for r in template[:n]
                    ).encode()
                    f.write(encode_frame(payload, n, 1_700_000_000_000))
                    raw.write(payload)
                    written += n
                    in_seg += n
            paths.append(path)
    size = sum(p.stat().st_size for p in paths)
    print(f"\n(b) read: {nrows:,} rows in {frame_rows}-row frames, {len(paths)} segments, {size / 1e6:.0f} MB")

    def staged() -> int:
        return sum(b.num_rows for b in iter_batches(paths, chunk_bytes=chunk_mib << 20))

    def raw_baseline() -> int:
        # The same TSV without frames, parsed by pyarrow in one call: the physical limit of the parse.
        t = pacsv.read_csv(
            raw_path,
            read_options=pacsv.ReadOptions(column_names=list(STAGED_FIELDS)),
            parse_options=_PARSE_OPTIONS,
            convert_options=_CONVERT_OPTIONS,
        )
        return t.num_rows

    def raw_streaming() -> int:
        # pyarrow's own streaming reader over the raw TSV, with the same block size as our chunks.
        reader = pacsv.open_csv(
            raw_path,
            read_options=pacsv.ReadOptions(column_names=list(STAGED_FIELDS), block_size=chunk_mib << 20),
            parse_options=_PARSE_OPTIONS,
            convert_options=_CONVERT_OPTIONS,
        )
        return sum(b.num_rows for b in reader)

    results = {}
    for name, fn in (
        ("raw read_csv (whole file)", raw_baseline),
        ("raw open_csv (streaming)", raw_streaming),
        ("iter_batches (frames + crc)", staged),
    ):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            got = fn()
            best = min(best, time.perf_counter() - t0)
            assert got == nrows, (name, got)
        results[name] = nrows / best
        print(f"  {name:<30} {nrows / best:>12,.0f} rows/s  ({best:.2f} s, best of 3)")
    ours = results["iter_batches (frames + crc)"]
    print(f"  ratio iter_batches / raw read_csv: {ours / results['raw read_csv (whole file)']:.2f}")
    print(f"  ratio iter_batches / raw open_csv: {ours / results['raw open_csv (streaming)']:.2f}")
    print(f"  pyarrow cpu_count={pa.cpu_count()}, chunk {chunk_mib} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under /tmp)")
    ap.add_argument("--producers", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--frame-rows", type=int, default=1000)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--skip-append", action="store_true")
    ap.add_argument("--skip-read", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=args.dir))
    try:
        if not args.skip_append:
            bench_append(base, [int(x) for x in args.producers.split(",")], args.seconds)
        if not args.skip_read:
            bench_read(base, args.rows, args.frame_rows, args.chunk_mib)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n(python {sys.version.split()[0]}, pyarrow {pa.__version__}, {os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
