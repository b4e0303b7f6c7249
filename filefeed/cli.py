"""The `filefeed` command line: serve, flush, status, inspect, retry, verify, simulate, demo.

Every command reads the same settings as the server (FILEFEED_STAGING_DIR, FILEFEED_FEEDS, the platform variables)
and is safe to run while the server runs: rolls take the partition's lease, reads never take one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from filefeed import db_cli, ops_cli, verify_cli  # noqa: F401  - they register status, inspect, flush, retry, verify, db
from filefeed.cli_base import EXIT_ENVIRONMENT, OperatorError, app, err, main, out, plural, print_json
from filefeed.cli_base import settings as load_checked_settings

__all__ = ["app", "main"]


@app.command()
def serve(
    workers: int = typer.Option(None, help="worker processes (default FILEFEED_WORKERS or 1)"),
    host: str = typer.Option(None, help="bind address (default FILEFEED_HOST, 0.0.0.0)"),
    port: int = typer.Option(None, help="port (default PLUGIN_PORT, 8080)"),
) -> None:
    """Run the plugin HTTP server."""
    settings = load_checked_settings(write=True, shared=True)  # schema upgraded once, before any worker starts
    from pipeline import shared

    shared.forget(settings.staging_dir)  # the workers open their own pools
    import uvicorn

    from filefeed import logs, metrics

    logs.start_run(settings.staging_dir)
    logs.configure(settings.log_level, settings.staging_dir)
    _warn_broken_feeds(settings)
    metrics.prepare_multiprocess_dir(settings.staging_dir)
    from filefeed import server

    server.run(
        uvicorn.Config(
            "filefeed.app:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers or settings.workers,
            loop="uvloop",
            http=server.HTTP_PROTOCOL,
            access_log=False,
            # nothing reads the client's address, and uvicorn's X-Forwarded-* middleware costs every request a call
            proxy_headers=False,
            log_config=None,
            timeout_graceful_shutdown=10,
            timeout_keep_alive=settings.keep_alive_seconds,
        )
    )


def _warn_broken_feeds(settings) -> None:
    """Embedded mode: a feed whose properties are invalid is told now, once per problem; its calls answer an error
    naming the same problems until the file is fixed (the others are served)."""
    if settings.feeds is None:
        return
    from filefeed.context import EmbeddedContextSource

    log = logging.getLogger("filefeed")
    for feed_id, ctx in EmbeddedContextSource(settings.feeds).check_all().items():
        for problem in ctx.error.problems if ctx.error else []:
            log.warning("feed %s in %s: %s; its calls answer an error until the file is fixed", feed_id,
                        settings.feeds, problem, extra={"feed_id": feed_id})


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8080", help="base URL of a running filefeed"),
    users: int = typer.Option(1000, help="user_segment_update calls (one user each)"),
    delete_ratio: float = typer.Option(0.0, min=0.0, max=1.0, help="share of DELETE operations"),
    batch_size: int = typer.Option(1000, min=1, help="items per batch_update (the platform's batch_flush_max_size)"),
    feed_id: str = typer.Option("42"),
    segment_id: str = typer.Option("451256"),
    concurrency: int = typer.Option(32, min=1, max=256),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Play the platform against a running filefeed: creation, connection, updates, batches."""
    report = _simulate(url, "user_segment_update", as_json, feed_id=feed_id, segment_id=segment_id, users=users,
                       delete_ratio=delete_ratio, batch_size=batch_size, concurrency=concurrency)
    data = report.as_dict()
    if as_json:
        print_json(data)
    else:
        table = Table(title="simulation", show_header=False)
        for k, v in data.items():
            table.add_row(k, str(v))
        out.print(table)
    if report.errors or report.creation.get("status") != "ok":
        raise typer.Exit(1)


def _simulate(url: str, label: str, quiet: bool, **kw):
    """Run the simulation with a progress bar; a URL where no filefeed answers is one line, exit 3."""
    from filefeed.simulate import NoPlugin
    from filefeed.simulate import simulate as run

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=quiet) as progress:
        task = progress.add_task(label, total=kw["users"])
        try:
            return asyncio.run(run(url, progress=lambda n: progress.advance(task, n), **kw))
        except NoPlugin as e:
            raise OperatorError(f"filefeed simulate: {e}; start one with `filefeed serve` or pass --url",
                                code=EXIT_ENVIRONMENT) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log_path: Path, lines: int = 5) -> list[str]:
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []
    return [f"  {line}" for line in tail] + [f"  (the whole log: {log_path})"]


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise OperatorError(f"filefeed demo: the server exited with code {proc.returncode} before it was ready",
                                *_log_tail(log_path), code=EXIT_ENVIRONMENT)
        try:
            if httpx.get(f"{url}/v1/status", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise OperatorError(f"filefeed demo: the server did not answer {url} within {timeout:.0f} s",
                        *_log_tail(log_path), code=EXIT_ENVIRONMENT)


@app.command()
def demo(
    users: int = typer.Option(10_000, help="users to simulate"),
    delete_ratio: float = typer.Option(0.1, min=0.0, max=1.0),
    batch_size: int = typer.Option(2_000, min=1),
    workers: int = typer.Option(2, min=1),
) -> None:
    """The whole job on the embedded default: serve config/feeds.toml, simulate the platform, show the files.

    It stages where every command looks by default (FILEFEED_STAGING_DIR, else ./var), so `filefeed status` right
    after shows the demo's partitions; it prints the environment to reuse for the other commands."""
    from filefeed.cli_base import check_staging_dir

    env = dict(os.environ)
    env.setdefault("FILEFEED_FEEDS", str(Path(__file__).resolve().parent.parent / "config" / "feeds.toml"))
    env.setdefault("FILEFEED_STAGING_DIR", "var")  # the settings' default, as the other commands read it
    staging = Path(env["FILEFEED_STAGING_DIR"])
    check_staging_dir(staging, write=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = staging / "serve.log"
    out.print(f"[bold]filefeed demo[/bold]: feeds {env['FILEFEED_FEEDS']}, staging {staging.resolve()}, "
              f"server {url} ({workers} workers, log {log_path})")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers)], env=env, stdout=logf, stderr=logf)
    try:
        _wait_ready(url, proc, log_path)
        report = _simulate(url, "platform -> filefeed", False, users=users, delete_ratio=delete_ratio,
                           batch_size=batch_size)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    data = report.as_dict()
    rate = users / report.seconds if report.seconds else 0
    out.print(f"{users:,} users in {report.seconds:.1f} s ({rate:,.0f} updates/s); "
              f"{report.items:,} rows; {plural(report.batches, 'batch_update call')}: "
              f"sent_items_in_success={report.sent_items_in_success} "
              f"sent_items_in_error={report.sent_items_in_error}; answers {data['batch_answers']}")
    os.environ.update({k: env[k] for k in ("FILEFEED_FEEDS", "FILEFEED_STAGING_DIR")})
    ops_cli.status(feed=None, wide=False, as_json=False)
    _show_delivered(Path(env["FILEFEED_FEEDS"]))
    reuse = f"FILEFEED_FEEDS={env['FILEFEED_FEEDS']}"
    if staging.resolve() != Path("var").resolve():
        reuse += f" FILEFEED_STAGING_DIR={staging.resolve()}"
    out.print(f"the other commands, on the demo's data: {reuse} filefeed status (or flush, inspect, verify)")
    if report.errors or report.sent_items_in_success != report.items:
        err.print(f"[red]demo incomplete: {report.errors[:3]}[/red]")
        raise typer.Exit(1)


SHOWN_FILES = 10


def _show_delivered(feeds_file: Path) -> None:
    from config.feed import parse_destination
    from filefeed.context import load_embedded_feeds

    for feed_id, table in load_embedded_feeds(feeds_file).items():
        dest = parse_destination(table["destination_uri"])
        if dest.scheme != "file":
            continue
        files = sorted(p for p in Path(dest.path).rglob("*") if p.is_file() and not p.name.startswith("."))
        shown = files[-SHOWN_FILES:]
        out.print(f"feed {feed_id}: {plural(len(files), 'file')} in {dest.path}"
                  + (f", the last {len(shown)}:" if len(shown) < len(files) else ":"))
        for p in shown:
            out.print(f"  {p.relative_to(dest.path)}  {p.stat().st_size:,} B")
        data_files = [p for p in files if not p.name.endswith(".manifest.json")]
        if data_files:
            out.print(f"  (see one: filefeed inspect {data_files[-1]})")


if __name__ == "__main__":
    main()
