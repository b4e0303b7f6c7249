"""Ingest benchmark: user_segment_update (2 identifiers) against `filefeed serve` (every row fsynced before its
answer) beside a bare endpoint of the same HTTP stack, loaded by wrk from the same machine, in one command.

    python bench/ingest.py [--seconds 30] [--workers 2] [--connections 64] [--soak 0]
    python bench/ingest.py --feeds 1,50,1000 [--rounds 2] [--repo PATH]

Prints requests/s, p50/p99 latency, the ratio filefeed/bare, server RSS at start and end, and checks that the staged
rows equal the acknowledged ones. `--soak 300` adds a 5-minute run reporting RSS every 30 s.

A third server, `durable`, is the bare endpoint plus a group-committed write + fsync before each answer and nothing
else (bench/bare_app.py): the most any durable endpoint can do on this stack and disk. Its ratio to bare is the
ceiling of filefeed's; filefeed/durable is the share left after filefeed's own work.

`--feeds N1,N2,...` measures the cost of partitions instead (see run_feeds): one filefeed server with max(N) feeds of
one segment each, the same load spread over the first N feeds, rounds interleaved; it prints each N's figures and
its ratio to the 1-feed (first N) figure. `--repo` runs the server from another checkout (the previous release).

`--peer node-sdk --ceiling` adds, in the same alternated rounds, the parse-and-constant endpoint as a raw ASGI
callable on filefeed's own server, answered straight from the protocol as filefeed's hot routes are (`direct`), and on
granian's RSGI interface (bench/bare_app.py): nothing durable, no framework, so their ratio to the peer is the most
any endpoint on that serving path could reach on this machine under this load. And the same direct endpoint answering
after a group-committed write + fsync (`direct-durable`; `durable-room`: the same into a file pre-written once, so no
commit grows it; `durable-thread`: the write + fsync pipelined on a thread, the loop never blocked): the most any
endpoint that makes each request durable before its answer could reach here. Every run prints wrk's own CPU per
request beside the server's, the budget 4.0x the peer leaves a server on this machine (the cores' CPU per request at
that rate, less wrk's), and how many cores each server's run kept busy with wrk (below the count: the loop waited in
fsync while the cores were free).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402

IDENTIFIER_TYPES = "USER_EMAIL,USER_POINT"
LUA = r"""
local counter = 0
local threads = {}
tid = 0
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  counter = 0
  run = tonumber(args[1]) or 0
end
local template = '{"feed_id":"42","session_id":"1717494873","datamart_id":"1023","segment_id":"451256",' ..
  '"ts":1717494873000,"operation":"UPSERT","user_identifiers":[' ..
  '{"type":"USER_POINT","user_point_id":"26340584-f777-404c-%04x-%04x%08x","creation_ts":1493118667529},' ..
  '{"type":"USER_EMAIL","hash":"ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad%04x%04x%08x",' ..
  '"creation_ts":1493118667529,"last_activity_ts":1717494873000,"providers":[]}],"user_profiles":[]}'
request = function()
  counter = counter + 1
  local body = string.format(template, run, tid, counter, run, tid, counter)
  return wrk.format("POST", "/v1/user_segment_update", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d errors=%d status_errors=%d p50_us=%d p99_us=%d duration_us=%d\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99), summary.duration))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/status", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("server not ready")


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its children (uvicorn's workers), in MB."""
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


_RUNS = iter(range(1, 1 << 16))


def run_wrk(url: str, seconds: int, connections: int, threads: int, script: Path, *extra: str) -> dict[str, float]:
    """One wrk run; every run sends identifiers no other run sent (the run number is in each of them).

    `client_cpu_us`: wrk's own CPU per request (its rusage as a waited-for child), which the server shares cores with.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
                          "-s", str(script), url, "--", str(next(_RUNS)), *extra], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"RESULT requests=(\d+) errors=(\d+) status_errors=(\d+) p50_us=(\d+) p99_us=(\d+) "
                  r"duration_us=(\d+)", out)
    if not m:
        raise SystemExit(f"wrk output not understood:\n{out}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    req, errors, status_errors, p50, p99, dur = map(int, m.groups())
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"requests": req, "errors": errors, "status_errors": status_errors, "rps": req / (dur / 1e6),
            "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "client_cpu_us": client / max(1, req) * 1e6}


def staged_rows(staging: Path) -> int:
    from pipeline.staging import Staging

    st = Staging(staging)
    return sum(st.stats(p).rows for p in st.partitions())


# The same update, spread over `nfeeds` feeds (feed f<k>, segment s<k>), derived from LUA so both send the same body.
LUA_FEEDS = LUA
for _old, _new in (('"feed_id":"42"', '"feed_id":"f%d"'), ('"segment_id":"451256"', '"segment_id":"s%d"'),
                   ("  run = tonumber(args[1]) or 0\n", "  run = tonumber(args[1]) or 0\n  nfeeds = tonumber(args[2]) or 1\n"),
                   ("  local body = string.format(template, run,",
                    "  local k = (counter * 7919 + tid) % nfeeds + 1\n  local body = string.format(template, k, k, run,")):
    assert _old in LUA_FEEDS, _old
    LUA_FEEDS = LUA_FEEDS.replace(_old, _new)


def run_feeds(args: argparse.Namespace) -> None:
    """Ingest over 1, 50, 1,000... feeds of one segment each: does the durability cost grow with the partitions?"""
    counts = sorted({int(n) for n in args.feeds.split(",")})
    repo = Path(args.repo).resolve() if args.repo else ROOT
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-feeds-"))
    script = tmp / "feeds.lua"
    script.write_text(LUA_FEEDS)
    out = tmp / "delivery"
    out.mkdir()
    toml = tmp / "feeds.toml"
    toml.write_text("".join(f'[feeds.f{k}]\ndestination_uri = "{out.as_uri()}"\n'
                            'identifier_types = "USER_EMAIL,USER_POINT"\nmax_buffer_age_seconds = 86400\n\n'
                            for k in range(1, max(counts) + 1)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
    env.update({"FILEFEED_FEEDS": str(toml), "FILEFEED_STAGING_DIR": str(tmp / "staging"),
                "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARN", "PYTHONPATH": str(repo)})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(args.workers)], env=env, cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "filefeed.log", "wb"))
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    acknowledged = sent_runs = 0

    def one(n: int, seconds: int) -> dict[str, float]:
        nonlocal acknowledged, sent_runs
        r = run_wrk(url, seconds, args.connections, args.wrk_threads, script, str(n))
        acknowledged += r["requests"] - r["status_errors"]
        sent_runs += 1
        return r

    try:
        wait_ready(url, proc)
        for n in counts:
            one(n, 3)  # warm-up: every feed's context loaded, every partition folder made
        for _ in range(args.rounds):
            for n in counts:
                results[n].append(one(n, args.seconds))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"ingest --feeds: user_segment_update, 2 identifiers, one segment per feed, {args.workers} workers, "
          f"wrk -c{args.connections} -t{args.wrk_threads}, {args.rounds} interleaved rounds of {args.seconds}s, "
          f"server code from {repo}")
    base = sum(r["requests"] for r in results[counts[0]])
    for n in counts:
        rs = results[n]
        rps = sum(r["requests"] for r in rs) / (args.seconds * len(rs))
        p50 = max(r["p50_ms"] for r in rs)
        p99 = max(r["p99_ms"] for r in rs)
        errors = sum(r["errors"] for r in rs)  # socket errors and timeouts
        non_2xx = sum(r["status_errors"] for r in rs)
        per_round = ", ".join(f"{r['rps']:,.0f}" for r in rs)
        print(f"  {n:6,d} feeds {rps:9,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  errors {errors} non-2xx {non_2xx}  "
              f"ratio to {counts[0]} feed(s) {sum(r['requests'] for r in rs) / base:.2f}  (rounds: {per_round})")
    print("  targets: 50 feeds >= 0.85 and 1,000 feeds >= 0.70 of the 1-feed figure")
    check_staged(tmp / "staging", acknowledged, args.connections * sent_runs)
    print(f"  {load_average()}")
    shutil.rmtree(tmp, ignore_errors=True)


def setup() -> tuple[Path, Path, dict[str, str]]:
    """A temp folder with the wrk script, feed 42 (USER_EMAIL + USER_POINT, a local folder) and the servers' env."""
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-ingest-"))
    script = tmp / "update.lua"
    script.write_text(LUA)
    out = tmp / "delivery"
    out.mkdir()
    feeds = tmp / "feeds.toml"
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{out.as_uri()}"\nidentifier_types = "{IDENTIFIER_TYPES}"\n'
                     "max_buffer_age_seconds = 86400\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_"))}
    env.update({"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp / "staging"),
                "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARN",
                "BENCH_DURABLE_DIR": str(tmp / "durable")})
    return tmp, script, env


def tree_pids(pid: int) -> list[int]:
    """A process and its children (uvicorn's or Node cluster's workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [pid] + [int(p) for p in out.split()]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its children."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def check_staged(staging: Path, acknowledged: int, in_flight: int, who: str = "") -> None:
    """Every acknowledged 2-identifier request staged 2 rows; requests in flight when a wrk run stops are staged but
    uncounted (at most one per connection per run)."""
    rows = staged_rows(staging)
    slack = 2 * in_flight
    ok = 2 * acknowledged <= rows <= 2 * acknowledged + slack
    print(f"  {who + ' ' if who else ''}staged rows on disk {rows:,}; 2 x acknowledged requests {2 * acknowledged:,} "
          f"(+ at most {slack:,} in flight at wrk's stops): {'OK' if ok else 'MISMATCH'}")


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def start_filefeed(env: dict[str, str], workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


@contextlib.contextmanager
def filefeed_and_peer(name: str, env: dict[str, str], workers: int, tmp: Path, folder: Path, identifier_types: str,
                      ) -> Iterator[dict[str, tuple[subprocess.Popen, str]]]:
    """filefeed (`env`'s embedded feed 42) and the peer (a gateway stand-in answering feed 42 with `folder` and
    `identifier_types`), both ready: {"filefeed": (process, url), name: (process, url)}; both stopped on exit."""
    gateway = peer.start_gateway(folder, identifier_types)
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        procs["filefeed"] = start_filefeed(env, workers, tmp / "filefeed.log")
        port = free_port()
        proc = peer.popen(port, gateway.port, env, tmp / "peer.log")
        procs[name] = (proc, f"http://127.0.0.1:{port}")
        wait_ready(procs[name][1], proc)
        yield procs
    finally:
        for key, (proc, _) in procs.items():
            if key == "filefeed":
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            else:
                peer.stop(proc)
        gateway.close()


CEILINGS = ("raw-asgi", "direct", "direct-durable", "durable-room", "durable-thread", "rsgi")
ROOM_BYTES = 256 * 1024 * 1024  # durable-room's file per worker, pre-written at its first request: > 2 rounds


@contextlib.contextmanager
def ceilings(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> Iterator[dict[str, tuple[subprocess.Popen, str]]]:
    """With --ceiling: the parse-and-constant endpoint (bench/bare_app.py) as a raw ASGI callable on filefeed's own
    server, answered from the protocol the way filefeed's hot routes are (`direct`), and on granian's RSGI interface
    when granian is installed: what each HTTP path alone allows."""
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    if not args.ceiling:
        yield procs
        return
    commands = {name: [sys.executable, "-m", "bench.serve_bare", f"bench.bare_app:{factory}", "--host",
                       "127.0.0.1", "--workers", str(args.workers), "--port"]
                for name, factory in (("raw-asgi", "create_raw_app"), ("direct", "create_direct_app"),
                                      ("direct-durable", "create_direct_durable_app"),
                                      ("durable-room", "create_direct_durable_app"),
                                      ("durable-thread", "create_direct_durable_app"))}
    if importlib.util.find_spec("granian") is not None:
        # single-threaded runtime: measured faster than the default on 2 cores (the Python thread is the bottleneck)
        commands["rsgi"] = [sys.executable, "-m", "granian", "--interface", "rsgi", "--workers", str(args.workers),
                            "--runtime-mode", "st", "--loop", "uvloop", "--no-log", "--host", "127.0.0.1", "--port"]
    else:
        print("  (granian not installed: pip install granian for the RSGI ceiling)")
    try:
        for name, cmd in commands.items():
            port = free_port()
            extra_env = {"durable-thread": {"BENCH_FSYNC_THREAD": "1"},
                         "durable-room": {"BENCH_ROOM_BYTES": str(ROOM_BYTES),
                                          "BENCH_DURABLE_DIR": str(tmp / "durable-room")}}.get(name, {})
            proc = subprocess.Popen([*cmd, str(port), *(["bench.bare_app:rsgi_app"] if name == "rsgi" else [])],
                                    env={**env, **extra_env},
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"))
            procs[name] = (proc, f"http://127.0.0.1:{port}")
            wait_ready(procs[name][1], proc)
        yield procs
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def peer_main(args: argparse.Namespace) -> None:
    """`--peer node-sdk`: filefeed (every row fsynced before its answer) against the official SDK's batched feed
    (nothing durable, Node's cluster on every core), the same wrk load and fresh identifiers, rounds alternated."""
    tmp, script, env = setup()
    acknowledged = sent_runs = 0
    print(f"before: {load_average()}")
    with filefeed_and_peer(args.peer, env, args.workers, tmp, tmp / "delivery", IDENTIFIER_TYPES) as procs, \
            ceilings(args, env, tmp) as extra:
        procs.update(extra)
        for name, (_, url) in procs.items():
            warm = run_wrk(url, 3, args.connections, args.wrk_threads, script)
            if name == "filefeed":
                acknowledged += warm["requests"] - warm["status_errors"]
                sent_runs += 1
        rounds: list[dict[str, dict[str, float]]] = []
        for i in range(args.rounds):
            rnd = {}
            order = list(procs) if i % 2 == 0 else list(procs)[::-1]  # alternate who goes first
            for name in order:
                proc, url = procs[name]
                cpu = tree_cpu_seconds(proc.pid)
                r = run_wrk(url, args.seconds, args.connections, args.wrk_threads, script)
                r["cpu_us"] = (tree_cpu_seconds(proc.pid) - cpu) / max(1, r["requests"]) * 1e6
                rnd[name] = r
                if name == "filefeed":
                    acknowledged += r["requests"] - r["status_errors"]
                    sent_runs += 1
            rounds.append(rnd)
        rss = {name: tree_rss_mb(p.pid) for name, (p, _) in procs.items()}
    print(f"ingest: user_segment_update, 2 identifiers, filefeed {args.workers} workers (every row fsynced before its "
          f"answer) vs {args.peer} (Node cluster, {os.cpu_count()} workers, nothing durable), wrk -c{args.connections} "
          f"-t{args.wrk_threads}, {args.rounds} alternated rounds of {args.seconds}s, new identifiers every request")
    for i, rnd in enumerate(rounds, 1):
        for name, r in rnd.items():
            print(f"  round {i} {name:9s} {r['rps']:9,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                  f"  server CPU {r['cpu_us']:5.0f} us/req  wrk CPU {r['client_cpu_us']:4.0f} us/req  "
                  f"errors {r['errors'] + r['status_errors']}")
        print(f"  round {i} ratio to {args.peer}: " + ", ".join(
            f"{n} {rnd[n]['rps'] / rnd[args.peer]['rps']:.2f}" for n in rnd if n != args.peer))
    total = {n: sum(r[n]["requests"] for r in rounds) / (args.seconds * len(rounds)) for n in procs}
    ratio = total["filefeed"] / total[args.peer]
    print(f"  overall   filefeed {total['filefeed']:,.0f} req/s, {args.peer} {total[args.peer]:,.0f} req/s, ratio "
          f"{ratio:.2f}  (target >= 4.0: {'ok' if ratio >= 4.0 else 'NOT MET'})")
    for name in [n for n in procs if n in CEILINGS]:
        what = {"direct-durable": "parse the body, group-committed write + fsync, answer a constant",
                "durable-room": "the same into a file pre-written once at start, overwritten in place",
                "durable-thread": "the same, the write + fsync pipelined on a thread of their own"}.get(
                    name, "parse the body, answer a constant, nothing durable")
        print(f"  ceiling   {name} ({what}) {total[name]:,.0f} req/s: "
              f"{total[name] / total[args.peer]:.2f}x {args.peer}; filefeed reaches {total['filefeed'] / total[name]:.2f}"
              " of it")
    print_budget(rounds, total, args.peer)
    print("  RSS at the end: " + ", ".join(f"{n} {v:.0f} MB" for n, v in rss.items()))
    check_staged(tmp / "staging", acknowledged, args.connections * sent_runs, "filefeed")
    print(f"after: {load_average()}")
    shutil.rmtree(tmp, ignore_errors=True)


def print_budget(rounds: list[dict[str, dict[str, float]]], total: dict[str, float], peer_name: str) -> None:
    """What 4.0x the peer leaves each request on this machine: wrk and the server share its cores, so at that rate
    the server may spend the cores' CPU per request less wrk's own (measured against filefeed)."""
    cores = os.cpu_count() or 1
    target = 4.0 * total[peer_name]
    budget = cores * 1e6 / target
    wrk = sum(rnd["filefeed"]["client_cpu_us"] for rnd in rounds) / len(rounds)
    spent = {n: sum(rnd[n]["cpu_us"] for rnd in rounds) / len(rounds) for n in rounds[0]}
    busy = {n: sum(rnd[n]["rps"] * (rnd[n]["cpu_us"] + rnd[n]["client_cpu_us"]) for rnd in rounds) / len(rounds) / 1e6
            for n in rounds[0]}
    print(f"  budget    4.0x is {target:,.0f} req/s: {budget:.0f} us of CPU per request on {cores} cores; wrk takes "
          f"{wrk:.0f}, which leaves the server {budget - wrk:.0f} us. Server CPU per request: "
          + ", ".join(f"{n} {v:.0f} us" for n, v in spent.items()))
    print("  cores     busy with server + wrk (of " + f"{cores}): " + ", ".join(f"{n} {v:.2f}" for n, v in busy.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=None, help="wrk connections (default 64; 32 with --peer)")
    ap.add_argument("--wrk-threads", type=int, default=None, help="wrk threads (default 1; 2 with --peer)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--soak", type=int, default=0, help="extra seconds of load reporting RSS (300 = 5 minutes)")
    ap.add_argument("--peer", choices=peer.PEERS, help="filefeed against this peer instead of the bare baselines")
    ap.add_argument("--ceiling", action="store_true", help="with --peer: also a parse-and-constant endpoint on "
                    "filefeed's server (raw ASGI) and on granian's RSGI, in the same rounds")
    ap.add_argument("--feeds", help="comma-separated feed counts: ingest spread over N feeds (see run_feeds)")
    ap.add_argument("--repo", help="with --feeds: run the server from this checkout (default: this one)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk (scripts/install.sh does)")
    if args.peer:
        args.connections = args.connections or 32
        args.wrk_threads = args.wrk_threads or 2
        peer_main(args)
        return
    args.connections = args.connections or 64
    args.wrk_threads = args.wrk_threads or 1
    if args.feeds:
        run_feeds(args)
        return
    tmp, script, env = setup()
    servers = {
        "bare": [sys.executable, "-m", "bench.serve_bare", "bench.bare_app:create_app"],
        "durable": [sys.executable, "-m", "bench.serve_bare", "bench.bare_app:create_durable_app"],
        "filefeed": [sys.executable, "-m", "filefeed", "serve"],
    }
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    acknowledged = 0
    sent_runs = 0
    try:
        for name, cmd in servers.items():
            port = free_port()
            full = cmd + ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
            proc = subprocess.Popen(full, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=open(tmp / f"{name}.log", "wb"))
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            warm = run_wrk(url, 3, args.connections, args.wrk_threads, script)
            if name == "filefeed":
                acknowledged += warm["requests"] - warm["status_errors"]
                sent_runs += 1
            procs[name] = (proc, url)
        rss_start = {name: tree_rss_mb(p.pid) for name, (p, _) in procs.items()}
        rounds: list[dict[str, dict[str, float]]] = []
        for _ in range(args.rounds):  # interleaved, so a noisy neighbour hurts both sides alike
            rnd = {}
            for name, (_proc, url) in procs.items():
                r = run_wrk(url, args.seconds, args.connections, args.wrk_threads, script)
                rnd[name] = r
                if name == "filefeed":
                    acknowledged += r["requests"] - r["status_errors"]
                    sent_runs += 1
            rounds.append(rnd)
        soak: list[int] = []
        if args.soak:
            proc, url = procs["filefeed"]
            for _ in range(max(1, args.soak // 30)):
                r = run_wrk(url, 30, args.connections, args.wrk_threads, script)
                acknowledged += r["requests"] - r["status_errors"]
                sent_runs += 1
                soak.append(round(tree_rss_mb(proc.pid)))
        rss_end = {name: tree_rss_mb(p.pid) for name, (p, _) in procs.items()}
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"ingest: user_segment_update, 2 identifiers, {args.workers} workers, wrk -c{args.connections} "
          f"-t{args.wrk_threads}, {args.rounds} interleaved rounds of {args.seconds}s, same machine")
    ratios = []
    for i, rnd in enumerate(rounds, 1):
        for name, r in rnd.items():
            print(f"  round {i} {name:9s} {r['rps']:9,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                  f"  errors {r['errors'] + r['status_errors']}")
        ratios.append(rnd["filefeed"]["rps"] / rnd["bare"]["rps"])
        ceiling = rnd["durable"]["rps"] / rnd["bare"]["rps"]
        print(f"  round {i} ratio filefeed/bare: {ratios[-1]:.2f}   (durable/bare {ceiling:.2f}, "
              f"filefeed/durable {rnd['filefeed']['rps'] / rnd['durable']['rps']:.2f})")
    total = {n: sum(r[n]["requests"] for r in rounds) / (args.seconds * len(rounds)) for n in servers}
    print(f"  overall   bare {total['bare']:,.0f} req/s, filefeed {total['filefeed']:,.0f} req/s, ratio "
          f"{total['filefeed'] / total['bare']:.2f}  (targets: filefeed >= 6,000 req/s and >= 0.60 of bare)")
    print(f"            durable baseline {total['durable']:,.0f} req/s: ceiling {total['durable'] / total['bare']:.2f} "
          f"of bare; filefeed reaches {total['filefeed'] / total['durable']:.2f} of it")
    for name in servers:
        print(f"  RSS {name}: {rss_start[name]:.0f} MB -> {rss_end[name]:.0f} MB"
              + (f"; during the soak, every 30 s: {soak}" if soak and name == "filefeed" else ""))
    check_staged(tmp / "staging", acknowledged, args.connections * sent_runs)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
