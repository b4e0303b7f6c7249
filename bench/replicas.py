"""Shared-database benchmark: the embedded default against FILEFEED_DATABASE_URL (PostgreSQL on the same machine),
in one command, rounds alternated.

    python bench/replicas.py [--seconds 20] [--rounds 3] [--workers 2] [--batches 10] [--database-url URL]

1. ingest: user_segment_update (2 identifiers, new ones every request, every row fsynced before its answer) by wrk
   (2 threads, 32 connections), against two servers that differ only by the setting: req/s, p99, the ratio
   (target >= 0.5). The hot path makes no database call, so the ratio measures what the shared mode costs the
   worker's background (leases, claims) and the machine (PostgreSQL on the same 2 cores).
2. batch_update into staging: 10,000-item calls of rows never staged, one call in flight (stage, roll with every
   row claimed in the database, publish to a local folder, count): items/s of each and the ratio.
Without --database-url, a fresh database is created on the project's server (scripts/servers.sh start) through its
PG_ADMIN_URL, read from FILEFEED_SERVERS_ENV or .servers/env, and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batch_update import batch, item, post_all  # noqa: E402
from bench.ingest import LUA, check_staged, load_average, run_wrk, start_filefeed  # noqa: E402


def servers_env() -> dict[str, str]:
    path = Path(os.environ.get("FILEFEED_SERVERS_ENV") or ROOT / ".servers" / "env")
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `bash scripts/servers.sh start` (or pass --database-url)")
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def fresh_database() -> tuple[str, str, str]:
    import psycopg

    env = servers_env()
    name = f"bench_{uuid.uuid4().hex[:10]}"
    owner = psycopg.conninfo.conninfo_to_dict(env["DATABASE_URL"])["user"]
    with psycopg.connect(env["PG_ADMIN_URL"], autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    return env["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name, env["PG_ADMIN_URL"], name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_env(tmp: Path, name: str, database_url: str | None) -> tuple[dict[str, str], Path]:
    out = tmp / f"delivery-{name}"
    out.mkdir()
    feeds = tmp / f"feeds-{name}.toml"
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{out.as_uri()}"\nidentifier_types = "USER_EMAIL,USER_POINT"\n'
                     "max_buffer_age_seconds = 86400\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
    env.update({"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp / f"staging-{name}"),
                "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARN", "PYTHONPATH": str(ROOT)})
    if database_url:
        env.update({"FILEFEED_DATABASE_URL": database_url, "FILEFEED_REPLICA_ID": "bench"})
    return env, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10, help="10,000-item batch_update calls per server and round")
    ap.add_argument("--database-url")
    args = ap.parse_args()
    created = None
    url = args.database_url
    if url is None:
        url, admin, name = fresh_database()
        created = (admin, name)
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-replicas-"))
    script = tmp / "update.lua"
    script.write_text(LUA)
    procs = {}
    try:
        server_env_of = {}
        for name, db in (("embedded", None), ("shared", url)):
            server_env_of[name] = server_env(tmp, name, db)
            procs[name] = start_filefeed(server_env_of[name][0], args.workers, tmp / f"{name}.log")
        print(f"replicas bench: {args.workers} workers each, wrk -t2 -c{args.connections}, {args.rounds} alternated "
              f"rounds of {args.seconds} s; PostgreSQL on this machine; {load_average()}")
        results: dict[str, list[dict]] = {n: [] for n in procs}
        acknowledged = {n: 0 for n in procs}
        runs = {n: 0 for n in procs}
        for name in procs:  # warm-up
            r = run_wrk(procs[name][1], 3, args.connections, 2, script)
            acknowledged[name] += r["requests"] - r["status_errors"]
            runs[name] += 1
        for k in range(args.rounds):
            order = list(procs) if k % 2 == 0 else list(reversed(procs))
            for name in order:
                r = run_wrk(procs[name][1], args.seconds, args.connections, 2, script)
                results[name].append(r)
                acknowledged[name] += r["requests"] - r["status_errors"]
                runs[name] += 1
        rps = {}
        for name, rs in results.items():
            rps[name] = sum(r["requests"] for r in rs) / sum(args.seconds for _ in rs)
            errors = sum(r["errors"] + r["status_errors"] for r in rs)
            print(f"  ingest {name:9s} {rps[name]:9,.0f} req/s  p50 {max(r['p50_ms'] for r in rs):6.2f} ms  "
                  f"p99 {max(r['p99_ms'] for r in rs):6.2f} ms  errors {errors}  "
                  f"(rounds: {', '.join(format(r['rps'], ',.0f') for r in rs)})")
        print(f"  ingest ratio shared/embedded {rps['shared'] / rps['embedded']:.2f} (target >= 0.5)")
        for name in procs:
            check_staged(tmp / f"staging-{name}", acknowledged[name], args.connections * runs[name], name)

        for name in procs:  # the ingest part's rows delivered first (not timed), so batches roll their own rows only
            env, _ = server_env_of[name]
            subprocess.run([sys.executable, "-m", "filefeed", "flush"], env=env, cwd=ROOT, check=True,
                           capture_output=True, timeout=600)
        n = 10_000
        rates: dict[str, list[float]] = {name: [] for name in procs}
        sent: dict[str, int] = {name: 0 for name in procs}
        seq = 0
        for k in range(args.rounds):
            order = list(procs) if k % 2 == 0 else list(reversed(procs))
            for name in order:
                bodies = [batch([item(50_000_000 + (seq + b) * n + i) for i in range(n)]) for b in range(args.batches)]
                seq += args.batches
                rate, answers = post_all(procs[name][1], bodies, n * len(bodies))
                rates[name].append(rate)
                sent[name] += sum(a.get("sent_items_in_success", 0) for a in answers)
        for name, rs in rates.items():
            print(f"  batch_update {name:9s} {sum(rs) / len(rs):9,.0f} items/s one call in flight  "
                  f"(rounds: {', '.join(format(r, ',.0f') for r in rs)}); counted {sent[name]:,} of "
                  f"{n * args.batches * args.rounds:,}")
        print(f"  batch_update ratio shared/embedded {sum(rates['shared']) / sum(rates['embedded']):.2f}")
        import psycopg

        with psycopg.connect(url) as conn:
            claims, size = conn.execute("SELECT count(*), pg_total_relation_size('claims') FROM claims").fetchone()
        print(f"  row claims in the database: {claims:,}, {size / max(claims, 1):.0f} bytes each (table + indexes)")
        print(f"  {load_average()}")
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if created:
            drop_database(*created)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
