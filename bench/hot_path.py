"""CPU per request of the hot route itself, without HTTP: `user_segment_update`'s `FeedEndpoint.serve` driven in
process the way filefeed/hotpath.py's protocol drives it, every row staged and fsynced before its answer.

    python bench/hot_path.py [--rounds 4] [--requests 48000] [--window 16]           # disk against tmpfs
    python bench/hot_path.py --against PATH [--rounds 4] [--staging DIR]              # this checkout against another
    python bench/hot_path.py --profile 30                                             # cProfile of one side

wrk's req/s on 2 shared cores moves 10-20 % between runs and mixes the HTTP stack in; this figure is the hot route's
own cost, so it is the one to A/B a change of the hot path with. Each side runs in a process of its own (a fresh
interpreter, a fresh staging folder on feed 42), one per round, sides alternated: it serves `--requests` new
2-identifier updates, `--window` of them in flight at a time (what one worker holds under bench/ingest.py's load of
32 connections on 2 workers), on uvloop as `filefeed serve` runs, after a warm-up, and reports its process CPU and
wall time per request. The baseline is the same code staging on tmpfs (`/dev/shm`: the disk's fsync costs nothing
there), or with `--against` another checkout staging on the same volume. The ratio is baseline/this on CPU per
request (above 1: this side is cheaper). `--profile N` prints the N costliest functions of one round under
cProfile instead (its overhead inflates small calls).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BODY = ('{"feed_id":"42","session_id":"1717494873","datamart_id":"1023","segment_id":"451256",'
        '"ts":1717494873000,"operation":"UPSERT","user_identifiers":['
        '{"type":"USER_POINT","user_point_id":"26340584-f777-404c-%04x-%012x","creation_ts":1493118667529},'
        '{"type":"USER_EMAIL","hash":"ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad%04x%012x",'
        '"creation_ts":1493118667529,"last_activity_ts":1717494873000,"providers":[]}],"user_profiles":[]}')
RESULT = re.compile(r"RESULT cpu_us=([\d.]+) wall_us=([\d.]+) code=(\S+)")


class Exchange:
    """Stands in for filefeed.hotpath.Exchange: keeps the answer's status and wakes the driver."""

    __slots__ = ("done", "status", "tasks")

    def __init__(self, done: asyncio.Future, tasks: set) -> None:
        self.done = done
        self.status = 0
        self.tasks = tasks

    def respond(self, response) -> None:
        self.status = response.status_code
        self.done.set_result(response.body)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def serve_round(endpoint, plugin, run: int, requests: int, window: int) -> tuple[float, float]:
    """Serve `requests` new updates, `window` in flight; (CPU seconds, wall seconds). Every answer must be 200."""
    loop = asyncio.get_running_loop()
    tasks: set = set()
    bodies = [(BODY % (run, i, run, i)).encode() for i in range(requests)]
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, requests, window):
        exchanges = [Exchange(loop.create_future(), tasks) for _ in range(min(window, requests - start))]
        for body, exchange in zip(bodies[start:start + window], exchanges, strict=True):
            endpoint.serve(plugin, body, exchange)
        await asyncio.gather(*(e.done for e in exchanges))
        bad = [e.status for e in exchanges if e.status != 200]
        if bad:
            raise SystemExit(f"hot_path: answers {bad[:3]} instead of 200: see the staging folder's log")
    return time.process_time() - cpu, time.perf_counter() - wall


async def child_async(args: argparse.Namespace) -> None:
    import filefeed
    from filefeed.app import create_app

    app = create_app()
    endpoint = app.direct_routes[b"/v1/user_segment_update"]
    async with app.app.router.lifespan_context(app.app):
        plugin = app.state.plugin
        await serve_round(endpoint, plugin, 0, min(args.requests, 8000), args.window)  # warm-up: journals, caches
        profile = cProfile.Profile() if args.profile else None
        if profile:
            profile.enable()
        cpu, wall = await serve_round(endpoint, plugin, 1, args.requests, args.window)
        if profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
        print(f"RESULT cpu_us={cpu / args.requests * 1e6:.2f} wall_us={wall / args.requests * 1e6:.2f} "
              f"code={Path(filefeed.__file__).parent.parent}", flush=True)


def child(args: argparse.Namespace) -> None:
    """One side of one round, in this process: a temp staging folder under --staging, feed 42 embedded."""
    sys.path.insert(0, str(args.repo.resolve()))
    tmp = Path(tempfile.mkdtemp(prefix="filefeed-bench-hot-", dir=args.staging))
    try:
        delivery = tmp / "delivery"
        delivery.mkdir()
        feeds = tmp / "feeds.toml"
        feeds.write_text(f'[feeds.42]\ndestination_uri = "{delivery.as_uri()}"\n'
                         'identifier_types = "USER_EMAIL,USER_POINT"\nmax_buffer_age_seconds = 86400\n')
        for key in [k for k in os.environ if k.startswith(("FILEFEED_", "PLUGIN_"))]:
            del os.environ[key]
        os.environ.update({"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp / "staging"),
                           "FILEFEED_MIN_FREE_BYTES": "0", "FILEFEED_LOG_LEVEL": "WARN",
                           "FILEFEED_FLUSH_CHECK_SECONDS": "3600"})
        import uvloop

        uvloop.run(child_async(args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_side(repo: Path, staging: Path, args: argparse.Namespace) -> tuple[float, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--repo", str(repo), "--staging", str(staging),
           "--requests", str(args.requests), "--window", str(args.window)]
    # the side's own checkout first on the path, whatever is installed; run from a neutral folder
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tempfile.gettempdir())
    m = RESULT.search(out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"hot_path: the {repo} side failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    if Path(m.group(3)).resolve() != repo.resolve():
        raise SystemExit(f"hot_path: the {repo} side imported filefeed from {m.group(3)}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--staging", type=Path, default=Path(tempfile.gettempdir()),
                        help="the volume this checkout stages on (a temp folder in it per side)")
    parser.add_argument("--against", type=Path, help="another checkout, staging on the same volume")
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--repo", type=Path, default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.profile:
        child(args)
        return
    this = ("this", ROOT, args.staging)
    base = ("against", args.against, args.staging) if args.against else ("tmpfs", ROOT, Path("/dev/shm"))
    if not base[2].is_dir():
        raise SystemExit(f"hot_path: {base[2]} is not a folder: give --against PATH")
    print(f"hot path: user_segment_update served in process ({args.requests:,} new 2-identifier updates per side "
          f"and round, {args.window} in flight, every row fsynced before its answer); this checkout staging in "
          f"{args.staging} against {'checkout ' + str(args.against) if args.against else 'itself staging on tmpfs'}"
          f", {args.rounds} rounds, sides alternated", flush=True)
    figures: dict[str, list[tuple[float, float]]] = {this[0]: [], base[0]: []}
    for i in range(args.rounds):
        for name, repo, staging in (this, base) if i % 2 == 0 else (base, this):
            cpu, wall = run_side(repo, staging, args)
            figures[name].append((cpu, wall))
            print(f"  round {i + 1} {name:8s} {cpu:6.1f} us CPU  {wall:6.1f} us wall per request", flush=True)
    cpu = {n: statistics.median(c for c, _ in f) for n, f in figures.items()}
    best = {n: min(c for c, _ in f) for n, f in figures.items()}
    print(f"  median    this {cpu['this']:.1f} us CPU per request, {base[0]} {cpu[base[0]]:.1f}: ratio "
          f"{cpu[base[0]] / cpu['this']:.2f}; best rounds {best['this']:.1f} and {best[base[0]]:.1f}: "
          f"{best[base[0]] / best['this']:.2f}")


if __name__ == "__main__":
    main()
