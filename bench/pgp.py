"""Roll + PGP against the same roll without encryption followed by `gpg --encrypt` of its files, in one command.

    python bench/pgp.py [--rows 10000000] [--rounds 2] [--case csv-gzip]

Stages realistic rows once (bench/rollover.py's journal segments), makes a partner key with `gpg --batch`, then in
interleaved rounds, each in a fresh child process:
  * pgp:       roll_partition with `encryption = pgp` (encode, then one streaming `gpg --encrypt` per file, hash,
               publish to a local folder, ledger);
  * plain+gpg: roll_partition without encryption, then `gpg --encrypt` of each published file with gpg's defaults
               (what an operator would script; the issue's baseline);
  * plain+gpg-z0 (information): the same with `--compress-algo none`, i.e. the same gpg work filefeed does.
    (gpg itself skips compressing input it recognises as gzip, so for csv-gzip the two baselines do the same work;
    Parquet it deflates again.)
Figures: rows/s and MB/s of plaintext file bytes over the whole pipeline, peak RSS of the child (VmHWM; the gpg
processes stream in about 15 MB each, not counted: rusage of a forked child reports its parent's pages). Targets: pgp >= 0.8 of plain+gpg; peak RSS < 300 MB at 10 M rows.
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.rollover import CASES, link_staged, peak_rss_mb, run_json_child, stage  # noqa: E402

TARGET_RATIO = 0.8
TARGET_RSS_MB = 300
MODES = ("pgp", "plain+gpg", "plain+gpg-z0")


def make_key(home: Path) -> str:
    home.mkdir(mode=0o700, parents=True)
    base = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--passphrase", "", "--pinentry-mode", "loopback"]
    subprocess.run([*base, "--quick-gen-key", "Partner <partner@example.com>", "rsa3072", "default", "0"],
                   check=True, capture_output=True, timeout=300)
    fpr = subprocess.run(["gpg", "--homedir", str(home), "--with-colons", "--list-keys"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    primary = next(line.split(":")[9] for line in fpr.splitlines() if line.startswith("fpr:"))
    subprocess.run([*base, "--quick-add-key", primary, "rsa3072", "encr", "0"], check=True, capture_output=True,
                   timeout=300)
    return subprocess.run(["gpg", "--homedir", str(home), "--armor", "--export"], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def child(mode: str, master: Path, work: Path, case: str, key_file: Path) -> dict:
    from config.feed import parse_feed_properties
    from pipeline.rollover import roll_partition
    from sinks import open_sink

    fmt, compression = CASES[case]
    partition, root, dest = link_staged(master, work)
    armoured = key_file.read_text()
    raw = {"destination_uri": f"file://{dest}", "file_format": fmt, "compression": compression,
           "max_rows_per_file": 5_000_000}
    if mode == "pgp":
        raw |= {"encryption": "pgp", "pgp_public_key": armoured}
    props = parse_feed_properties(raw)
    home = work / "gnupg"
    if mode != "pgp":  # the operator's keyring, ready before the clock starts
        home.mkdir(mode=0o700)
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", "--import"], input=armoured.encode(),
                       check=True, capture_output=True, timeout=60)
    started = time.perf_counter()
    with open_sink(props) as sink:
        outcome = roll_partition(root, partition, props, sink, now=datetime.now(UTC))
    if outcome.status != "published":
        raise SystemExit(f"roll failed: {outcome}")
    plain_bytes = 0
    for name in outcome.files:
        if mode == "pgp":
            break
        path = dest / name
        plain_bytes += path.stat().st_size
        extra = ["--compress-algo", "none"] if mode == "plain+gpg-z0" else []
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", "--trust-model", "always", *extra,
                        "--recipient", "partner@example.com", "--output", f"{path}.gpg", "--encrypt", str(path)],
                       check=True, capture_output=True, timeout=3600)
    seconds = time.perf_counter() - started
    # plain_bytes stays 0 for pgp: MB/s of every mode is counted on the plaintext files of plain+gpg (same rows)
    return {"rows": outcome.rows, "seconds": seconds, "plain_bytes": plain_bytes, "peak_rss_mb": peak_rss_mb()}


def run(mode: str, master: Path, work: Path, case: str, key_file: Path) -> dict:
    return run_json_child([__file__, "--child", mode, str(master), str(work), case, str(key_file)], f"{mode} child")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--frame-rows", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", default="csv-gzip", choices=sorted(CASES))
    parser.add_argument("--child", nargs=5, metavar=("MODE", "MASTER", "WORK", "CASE", "KEY"))
    args = parser.parse_args()
    if args.child:
        mode, master, work, case, key = args.child
        print(json.dumps(child(mode, Path(master), Path(work), case, Path(key))))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="filefeed-bench-pgp-"))
    home = workdir / "partner-gnupg"
    try:
        key_file = workdir / "partner.asc"
        key_file.write_text(make_key(home))
        segments = stage(workdir / "master", args.rows, args.frame_rows)
        os.sync()
        print(f"staged {args.rows:,} rows in {len(segments)} segments; case {args.case}; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for round_no in range(args.rounds):
            for mode in MODES if round_no % 2 == 0 else tuple(reversed(MODES)):
                work = workdir / f"{mode}-{round_no}"
                results[mode].append(run(mode, workdir / "master", work, args.case, key_file))
                shutil.rmtree(work, ignore_errors=True)
                os.sync()
        best = {m: min(runs, key=lambda r: r["seconds"]) for m, runs in results.items()}
        plain_mb = best["plain+gpg"]["plain_bytes"] / 1e6
        print(f"{'mode':<14}{'best s':>8}{'rows/s':>12}{'MB/s':>8}{'peak RSS':>10}  all rounds (s)")
        for mode in MODES:
            b = best[mode]
            print(f"{mode:<14}{b['seconds']:>8.2f}{b['rows'] / b['seconds'] / 1e6:>10.2f} M"
                  f"{plain_mb / b['seconds']:>8.0f}{b['peak_rss_mb']:>7.0f} MB  "
                  + " ".join(f"{r['seconds']:.2f}" for r in results[mode]))
        ratio = best["plain+gpg"]["seconds"] / best["pgp"]["seconds"]
        ratio_z0 = best["plain+gpg-z0"]["seconds"] / best["pgp"]["seconds"]
        rss = max(r["peak_rss_mb"] for r in results["pgp"])
        problems = []
        if ratio < TARGET_RATIO:
            problems.append(f"pgp < {TARGET_RATIO} of plain+gpg")
        if rss >= TARGET_RSS_MB:
            problems.append(f"peak RSS >= {TARGET_RSS_MB} MB")
        if any(r["rows"] != args.rows for runs in results.values() for r in runs):
            problems.append("row count mismatch")
        print(f"pgp / plain+gpg = {ratio:.2f} (target >= {TARGET_RATIO}); pgp / plain+gpg-z0 = {ratio_z0:.2f} "
              f"(information: the same gpg work); pgp peak RSS {rss:.0f} MB; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  {'; '.join(problems) or 'ok'}")
        return 1 if problems else 0
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30,
                       check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
