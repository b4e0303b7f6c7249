"""batch_update benchmark: items/s for 10,000-item batch_update calls, over real HTTP against `filefeed serve`.

    python bench/batch_update.py [--batches 20] [--items 10000] [--workers 2]
    python bench/batch_update.py --peer node-sdk [--rounds 2] [--history 120]   # against the official SDK's feed
    python bench/batch_update.py --peer node-sdk --ceiling         # + the durable floor (bench/bare_batch.py)
    python bench/batch_update.py --old-repo PATH [--rounds 4]      # against another checkout (the previous release)

Two cases, in one command (into staging twice: one call in flight, then --concurrency calls in flight, as the
platform's parallel batch jobs send them; each pass with items never seen before):
- "into staging": items the server never staged (another instance answered their user_segment_update): each call
  parses, stages (fsync), rolls and publishes them to a local folder, and counts;
- "already staged": items returned by this server's own user_segment_update answers (the usual case): each call
  finds their segments, rolls and counts.
The baseline beside them: the same bodies posted to a bare endpoint of the same HTTP stack that parses them
(orjson, then every item) and answers a constant. Target: 300,000 items/s into staging.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402
from bench.ingest import filefeed_and_peer, free_port, load_average, tree_cpu_seconds, wait_ready  # noqa: E402


def item(i: int, op: str = "UPSERT") -> str:
    return orjson.dumps({"segment_id": "451256", "operation": op, "identifier_type": "USER_EMAIL",
                         "identifier": hashlib.sha256(f"u{i}@example.com".encode()).hexdigest(),
                         "ts": 1717494873000, "session_id": "1717494873", "datamart_id": "1023",
                         "user_point_id": f"up-{i}"}).decode()


def batch(items: list) -> bytes:
    return orjson.dumps({"batch_content": items, "ts": 1717494873000,
                         "context": {"endpoint": "/v1/user_segment_update", "feed_id": "42",
                                     "feed_session_id": "1717494873", "segment_id": "451256",
                                     "datamart_id": "1023", "grouping_key": "UPSERT"}})


JSON_HEADERS = {"content-type": "application/json"}  # as the platform sends them (the SDK's body parser needs it)


def post_all(url: str, bodies: list[bytes], n_items: int, concurrency: int = 1) -> tuple[float, list[dict]]:
    """Post every body, `concurrency` calls in flight (one connection each); items/s over the whole run."""
    clients = [httpx.Client(base_url=url, timeout=300, trust_env=False) for _ in range(concurrency)]
    try:
        for c in clients:  # connect before timing
            c.get("/v1/status")

        def post_share(k: int) -> list[dict]:
            return [clients[k].post("/v1/batch_update", content=b, headers=JSON_HEADERS).json() for b in bodies[k::concurrency]]

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            shares = list(pool.map(post_share, range(concurrency)))
        elapsed = time.perf_counter() - t
    finally:
        for c in clients:
            c.close()
    return n_items / elapsed, [a for share in shares for a in share]


def setup() -> tuple[Path, Path, dict[str, str]]:
    """A temp folder, its delivery folder, and the env of filefeed serving feed 42 (USER_EMAIL) into it."""
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-batch-"))
    out = tmp / "delivery"
    out.mkdir()
    feeds = tmp / "feeds.toml"
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{out.as_uri()}"\nidentifier_types = "USER_EMAIL"\n'
                     "max_buffer_age_seconds = 86400\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
    env.update({"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp / "staging"),
                "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARN"})
    return tmp, out, env


@contextlib.contextmanager
def floor(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> Iterator[dict[str, tuple[subprocess.Popen, str]]]:
    """With --ceiling: bench/bare_batch.py's durable floor, served like filefeed (the same workers and serving path)."""
    if not args.ceiling:
        yield {}
        return
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_bare", "bench.bare_batch:create_durable_app", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
                            env={**env, "BENCH_FLOOR_DIR": str(tmp / "floor")}, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "floor.log", "wb"))
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield {"floor": (proc, f"http://127.0.0.1:{port}")}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def peer_main(args: argparse.Namespace) -> None:
    """`--peer node-sdk`: the same 10,000-item batches, one call in flight, into filefeed's staging (parse, stage with
    fsync, roll, publish) and into the official SDK's batched feed (parse, append to a CSV, no fsync); every pass with
    items never sent before, rounds alternated."""
    tmp, _, env = setup()
    n = args.items
    passes = iter(range(1 << 16))

    def fresh() -> list[bytes]:
        k = next(passes)
        return [batch([item((k * args.batches + b) * n + i) for i in range(n)]) for b in range(args.batches)]

    print(f"before: {load_average()}")
    with filefeed_and_peer(args.peer, env, args.workers, tmp, tmp / "peer-delivery", "USER_EMAIL") as procs, \
            floor(args, env, tmp) as extra:
        procs.update(extra)
        for _, url in procs.values():  # warm-up pass (JIT, first roll), not counted
            post_all(url, fresh()[:3], 3 * n)
            for start in range(0, args.history, args.batches):  # the history a long-running feed has, not counted
                calls = min(args.batches, args.history - start)
                post_all(url, fresh()[:calls], n * calls)
        rounds: list[dict[str, tuple[float, list[dict], float]]] = []
        for i in range(args.rounds):
            rnd = {}
            for name in (list(procs) if i % 2 == 0 else list(procs)[::-1]):
                proc, url = procs[name]
                cpu = tree_cpu_seconds(proc.pid)
                rate, answers = post_all(url, fresh(), n * args.batches)
                rnd[name] = (rate, answers, (tree_cpu_seconds(proc.pid) - cpu) / (n * args.batches) * 1e6)
            rounds.append(rnd)
    total = n * args.batches
    print(f"batch_update: {args.batches} calls of {n:,} items (JSON strings) per pass, one call in flight; filefeed "
          f"{args.workers} workers into staging (stage with fsync, roll, publish to a local folder) vs {args.peer} "
          f"(append to a CSV, no fsync); each server had {args.history} calls of history before the rounds")
    for i, rnd in enumerate(rounds, 1):
        for name, (rate, answers, cpu_us) in rnd.items():
            sent = sum(a.get("sent_items_in_success", 0) for a in answers)
            statuses = sorted({str(a.get("status")) for a in answers})
            print(f"  round {i} {name:9s} {rate:10,.0f} items/s  server CPU {cpu_us:5.2f} us/item  answers {statuses}, "
                  f"sent_items_in_success {sent:,} of {total:,}")
        print(f"  round {i} ratio filefeed/{args.peer}: {rnd['filefeed'][0] / rnd[args.peer][0]:.2f}"
              + (f"   (floor/{args.peer} {rnd['floor'][0] / rnd[args.peer][0]:.2f}, filefeed/floor "
                 f"{rnd['filefeed'][0] / rnd['floor'][0]:.2f})" if "floor" in rnd else ""))
    mean = {name: len(rounds) / sum(1 / r[name][0] for r in rounds) for name in procs}  # items over total time
    ratio = mean["filefeed"] / mean[args.peer]
    print(f"  overall   filefeed {mean['filefeed']:,.0f} items/s, {args.peer} {mean[args.peer]:,.0f} items/s, ratio "
          f"{ratio:.2f}  (target >= 1.5: {'ok' if ratio >= 1.5 else 'NOT MET'})")
    if "floor" in mean:
        print(f"  ceiling   floor (decode, TSV + fsync, CSV + gzip + fsync + rename, nothing else) "
              f"{mean['floor']:,.0f} items/s: {mean['floor'] / mean[args.peer]:.2f}x {args.peer}; filefeed reaches "
              f"{mean['filefeed'] / mean['floor']:.2f} of it")
    print(f"after: {load_average()}")
    shutil.rmtree(tmp, ignore_errors=True)


def old_repo_main(args: argparse.Namespace) -> None:
    """`--old-repo PATH`: the filefeed of another checkout (run from its own folder, so its code is imported) against
    this one, each with its own staging and folder, the same kind of fresh 10,000-item batches, one call in flight,
    rounds alternated."""
    n = args.items
    passes = iter(range(1 << 16))

    def fresh() -> list[bytes]:
        k = next(passes)
        return [batch([item((k * args.batches + b) * n + i) for i in range(n)]) for b in range(args.batches)]

    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    tmps = []
    print(f"before: {load_average()}")
    try:
        for name, code in (("old", args.old_repo.resolve()), ("this", ROOT)):
            tmp, _, env = setup()
            tmps.append(tmp)
            env["PYTHONPATH"] = str(code)
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port",
                                     str(port), "--workers", str(args.workers)], env=env, cwd=code,
                                    stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
            procs[name] = (proc, f"http://127.0.0.1:{port}")
            wait_ready(procs[name][1], proc)
        for _, url in procs.values():  # warm-up pass, not counted
            post_all(url, fresh()[:3], 3 * n)
        rates: dict[str, list[float]] = {name: [] for name in procs}
        total = n * args.batches
        print(f"batch_update: {args.batches} calls of {n:,} items per pass, one call in flight, {args.workers} workers "
              f"each; old = {args.old_repo}")
        for i in range(args.rounds):
            for name in (list(procs) if i % 2 == 0 else list(procs)[::-1]):
                cpu = tree_cpu_seconds(procs[name][0].pid)
                rate, answers = post_all(procs[name][1], fresh(), total)
                cpu_us = (tree_cpu_seconds(procs[name][0].pid) - cpu) / total * 1e6
                sent = sum(a.get("sent_items_in_success", 0) for a in answers)
                statuses = sorted({str(a.get("status")) for a in answers})
                rates[name].append(rate)
                print(f"  round {i + 1} {name:4s} {rate:10,.0f} items/s  server CPU {cpu_us:5.2f} us/item  answers "
                      f"{statuses}, sent_items_in_success {sent:,} of {total:,}")
            print(f"  round {i + 1} ratio this/old: {rates['this'][-1] / rates['old'][-1]:.2f}")
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    mean = {name: len(r) / sum(1 / x for x in r) for name, r in rates.items()}  # items over total time
    print(f"  overall   this {mean['this']:,.0f} items/s, old {mean['old']:,.0f} items/s, ratio "
          f"{mean['this'] / mean['old']:.2f}")
    print(f"after: {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=None,
                    help="calls in flight for the concurrent pass (default: as many as workers)")
    ap.add_argument("--peer", choices=peer.PEERS, help="filefeed against this peer, one call in flight, alternated")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds with --peer or --old-repo")
    ap.add_argument("--history", type=int, default=120,
                    help="with --peer: calls sent to each server before the rounds, not counted (120 x 10,000 items "
                         "fill the partition's roll-time dedup window of FILEFEED_DEDUP_MAX_ROWS = 1 M rows: a busy "
                         "feed's steady state; the first 100 calls cost about a third less)")
    ap.add_argument("--ceiling", action="store_true", help="with --peer: also the durable floor (bench/bare_batch.py "
                    "create_durable_app) in the same rounds")
    ap.add_argument("--old-repo", type=Path, default=None,
                    help="another checkout's filefeed against this one, one call in flight, alternated")
    args = ap.parse_args()
    if args.old_repo:
        old_repo_main(args)
        return
    if args.peer:
        peer_main(args)
        return
    concurrency = args.concurrency or args.workers
    tmp, out, env = setup()
    n = args.items
    # one set of never-staged items per pass: a body posted twice would be "already published" the second time
    fresh = [batch([item(b * n + i) for i in range(n)]) for b in range(args.batches)]
    fresh_mt = [batch([item((args.batches + b) * n + i) for i in range(n)]) for b in range(args.batches)]
    procs = []
    try:
        port = free_port()
        ff = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", str(args.workers)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "serve.log", "wb"))
        procs.append(ff)
        url = f"http://127.0.0.1:{port}"
        bport = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.serve_bare", "bench.bare_batch:create_app", "--host",
                                 "127.0.0.1", "--port", str(bport), "--workers", str(args.workers)], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(bare)
        burl = f"http://127.0.0.1:{bport}"
        wait_ready(url, ff)
        wait_ready(burl, bare)
        base_rate, _ = post_all(burl, fresh, n * len(fresh))
        fresh_rate, answers = post_all(url, fresh, n * len(fresh))
        base_mt_rate, _ = post_all(burl, fresh_mt, n * len(fresh_mt), concurrency)
        fresh_mt_rate, answers_mt = post_all(url, fresh_mt, n * len(fresh_mt), concurrency)
        sent = sum(a.get("sent_items_in_success", 0) for a in answers)
        sent_mt = sum(a.get("sent_items_in_success", 0) for a in answers_mt)
        statuses = {a.get("status") for a in answers + answers_mt}

        # already staged: stage through user_segment_update first (not timed), then batch the returned items
        staged_bodies = []
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            for b in range(args.batches):
                items = []
                for i in range(n):
                    k = 10_000_000 + b * n + i
                    body = {"feed_id": "42", "session_id": "1717494873", "datamart_id": "1023",
                            "segment_id": "451256", "ts": 1717494873000, "operation": "UPSERT",
                            "user_identifiers": [{"type": "USER_EMAIL",
                                                  "hash": hashlib.sha256(f"s{k}".encode()).hexdigest()}]}
                    r = c.post("/v1/user_segment_update", content=orjson.dumps(body))
                    items.extend(orjson.dumps(x["content"]).decode() for x in r.json()["data"])
                staged_bodies.append(batch(items))
                if b >= 1:  # staging 10k users one call at a time is slow: two batches are enough here
                    break
        staged_items = sum(len(orjson.loads(b)["batch_content"]) for b in staged_bodies)
        staged_rate, answers2 = post_all(url, staged_bodies, staged_items)
        sent2 = sum(a.get("sent_items_in_success", 0) for a in answers2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".manifest.json"))
    total = n * len(fresh)
    print(f"batch_update: {args.batches} calls of {n:,} items (JSON strings) per pass, {args.workers} workers, "
          "local folder")
    print(f"  {'':40}{'1 call in flight':>18}{f'{concurrency} in flight':>16}")
    print(f"  {'bare endpoint (parse body + items)':40}{base_rate:>12,.0f} it/s{base_mt_rate:>11,.0f} it/s")
    print(f"  {'into staging (stage, roll, publish)':40}{fresh_rate:>12,.0f} it/s{fresh_mt_rate:>11,.0f} it/s"
          f"  target >= 300,000 items/s: {'ok' if max(fresh_rate, fresh_mt_rate) >= 300_000 else 'NOT MET'}")
    print(f"  {'  ratio to bare':40}{fresh_rate / base_rate:>17.2f}{fresh_mt_rate / base_mt_rate:>16.2f}")
    print(f"  answers {statuses}; sent_items_in_success {sent:,} of {total:,} and {sent_mt:,} of {total:,}")
    print(f"  already staged (find, roll, publish) {staged_rate:12,.0f} items/s  sent_items_in_success {sent2:,} of "
          f"{staged_items:,}")
    print(f"  {len(files)} data files published")
    for a in answers2:
        if a.get("status") != "OK":
            print(f"  already-staged answer: {a}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
